"""``docs/config.md`` is generated from the config schema, so the two cannot drift apart."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel

from medtl.config import Config, _models_in, config_reference_markdown, rule_descriptions

DOC = Path(__file__).resolve().parents[1] / "docs" / "config.md"
REGENERATE = ('python -c "from medtl.config import config_reference_markdown; print(config_reference_markdown())" '
              "> docs/config.md")


def _sections(model: type[BaseModel] = Config, prefix: str = "") -> list[tuple[str, type[BaseModel]]]:
    out = [(prefix, model)]
    for name, field in model.model_fields.items():
        for sub in _models_in(field.annotation):
            out += _sections(sub, f"{prefix}{name}.")
    return out


def test_docs_config_md_is_the_generated_reference():
    # `print(...) > docs/config.md` adds one newline
    assert DOC.read_text() == config_reference_markdown() + "\n", f"docs/config.md is stale; run {REGENERATE}"


@pytest.mark.parametrize("prefix, model", _sections(), ids=[p or "top" for p, _ in _sections()])
def test_every_key_has_a_meaning_and_a_row(prefix, model):
    text = config_reference_markdown()
    assert (model.__doc__ or "").strip(), f"section {prefix or 'top level'} has no docstring"
    for name, field in model.model_fields.items():
        assert (field.description or "").strip(), f"{prefix}{name} has no Field(description=...)"
        assert f"| `{prefix}{name}` |" in text


def test_every_rule_is_documented():
    text = config_reference_markdown()
    rules = rule_descriptions()
    assert len(rules) >= 12 and all(rules)
    assert all(f"- {r}" in text for r in rules)
