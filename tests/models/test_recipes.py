"""Weight records carry a measured fine-tuning recipe; load_config fills the keys a config leaves unset."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from medtl.config import config_yaml, load_config
from medtl.models import _registry
from medtl.models._registry import Recipe, WeightRecord, get_record, register

RECIPE = Recipe({"train.lr": 3e-4, "train.scheduler": "onecycle", "train.strategy.name": "llrd",
                 "train.strategy.llrd_decay": 0.8}, evidence="test figure")


@pytest.fixture()
def recipe_record(monkeypatch: pytest.MonkeyPatch) -> WeightRecord:
    base = get_record("tf_efficientnet_lite0.in1k")
    rec = dataclasses.replace(base, name="tf_efficientnet_lite0.recipe_test", tags=(), recipe=RECIPE)
    monkeypatch.setitem(_registry._REGISTRY, rec.name, rec)
    monkeypatch.setitem(_registry._ALIASES, "recipe_test_alias", rec.name)
    return rec


def _raw(**model: object) -> dict:
    return {"data": {"path": ".", "format": "medmnist"}, "model": {"name": "tf_efficientnet_lite0.recipe_test",
                                                                     **model}}


def test_unset_keys_come_from_the_record(recipe_record: WeightRecord) -> None:
    cfg = load_config(_raw())
    assert cfg.train.lr == 3e-4 and cfg.train.scheduler == "onecycle"
    assert cfg.train.strategy.name == "llrd" and cfg.train.strategy.llrd_decay == 0.8
    assert cfg.recipe_applied["source"] == recipe_record.name
    assert set(cfg.recipe_applied["settings"]) == set(RECIPE.settings) and cfg.recipe_applied["kept"] == []
    by_alias = load_config({**_raw(), "model": {"name": "recipe_test_alias"}})
    assert by_alias.train.lr == 3e-4


def test_the_users_keys_win(recipe_record: WeightRecord) -> None:
    raw = _raw()
    raw["train"] = {"lr": 1e-2, "strategy": {"name": "finetune"}}
    cfg = load_config(raw, ["train.scheduler=cosine"])
    assert cfg.train.lr == 1e-2 and cfg.train.strategy.name == "finetune" and cfg.train.scheduler == "cosine"
    assert cfg.train.strategy.llrd_decay == 0.8  # the one key left unset still comes from the recipe
    assert sorted(cfg.recipe_applied["kept"]) == ["train.lr", "train.scheduler", "train.strategy.name"]


def test_recipe_off_keeps_the_schema_defaults(recipe_record: WeightRecord) -> None:
    cfg = load_config(_raw(recipe=False))
    assert cfg.train.lr == 1e-3 and cfg.train.strategy.name == "finetune" and cfg.recipe_applied == {}
    plain = load_config({"data": {"path": ".", "format": "medmnist"}, "model": {"name": "resnet18"}})
    assert plain.recipe_applied == {}  # a timm name without a record: no recipe


def test_run_config_names_the_recipe_and_reloads_the_same(recipe_record: WeightRecord, tmp_path: Path) -> None:
    cfg = load_config(_raw())
    text = config_yaml(cfg)
    assert text.startswith("# from the recipe of the weight record tf_efficientnet_lite0.recipe_test: train.lr=0.0003")
    path = tmp_path / "config.yaml"
    path.write_text(text)
    again = load_config(path)
    assert again.model_dump(exclude={"data"}) == cfg.model_dump(exclude={"data"})  # data paths made absolute
    assert again.recipe_applied["settings"] == {}  # every key is written out: nothing left to fill
    assert yaml.safe_load(text)["train"]["lr"] == 3e-4


def test_invalid_recipes_are_refused_at_registration() -> None:
    base = get_record("tf_efficientnet_lite0.in1k")
    for bad in ({"train.lr": -1.0}, {"train.no_such_key": 1}, {"train.scheduler": "linear"}):
        with pytest.raises(ValueError, match="not a valid config"):
            register(dataclasses.replace(base, name="bad.recipe", recipe=Recipe(bad)))
    assert "bad.recipe" not in _registry._REGISTRY


def test_shipped_recipes_are_valid_and_documented() -> None:
    from medtl.models import list_records

    with_recipe = [r for r in list_records() if r.recipe is not None]
    for rec in with_recipe:
        rec.recipe.check()
        assert rec.recipe.evidence, f"{rec.name}: a recipe must say what measurement chose it"
        assert rec.to_dict()["recipe"]["settings"] == dict(rec.recipe.settings)
