"""Typed configs: shipped YAMLs validate, overrides apply, bad keys/types are named."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from medtl.config import config_hash, dump_config, load_config
from medtl.errors import ConfigError

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_validate(path):
    cfg = load_config(path)
    assert cfg.name
    assert cfg.data.path


def test_overrides_apply_and_parse_yaml_values():
    cfg = load_config(CONFIGS[0], ["train.epochs=3", "data.image_size=[64, 64]", "model.pretrained=false"])
    assert cfg.train.epochs == 3 and cfg.data.image_size == [64, 64] and cfg.model.pretrained is False


def test_unknown_key_is_named_with_valid_options_and_suggestion():
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS[0], ["train.epoch=3"])
    msg = str(err.value)
    assert "train.epoch" in msg and "Did you mean 'epochs'" in msg and "batch_size" in msg


def test_wrong_type_is_named():
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS[0], ["train.epochs=many"])
    assert "train.epochs" in str(err.value) and "many" in str(err.value)


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(CONFIGS[0], ["train.epochs"])


def test_missing_file_message():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("nope.yaml")


def test_shared_data_variable_resolves(monkeypatch, tmp_path):
    monkeypatch.setenv("MEDTL_SHARED_DATA", str(tmp_path))
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "breastmnist.yaml")
    assert cfg.resolved_data_path() == tmp_path / "medmnist" / "breastmnist.npz"


def test_dump_roundtrip_and_hash(tmp_path):
    cfg = load_config(CONFIGS[0])
    path = dump_config(cfg, tmp_path / "config.yaml")
    again = load_config(yaml.safe_load(path.read_text()))
    assert again.train == cfg.train
    assert config_hash(cfg) != config_hash(load_config(CONFIGS[0], ["train.lr=0.5"]))
