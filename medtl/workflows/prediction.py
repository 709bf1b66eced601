"""Predict new scans with a finished run: the ensemble of its fold models (or its final model).

Each model's probabilities are temperature-scaled with the temperature fitted for it (when
the run used ``evaluate.calibration: temperature``), then averaged; the decision threshold
is the mean of the models' thresholds, each chosen on inner validation data. Preprocessing
is the run's own (``config.yaml``), so new scans go through exactly what training saw.

An official-split ensemble (``train.ensemble_folds`` > 1) is one model here: its checkpoint
loads as one :class:`~medtl.models.ensemble.EnsembleClassifier` that averages its members
with flip TTA inside (``tta`` switches it), with the temperature and threshold chosen for the
ensemble, so it gives the run's own test probabilities back.

Outputs hold no path or file name (a hospital folder is often named after its patient):
scans get pseudonymous ids (``scan-0001`` in sorted path order), and the id -> path
mapping is written only on request, to ``IDENTIFYING_id_map.csv``.

Example:
    >>> res = predict("runs/ct", "new_scans/", out_dir="runs/ct/predict")  # doctest: +SKIP
    >>> res["n_cases"], res["n_models"]                                         # doctest: +SKIP
    (12, 5)
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from medtl._compute import ComputeBill
from medtl._io import write_json
from medtl._runtime import console, resolve_device
from medtl.config import load_config
from medtl.data.manifest import Case
from medtl.data.prepare import prepare
from medtl.errors import DataError
from medtl.evaluate.calibration import TemperatureScaler
from medtl.models.heads import MultiTaskHead
from medtl.training.loop import predict_outputs, predict_proba
from medtl.workflows._folds import bootstrap_metrics, prediction_rows, print_summary, task_output_columns
from medtl.workflows.rundir import RunDir

__all__ = ["predict"]

_SCAN_SUFFIXES = (".dcm", ".nii", ".nii.gz", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".npy", "")


def _scan_cases(path: Path, *, reveal_ids: bool = False) -> list[Case]:
    """Every scan file under a folder (or one file), unlabelled; DICOM series stay per file.

    Case ids are ``scan-0001``, ``scan-0002``, ... in sorted path order: a folder named after a
    patient (``DOE_JOHN_19600101/``) never reaches an output. With ``reveal_ids`` the id is
    the path relative to the folder.
    """
    # a dangling link or a symlink loop is not a file but is listed, so the reader reports it as skipped
    files = [path] if path.is_file() or path.is_symlink() else sorted(
        p for p in path.rglob("*") if (p.is_file() or p.is_symlink()) and not p.name.startswith(".")
        and (p.suffix.lower() in _SCAN_SUFFIXES or p.name.lower().endswith(".nii.gz")))
    if not files:
        raise DataError(f"No scan files under '{path}'. Pass a scan, a folder of scans, or a manifest CSV.")
    root = path if path.is_dir() else path.parent
    width = max(4, len(str(len(files))))
    return [Case(case_id=str(p.relative_to(root)) if reveal_ids else f"scan-{i + 1:0{width}d}", path=str(p),
                 label=None, patient_id=f"case{i}")
            for i, p in enumerate(files)]


def _relative(path: str | None, root: Path) -> str:
    if not path:
        return ""
    try:
        return str(Path(path).absolute().relative_to(root.absolute()))
    except ValueError:
        return str(path)


def predict(run_dir: str | Path, data: str | Path, *, out_dir: str | Path | None = None,
            tta: bool | None = None, progress: bool = True, overrides: list[str] | None = None,
            write_id_map: bool = False, trust_unverified: bool = False) -> dict:
    """Predict ``data`` (a scan, a folder of scans, or a manifest CSV with the run's columns)
    with the run's model ensemble and write ``predictions.csv``, ``skipped.json``,
    ``predict.json`` (+ ``metrics.json`` when the cases carry labels) into ``out_dir``
    (default ``RUN_DIR/predict``).

    No output holds a scan's path: scans in a folder get the ids ``scan-0001``, ... (sorted
    by path), manifest rows their row ids, unless the run's ``privacy.reveal_ids`` is set.

    Args:
        write_id_map: also write ``IDENTIFYING_id_map.csv`` (case id -> path), marked as
            identifying by its name and first line.
        trust_unverified: load checkpoints that do not verify (no sha256 recorded, or a
            mismatch) instead of refusing them; recorded in ``predict.json`` (and
            ``metrics.json``) as ``"trust_unverified": true`` with the reasons.

    Returns ``{"n_cases", "n_models", "n_skipped", "metrics" (or None), "threshold", "out_dir",
    "id_map" (or None), "trust_unverified", "unverified"}``.

    Raises:
        UnverifiedCheckpointError: a checkpoint does not verify and ``trust_unverified`` is False.
    """
    t0 = time.time()
    run = RunDir(run_dir)
    cfg = run.read_config()
    device = resolve_device(cfg.train.device)
    bill = ComputeBill(device, cfg.train.cpu_watts_per_core)
    models = run.load_models(trust_unverified=trust_unverified)
    trust = run.trust_record(models, trust_unverified)
    names = models[0][2]["class_names"]
    data_path = Path(data)
    labelled = data_path.suffix.lower() == ".csv"
    reveal = cfg.privacy.reveal_ids
    raw = cfg.model_dump(mode="json")
    raw["data"].update({"path": str(data_path), "class_names": names, "on_error": "skip", "max_cases": None})
    if labelled:
        raw["data"]["format"] = "manifest"
    if cfg.tasks:  # multi-task run: every head is predicted; a labelled CSV needs the primary label only
        raw["data"]["label_column"] = cfg.tasks[0].column
        raw["data"]["labels"] = None if labelled else raw["data"]["labels"]
        raw["tasks"], raw["train"]["task_weighting"] = None, "fixed"
    pcfg = load_config(raw, overrides)
    cases = None if labelled else [Case(c.case_id, c.path, names[0], c.patient_id)
                                   for c in _scan_cases(data_path, reveal_ids=reveal)]
    with bill.stage("decode"):
        prep = prepare(pcfg, cases, progress=progress, require_all_classes=False)
    bill.add_images("decode", len(prep.y))
    use_tta = cfg.train.tta if tta is None else tta
    probs, thresholds, task_outs = [], [], []
    for key, model, meta in models:
        head = MultiTaskHead.from_dict(meta["tasks"]) if meta.get("tasks") else None
        model = model.to(device)
        tta_here = use_tta
        if meta.get("ensemble"):  # the ensemble flips inside, per member, as the run predicted its test cases
            model.tta, tta_here = bool(use_tta), False
        with bill.stage("prediction"):
            if head is None:
                p = predict_proba(model, prep.images, device=device, tta=tta_here)
            else:
                outs = predict_outputs(model, prep.images, head, device=device, tta=use_tta)
                p = outs[head.primary.name]
                task_outs.append((head, outs))
        bill.add_images("prediction", len(prep.y))
        if meta.get("temperature"):
            ts = TemperatureScaler()
            ts.temperature_ = float(meta["temperature"])
            p = ts.transform(p)
        probs.append(p)
        thresholds.append(float(meta.get("threshold", 0.5)))
    proba = np.mean(probs, axis=0)
    threshold = float(np.mean(thresholds))
    out = RunDir(out_dir if out_dir is not None else run.path / "predict")
    out.mkdir()
    pseudo = out.pseudonymizer(reveal)
    out.write_skipped(prep.skipped, reveal_ids=reveal)
    idx = np.arange(len(prep.y))
    # unlabelled scans: the label column stays empty (prepare() gave them a placeholder class)
    rows = prediction_rows(prep, idx, proba, [["ensemble"]] * len(idx), pseudo, threshold, labelled=labelled)
    if task_outs:  # every other head's outputs, averaged over the models, after the primary's columns
        for h in task_outs[0][0].heads[1:]:
            mean = np.mean([o[h.name] for _, o in task_outs], axis=0)
            for r, o in zip(rows, mean):
                r.extra.update(task_output_columns(h.name, h.kind, h.class_names, o))
    out.write_predictions(rows, names)
    id_map = None
    if write_id_map:
        root = data_path.parent if labelled or data_path.is_file() else data_path
        pairs = [(c.case_id, _relative(c.path, root)) for c in prep.cases]
        pairs = sorted(pairs + [(s["case_id"], _relative(s.get("path"), root)) for s in prep.skipped])
        id_map = out.write_id_map(pairs, f"relative to '{root}'").name
    elif (out / out.ID_MAP).exists():  # a map from an earlier prediction would now link the wrong scans
        (out / out.ID_MAP).unlink()
        console.print(f"removed the earlier {out.ID_MAP} in {out.path} (it belonged to another prediction; "
                      "pass --write-id-map to write a new one)", markup=False, highlight=False)
    metrics = None
    if labelled and len(set(prep.y.tolist())) > 1:
        with bill.stage("evaluation"):
            metrics, binfo = bootstrap_metrics(cfg, prep.y, proba, prep.groups, threshold)
        out.write_metrics({"task": "predict", "run": run.path.name, "test": metrics, "bootstrap": binfo,
                           "threshold": threshold, "n_models": len(models), "n_cases": int(len(idx)),
                           "class_names": names, **trust, "seconds": round(time.time() - t0, 1),
                           "compute": bill.as_dict()})
        print_summary(f"ensemble of {len(models)} model(s) on {len(idx)} labelled case(s)", metrics)
    record = {"task": "predict", "run": run.path.name, "models": [k for k, _, _ in models],
              "n_models": len(models), "n_cases": int(len(idx)), "n_skipped": len(prep.skipped),
              "labelled": labelled, "threshold": threshold, "tta": bool(use_tta), "class_names": names,
              "case_ids": "paths (privacy.reveal_ids)" if reveal and not labelled else "pseudonymous",
              "id_map": id_map, **trust, "seconds": round(time.time() - t0, 1), "compute": bill.as_dict()}
    members = {k: [m["key"] for m in meta["ensemble"]["members"]] for k, _, meta in models if meta.get("ensemble")}
    if members:  # an official-split ensemble, predicted as one model
        record["ensemble_members"] = members
    write_json(out / "predict.json", record)
    return {"n_cases": int(len(idx)), "n_models": len(models), "n_skipped": len(prep.skipped), "metrics": metrics,
            "threshold": threshold, "out_dir": str(out.path), "id_map": id_map, **trust}
