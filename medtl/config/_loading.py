"""Loading a config: YAML read safely (size and alias limits), ``--set`` overrides, error messages, hashing."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    ValidationError,
)

from medtl.config._memory import MAX_CONFIG_BYTES, MAX_YAML_NODES, format_bytes
from medtl.config._recipes import fill_recipe
from medtl.config._schema import _SECTIONS, Config, _section_at
from medtl.errors import ConfigError, did_you_mean


def apply_overrides(raw: dict, overrides: list[str] | None) -> dict:
    """Apply ``a.b=c`` overrides to a raw config dict; values are parsed as YAML."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"Override '{item}' is not of the form key.path=value, e.g. train.epochs=5.")
        key, _, value = item.partition("=")
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise ConfigError(f"Override '{item}' has an empty key.")
        node = raw
        for depth, part in enumerate(parts[:-1]):
            sub = node.get(part)
            if sub is None:
                sub = node[part] = {}
            if not isinstance(sub, dict):
                raise ConfigError(f"Override '{item}': '{'.'.join(parts[:depth + 1])}' is a value, not a section.")
            node = sub
        try:
            node[parts[-1]] = _load_yaml(value) if value.strip() else ""
        except (yaml.YAMLError, _YamlTooLarge) as exc:
            raise ConfigError(f"Override '{_clip(item, 120)}': cannot parse value {_clip(value)!r} ({exc}).") from None
    return raw


class _YamlTooLarge(ValueError):
    """A YAML document over the node limit (an alias bomb) or nested too deeply."""


def _clip(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _expanded_nodes(root: yaml.Node, limit: int) -> int:
    """How many nodes ``root`` holds with every alias expanded, counting shared nodes once per use.

    Linear in the composed document (sizes of shared nodes are memoised), so a "billion laughs"
    alias bomb is measured without being expanded. Raises :class:`_YamlTooLarge` past ``limit``
    or on a node that contains itself.
    """
    sizes: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            on_path.discard(key)
            children = _children(node)
            total = 1 + sum(sizes[id(c)] for c in children)
            if total > limit:
                raise _YamlTooLarge(f"the document expands to more than {limit} values (through anchors and "
                                    "aliases: a YAML alias bomb?)")
            sizes[key] = total
            continue
        if key in sizes:
            continue
        if key in on_path:
            raise _YamlTooLarge("an alias refers to a node that contains it (a recursive YAML structure)")
        on_path.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in _children(node) if id(c) not in sizes)
    return sizes[id(root)]


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _load_yaml(text: str) -> Any:
    """``yaml.safe_load`` for at most :data:`MAX_YAML_NODES` values, aliases expanded.

    PyYAML shares the node an alias points to, so composing an alias bomb is cheap; what
    explodes is every later walk of the result (validation, hashing, dumping). The composed
    document is measured before any Python object is built.
    """
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_nodes(node, MAX_YAML_NODES)
        return loader.construct_document(node)
    except RecursionError:
        raise _YamlTooLarge("the document is nested too deeply") from None
    finally:
        loader.dispose()


def _read_config_text(path: Path) -> str:
    """The text of a config file: at most :data:`MAX_CONFIG_BYTES`, UTF-8, no NUL bytes."""
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(f"Config file '{path}' is {format_bytes(size)}; a config is at most "
                              f"{MAX_CONFIG_BYTES >> 20} MiB of YAML. Is it the right file? Shipped configs live "
                              "in configs/, e.g. configs/breastmnist.yaml.")
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"Config file '{path}' cannot be read: {exc.strerror or exc}.") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"Config file '{path}' is not a text file: byte 0x{raw[exc.start]:02x} at offset "
                          f"{exc.start} is not UTF-8. Give a YAML config (UTF-8 text), e.g. "
                          "configs/breastmnist.yaml.") from None
    if "\x00" in text:
        raise ConfigError(f"Config file '{path}' is not a text file: it holds NUL bytes (offset "
                          f"{text.index(chr(0))}). Give a YAML config (UTF-8 text), e.g. configs/breastmnist.yaml.")
    return text


def _is_union_tag(part: str | int) -> bool:
    """Pydantic names the member of a union an error came from (``WindowSpec``, ``literal['lung',...]``)."""
    return isinstance(part, str) and (part.startswith("literal[") or any(
        part == m.__name__ for m in _SECTIONS))


def _errors(err: ValidationError) -> list[dict]:
    """``err.errors()`` without the noise of unions such as ``windows: [{center, width} | preset]``:
    pydantic reports why a value fits no member; keep the section's errors for a mapping, else the
    choices' error."""
    errors = err.errors()

    def tag(e: dict) -> tuple[tuple, str | None]:
        for i, part in enumerate(e["loc"]):
            if _is_union_tag(part):
                return tuple(e["loc"][:i]), ("literal" if str(part).startswith("literal[") else "section")
        return tuple(e["loc"]), None

    kinds: dict[tuple, set] = {}
    not_mapping = set()
    for e in errors:
        prefix, kind = tag(e)
        if kind:
            kinds.setdefault(prefix, set()).add(kind)
            if kind == "section" and len(e["loc"]) == len(prefix) + 1:  # the value itself is not a mapping
                not_mapping.add(prefix)
    keep = []
    for e in errors:
        prefix, kind = tag(e)
        if kind and len(kinds[prefix]) > 1 and (kind == "section") == (prefix in not_mapping):
            continue
        keep.append(e)
    return keep


def _format_validation(err: ValidationError, source: str) -> str:
    lines = [f"Invalid config {source}:"]
    for e in _errors(err):
        loc = ".".join(str(p) for p in e["loc"] if not _is_union_tag(p))
        if e["type"] == "config_rule":
            lines += [f"  - {rule}" for rule in e["msg"].splitlines()]
        elif e["type"] == "extra_forbidden":
            model = _section_at(e["loc"][:-1])
            valid = sorted(model.model_fields) if model else []
            hint = did_you_mean(str(e["loc"][-1]), valid)
            listing = f" Valid keys here: {', '.join(valid)}." if valid else ""
            lines.append(f"  - unknown key '{loc}'.{hint}{listing}")
        elif e["type"] == "missing":
            lines.append(f"  - missing required key '{loc}'.")
        else:
            got = e.get("input")
            hint = ""
            if e["type"] == "literal_error" and isinstance(got, str):
                hint = did_you_mean(got, re.findall(r"'([^']*)'", str(e.get("ctx", {}).get("expected", ""))))
            lines.append(f"  - '{loc}': {e['msg']}. Got {got!r}.{hint}")
    lines.append("Fix the YAML file or the --set override named above.")
    return "\n".join(lines)


def load_config(source: str | Path | dict, overrides: list[str] | None = None, *,
                check_dependencies: bool = True) -> Config:
    """Load and validate a config from a YAML file (or a dict), then apply overrides.

    Args:
        source: a YAML file or an already parsed mapping.
        overrides: ``--set`` style ``dotted.key=value`` strings (values parsed as YAML).
        check_dependencies: check what depends on this machine: the optional packages the run
            will use are installed (``tracking: mlflow``), and a batch fits in half the available
            memory when ``data.memory_budget`` is unset. Pass ``False`` when reloading a finished
            run's config only to read it (predict, explain), where tracking does not run.

    Raises:
        ConfigError: naming every unknown key, wrong value and broken rule (``rule_descriptions()``);
            a file that is not UTF-8 text, larger than ``MAX_CONFIG_BYTES``, or whose YAML expands to
            more than ``MAX_YAML_NODES`` values through aliases (or nests too deeply).
    """
    if isinstance(source, dict):
        raw, label = json.loads(json.dumps(source)), "(dict)"
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"Config file '{path}' does not exist. Shipped configs live in configs/, "
                              "e.g. configs/breastmnist.yaml.")
        text = _read_config_text(path)
        try:
            raw = _load_yaml(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"Config file '{path}' is not valid YAML: {exc}") from None
        except _YamlTooLarge as exc:
            raise ConfigError(f"Config file '{path}' is refused: {exc}. A config holds at most {MAX_YAML_NODES} "
                              "values; write the values out instead of nesting aliases.") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"Config file '{path}' must hold a mapping at the top level.")
        label = f"'{path}'"
    raw = apply_overrides(raw, overrides)
    raw, recipe = fill_recipe(raw)  # what the weight record's recipe sets, where the config is silent
    try:
        cfg = Config.model_validate(raw, context={"check_dependencies": check_dependencies})
    except ValidationError as err:
        message = _format_validation(err, label)
        if recipe.get("settings"):
            message += (f"\n(filled from the recipe of '{recipe['source']}': "
                        f"{', '.join(f'{k}={v}' for k, v in recipe['settings'].items())}; set model.recipe: false "
                        "to leave the recipe out)")
        raise ConfigError(message) from None
    cfg._recipe = recipe
    return cfg


def config_yaml(cfg: Config) -> str:
    """The resolved config as YAML text, with the data paths expanded and made absolute.

    A first comment names the weight record whose recipe filled keys of this config, and those keys.
    """
    data = cfg.model_dump(mode="json")
    data["data"]["path"] = str(cfg.resolved_data_path().resolve())
    if cfg.data.labels is not None:
        data["data"]["labels"]["csv"] = str(cfg.resolved_labels_path().resolve())
    text = yaml.safe_dump(data, sort_keys=False)
    recipe = cfg.recipe_applied
    if recipe.get("settings"):
        filled = ", ".join(f"{k}={v}" for k, v in recipe["settings"].items())
        text = f"# from the recipe of the weight record {recipe['source']}: {filled}\n" + text
    return text


def dump_config(cfg: Config, path: str | Path) -> Path:
    """Write the resolved config (:func:`config_yaml`) to ``path``."""
    Path(path).write_text(config_yaml(cfg))
    return Path(path)


def config_hash(cfg: Config) -> str:
    """sha256 of the resolved config (identifies a run's recipe in checkpoints)."""
    blob = json.dumps(cfg.model_dump(mode="json"), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
