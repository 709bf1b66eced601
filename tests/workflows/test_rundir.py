"""RunDir owns the run directory: what it writes, it reads back the same."""

from __future__ import annotations

import yaml
import pytest

from medtl.config import config_hash, load_config
from medtl.errors import MedtlError
from medtl.workflows.rundir import FoldKey, FoldRecord, PredictionRow, RunDir


def _cfg(tmp_path, *overrides):
    return load_config({"name": "rt", "data": {"path": str(tmp_path / "m.csv")}}, list(overrides))


@pytest.mark.parametrize("text", ["fold0", "fold12", "r0fold3", "r11fold0", "site2", "final"])
def test_fold_keys_round_trip(text):
    assert str(FoldKey.parse(text)) == text


@pytest.mark.parametrize("text", ["fold", "r1", "foldx", "final1", "../fold0", ""])
def test_a_bad_fold_key_is_refused_with_the_valid_forms(text):
    with pytest.raises(MedtlError, match="fold3, r1fold3, site0 or final"):
        FoldKey.parse(text)


def test_records_predictions_and_metrics_round_trip(tmp_path):
    run = RunDir(tmp_path / "run")
    h = run.start(_cfg(tmp_path), resume=False)
    rec = FoldRecord(config_hash=h, fold="r1fold2", test_ids=["3", "7"], proba=[[0.25, 0.75], [0.5, 0.5]],
                     proba_raw=[[0.2, 0.8], [0.5, 0.5]], threshold=0.4, temperature=1.5, n_train=10, n_val=3,
                     info={"best_epoch": 2, "history": [{"epoch": 1, "val_auc": None}], "selected": {"train.lr": 0.1}})
    run.write_fold(rec)
    assert run.read_fold("r1fold2", ["3", "7"]) is None  # no checkpoint: not a finished fold
    (run.checkpoint("r1fold2")).mkdir(parents=True)
    rows = [PredictionRow(id="3", patient_id="P-1", site="a", folds=["r0fold1", "r1fold2"], label="lesion",
                          proba={"normal": 0.25, "lesion": 0.75}, pred="lesion"),
            PredictionRow(id="7", patient_id="P-2", site="", folds=["final"], label="normal",
                          proba={"normal": 0.5, "lesion": 0.5}, pred="lesion")]
    run.write_predictions(rows, ["normal", "lesion"])
    assert run.read_predictions() == rows
    assert [RunDir.model_key(r) for r in rows] == ["r0fold1", "final"]
    run.write_metrics({"task": "official", "name": "rt", "class_names": ["normal", "lesion"], "n_test": 2,
                       "test": {"auc": {"value": float("nan"), "ci95": [None, None]}}})
    m = run.read_metrics()
    assert (m.task, m.n_cases, m.class_names) == ("official", 2, ["normal", "lesion"])
    assert m.headline["auc"]["value"] is None  # strict JSON: NaN written as null
    again = RunDir(run.path).read_config()
    assert config_hash(again) == h


def test_resume_accepts_a_run_written_by_an_older_medtl(tmp_path, monkeypatch):
    """An old config.yaml lacks a field that has a default today: the folds it finished are still reused."""
    cfg = _cfg(tmp_path)
    run = RunDir(tmp_path / "run")
    h = run.start(cfg, resume=False)
    raw = yaml.safe_load((run / "config.yaml").read_text())
    raw["train"].pop("ema")                       # a field an older medtl did not have
    raw["_config_hash"] = "0ld0ld0ld0ld0ld0"      # ... so it recorded another hash
    (run / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    old = FoldRecord(config_hash="0ld0ld0ld0ld0ld0", fold="fold0", test_ids=["1"], proba=[[0.5, 0.5]],
                     proba_raw=[[0.5, 0.5]], threshold=0.5)
    run.write_fold(old)
    ckpt = run.checkpoint("fold0")
    ckpt.mkdir(parents=True)
    monkeypatch.setattr("medtl.workflows.rundir.verify_checkpoint", lambda folder: {})
    (ckpt / "model.safetensors").write_bytes(b"x")
    again = RunDir(run.path)
    assert again.start(cfg, resume=True) == h
    assert again.read_fold("fold0", ["1"]) == old
    assert again.read_fold("fold0", ["2"]) is None  # other test cases: retrain


def test_resume_refuses_a_different_config(tmp_path):
    run = RunDir(tmp_path / "run")
    run.start(_cfg(tmp_path), resume=False)
    (run / "folds").mkdir()
    with pytest.raises(MedtlError, match="different config"):
        RunDir(run.path).start(_cfg(tmp_path, "train.lr=0.5"), resume=True)


def test_readers_name_what_is_missing(tmp_path):
    with pytest.raises(MedtlError, match="config.yaml missing"):
        RunDir(tmp_path).read_config()
    with pytest.raises(MedtlError, match="No checkpoints"):
        RunDir(tmp_path).load_models()
