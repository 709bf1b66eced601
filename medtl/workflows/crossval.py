"""``medtl cv``: patient-grouped cross-validation with any fold trainer.

One driver for every scheme (``cv.scheme``: kfold, repeated, nested, leave_one_site_out)
and every trainer (fine-tune, linear probe; nested selection wraps either). Per outer fold,
everything that is *chosen* (epoch, probe ``C``, grid point, temperature, threshold) is
chosen on the fold's inner validation data, never on its test cases. Each finished fold is
stored (``folds/<key>.json`` and its checkpoint), so a killed run resumes: rerunning the same
command reuses finished folds, and because every fold draws its randomness from its own
:class:`~medtl._runtime.FoldSeeds`, the result is bit for bit that of an uninterrupted run.

Writes the run directory described in :mod:`medtl.workflows.rundir`.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np

from medtl._compute import ComputeBill
from medtl._runtime import FoldSeeds, console, device_name, progress_bar, resolve_device
from medtl.config import Config
from medtl.data.prepare import PreparedData
from medtl.evaluate.calibration import expected_calibration_error
from medtl.evaluate.metrics import METRIC_KEYS, compute_metrics
from medtl.evaluate.schemes import FoldSpec, fold_plan
from medtl.evaluate.splits import inner_split
from medtl.evaluate.stats import mean_sd
from medtl.workflows._folds import (
    FoldContext,
    add_tasks,
    fit_fold,
    prediction_rows,
    print_summary,
    score,
    score_per_site,
    start,
    track,
    write_plots,
)
from medtl.workflows.rundir import class_counts
from medtl.workflows.search import print_search, search_summary
from medtl.workflows.trainers import LinearProbe, make_trainer

__all__ = ["cross_validate"]


def cross_validate(cfg: Config, out_dir: str | Path, *, resume: bool = True, progress: bool = True,
                   data: PreparedData | None = None) -> dict:
    """Patient-grouped cross-validation of ``cfg``; returns the ``metrics.json`` dict.

    Args:
        cfg: the run config (``cv`` chooses the scheme, ``train.strategy`` the trainer).
        out_dir: the run directory (created; with ``resume``, finished folds there are reused).
        resume: reuse folds an earlier run of the same config finished in ``out_dir``.
        progress: show progress bars.
        data: already prepared data (otherwise decoded from ``cfg.data``).

    Example:
        >>> cfg = load_config("configs/ct_contrast.yaml", ["cv.n_splits=3"])  # doctest: +SKIP
        >>> cross_validate(cfg, "runs/ct")["pooled"]["auc"]                   # doctest: +SKIP
        {'value': 0.79, 'ci95': [0.67, 0.88], 'n_valid': 1000}
    """
    t0 = time.time()
    bill = ComputeBill(resolve_device(cfg.train.device), cfg.train.cpu_watts_per_core)
    # too few patients of a class for the folds is said by fold_plan, after every unreadable file is listed
    run, h, data, progress = start(cfg, out_dir, resume=resume, progress=progress, data=data, bill=bill)
    groups, names = data.groups, data.class_names
    sites = np.array([c.site for c in data.cases], dtype=object)
    plan = fold_plan(cfg, data.y, groups, sites, names)
    trainer = make_trainer(cfg, run.path / "search", resume=resume)  # nested CV's Optuna studies: <run>/search
    n, k_cls = len(data.y), len(names)
    n_rep = max(f.repeat for f in plan) + 1
    oof, oof_raw = np.zeros((n_rep, n, k_cls)), np.zeros((n_rep, n, k_cls))
    fold_of = np.full((n_rep, n), "", dtype=object)
    per_fold, history, thresholds, resumed = [], [], [], []
    with (progress_bar() if progress else nullcontext()) as bar:
        ctx = FoldContext(cfg, data, run, h, trainer, bar, bill)
        for spec in plan:
            test_ids = [data.cases[i].case_id for i in spec.test]
            done = run.read_fold(spec.key, test_ids) if resume else None
            if done is None:
                done = _run_fold(ctx, spec, len(plan))
                run.write_fold(done)
            else:
                console.print(f"{spec.key}: finished earlier, loaded from folds/{spec.key}.json")
                resumed.append(spec.key)
                if done.info.get("compute"):  # its recorded cost counts: the total stays honest after resume
                    bill.merge(done.info["compute"], earlier=True)
            te = spec.test
            proba = np.asarray(done.proba)
            oof[spec.repeat, te], oof_raw[spec.repeat, te] = proba, np.asarray(done.proba_raw)
            fold_of[spec.repeat, te] = spec.key
            thresholds.append(done.threshold)
            history += [{**row, "fold": spec.key} for row in done.history]
            choices = {k: done.info.get(k) for k in ("best_epoch", "C", "selected") if k in done.info}
            per_fold.append({"fold": spec.key, "repeat": spec.repeat, "site": spec.site, "n_test": int(len(te)),
                             "n_test_patients": int(len(set(groups[te]))), "threshold": done.threshold,
                             "temperature": done.temperature, **choices,
                             **compute_metrics(data.y[te], proba, threshold=done.threshold),
                             "ece": expected_calibration_error(data.y[te], proba) if len(te) else None})
    threshold = float(np.mean(thresholds))
    calibrated = cfg.evaluate.calibration != "none"
    pooled_p, pooled_raw = oof.mean(0), oof_raw.mean(0)
    bill.begin("evaluation")  # pooled bootstrap CIs, predictions and plots: the run's own evaluation
    scored = score(cfg, data.y, pooled_raw, groups, threshold, pooled_p if calibrated else None)
    pseudo = run.pseudonymizer(cfg.privacy.reveal_ids)
    folds_col = [[f for f in fold_of[:, i] if f] for i in range(n)]
    run.write_predictions(prediction_rows(data, np.arange(n), pooled_p, folds_col, pseudo, threshold), names)
    keys = [f.key for f in plan]
    fold_ids = np.array([keys.index(f) for f in fold_of[0]])
    title = _title(cfg, plan)
    plots = write_plots(run, data.y, pooled_raw, names, threshold, history, fold_ids, title,
                        pooled_p if calibrated else None)
    device = resolve_device(cfg.train.device)
    metrics = {
        "task": "cv", "scheme": cfg.cv.scheme, "trainer": trainer.name, "name": cfg.name, "folds": per_fold,
        "pooled": scored["metrics"],
        "fold_mean": {k: mean_sd([f[k] for f in per_fold]) for k in (*METRIC_KEYS, "ece")},
        "calibration": scored["calibration"], "bootstrap": scored["bootstrap"], "threshold": threshold,
        "threshold_rule": cfg.evaluate.threshold, "class_names": names, "n_cases": int(n),
        "n_patients": int(len(set(groups))), "n_skipped": len(data.skipped),
        "class_counts": class_counts(data.y, names), "model": cfg.model.name, "pretrained": cfg.model.pretrained,
        "plots": plots, "device": device_name(device), "seconds": round(time.time() - t0, 1), "config_hash": h,
    }
    base = getattr(trainer, "inner", trainer)
    if isinstance(base, LinearProbe):
        s = cfg.train.strategy
        metrics["strategy"] = {"name": "linear_probe", "head": s.probe_head, "C_grid": list(s.probe_C),
                               "C_per_fold": [f.get("C") for f in per_fold], "tta": cfg.train.tta,
                               **base.feature_info_}
    if "multiclass" in scored:
        metrics["multiclass"] = scored["multiclass"]
    if n_rep > 1:
        metrics["repeats"] = [{k: compute_metrics(data.y, oof[r], threshold=threshold)[k] for k in METRIC_KEYS}
                              for r in range(n_rep)]
        metrics["repeat_mean"] = {k: mean_sd([r[k] for r in metrics["repeats"]]) for k in METRIC_KEYS}
    site_metrics = score_per_site(cfg, data, np.arange(n), pooled_p, threshold)
    if site_metrics:
        metrics["per_site"] = site_metrics
    if data.tasks:  # multi-task: per-task metrics with CIs, and per-task columns in predictions.csv
        add_tasks(cfg, data, run, [(run.read_fold_record(s.key), s.test, s.repeat) for s in plan], metrics)
    if cfg.cv.scheme == "nested":  # the inner search's trials, wall time and choice per outer fold
        metrics["search"] = search_summary([run.read_fold_record(s.key) for s in plan])
    bill.end("evaluation")
    metrics["compute"] = {**bill.as_dict(), "resumed_folds": resumed}
    run.write_metrics(metrics)
    print_summary(f"{cfg.name}: {title}, pooled out-of-fold ({n} cases, {metrics['n_patients']} patients)",
                  scored["metrics"])
    if "search" in metrics:
        print_search(metrics["search"])
    track(cfg, run, metrics)
    return metrics


def _run_fold(ctx: FoldContext, spec: FoldSpec, n_folds: int):
    cfg, data = ctx.cfg, ctx.data
    seeds = FoldSeeds(cfg.train.seed, spec.repeat, spec.index)
    tr = spec.train
    itr, iva = inner_split(data.y[tr], data.groups[tr], val_fraction=cfg.cv.val_fraction,
                           seed=seeds.int("inner_split"))
    record, _ = fit_fold(ctx, spec.key, tr[itr], tr[iva], spec.test, seeds,
                         description=f"{spec.key} (of {n_folds})")
    return record


def _title(cfg: Config, plan: list[FoldSpec]) -> str:
    s = cfg.cv.scheme
    probe = ", linear probe" if cfg.train.strategy.name == "linear_probe" else ""
    if s == "repeated":
        return f"{cfg.cv.n_repeats}x{cfg.cv.n_splits}-fold CV{probe}"
    if s == "leave_one_site_out":
        return f"leave-one-site-out CV ({len(plan)} sites){probe}"
    return f"{'nested ' if s == 'nested' else ''}{cfg.cv.n_splits}-fold CV{probe}"
