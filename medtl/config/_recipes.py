"""Training recipes that come with the weights: settings a config leaves unset are filled from them.

A weight record (``medtl.models``) may carry a recipe: dotted config keys and values
(``{"train.lr": 3e-4, "train.strategy.name": "llrd", ...}``) chosen by measurement for those
weights. :func:`medtl.config.load_config` fills every key of the recipe that the YAML file and
the ``--set`` overrides leave out, before validation, so the run's ``config.yaml`` holds the
values used and a key the user writes always wins. ``model.recipe: false`` turns this off.

The config floor does not import the models: ``medtl.models`` registers its lookup here
(:func:`register_recipe_lookup`) when it is imported, as the public API and the CLI do.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["RecipeLookup", "fill_recipe", "register_recipe_lookup"]

#: ``lookup(model_name) -> (source name, {dotted key: value})`` or ``None`` when the name has no recipe
RecipeLookup = Callable[[str], "tuple[str, Mapping[str, Any]] | None"]
_LOOKUPS: list[RecipeLookup] = []
_DEFAULT_MODEL = "tf_efficientnet_lite0"  # ModelConfig.name's default


def register_recipe_lookup(lookup: RecipeLookup) -> None:
    """Add a recipe lookup (``medtl.models`` registers the weight records' recipes)."""
    if lookup not in _LOOKUPS:
        _LOOKUPS.append(lookup)


def fill_recipe(raw: dict) -> tuple[dict, dict[str, Any]]:
    """Fill the recipe keys ``raw`` (a parsed config, overrides applied) leaves out.

    Returns ``(raw, applied)``: ``raw`` is changed in place; ``applied`` is
    ``{"source": record name, "settings": {key: value filled}, "kept": [keys the config set]}``,
    or ``{}`` when there is no recipe (or ``model.recipe`` is false).
    """
    model = raw.get("model") if isinstance(raw.get("model"), dict) else {}
    if model.get("recipe", True) is False:
        return raw, {}
    name = model.get("name", _DEFAULT_MODEL)
    if not isinstance(name, str):
        return raw, {}  # validation names the bad value
    found = None
    for lookup in _LOOKUPS:
        found = lookup(name)
        if found is not None:
            break
    if found is None:
        return raw, {}
    source, settings = found
    filled: dict[str, Any] = {}
    kept: list[str] = []
    for key, value in settings.items():
        node, parts = raw, key.split(".")
        for part in parts[:-1]:
            sub = node.get(part)
            if sub is None:
                sub = node[part] = {}
            if not isinstance(sub, dict):  # e.g. a section given as a bad scalar: validation says so
                node = None
                break
            node = sub
        if node is None:
            continue
        if parts[-1] in node:
            kept.append(key)
        else:
            node[parts[-1]] = value
            filled[key] = value
    return raw, {"source": source, "settings": filled, "kept": kept}
