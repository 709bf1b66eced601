"""The config reference in ``docs/config.md``, generated from the schema."""

from __future__ import annotations

import json
import re
import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types
from pydantic import (
    BaseModel,
)
from pydantic.fields import FieldInfo

from medtl.config._memory import MAX_CONFIG_BYTES, MAX_YAML_NODES
from medtl.config._rules import rule_descriptions
from medtl.config._schema import Config, _alternatives, _models_in

# -- the reference in docs/config.md -------------------------------------------------------
_REGENERATE = ('python -c "from medtl.config import config_reference_markdown; '
               'print(config_reference_markdown())" > docs/config.md')
_BOUNDS = ((annotated_types.Gt, "gt", ">"), (annotated_types.Ge, "ge", ">="), (annotated_types.Lt, "lt", "<"),
           (annotated_types.Le, "le", "<="))


def _constraints(metadata: list) -> str:
    out = []
    for m in metadata:
        if isinstance(m, FieldInfo):  # Annotated[float, Field(gt=0)]
            out.append(_constraints(m.metadata))
            continue
        for cls, attr, sign in _BOUNDS:
            if isinstance(m, cls):
                out.append(f"{sign} {getattr(m, attr)}")
        if isinstance(m, annotated_types.MinLen):
            out.append(f"at least {m.min_length} item{'s' if m.min_length > 1 else ''}")
    return ", ".join(o for o in out if o)


def _type_text(ann: Any, metadata: list | None = None) -> str:
    """A short, Markdown-safe description of a field's type, e.g. ``one of `a`, `b` or null``."""
    nullable = get_origin(ann) in (Union, types.UnionType) and type(None) in get_args(ann)
    if get_origin(ann) is Annotated:
        base, *meta = get_args(ann)
        return _type_text(base, [*meta, *(metadata or [])])
    alts = _alternatives(ann)
    literals = [v for a in alts if get_origin(a) is Literal for v in get_args(a)]
    parts = []
    if literals:
        parts.append("one of " + ", ".join(f"`{v}`" for v in literals))
    for a in alts:
        origin = get_origin(a)
        if origin is Literal:
            continue
        if isinstance(a, type) and issubclass(a, BaseModel):
            parts.append("section" if len(alts) == 1 else "{" + ", ".join(a.model_fields) + "}")
        elif origin is list:
            parts.append(f"list of {_type_text(get_args(a)[0])}")
        elif origin is dict:
            k, v = get_args(a)
            parts.append(f"mapping of {_type_text(k)} to {_type_text(v)}")
        else:
            parts.append(getattr(a, "__name__", str(a)))
    text = " or ".join(parts)
    bounds = _constraints(metadata or [])
    if bounds:
        text = f"{text} ({bounds})"
    return f"{text} or null" if nullable else text


def _default_text(field) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "see below"
    if isinstance(value, str):
        return f"`{value}`"
    return f"`{json.dumps(value)}`"


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _summary(model: type[BaseModel]) -> str:
    """The first paragraph of a section's docstring, on one line."""
    doc = (model.__doc__ or "").strip().split("\n\n")[0]
    doc = re.sub(r":\w+:`", "`", doc)  # Sphinx roles (:mod:`x`) read as plain code in Markdown
    return " ".join(doc.split()).replace("``", "`")


def _section_tables(model: type[BaseModel], prefix: str) -> list[str]:
    """The table of one section (``prefix`` ``""``: the top level), then its subsections' tables."""
    title = f"`{prefix.rstrip('.')}`" if prefix else "Top level"
    lines = [f"## {title}", "", _summary(model), "",
             "| key | type / choices | default | meaning |", "|---|---|---|---|"]
    below = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        subs = _models_in(field.annotation)
        if subs:
            lines.append(f"| `{key}` | {_cell(_type_text(field.annotation))} | {_cell(_default_text(field))} | "
                         f"{_cell(field.description or '')}; keys in `{key}` below |")
            below += _section_tables(subs[0], f"{key}.")
        else:
            lines.append(f"| `{key}` | {_cell(_type_text(field.annotation, field.metadata))} | "
                         f"{_cell(_default_text(field))} | {_cell(field.description or '')} |")
    return [*lines, "", *below]


def config_reference_markdown() -> str:
    """The Markdown reference of every config key (``docs/config.md``), generated from the schema.

    The rules checked across keys when a config is loaded (``rule_descriptions()``), then one
    table per section: key, type or choices (with bounds), default, and meaning (the field's
    ``description``; the section's docstring above its table).

    Example:
        >>> "| `train.epochs` |" in config_reference_markdown()
        True
    """
    lines = [
        "# Config reference",
        "",
        "<!-- Generated from the schema in medtl/config/ by medtl.config.config_reference_markdown(). "
        "Do not edit by hand. -->",
        "",
        "This file is generated from the pydantic models in `medtl/config/_schema.py`; do not edit it by hand. "
        "After changing the schema, regenerate it with",
        "",
        "```bash",
        _REGENERATE,
        "```",
        "",
        "(`tests/test_config_docs.py` fails while this file and the schema disagree.) A config is a YAML "
        "file; every key can also be set with `--set dotted.key=value` (the value is parsed as YAML). "
        "Unknown keys are errors, with the valid keys of their section and a did-you-mean. A config file is UTF-8 "
        f"text of at most {MAX_CONFIG_BYTES >> 20} MiB holding at most {MAX_YAML_NODES} "
        "values once YAML aliases are expanded (an alias bomb is refused before it is built), and no number may "
        "be NaN or infinite.",
        "",
        "## Rules checked when a config is loaded",
        "",
        "Besides each key's type and bounds, `load_config` checks these rules across keys and reports "
        "every broken one at once:",
        "",
        *[f"- {text}" for text in rule_descriptions()],
        "",
    ]
    lines += _section_tables(Config, "")
    return "\n".join(lines).rstrip() + "\n"
