"""The one fold driver shared by cross-validation and official-split training.

For one fold, with any trainer (:mod:`medtl.workflows.trainers`): fit on the training cases,
choose the temperature and the threshold on the validation cases (never the test cases),
save the checkpoint, predict the test cases and return a :class:`FoldRecord`. Then score
pooled predictions with patient-bootstrap CIs, write plots and print the summary.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.table import Table

from medtl._compute import ComputeBill
from medtl._runtime import FoldSeeds, console, resolve_device
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
from medtl.workflows.rundir import FoldRecord, PredictionRow, RunDir, epochs_trained
from medtl.workflows.trainers import FoldTrainer, n_outputs

__all__ = ["FoldContext", "add_tasks", "bootstrap_metrics", "start", "fit_fold", "fold_task_outputs",
           "prediction_rows", "print_summary", "rank_out", "score", "score_per_site", "task_output_columns", "track",
           "write_plots"]


@dataclass
class FoldContext:
    """What every fold of one run shares."""

    cfg: Config
    data: PreparedData
    run: RunDir
    config_hash: str
    trainer: FoldTrainer
    bar: object = None
    bill: ComputeBill | None = None  # the run's compute bill; each fold's own bill is merged into it


def fit_fold(ctx: FoldContext, key: str, trn: np.ndarray, val: np.ndarray, test: np.ndarray, seeds: FoldSeeds, *,
             description: str) -> tuple[FoldRecord, np.ndarray | None]:
    """Train one fold and write its checkpoint; returns its record and the validation probabilities used.

    The temperature (``evaluate.calibration``) and threshold (``evaluate.threshold``) are
    fitted on ``val`` only. The returned validation probabilities are the calibrated ones.
    The fold's compute bill (features, nested CV's inner search, training, evaluation) is kept in
    ``record.info["compute"]``, so a resumed run still counts what this fold cost, and merged into
    ``ctx.bill``.
    """
    cfg, data = ctx.cfg, ctx.data
    bill = ComputeBill(resolve_device(cfg.train.device), cfg.train.cpu_watts_per_core)
    base = getattr(ctx.trainer, "inner", ctx.trainer)
    if hasattr(base, "features"):  # a probe: the frozen features once per run, billed to the fold that makes them
        before = getattr(base, "feature_info_", None)
        with bill.stage("features"):
            base.features(cfg, data)
        if base.feature_info_ is not before:  # computed now (a new info dict), not reused from memory
            bill.add_images("features", len(data.y))
    if hasattr(ctx.trainer, "search"):  # nested CV: the inner search (medtl.workflows.search), billed apart
        with bill.stage("search"):
            bill.add_images("search", ctx.trainer.search(cfg, data, trn, val, seeds, description=description,
                                                         bar=ctx.bar))
    with bill.stage("training"):
        fitted = ctx.trainer.fit(cfg, data, trn, val, seeds, description=description, bar=ctx.bar)
    epochs = epochs_trained(fitted.info)
    bill.add_images("training", len(trn) * epochs if epochs else len(trn) + len(val))
    with bill.stage("evaluation"):
        p_test = fitted.predict(test)
        p_val = fitted.predict_val() if len(val) else None
    bill.add_images("evaluation", len(test) + len(val))
    temperature, p_test_use, p_val_use = None, p_test, p_val
    if cfg.evaluate.calibration == "temperature" and p_val is not None:
        ts = TemperatureScaler().fit(p_val, data.y[val])
        temperature = float(ts.temperature_)
        p_val_use, p_test_use = ts.transform(p_val), ts.transform(p_test)
    thr = 0.5 if p_val_use is None else choose_threshold(data.y[val], p_val_use, cfg.evaluate.threshold,
                                                         target_sensitivity=cfg.evaluate.target_sensitivity)
    if fitted.save is not None:
        spec = ModelSpec.from_config(cfg, n_outputs(data))
        meta = ctx.run.checkpoint_meta(cfg, spec, data.class_names, ctx.config_hash, fold=key,
                                       best_epoch=fitted.info.get("best_epoch"), threshold=thr,
                                       temperature=temperature, **fitted.meta)
        fitted.save(ctx.run.checkpoint(key), meta)
    record = FoldRecord(config_hash=ctx.config_hash, fold=key, test_ids=[data.cases[i].case_id for i in test],
                        proba=np.asarray(p_test_use).tolist(), proba_raw=np.asarray(p_test).tolist(), threshold=thr,
                        temperature=temperature, n_train=int(len(trn)), n_val=int(len(val)),
                        info={**fitted.info, "compute": bill.as_dict()},
                        tasks=fold_task_outputs(data, fitted, trn, val, test))
    if ctx.bill is not None:
        ctx.bill.merge(record.info["compute"])
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


def start(cfg: Config, out_dir, *, resume: bool, progress: bool, data: PreparedData | None,
          bill: ComputeBill | None = None) -> tuple[RunDir, str, PreparedData, bool]:
    """Open the run directory (rank 0 only under torchrun), write the config, decode the data once.

    Returns ``(run, config hash, prepared data, progress)``; unreadable inputs are listed in
    ``skipped.json`` by case id and reason (and said on the console); their paths only with
    ``privacy.reveal_ids``. Decoding is billed to ``bill``'s ``decode`` stage.
    """
    from medtl.data.prepare import prepare

    out_dir, progress = rank_out(out_dir, progress)
    run = RunDir(out_dir)
    h = run.start(cfg, resume=resume)
    if data is None:
        with bill.stage("decode") if bill is not None else nullcontext():
            data = prepare(cfg, progress=progress, cache_dir=run.path / "decoded")  # over the memory budget
        if bill is not None:
            bill.add_images("decode", len(data.y))
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


# -- multi-task runs (config `tasks`) -----------------------------------------------------------
def fold_task_outputs(data: PreparedData, fitted, trn: np.ndarray, val: np.ndarray, test: np.ndarray) -> dict | None:
    """A fold's per-task test outputs for its record (``None`` for a single-task run); a regression
    task also keeps the mean of its labelled training-fold cases (``trn`` and ``val``), the baseline
    every MAE is compared with."""
    if getattr(fitted, "predict_tasks", None) is None or not data.tasks:
        return None
    outs = fitted.predict_tasks(test)
    tr = np.concatenate([trn, val])
    block = {}
    for t in data.tasks:
        block[t.name] = {"outputs": np.asarray(outs[t.name]).tolist()}
        if t.kind == "regression":
            v = t.values[tr]
            block[t.name]["train_mean"] = float(np.nanmean(v)) if (~np.isnan(v)).any() else None
    return block


def add_tasks(cfg: Config, data: PreparedData, run: RunDir, folds: list[tuple[FoldRecord, np.ndarray, int]],
              metrics: dict) -> dict:
    """Score every task of a multi-task run and add its columns to ``predictions.csv``.

    ``folds``: ``(record, test indices, repeat)`` of every fold of the run; outputs
    of repeats are averaged per case, like the pooled probabilities. Adds to ``metrics``:
    ``"tasks": {name: {"kind", "n_labelled", "n_missing", "n_patients", metrics with CIs}}`` (the
    primary task's metrics are ``pooled``/``test``), ``"task_weighting"`` and ``"task_weights"``
    (per fold: each task's loss weight, learned with ``uncertainty``). A regression task gets
    ``baseline_mae`` (predicting the training-fold mean) and ``mae_minus_baseline`` beside its
    ``mae``. Returns ``metrics``.
    """
    from medtl.data.tasks import label_counts
    from medtl.evaluate.multitask import score_task

    n = len(data.y)
    sums = {t.name: np.zeros((n, t.n_outputs)) for t in data.tasks}
    base, seen = np.zeros(n), np.zeros(n)
    weights = {}
    for rec, test, _ in folds:
        key = rec.fold
        for t in data.tasks:
            sums[t.name][test] += np.asarray(rec.tasks[t.name]["outputs"], dtype=np.float64).reshape(len(test), -1)
            if t.kind == "regression" and rec.tasks[t.name].get("train_mean") is not None:
                base[test] += rec.tasks[t.name]["train_mean"]
        seen[test] += 1
        weights[key] = rec.info.get("task_weights")
    cover = seen > 0
    outs = {k: v / np.maximum(seen, 1)[:, None] for k, v in sums.items()}
    baseline = base / np.maximum(seen, 1)
    counts = label_counts(data.tasks)
    ev = cfg.evaluate
    block = {}
    for i, t in enumerate(data.tasks):
        entry = {"kind": t.kind, "columns": list(t.columns), "weight": t.weight, **counts[t.name]}
        if t.kind != "regression":
            entry["class_names"] = list(t.class_names)
        if i == 0:
            entry.update(primary=True, metrics="pooled" if "pooled" in metrics else "test")
        else:
            y = t.values.copy()
            y[~cover] = np.nan  # cases no model was tested on (official split: train and val)
            entry["metrics"] = score_task(t.kind, y, outs[t.name], data.groups, class_names=t.class_names,
                                          n_boot=ev.n_bootstrap, seed=ev.seed,
                                          baseline=baseline if t.kind == "regression" else None)
            if t.kind == "regression":
                entry["baseline"] = "the mean of the task's labelled training-fold cases, per fold"
        block[t.name] = entry
    metrics.update(tasks=block, task_weighting=cfg.train.task_weighting, task_weights=weights)
    _task_columns(run, data, outs, baseline, cover)
    _print_tasks(cfg.name, block)
    return metrics


def _task_columns(run: RunDir, data: PreparedData, outs: dict, baseline: np.ndarray, cover: np.ndarray) -> None:
    """``predictions.csv`` with ``<task>.label``, ``<task>.prob_<class>`` / ``<task>.pred`` (and
    ``<task>.baseline`` for regression) after the primary task's columns; empty = no label or no output."""
    rows = run.read_predictions()
    index = {c.case_id: i for i, c in enumerate(data.cases)}
    for r in rows:
        i = index[r.id]
        extra = {}
        for t in data.tasks[1:]:
            v = t.values[i]
            if t.kind == "multilabel":
                extra.update({f"{t.name}.label_{lab}": "" if np.isnan(v[j]) else str(int(v[j]))
                              for j, lab in enumerate(t.class_names)})
            elif t.kind == "regression":
                extra[f"{t.name}.label"] = _num(v)
            else:
                extra[f"{t.name}.label"] = "" if np.isnan(v) else t.class_names[int(v)]
            extra.update(task_output_columns(t.name, t.kind, t.class_names, outs[t.name][i] if cover[i] else None))
            if t.kind == "regression":
                extra[f"{t.name}.baseline"] = _num(baseline[i]) if cover[i] else ""
        r.extra = extra
    run.write_predictions(rows, data.class_names)


def task_output_columns(name: str, kind: str, class_names: list[str], out: np.ndarray | None) -> dict[str, str]:
    """One case's ``predictions.csv`` cells of a task's head: ``<task>.prob_<class or label>`` and
    ``<task>.pred`` (the argmax class; the value for regression); empty cells when ``out`` is ``None``."""
    if kind == "regression":
        return {f"{name}.pred": "" if out is None else _num(float(out[0]))}
    cells = {f"{name}.prob_{c}": "" if out is None else _num(float(out[j])) for j, c in enumerate(class_names)}
    if kind != "multilabel":
        cells[f"{name}.pred"] = "" if out is None else class_names[int(np.argmax(out))]
    return cells


def _num(v: float) -> str:
    return "" if not np.isfinite(v) else f"{v:.6f}"


def _print_tasks(name: str, block: dict) -> None:
    t = Table(title=f"{name}: per-task metrics (95% CI, patient bootstrap)")
    for col in ("task", "kind", "labelled", "metric", "value", "95% CI"):
        t.add_column(col, justify="right" if col in ("labelled", "value", "95% CI") else "left")

    def fmt(x) -> str:
        return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.3f}"

    for task, e in block.items():
        m = e["metrics"]
        if not isinstance(m, dict):
            t.add_row(task, e["kind"], str(e["n_labelled"]), f"see {m}", "", "")
            continue
        shown = {"binary": ("auc", "acc"), "multiclass": ("auc", "acc"), "multilabel": ("macro_auc",),
                 "regression": ("mae", "baseline_mae", "mae_minus_baseline", "r2")}[e["kind"]]
        for k in shown:
            if k in m:
                t.add_row(task, e["kind"], str(e["n_labelled"]), k, fmt(m[k]["value"]),
                          f"[{fmt(m[k]['ci95'][0])}, {fmt(m[k]['ci95'][1])}]")
    console.print(t)
