"""Predict new scans with a finished run: the ensemble of its fold models (or its final model).

Each model's probabilities are temperature-scaled with the temperature fitted for it (when
the run used ``evaluate.calibration: temperature``), then averaged; the decision threshold
is the mean of the models' thresholds, each chosen on inner validation data. Preprocessing
is the run's own (``config.yaml``), so new scans go through exactly what training saw.

Example:
    >>> res = predict_run("runs/ct", "new_scans/", out_dir="runs/ct/predict")  # doctest: +SKIP
    >>> res["n_cases"], res["n_models"]                                         # doctest: +SKIP
    (12, 5)
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import yaml

from medtl.config import Config, load_config
from medtl.data.manifest import Case
from medtl.data.prepare import prepare
from medtl.data.privacy import Pseudonymizer
from medtl.errors import DataError, MedtlError
from medtl.evaluate import _runio as io
from medtl.evaluate.calibration import TemperatureScaler
from medtl.train.loop import predict_proba, resolve_device

__all__ = ["predict_run", "load_run_models"]

_SCAN_SUFFIXES = (".dcm", ".nii", ".nii.gz", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".npy", "")


def run_config(run_dir: Path) -> Config:
    path = run_dir / "config.yaml"
    if not path.exists():
        raise MedtlError(f"'{run_dir}' is not a medtl run directory (no config.yaml). Pass the --out folder of "
                         "`medtl cv` or `medtl train`.")
    raw = yaml.safe_load(path.read_text())
    return load_config({k: v for k, v in raw.items() if not k.startswith("_")})


def load_run_models(run_dir: str | Path) -> list[tuple[str, object, dict]]:
    """``[(key, model in eval mode, meta)]`` for every checkpoint of a run (sha256-verified)."""
    from medtl.train.checkpoint import load_checkpoint

    run_dir = Path(run_dir)
    folders = sorted(p.parent for p in (run_dir / "checkpoints").glob("*/meta.json"))
    if not folders:
        raise MedtlError(f"No checkpoints under '{run_dir / 'checkpoints'}'. The run did not finish any fold; "
                         "rerun it (with --resume) first.")
    out = []
    for f in folders:
        model, meta = load_checkpoint(f)
        out.append((f.name, model, meta))
    return out


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


def predict_run(run_dir: str | Path, data: str | Path, *, out_dir: str | Path | None = None,
                tta: bool | None = None, progress: bool = True, overrides: list[str] | None = None) -> dict:
    """Predict ``data`` (a scan, a folder of scans, or a manifest CSV with the run's columns)
    with the run's model ensemble and write ``predictions.csv`` (+ ``metrics.json`` when the
    cases carry labels) into ``out_dir`` (default ``RUN_DIR/predict``).

    Returns ``{"n_cases", "n_models", "n_skipped", "metrics" (or None), "out_dir"}``.
    """
    t0 = time.time()
    run_dir = Path(run_dir)
    cfg = run_config(run_dir)
    models = load_run_models(run_dir)
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
    out = Path(out_dir) if out_dir is not None else run_dir / "predict"
    out.mkdir(parents=True, exist_ok=True)
    pseudo = Pseudonymizer.for_run(out, reveal=cfg.privacy.reveal_ids)
    io.write_json(out / "skipped.json", prep.skipped)
    idx = np.arange(len(prep.y))
    io.write_predictions(out / "predictions.csv", prep, idx, proba, ["ensemble"] * len(idx), pseudo, threshold)
    metrics = None
    if labelled and len(set(prep.y.tolist())) > 1:
        metrics, binfo = io.bootstrap(cfg, prep.y, proba, prep.groups, threshold)
        io.write_json(out / "metrics.json", {"task": "predict", "run": run_dir.name, "test": metrics,
                                             "bootstrap": binfo, "threshold": threshold, "n_models": len(models),
                                             "n_cases": int(len(idx)), "seconds": round(time.time() - t0, 1)})
        io.print_summary(f"ensemble of {len(models)} model(s) on {len(idx)} labelled case(s)", metrics)
    if not labelled:  # unlabelled: the label column holds a placeholder; say so in the file
        _blank_labels(out / "predictions.csv")
    return {"n_cases": int(len(idx)), "n_models": len(models), "n_skipped": len(prep.skipped), "metrics": metrics,
            "threshold": threshold, "out_dir": str(out)}


def _blank_labels(path: Path) -> None:
    import csv
    import io as _io

    rows = list(csv.reader(path.open(newline="")))
    li = rows[0].index("label")
    for r in rows[1:]:
        r[li] = ""
    buf = _io.StringIO()
    csv.writer(buf).writerows(rows)
    io.atomic_write_text(path, buf.getvalue())
