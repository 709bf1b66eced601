"""Linear-probe CV: synthetic DICOM -> one feature pass -> grouped folds -> the run-dir contract."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from medtl.config import load_config
from medtl.data.demo import make_demo_dataset
from medtl.data.prepare import prepare
from medtl.workflows import cross_validate as cross_validate_linear_probe
from medtl.evaluate.metrics import METRIC_KEYS

TINY = ["data.image_size=[32, 32]", "cv.n_splits=3", "evaluate.n_bootstrap=50", "train.tta=false",
        "train.strategy.name=linear_probe", "train.strategy.probe_C=[0.01, 1.0]", "cv.inner_splits=2"]


@pytest.fixture(scope="module")
def lp_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("lp")
    mp = pytest.MonkeyPatch()
    mp.setenv("MEDTL_CACHE_DIR", str(root / "cache"))
    manifest = make_demo_dataset(root / "data", n_patients=12, slices_per_patient=2, size=32)
    raw = {"name": "tiny-lp", "data": {"path": str(manifest), "intensity": {"mode": "window", "preset": "lung"}}}
    cfg = load_config(raw, TINY)
    data = prepare(cfg, progress=False)
    metrics = cross_validate_linear_probe(cfg, root / "run", progress=False, data=data)
    yield root, cfg, data, metrics
    mp.undo()


def test_run_dir_contract(lp_run):
    root, _, _, metrics = lp_run
    run = root / "run"
    for f in ("config.yaml", "metrics.json", "predictions.csv", "roc.png", "confusion.png", "skipped.json"):
        assert (run / f).is_file(), f
    on_disk = json.loads((run / "metrics.json").read_text())
    assert on_disk["task"] == "cv" and len(on_disk["folds"]) == 3 and on_disk["n_cases"] == 24
    for key in METRIC_KEYS:
        assert set(on_disk["pooled"][key]) >= {"value", "ci95"} and key in on_disk["fold_mean"]
        assert set(on_disk["fold_mean"][key]) == {"mean", "sd"}
    s = on_disk["strategy"]
    assert s["name"] == "linear_probe" and s["feature_dim"] == 1280 and s["feature_cache"] == "miss"
    assert all(c in (0.01, 1.0) for c in s["C_per_fold"])
    assert "_config_hash" in (run / "config.yaml").read_text()


def test_predictions_cover_every_case_once_with_pseudonymised_patients(lp_run):
    root, _, data, _ = lp_run
    with (root / "run" / "predictions.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 24 and len({r["id"] for r in rows}) == 24
    folds_of: dict[str, set] = {}
    for r in rows:
        folds_of.setdefault(r["patient_id"], set()).add(r["fold"])
        assert abs(float(r["prob_lesion"]) + float(r["prob_normal"]) - 1) < 1e-4
    assert all(len(f) == 1 for f in folds_of.values())  # no patient in two folds
    assert all(p.startswith("P-") for p in folds_of)
    raw_ids = {c.patient_id for c in data.cases}
    text = (root / "run" / "predictions.csv").read_text() + (root / "run" / "metrics.json").read_text()
    assert not any(pid in text for pid in raw_ids)


def test_fold_checkpoint_holds_the_probe_folded_into_the_encoder_head(lp_run):
    from medtl.training.checkpoint import load_checkpoint

    root, _, data, _ = lp_run
    rec = json.loads((root / "run" / "folds" / "fold0.json").read_text())
    model, meta = load_checkpoint(root / "run" / "checkpoints" / "fold0")
    assert meta["strategy"] == "linear_probe" and meta["probe_C"] == rec["info"]["C"]
    te = [i for i, c in enumerate(data.cases) if c.case_id in set(rec["test_ids"])]
    with torch.no_grad():
        p = model(torch.as_tensor(data.images[te])).softmax(-1).numpy()
    np.testing.assert_allclose(p, np.asarray(rec["proba"]), atol=1e-4)


def test_second_run_hits_the_feature_cache_and_gives_identical_metrics(lp_run, tmp_path):
    root, cfg, data, metrics = lp_run
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDTL_CACHE_DIR", str(root / "cache"))
        again = cross_validate_linear_probe(cfg, tmp_path / "run2", progress=False, data=data)
    assert again["strategy"]["feature_cache"] == "hit"
    assert again["pooled"] == metrics["pooled"] and again["folds"] == metrics["folds"]


def test_nested_selection_wraps_the_probe_trainer(lp_run, tmp_path):
    """Nested CV is not refused for the probe: the same NestedSelection wraps it."""
    root, cfg, data, metrics = lp_run
    assert metrics["trainer"] == "linear_probe"
    nested = load_config(cfg.model_dump(mode="json"),
                         ["cv.scheme=nested", 'cv.grid={"train.class_weighted": [false, true]}'])
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDTL_CACHE_DIR", str(root / "cache"))
        m = cross_validate_linear_probe(nested, tmp_path / "nested", progress=False, data=data)
    assert m["trainer"] == "nested(linear_probe)" and len(m["folds"]) == 3
    for fold in m["folds"]:
        assert fold["selected"] in ({"train.class_weighted": False}, {"train.class_weighted": True})
    rec = json.loads((tmp_path / "nested" / "folds" / "fold0.json").read_text())
    assert [s["point"] for s in rec["info"]["inner_scores"]] == [{"train.class_weighted": False},
                                                                 {"train.class_weighted": True}]
    assert all(len(s["inner"]) == 2 for s in rec["info"]["inner_scores"])  # cv.inner_splits=2


def test_youden_threshold_and_temperature_come_from_the_training_fold(lp_run, tmp_path):
    root, cfg, data, _ = lp_run
    cfg2 = load_config(cfg.model_dump(mode="json"), ["evaluate.threshold=youden_val", "cv.val_fraction=0.4",
                                                     "evaluate.calibration=temperature"])
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDTL_CACHE_DIR", str(root / "cache"))
        m = cross_validate_linear_probe(cfg2, tmp_path / "yt", progress=False, data=data)
    assert all(0.0 <= f["threshold"] <= 1.0 and f["temperature"] > 0 for f in m["folds"])
    assert m["threshold_rule"] == "youden_val" and "calibrated" in m["calibration"]
