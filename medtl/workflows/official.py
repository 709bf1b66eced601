"""``medtl train``: the official split. Train on ``train``, choose on ``val``, report on ``test``.

The same fold driver as cross-validation (:func:`medtl.workflows._folds.fit_fold`) with
one fold whose training, validation and test cases come from the data's ``split``: the
epoch (or probe ``C``), temperature and threshold are chosen on ``val``; ``test`` is
scored once, with patient-bootstrap CIs.

With ``train.ensemble_folds`` k > 1 the run trains a fold ensemble instead, scored as one
model against each of its members (:mod:`medtl.workflows.ensembles`).
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np

from medtl._compute import ComputeBill
from medtl._runtime import FoldSeeds, device_name, progress_bar, resolve_device
from medtl.config import Config
from medtl.data.prepare import PreparedData
from medtl.errors import DataError
from medtl.evaluate.metrics import compute_metrics
from medtl.workflows._folds import (
    FoldContext,
    add_tasks,
    fit_fold,
    prediction_rows,
    print_summary,
    score,
    start,
    track,
    write_plots,
)
from medtl.workflows.ensembles import train_ensemble
from medtl.workflows.trainers import base_trainer

__all__ = ["train"]


def train(cfg: Config, out_dir: str | Path, *, progress: bool = True, data: PreparedData | None = None,
          resume: bool = True) -> dict:
    """Official-split training; returns the ``metrics.json`` dict (``test``, ``val``, ``history``, ...).

    With ``train.ensemble_folds`` > 1, ``resume`` reuses the ensemble members an earlier run of
    the same config finished in ``out_dir`` (a single model, k = 1, is always trained again).

    Example:
        >>> cfg = medtl.load_config("configs/breastmnist.yaml", ["train.epochs=2"])  # doctest: +SKIP
        >>> train(cfg, "runs/breast")["test"]["auc"]["value"]                        # doctest: +SKIP
        0.87
    """
    t0 = time.time()
    bill = ComputeBill(resolve_device(cfg.train.device), cfg.train.cpu_watts_per_core)
    k = cfg.train.ensemble_folds
    run, h, data, progress = start(cfg, out_dir, resume=resume and k > 1, progress=progress, data=data, bill=bill)
    trn, val, tst = data.subset("train"), data.subset("val"), data.subset("test")
    if len(trn) == 0 or len(val) == 0 or len(tst) == 0:
        raise DataError(f"Official-split training needs train, val and test cases; found {len(trn)}/{len(val)}/"
                        f"{len(tst)}. Use data.format=medmnist with data.split=official, or a manifest with a "
                        "'split' column (train/val/test); or run `medtl cv` instead.")
    trainer = base_trainer(cfg)
    if k > 1:
        return train_ensemble(FoldContext(cfg, data, run, h, trainer, None, bill), trn, val, tst, resume=resume,
                              progress=progress, t0=t0)
    with (progress_bar() if progress else nullcontext()) as bar:
        ctx = FoldContext(cfg, data, run, h, trainer, bar, bill)
        rec, p_val = fit_fold(ctx, "final", trn, val, tst, FoldSeeds(cfg.train.seed, 0, 0), description="train")
    thr = rec.threshold
    p_test, p_test_raw = np.asarray(rec.proba), np.asarray(rec.proba_raw)
    calibrated = p_test if rec.temperature is not None else None
    bill.begin("evaluation")  # bootstrap CIs, predictions and plots: the run's own evaluation
    scored = score(cfg, data.y[tst], p_test_raw, data.groups[tst], thr, calibrated)
    pseudo = run.pseudonymizer(cfg.privacy.reveal_ids)
    run.write_predictions(prediction_rows(data, tst, p_test, [["test"]] * len(tst), pseudo, thr), data.class_names)
    history = rec.history
    plots = write_plots(run, data.y[tst], p_test_raw, data.class_names, thr, history, None, "official test split",
                        calibrated)
    metrics = {
        "task": "official", "trainer": trainer.name, "name": cfg.name, "test": scored["metrics"],
        "val": compute_metrics(data.y[val], p_val, threshold=thr), "calibration": scored["calibration"],
        "temperature": rec.temperature, "bootstrap": scored["bootstrap"], "threshold": thr,
        "threshold_rule": cfg.evaluate.threshold, "best_epoch": rec.info.get("best_epoch"),
        **{k: rec.info[k] for k in ("ensemble_seeds", "member_best_epochs") if k in rec.info},
        "class_names": data.class_names, "n_train": int(len(trn)), "n_val": int(len(val)), "n_test": int(len(tst)),
        "n_skipped": len(data.skipped), "model": cfg.model.name, "pretrained": cfg.model.pretrained,
        "plots": plots, "device": device_name(resolve_device(cfg.train.device)),
        "seconds": round(time.time() - t0, 1), "config_hash": h, "history": history,
    }
    if "C" in rec.info:
        metrics["strategy"] = {"name": "linear_probe", "C": rec.info["C"], **trainer.feature_info_}
    if "multiclass" in scored:
        metrics["multiclass"] = scored["multiclass"]
    if data.tasks:  # multi-task: per-task metrics with CIs, and per-task columns in predictions.csv
        add_tasks(cfg, data, run, [(rec, tst, 0)], metrics)
    bill.end("evaluation")
    metrics["compute"] = bill.as_dict()
    run.write_metrics(metrics)
    run.write_fold(rec)
    print_summary(f"{cfg.name}: official test split ({len(tst)} cases)", scored["metrics"])
    track(cfg, run, metrics)
    return metrics
