"""End to end: synthetic DICOM -> patient-grouped CV -> run-dir contract -> report, privacy, resume."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from medtl.config import load_config
from medtl.data.demo import demo_identifying_strings, find_identifying_strings, make_demo_dataset
from medtl.evaluate.metrics import METRIC_KEYS
from medtl.workflows import cross_validate
from medtl.workflows import train as train_official

TINY = ["train.epochs=1", "train.batch_size=8", "data.image_size=[32, 32]", "cv.n_splits=3",
        "evaluate.n_bootstrap=50", "explain.n_correct=1", "explain.n_wrong=1", "explain.ig_steps=4",
        "train.tta=false"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    manifest = make_demo_dataset(root / "data", n_patients=9, slices_per_patient=2, size=32)
    raw = {"name": "tiny", "data": {"path": str(manifest), "intensity": {"mode": "window", "preset": "lung"}}}
    cfg = load_config(raw, TINY)
    metrics = cross_validate(cfg, root / "run", progress=False)
    return root, cfg, metrics


def test_run_dir_contract(demo_run):
    root, _, metrics = demo_run
    run = root / "run"
    for f in ("config.yaml", "metrics.json", "predictions.csv", "roc.png", "confusion.png", "skipped.json"):
        assert (run / f).is_file(), f
    for k in range(3):
        assert (run / "checkpoints" / f"fold{k}" / "model.safetensors").is_file()
        meta = json.loads((run / "checkpoints" / f"fold{k}" / "meta.json").read_text())
        assert meta["class_names"] == ["lesion", "normal"] and meta["weights_record"]["mean"] == [0.5, 0.5, 0.5]
        assert meta["config_hash"] == metrics["config_hash"]
    on_disk = json.loads((run / "metrics.json").read_text())
    assert len(on_disk["folds"]) == 3
    for key in METRIC_KEYS:
        v = on_disk["pooled"][key]
        assert set(v) >= {"value", "ci95"} and len(v["ci95"]) == 2
        assert key in on_disk["folds"][0]


def test_predictions_one_row_per_case_and_no_patient_in_two_folds(demo_run):
    root, _, _ = demo_run
    with (root / "run" / "predictions.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 18
    assert set(rows[0]) >= {"id", "patient_id", "fold", "label", "prob_lesion", "prob_normal"}
    folds_of = {}
    for r in rows:
        folds_of.setdefault(r["patient_id"], set()).add(r["fold"])
        assert abs(float(r["prob_lesion"]) + float(r["prob_normal"]) - 1) < 1e-4
    assert all(len(f) == 1 for f in folds_of.values())
    assert all(p.startswith("P-") for p in folds_of)


def test_resume_skips_finished_folds_and_gives_identical_results(demo_run, tmp_path):
    root, cfg, metrics = demo_run
    import shutil

    run2 = tmp_path / "run2"
    shutil.copytree(root / "run", run2)
    # simulate a run killed during fold 2: its record is gone
    (run2 / "folds" / "fold2.json").unlink()
    (run2 / "metrics.json").unlink()
    again = cross_validate(cfg, run2, progress=False)
    assert again["pooled"] == metrics["pooled"]
    assert again["folds"] == metrics["folds"]


def test_explain_writes_private_self_contained_report(demo_run):
    from medtl.workflows.explanation import explain_run

    root, _, _ = demo_run
    report = explain_run(root / "run", progress=False)
    html = Path(report).read_text()
    assert "<img" in html and "data:image/png;base64," in html and 'src="http' not in html
    secrets = demo_identifying_strings(root / "data")
    for f in (root / "run").rglob("*"):
        if f.is_file() and f.suffix in (".csv", ".json", ".yaml", ".html"):
            assert not find_identifying_strings(f.read_text(errors="ignore"), secrets), f
        assert not find_identifying_strings(f.name, secrets)


def test_official_split_requires_splits(demo_run, tmp_path):
    from medtl.errors import DataError

    _, cfg, _ = demo_run
    with pytest.raises(DataError, match="split"):
        train_official(cfg, tmp_path / "o", progress=False)


def test_official_split_on_breastmnist_subset(shared_data, shared_weights, tmp_path):
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "breastmnist.yaml",
                      TINY + ["data.max_cases=160", f"data.path={shared_data}/medmnist/breastmnist.npz"])
    m = train_official(cfg, tmp_path / "b", progress=False)
    assert set(m["test"]) == set(METRIC_KEYS)
    assert 0.0 <= m["test"]["auc"]["value"] <= 1.0
    rows = list(csv.DictReader((tmp_path / "b" / "predictions.csv").open()))
    assert len(rows) == m["n_test"] and {r["fold"] for r in rows} == {"test"}
    assert np.isfinite(float(rows[0]["prob_malignant"]))
