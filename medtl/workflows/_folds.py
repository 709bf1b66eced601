"""The one fold driver shared by cross-validation and official-split training.

For one fold, with any trainer (:mod:`medtl.workflows.trainers`): fit on the training cases,
choose the temperature and the threshold on the validation cases (never the test cases),
save the checkpoint, predict the test cases and return a :class:`FoldRecord`. Then score
pooled predictions with patient-bootstrap CIs, write plots and print the summary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.table import Table

from medtl._runtime import FoldSeeds, console
from medtl.config import Config
from medtl.data.prepare import PreparedData
from medtl.evaluate.calibration import (
    TemperatureScaler,
    brier_score,
    calibration_metrics,
    expected_calibration_error,
)
from medtl.evaluate.metrics import bootstrap_ci, choose_threshold, predicted_class
from medtl.evaluate.plots import (
    plot_confusion,
    plot_reliability,
    plot_roc,
    plot_training_curves,
)
from medtl.evaluate.stats import bootstrap_stat, multiclass_metrics
from medtl.training.checkpoint import ModelSpec
from medtl.workflows.rundir import FoldRecord, PredictionRow, RunDir
from medtl.workflows.trainers import FoldTrainer

__all__ = ["FoldContext", "bootstrap_metrics", "start", "fit_fold", "prediction_rows", "print_summary", "rank_out", "score", "score_per_site",
           "track", "write_plots"]


@dataclass
class FoldContext:
    """What every fold of one run shares."""

    cfg: Config
    data: PreparedData
    run: RunDir
    config_hash: str
    trainer: FoldTrainer
    bar: object = None


def fit_fold(ctx: FoldContext, key: str, trn: np.ndarray, val: np.ndarray, test: np.ndarray, seeds: FoldSeeds, *,
             description: str) -> tuple[FoldRecord, np.ndarray | None]:
    """Train one fold and write its checkpoint; returns its record and the validation probabilities used.

    The temperature (``evaluate.calibration``) and threshold (``evaluate.threshold``) are
    fitted on ``val`` only. The returned validation probabilities are the calibrated ones.
    """
    cfg, data = ctx.cfg, ctx.data
    fitted = ctx.trainer.fit(cfg, data, trn, val, seeds, description=description, bar=ctx.bar)
    p_test = fitted.predict(test)
    p_val = fitted.predict_val() if len(val) else None
    temperature, p_test_use, p_val_use = None, p_test, p_val
    if cfg.evaluate.calibration == "temperature" and p_val is not None:
        ts = TemperatureScaler().fit(p_val, data.y[val])
        temperature = float(ts.temperature_)
        p_val_use, p_test_use = ts.transform(p_val), ts.transform(p_test)
    thr = 0.5 if p_val_use is None else choose_threshold(data.y[val], p_val_use, cfg.evaluate.threshold,
                                                         target_sensitivity=cfg.evaluate.target_sensitivity)
    if fitted.save is not None:
        spec = ModelSpec.from_config(cfg, len(data.class_names))
        meta = ctx.run.checkpoint_meta(cfg, spec, data.class_names, ctx.config_hash, fold=key,
                                       best_epoch=fitted.info.get("best_epoch"), threshold=thr,
                                       temperature=temperature, **fitted.meta)
        fitted.save(ctx.run.checkpoint(key), meta)
    record = FoldRecord(config_hash=ctx.config_hash, fold=key, test_ids=[data.cases[i].case_id for i in test],
                        proba=np.asarray(p_test_use).tolist(), proba_raw=np.asarray(p_test).tolist(), threshold=thr,
                        temperature=temperature, n_train=int(len(trn)), n_val=int(len(val)), info=fitted.info)
    return record, p_val_use


def score(cfg: Config, y: np.ndarray, proba: np.ndarray, groups: np.ndarray, threshold: float,
          calibrated: np.ndarray | None) -> dict:
    """Headline metrics with patient-bootstrap CIs, calibration (ECE, Brier, NLL) and multi-class extras."""
    headline = calibrated if calibrated is not None else proba
    metrics, binfo = bootstrap_metrics(cfg, y, headline, groups, threshold)
    nb, seed = max(200, cfg.evaluate.n_bootstrap // 5), cfg.evaluate.seed
    cal = {}
    for label, p in (("uncalibrated", proba), ("calibrated", calibrated)):
        if p is None:
            continue
        cal[label] = {"ece": bootstrap_stat(expected_calibration_error, y, p, groups, n_boot=nb, seed=seed),
                      "brier": bootstrap_stat(brier_score, y, p, groups, n_boot=nb, seed=seed),
                      "nll": calibration_metrics(y, p)["nll"]}
    out = {"metrics": metrics, "bootstrap": binfo, "calibration": cal}
    if proba.shape[1] > 2:
        out["multiclass"] = multiclass_metrics(y, headline, ordinal=cfg.evaluate.ordinal)
    return out


def bootstrap_metrics(cfg: Config, y, proba, groups, threshold) -> tuple[dict, dict]:
    res = bootstrap_ci(y, proba, groups, n_boot=cfg.evaluate.n_bootstrap, seed=cfg.evaluate.seed, threshold=threshold)
    info = res.pop("_bootstrap", {})
    return res, info


def score_per_site(cfg: Config, data: PreparedData, idx: np.ndarray, proba: np.ndarray, threshold: float) -> dict:
    """Per-site metrics with CIs (``{}`` when the data has no sites)."""
    sites = np.array([data.cases[i].site or "" for i in idx], dtype=object)
    if not any(sites):
        return {}
    groups = data.groups[idx]
    out = {}
    for s in sorted(set(sites.tolist())):
        m = sites == s
        res, _ = bootstrap_metrics(cfg, data.y[idx][m], proba[m], groups[m], threshold)
        out[s or "(none)"] = {"n_cases": int(m.sum()), **res}
    return out


def prediction_rows(data: PreparedData, idx: np.ndarray, proba: np.ndarray, folds: list[list[str]], pseudo,
                    threshold: float, *, labelled: bool = True) -> list[PredictionRow]:
    """``predictions.csv`` rows: pseudonymised patients, one probability per class, the prediction."""
    names = data.class_names
    pred = predicted_class(proba, threshold)
    return [PredictionRow(id=data.cases[i].case_id, patient_id=pseudo(data.cases[i].patient_id),
                          site=data.cases[i].site or "", folds=list(f),
                          label=names[data.y[i]] if labelled else "",
                          proba={n: float(v) for n, v in zip(names, p)}, pred=names[c])
            for i, p, f, c in zip(idx, proba, folds, pred)]


def write_plots(run: RunDir, y: np.ndarray, proba: np.ndarray, names: list[str], threshold: float,
                history: list[dict], fold_ids: np.ndarray | None, title: str,
                calibrated: np.ndarray | None = None) -> dict[str, str]:
    """ROC, confusion matrix, reliability diagram and training curves into the run directory."""
    out = run.path
    plots = {"roc": plot_roc(y, proba, names, out / "roc.png", fold_ids=fold_ids, title=f"ROC — {title}"),
             "confusion": plot_confusion(y, predicted_class(calibrated if calibrated is not None else proba,
                                                            threshold), names, out / "confusion.png",
                                         title=f"Confusion — {title}")}
    curves = {"uncalibrated" if calibrated is not None else "model": (y, proba)}
    if calibrated is not None:
        curves["temperature-scaled"] = (y, calibrated)
    plots["reliability"] = plot_reliability(curves, out / "reliability.png", title=f"Reliability — {title}")
    if history:
        plots["training"] = plot_training_curves(history, out / "training.png", title="Training curves")
    return {k: Path(v).name for k, v in plots.items()}


def print_summary(title: str, metrics: dict) -> None:
    t = Table(title=title)
    t.add_column("metric")
    t.add_column("value", justify="right")
    t.add_column("95% CI (patient bootstrap)", justify="right")

    def fmt(x) -> str:
        return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.3f}"

    for k, v in metrics.items():
        if isinstance(v, dict) and "value" in v:
            lo, hi = v["ci95"]
            t.add_row(k, fmt(v["value"]), f"[{fmt(lo)}, {fmt(hi)}]")
    console.print(t)


def start(cfg: Config, out_dir, *, resume: bool, progress: bool, data: PreparedData | None
          ) -> tuple[RunDir, str, PreparedData, bool]:
    """Open the run directory (rank 0 only under torchrun), write the config, decode the data once.

    Returns ``(run, config hash, prepared data, progress)``; unreadable inputs are listed in
    ``skipped.json`` by case id and reason (and said on the console); their paths only with
    ``privacy.reveal_ids``.
    """
    from medtl.data.prepare import prepare

    out_dir, progress = rank_out(out_dir, progress)
    run = RunDir(out_dir)
    h = run.start(cfg, resume=resume)
    data = data if data is not None else prepare(cfg, progress=progress)
    run.write_skipped(data.skipped, reveal_ids=cfg.privacy.reveal_ids)
    if data.skipped:
        console.print(f"[yellow]Skipped {len(data.skipped)} unreadable case(s); see {run / run.SKIPPED}[/]")
    return run, h, data, progress


def rank_out(out_dir, progress: bool):
    """Under torchrun every rank runs the workflow; only rank 0 writes ``out_dir`` and shows bars."""
    from medtl.training import distributed

    distributed.init_from_env()
    if distributed.is_main():
        return out_dir, progress
    import tempfile

    return tempfile.mkdtemp(prefix=f"medtl-rank{distributed.rank()}-"), False


def track(cfg: Config, run: RunDir, metrics: dict) -> None:
    if cfg.tracking == "mlflow":
        from medtl.workflows.tracking import log_run

        log_run(cfg, run, metrics)
