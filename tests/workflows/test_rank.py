"""`medtl rank`: candidates scored without fine-tuning (LogME, LEEP, probe AUC), ranked, written."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medtl.config import load_config
from medtl.data.manifest import Case
from medtl.data.prepare import PreparedData
from medtl.errors import ConfigError
from medtl.workflows import ranking as rank_mod
from medtl.workflows.ranking import parse_candidate
from medtl.workflows import rank as rank_encoders


def _tiny_data(n=40, size=32, official=False) -> PreparedData:
    rng = np.random.default_rng(0)
    y = np.arange(n) % 2
    images = rng.random((n, 1, size, size), dtype=np.float32) * 0.3
    images[y == 1, :, 8:24, 8:24] += 0.6  # a bright square marks class 1
    splits = (["train"] * (n // 2) + ["val"] * (n // 4) + ["test"] * (n - n // 2 - n // 4)) if official else [None] * n
    cases = [Case(case_id=f"c{i}", path=None, label=str(y[i]), patient_id=f"pat{i // 2}", split=splits[i])
             for i in range(n)]
    return PreparedData(images, y.astype(np.int64), cases, ["0", "1"])


def _cfg(tmp_path):
    return load_config({"name": "tiny-rank", "data": {"path": str(tmp_path / "unused.csv"), "image_size": [32, 32]}},
                       ["cv.n_splits=3", "train.batch_size=16"])


def test_rank_two_candidates_writes_json_and_markdown(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDTL_CACHE_DIR", str(tmp_path / "cache"))
    rows = rank_encoders(_cfg(tmp_path), ["tf_efficientnet_lite0", "resnet18:scratch"], out_dir=tmp_path / "r",
                         progress=False, data=_tiny_data())
    assert [r["rank"] for r in rows] == [1, 2]
    assert rows[0]["logme"] >= rows[1]["logme"]  # ranked by LogME
    by = {r["encoder"]: r for r in rows}
    assert set(by) == {"tf_efficientnet_lite0", "resnet18:scratch"}  # a :scratch candidate is the baseline
    assert by["resnet18:scratch"]["baseline"] and not by["tf_efficientnet_lite0"]["baseline"]
    assert by["tf_efficientnet_lite0"]["leep"] < 0 and by["resnet18:scratch"]["leep"] is None
    assert by["tf_efficientnet_lite0"]["feature_dim"] == 1280 and by["resnet18:scratch"]["feature_dim"] == 512
    assert all(0.0 <= r["probe_auc"] <= 1.0 and r["seconds"] >= 0 for r in rows)
    doc = json.loads((tmp_path / "r" / "rank.json").read_text())
    assert doc["ranked_by"] == "logme" and [c["encoder"] for c in doc["candidates"]] == [r["encoder"] for r in rows]
    md = (tmp_path / "r" / "rank.md").read_text()
    assert "| rank | encoder | LogME | LEEP | probe AUC | feature dim | seconds |" in md and "n/a" in md
    assert (tmp_path / "r" / "config.yaml").is_file()
    assert len(list((tmp_path / "cache" / "features").glob("*.npy"))) == 2  # features cached per candidate


def test_auto_baseline_and_official_test_split_held_out(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDTL_CACHE_DIR", str(tmp_path / "cache"))
    cfg = load_config(_cfg(tmp_path).model_dump(mode="json"), ["train.strategy.feature_cache=false"])
    rows = rank_encoders(cfg, ["tf_efficientnet_lite0"], out_dir=tmp_path / "r", progress=False,
                         data=_tiny_data(n=48, official=True))
    assert {r["encoder"] for r in rows} == {"tf_efficientnet_lite0", "tf_efficientnet_lite0:scratch"}
    assert [r["baseline"] for r in rows if r["encoder"].endswith(":scratch")] == [True]
    doc = json.loads((tmp_path / "r" / "rank.json").read_text())
    assert doc["n_cases"] == 36 and "test split held out" in doc["cases_used"]
    assert not (tmp_path / "cache").exists()  # feature_cache=false writes nothing


def test_negative_transfer_warning_when_a_pretrained_encoder_scores_below_random_init(tmp_path, monkeypatch, capsys):
    fake = {"good": 0.5, "bad": -1.0, "arch:scratch": -0.2}

    def fake_score(cfg, spec, name, pretrained, images, y, groups, n_splits, progress, bill):
        return {"encoder": spec, "model": name, "pretrained": pretrained, "weights": name, "logme": fake[spec],
                "leep": None, "probe_auc": 0.6, "feature_dim": 4, "seconds": 0.0}

    monkeypatch.setattr(rank_mod, "_score", fake_score)
    rows = rank_encoders(_cfg(tmp_path), ["good", "bad", "arch:scratch"], out_dir=tmp_path / "r",
                         progress=False, data=_tiny_data())
    assert [r["encoder"] for r in rows] == ["good", "arch:scratch", "bad"]
    warned = {r["encoder"]: r["warning"] for r in rows}
    assert warned["good"] is None and warned["arch:scratch"] is None
    assert "below the random-init baseline arch:scratch" in warned["bad"] and "negative transfer" in warned["bad"]
    assert "negative transfer" in (tmp_path / "r" / "rank.md").read_text()
    assert "negative transfer" in capsys.readouterr().err


def test_candidate_specs():
    assert parse_candidate("tf_efficientnet_lite0") == ("tf_efficientnet_lite0", True)
    assert parse_candidate("resnet18:scratch") == ("resnet18", False)
    assert parse_candidate("resnet18:pretrained") == ("resnet18", True)
    with pytest.raises(ConfigError, match="NAME:scratch"):
        parse_candidate("resnet18:random")
    with pytest.raises(ConfigError, match="non-empty list of encoder specs"):
        rank_encoders(load_config({"data": {"path": "x"}}), [], progress=False)
    with pytest.raises(ConfigError, match="must be distinct"):
        rank_encoders(load_config({"data": {"path": "x"}}), ["a", "a"], progress=False)


def test_multichannel_images_are_ranked_on_every_channel(tmp_path, monkeypatch):
    """Multi-window CT (3 channels) builds 3-channel encoders; the class signal sits in channel 2 only."""
    monkeypatch.setenv("MEDTL_CACHE_DIR", str(tmp_path / "cache"))
    one = _tiny_data()
    rng = np.random.default_rng(1)
    images = rng.random((len(one.y), 3, 32, 32), dtype=np.float32) * 0.3
    images[:, 2] = one.images[:, 0]
    data = PreparedData(images, one.y, one.cases, one.class_names)
    cfg = load_config(_cfg(tmp_path).model_dump(mode="json"), ["train.strategy.feature_cache=false"])
    rows = rank_encoders(cfg, ["tf_efficientnet_lite0"], progress=False, data=data, baseline=None)
    assert rows[0]["probe_auc"] > 0.9  # the signal of the third channel reached the features
