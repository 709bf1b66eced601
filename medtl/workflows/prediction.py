"""Predict new scans with a finished run: the ensemble of its fold models (or its final model).

Each model's probabilities are temperature-scaled with the temperature fitted for it (when
the run used ``evaluate.calibration: temperature``), then averaged; the decision threshold
is the mean of the models' thresholds, each chosen on inner validation data. Preprocessing
is the run's own (``config.yaml``), so new scans go through exactly what training saw.

Example:
    >>> res = predict("runs/ct", "new_scans/", out_dir="runs/ct/predict")  # doctest: +SKIP
    >>> res["n_cases"], res["n_models"]                                         # doctest: +SKIP
    (12, 5)
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from medtl._runtime import resolve_device
from medtl.config import load_config
from medtl.data.manifest import Case
from medtl.data.prepare import prepare
from medtl.errors import DataError
from medtl.evaluate.calibration import TemperatureScaler
from medtl.training.loop import predict_proba
from medtl.workflows._folds import bootstrap_metrics, prediction_rows, print_summary
from medtl.workflows.rundir import RunDir

__all__ = ["predict"]

_SCAN_SUFFIXES = (".dcm", ".nii", ".nii.gz", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".npy", "")


def _scan_cases(path: Path) -> list[Case]:
    """Every scan file under a folder (or one file), unlabelled; DICOM series stay per file."""
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")
        and (p.suffix.lower() in _SCAN_SUFFIXES or p.name.lower().endswith(".nii.gz")))
    if not files:
        raise DataError(f"No scan files under '{path}'. Pass a scan, a folder of scans, or a manifest CSV.")
    root = path if path.is_dir() else path.parent
    return [Case(case_id=str(p.relative_to(root)), path=str(p), label=None, patient_id=f"case{i}")
            for i, p in enumerate(files)]


def predict(run_dir: str | Path, data: str | Path, *, out_dir: str | Path | None = None,
                tta: bool | None = None, progress: bool = True, overrides: list[str] | None = None) -> dict:
    """Predict ``data`` (a scan, a folder of scans, or a manifest CSV with the run's columns)
    with the run's model ensemble and write ``predictions.csv`` (+ ``metrics.json`` when the
    cases carry labels) into ``out_dir`` (default ``RUN_DIR/predict``).

    Returns ``{"n_cases", "n_models", "n_skipped", "metrics" (or None), "out_dir"}``.
    """
    t0 = time.time()
    run = RunDir(run_dir)
    cfg = run.read_config()
    models = run.load_models()
    names = models[0][2]["class_names"]
    data_path = Path(data)
    labelled = data_path.suffix.lower() == ".csv"
    raw = cfg.model_dump(mode="json")
    raw["data"].update({"path": str(data_path), "class_names": names, "on_error": "skip", "max_cases": None})
    if labelled:
        raw["data"]["format"] = "manifest"
    pcfg = load_config(raw, overrides)
    cases = None if labelled else [Case(c.case_id, c.path, names[0], c.patient_id) for c in _scan_cases(data_path)]
    prep = prepare(pcfg, cases, progress=progress, require_all_classes=False)
    device = resolve_device(cfg.train.device)
    use_tta = cfg.train.tta if tta is None else tta
    probs, thresholds = [], []
    for key, model, meta in models:
        p = predict_proba(model, prep.images, device=device, tta=use_tta)
        if meta.get("temperature"):
            ts = TemperatureScaler()
            ts.temperature_ = float(meta["temperature"])
            p = ts.transform(p)
        probs.append(p)
        thresholds.append(float(meta.get("threshold", 0.5)))
    proba = np.mean(probs, axis=0)
    threshold = float(np.mean(thresholds))
    out = RunDir(out_dir if out_dir is not None else run.path / "predict")
    out.path.mkdir(parents=True, exist_ok=True)
    pseudo = out.pseudonymizer(cfg.privacy.reveal_ids)
    out.write_skipped(prep.skipped)
    idx = np.arange(len(prep.y))
    # unlabelled scans: the label column stays empty (prepare() gave them a placeholder class)
    out.write_predictions(prediction_rows(prep, idx, proba, [["ensemble"]] * len(idx), pseudo, threshold,
                                          labelled=labelled), names)
    metrics = None
    if labelled and len(set(prep.y.tolist())) > 1:
        metrics, binfo = bootstrap_metrics(cfg, prep.y, proba, prep.groups, threshold)
        out.write_metrics({"task": "predict", "run": run.path.name, "test": metrics, "bootstrap": binfo,
                           "threshold": threshold, "n_models": len(models), "n_cases": int(len(idx)),
                           "class_names": names, "seconds": round(time.time() - t0, 1)})
        print_summary(f"ensemble of {len(models)} model(s) on {len(idx)} labelled case(s)", metrics)
    return {"n_cases": int(len(idx)), "n_models": len(models), "n_skipped": len(prep.skipped), "metrics": metrics,
            "threshold": threshold, "out_dir": str(out.path)}
