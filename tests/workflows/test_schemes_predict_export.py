"""CV schemes (repeated, leave-one-site-out, nested), calibration and thresholds inside CV,
prediction with the fold ensemble, export (ONNX, TorchScript, MONAI bundle), run comparison."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from medtl.config import load_config
from medtl.data.demo import make_demo_dataset
from medtl.errors import ConfigError, DataError
from medtl.workflows import compare as compare_runs
from medtl.workflows import cross_validate
from medtl.evaluate.schemes import fold_plan, grid_points, leave_one_site_out, with_point

TINY = ["train.epochs=1", "train.batch_size=8", "data.image_size=[32, 32]", "cv.n_splits=2",
        "evaluate.n_bootstrap=50", "train.tta=false", "model.drop_rate=0.0"]


@pytest.fixture(scope="module")
def demo_manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("schemes")
    return make_demo_dataset(root / "data", n_patients=8, slices_per_patient=2, size=32)


def _cfg(manifest, *extra):
    raw = {"name": "tiny", "data": {"path": str(manifest), "intensity": {"mode": "window", "preset": "lung"}}}
    return load_config(raw, [*TINY, *extra])


def test_fold_plans_repeated_and_site(demo_manifest):
    cfg = _cfg(demo_manifest, "cv.scheme=repeated", "cv.n_repeats=2")
    y = np.array([0, 1] * 10)
    groups = np.repeat(np.arange(10), 2)
    plan = fold_plan(cfg, y, groups)
    assert [f.key for f in plan] == ["r0fold0", "r0fold1", "r1fold0", "r1fold1"]
    for r in (0, 1):
        tests = np.concatenate([f.test for f in plan if f.repeat == r])
        assert sorted(tests) == list(range(20))  # every case tested once per repeat
    assert not all(np.array_equal(a.test, b.test) for a, b in zip(plan[:2], plan[2:]))  # reshuffled
    with pytest.raises(ConfigError, match="n_repeats"):
        fold_plan(_cfg(demo_manifest, "cv.n_repeats=2"), y, groups)


def test_leave_one_site_out_rejects_patients_at_two_sites():
    sites = np.array(["a", "a", "b", "b"], dtype=object)
    assert [s for s, _, _ in leave_one_site_out(sites, np.array([1, 1, 2, 3]))] == ["a", "b"]
    with pytest.raises(DataError, match="2 sites"):
        leave_one_site_out(sites, np.array([1, 2, 2, 3]))
    with pytest.raises(DataError, match=">= 2 sites"):
        leave_one_site_out(np.array(["a", "a"], dtype=object), np.array([1, 2]))


def test_grid_points_and_with_point(demo_manifest):
    pts = grid_points({"train.lr": [1e-4, 1e-3], "train.epochs": [1]})
    assert pts == [{"train.epochs": 1, "train.lr": 1e-4}, {"train.epochs": 1, "train.lr": 1e-3}]
    assert with_point(_cfg(demo_manifest), pts[1]).train.lr == 1e-3
    with pytest.raises(ConfigError, match="unknown key"):
        with_point(_cfg(demo_manifest), {"train.lrr": 1})


@pytest.fixture(scope="module")
def calibrated_run(demo_manifest, tmp_path_factory):
    out = tmp_path_factory.mktemp("cal") / "run"
    cfg = _cfg(demo_manifest, "evaluate.calibration=temperature", "evaluate.threshold=sensitivity_val",
               "evaluate.target_sensitivity=0.8")
    return out, cross_validate(cfg, out, progress=False)


def test_cv_with_temperature_scaling_and_sensitivity_threshold(calibrated_run):
    out, m = calibrated_run
    assert set(m["calibration"]) == {"uncalibrated", "calibrated"}
    for part in m["calibration"].values():
        assert 0 <= part["ece"]["value"] <= 1 and len(part["ece"]["ci95"]) == 2
    assert all(f["temperature"] > 0 for f in m["folds"]) and m["threshold_rule"] == "sensitivity_val"
    assert (out / "reliability.png").stat().st_size > 1000
    text = (out / "metrics.json").read_text()
    assert "NaN" not in text and "Infinity" not in text  # strict JSON
    meta = json.loads((out / "checkpoints" / "fold0" / "meta.json").read_text())
    assert meta["temperature"] == m["folds"][0]["temperature"] and meta["build"]["in_chans"] == 1


def test_leave_one_site_out_cv_reports_per_site(demo_manifest, tmp_path):
    m = cross_validate(_cfg(demo_manifest, "cv.scheme=leave_one_site_out"), tmp_path / "loso", progress=False)
    assert [f["fold"] for f in m["folds"]] == ["site0", "site1"]
    assert {f["site"] for f in m["folds"]} == set(m["per_site"])
    assert sum(v["n_cases"] for v in m["per_site"].values()) == m["n_cases"]


def test_nested_cv_selects_a_grid_point_per_fold(demo_manifest, tmp_path):
    cfg = _cfg(demo_manifest, "cv.scheme=nested", "cv.inner_splits=2", 'cv.grid={"train.lr": [0.0001, 0.003]}')
    m = cross_validate(cfg, tmp_path / "nested", progress=False)
    rec = json.loads((tmp_path / "nested" / "folds" / "fold0.json").read_text())
    assert rec["info"]["selected"]["train.lr"] in (0.0001, 0.003) and len(rec["info"]["inner_scores"]) == 2
    assert all(f["selected"] is not None for f in m["folds"])
    with pytest.raises(ConfigError, match="needs a cv.grid"):
        cross_validate(_cfg(demo_manifest, "cv.scheme=nested"), tmp_path / "x", progress=False)


def test_predict_with_fold_ensemble_on_folder_and_manifest(calibrated_run, demo_manifest, tmp_path):
    from medtl.workflows import predict as predict_run

    out, _ = calibrated_run
    res = predict_run(out, demo_manifest, out_dir=tmp_path / "pred", progress=False)
    assert res["n_models"] == 2 and res["n_cases"] == 16 and res["metrics"] is not None
    metrics = json.loads((tmp_path / "pred" / "metrics.json").read_text())
    assert metrics["trust_unverified"] is False and metrics["unverified"] == {}
    root = demo_manifest.parent
    res2 = predict_run(out, root, out_dir=tmp_path / "pred2", progress=False)
    rows = list(csv.DictReader((tmp_path / "pred2" / "predictions.csv").open()))
    assert len(rows) == res2["n_cases"] >= 1 and all(r["label"] == "" for r in rows)
    assert all(abs(float(r["prob_lesion"]) + float(r["prob_normal"]) - 1) < 1e-4 for r in rows)
    # pseudonymous case ids in sorted path order; no path or file name in any output
    scans = sorted(str(p.relative_to(root)) for p in root.rglob("*.dcm"))
    assert [r["id"] for r in rows] == [f"scan-{i:04d}" for i in range(1, len(rows) + 1)] and len(rows) == len(scans)
    record = json.loads((tmp_path / "pred2" / "predict.json").read_text())
    assert record["n_cases"] == len(rows) and record["id_map"] is None and record["case_ids"] == "pseudonymous"
    for f in (tmp_path / "pred2").iterdir():
        assert not any(Path(s).name in f.read_text(errors="replace") for s in scans), f
    assert not (tmp_path / "pred2" / "IDENTIFYING_id_map.csv").exists()
    # the mapping, on request, in a file marked as identifying
    res3 = predict_run(out, root, out_dir=tmp_path / "pred2", progress=False, write_id_map=True)
    lines = (tmp_path / "pred2" / res3["id_map"]).read_text().splitlines()
    assert res3["id_map"] == "IDENTIFYING_id_map.csv" and lines[0].startswith("# IDENTIFYING") and lines[1] == "id,path"
    assert lines[2:2 + len(scans)] == [f"scan-{i:04d},{s}" for i, s in enumerate(scans, start=1)]
    assert len(lines) == 2 + res3["n_cases"] + res3["n_skipped"]  # skipped files (the .npy masks) too


def test_run_start_writes_no_temporary_config(demo_manifest, tmp_path):
    from medtl.workflows import RunDir

    RunDir(tmp_path / "run").start(_cfg(demo_manifest), resume=False)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["config.yaml"]


@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "monai-bundle"])
def test_export_agrees_with_pytorch(calibrated_run, tmp_path, fmt):
    from medtl.workflows import export as export_run

    out, _ = calibrated_run
    rec = export_run(out, fmt, out_dir=tmp_path / fmt)
    assert rec["max_abs_diff"] <= 1e-4 and rec["n_models"] == 2
    assert rec["trust_unverified"] is False and rec["unverified"] == {}
    assert json.loads((tmp_path / fmt / "export.json").read_text())["format"] == fmt


def test_compare_runs_paired_delong(calibrated_run, tmp_path):
    out, _ = calibrated_run
    same = compare_runs(out, out)
    assert same["delong"]["p_value"] == 1.0 and same["n_common"] == 16
    with pytest.raises(Exception, match="predictions.csv"):
        compare_runs(out, tmp_path)


def test_mlflow_tracking_logs_params_metrics_and_artifacts(calibrated_run, tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    from medtl.workflows import RunDir
    from medtl.workflows.tracking import log_run

    out, metrics = calibrated_run
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    run_id = log_run(RunDir(out).read_config(), RunDir(out), metrics)
    run = mlflow.get_run(run_id)
    assert run.data.params["train.epochs"] == "1" and "data.path" not in run.data.params
    assert abs(run.data.metrics["auc"] - metrics["pooled"]["auc"]["value"]) < 1e-9
    arts = {a.path for a in mlflow.MlflowClient().list_artifacts(run_id)}
    assert {"metrics.json", "predictions.csv", "roc.png"} <= arts and "checkpoints" not in arts
