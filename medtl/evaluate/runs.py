"""Run drivers: official-split training and patient-grouped cross-validation.

Both write the run-directory contract::

    RUN_DIR/config.yaml        resolved config (+ _config_hash)
    RUN_DIR/metrics.json       CV: {"folds": [...], "pooled": {key: {"value", "ci95"}}, "fold_mean": ...,
                               "calibration": ..., "per_site": ...}; official: {"test": ..., "val": ...}
                               (undefined values are null)
    RUN_DIR/predictions.csv    id, patient_id (pseudonymised), site, fold, label, prob_<class>..., pred
    RUN_DIR/checkpoints/       <fold key>/ or final/: model.safetensors + meta.json
    RUN_DIR/roc.png, confusion.png, reliability.png, training.png, skipped.json

Every file is written atomically (temporary file, then rename). Cross-validation resumes:
each finished fold is stored (``folds/<key>.json`` and its checkpoint) under the config's
hash; rerunning with the same config skips finished folds. Folds are seeded
independently, so a resumed run gives the same numbers as one that ran straight through.

Per outer fold, everything that is *chosen* (epoch, nested-CV grid point, temperature,
threshold) is chosen on the fold's inner validation data, never on its test cases.
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np

from medtl.adapt.domain import adaptation_inputs
from medtl.config import Config
from medtl.data.prepare import PreparedData, prepare
from medtl.data.privacy import Pseudonymizer
from medtl.errors import DataError
from medtl.evaluate import _runio as io
from medtl.evaluate.calibration import TemperatureScaler, calibration_metrics, expected_calibration_error, brier_score
from medtl.evaluate.metrics import METRIC_KEYS, compute_metrics
from medtl.evaluate.schemes import FoldSpec, fold_plan, grid_points, with_point
from medtl.evaluate.splits import inner_split, outer_splits
from medtl.evaluate.stats import multiclass_metrics
from medtl.models.encoders import create_encoder
from medtl.train.checkpoint import save_checkpoint
from medtl.train.loop import fit, predict_proba, resolve_device, seed_everything

__all__ = ["cross_validate", "train_official", "make_model"]

console = io.console


def make_model(cfg: Config, n_classes: int):
    """The configured encoder with a fresh ``n_classes`` head (see :func:`medtl.create_encoder`)."""
    m = cfg.model
    return create_encoder(m.name, pretrained=m.pretrained, num_classes=n_classes, in_chans=_data_chans(cfg),
                          spatial_dims=cfg.data.spatial_dims, channel_mapping=m.channel_mapping,
                          drop_rate=m.drop_rate, weights_path=m.weights_path, layout=m.layout,
                          conversion_3d=m.conversion_3d,
                          depth=cfg.data.image_size[0] if cfg.data.spatial_dims == 3 else None)


def _data_chans(cfg: Config) -> int:
    it = cfg.data.intensity
    return len(it.windows) if it.mode == "multiwindow" else 1


def _train(cfg: Config, data: PreparedData, trn: np.ndarray, val: np.ndarray, *, seed_offset: int,
           fit_seed_offset: int, description: str, bar):
    """Build and fit one model (the single place the run drivers call :func:`fit`).

    ``seed_offset`` seeds the head's initialisation, ``fit_seed_offset`` the augmentation and
    batch order; both are fixed per fold, so folds are independent of each other's order."""
    seed_everything(cfg.train.seed + seed_offset)
    model = make_model(cfg, len(data.class_names))
    tcfg = cfg.train.model_copy(update={"seed": cfg.train.seed + fit_seed_offset})
    return fit(model, data.images[trn], data.y[trn], data.images[val], data.y[val], tcfg,
               num_classes=len(data.class_names), description=description, progress=bar,
               **adaptation_inputs(cfg.adapt, data.images, [c.site for c in data.cases], trn, val))


def _score(cfg: Config, y: np.ndarray, proba: np.ndarray, groups: np.ndarray, threshold: float,
           calibrated: np.ndarray | None) -> dict:
    """Headline metrics with patient-bootstrap CIs, calibration, and multiclass extras."""
    headline = calibrated if calibrated is not None else proba
    metrics, binfo = io.bootstrap(cfg, y, headline, groups, threshold)
    nb, seed = max(200, cfg.evaluate.n_bootstrap // 5), cfg.evaluate.seed
    cal = {}
    for label, p in (("uncalibrated", proba), ("calibrated", calibrated)):
        if p is None:
            continue
        cal[label] = {"ece": io.bootstrap_stat(expected_calibration_error, y, p, groups, n_boot=nb, seed=seed),
                      "brier": io.bootstrap_stat(brier_score, y, p, groups, n_boot=nb, seed=seed),
                      "nll": calibration_metrics(y, p)["nll"]}
    out = {"metrics": metrics, "bootstrap": binfo, "calibration": cal}
    if proba.shape[1] > 2:
        out["multiclass"] = multiclass_metrics(y, headline, ordinal=cfg.evaluate.ordinal)
    return out


def _per_site(cfg: Config, data: PreparedData, idx: np.ndarray, proba: np.ndarray, threshold: float) -> dict:
    sites = np.array([data.cases[i].site or "" for i in idx], dtype=object)
    if not any(sites):
        return {}
    groups = data.groups[idx]
    out = {}
    for s in sorted(set(sites.tolist())):
        m = sites == s
        res, _ = io.bootstrap(cfg, data.y[idx][m], proba[m], groups[m], threshold)
        out[s or "(none)"] = {"n_cases": int(m.sum()), **res}
    return out


def _rank_out(out_dir: str | Path, progress: bool) -> tuple[str | Path, bool]:
    """Under torchrun every rank runs the driver; only rank 0 writes ``out_dir`` and shows bars."""
    from medtl.train import distributed

    distributed.init_from_env()
    if distributed.is_main():
        return out_dir, progress
    import tempfile

    return tempfile.mkdtemp(prefix=f"medtl-rank{distributed.rank()}-"), False


def cross_validate(cfg: Config, out_dir: str | Path, *, resume: bool = True, progress: bool = True,
                   data: PreparedData | None = None) -> dict:
    """Patient-grouped cross-validation (``cv.scheme``: kfold, repeated, nested, leave_one_site_out).

    Each outer fold trains on its training patients, selects the epoch (and, for nested CV,
    the grid point), fits the temperature and the threshold on an inner grouped validation
    split, and predicts its test patients. Returns the ``metrics.json`` dict; see the module
    docstring for the files written.

    Example:
        >>> cfg = load_config("configs/ct_contrast.yaml", ["cv.n_splits=3"])  # doctest: +SKIP
        >>> cross_validate(cfg, "runs/ct")["pooled"]["auc"]                   # doctest: +SKIP
        {'value': 0.79, 'ci95': [0.67, 0.88], 'n_valid': 1000}
    """
    if cfg.train.strategy.name == "linear_probe":
        from medtl.evaluate.linear_probe import cross_validate_linear_probe

        return cross_validate_linear_probe(cfg, out_dir, progress=progress, data=data)
    out_dir, progress = _rank_out(out_dir, progress)
    t0 = time.time()
    out, h = io.start_run(cfg, out_dir, resume=resume)
    data = data if data is not None else prepare(cfg, progress=progress)
    io.write_json(out / "skipped.json", data.skipped)
    if data.skipped:
        console.print(f"[yellow]Skipped {len(data.skipped)} unreadable case(s); see {out / 'skipped.json'}[/]")
    groups = data.groups
    sites = np.array([c.site for c in data.cases], dtype=object)
    plan = fold_plan(cfg, data.y, groups, sites, data.class_names)
    pseudo = Pseudonymizer.for_run(out, reveal=cfg.privacy.reveal_ids)
    device = resolve_device(cfg.train.device)
    (out / "folds").mkdir(exist_ok=True)
    n, k_cls = len(data.y), len(data.class_names)
    n_rep = max(f.repeat for f in plan) + 1
    oof = np.zeros((n_rep, n, k_cls))
    oof_raw = np.zeros((n_rep, n, k_cls))
    fold_of = np.full((n_rep, n), "", dtype=object)
    per_fold, history, thresholds = [], [], []
    with (io.progress_bar() if progress else nullcontext()) as bar:
        for spec in plan:
            record_path = out / "folds" / f"{spec.key}.json"
            ckpt = out / "checkpoints" / spec.key
            done = _load_fold(record_path, ckpt, h, data, spec.test) if resume else None
            if done is None:
                done = _run_fold(cfg, data, spec, groups, h, ckpt, device, bar, len(plan))
                io.write_json(record_path, done)
            else:
                console.print(f"{spec.key}: finished earlier, loaded from {record_path.name}")
            te = spec.test
            proba = np.asarray(done["proba"])
            oof[spec.repeat, te] = proba
            oof_raw[spec.repeat, te] = np.asarray(done.get("proba_raw", done["proba"]))
            fold_of[spec.repeat, te] = spec.key
            thresholds.append(done["threshold"])
            history += [{**row, "fold": spec.key} for row in done["history"]]
            fm = compute_metrics(data.y[te], proba, threshold=done["threshold"])
            per_fold.append({"fold": spec.key, "repeat": spec.repeat, "site": spec.site, "n_test": int(len(te)),
                             "n_test_patients": int(len(set(groups[te]))), "best_epoch": done["best_epoch"],
                             "threshold": done["threshold"], "temperature": done.get("temperature"),
                             "selected": done.get("selected"), **fm,
                             "ece": expected_calibration_error(data.y[te], proba) if len(te) else None})
    threshold = float(np.mean(thresholds))
    calibrated = cfg.evaluate.calibration != "none"
    pooled_p, pooled_raw = oof.mean(0), oof_raw.mean(0)
    scored = _score(cfg, data.y, pooled_raw, groups, threshold, pooled_p if calibrated else None)
    folds_col = ["|".join(fold_of[:, i]) for i in range(n)]
    io.write_predictions(out / "predictions.csv", data, np.arange(n), pooled_p, folds_col, pseudo, threshold)
    fold_ids = np.array([list(plan_keys(plan)).index(f) for f in fold_of[0]])
    plots = io.write_plots(out, data.y, pooled_raw, data.class_names, threshold, history, fold_ids,
                           _title(cfg, plan), pooled_p if calibrated else None)
    metrics = {
        "task": "cv", "scheme": cfg.cv.scheme, "name": cfg.name, "folds": per_fold, "pooled": scored["metrics"],
        "fold_mean": {k: io.mean_sd([f[k] for f in per_fold]) for k in (*METRIC_KEYS, "ece")},
        "calibration": scored["calibration"], "bootstrap": scored["bootstrap"], "threshold": threshold,
        "threshold_rule": cfg.evaluate.threshold, "class_names": data.class_names, "n_cases": int(n),
        "n_patients": int(len(set(groups))), "n_skipped": len(data.skipped),
        "class_counts": {c: int((data.y == i).sum()) for i, c in enumerate(data.class_names)},
        "model": cfg.model.name, "pretrained": cfg.model.pretrained, "plots": plots, "device": str(device),
        "seconds": round(time.time() - t0, 1), "config_hash": h,
    }
    if "multiclass" in scored:
        metrics["multiclass"] = scored["multiclass"]
    if n_rep > 1:
        metrics["repeats"] = [{k: compute_metrics(data.y, oof[r], threshold=threshold)[k] for k in METRIC_KEYS}
                              for r in range(n_rep)]
        metrics["repeat_mean"] = {k: io.mean_sd([r[k] for r in metrics["repeats"]]) for k in METRIC_KEYS}
    site_metrics = _per_site(cfg, data, np.arange(n), pooled_p, threshold)
    if site_metrics:
        metrics["per_site"] = site_metrics
    io.write_json(out / "metrics.json", metrics)
    io.print_summary(f"{cfg.name}: {_title(cfg, plan)}, pooled out-of-fold ({n} cases, "
                     f"{metrics['n_patients']} patients)", scored["metrics"])
    _track(cfg, out, metrics)
    return metrics


def plan_keys(plan: list[FoldSpec]) -> list[str]:
    return [f.key for f in plan]


def _title(cfg: Config, plan: list[FoldSpec]) -> str:
    s = cfg.cv.scheme
    if s == "repeated":
        return f"{cfg.cv.n_repeats}x{cfg.cv.n_splits}-fold CV"
    if s == "leave_one_site_out":
        return f"leave-one-site-out CV ({len(plan)} sites)"
    return f"{'nested ' if s == 'nested' else ''}{cfg.cv.n_splits}-fold CV"


def _select_point(cfg: Config, data: PreparedData, spec: FoldSpec, groups: np.ndarray, bar) -> tuple[dict, list]:
    """Nested CV: score every grid point by inner grouped k-fold on the outer training patients."""
    tr = spec.train
    inner = outer_splits(data.y[tr], groups[tr], n_splits=cfg.cv.inner_splits, seed=cfg.cv.seed + 7919 * (spec.index + 1))
    scores = []
    for gi, point in enumerate(grid_points(cfg.cv.grid)):
        pcfg = with_point(cfg, point)
        vals = []
        for j, (itr, ite) in enumerate(inner):
            res = _train(pcfg, data, tr[itr], tr[ite], seed_offset=1000 * spec.index + 37 * j + 1,
                         fit_seed_offset=spec.index + 37 * j + 1, description=f"{spec.key} inner {j + 1}/{len(inner)} grid {gi + 1}", bar=bar)
            vals.append(_val_score(res.history, cfg.train.select_metric))
        scores.append({"point": point, "inner_mean": float(np.nanmean(vals)), "inner": vals})
    lower_better = cfg.train.select_metric == "loss"
    best = (min if lower_better else max)(scores, key=lambda s: s["inner_mean"])
    return best["point"], scores


def _val_score(history: list[dict], metric: str) -> float:
    key = f"val_{metric}"
    vals = [row[key] for row in history if row.get(key) is not None]
    if not vals:
        return float("nan")
    return float(min(vals) if metric == "loss" else max(vals))


def _run_fold(cfg: Config, data: PreparedData, spec: FoldSpec, groups, h, ckpt, device, bar, n_folds) -> dict:
    tr, te = spec.train, spec.test
    itr, iva = inner_split(data.y[tr], groups[tr], val_fraction=cfg.cv.val_fraction,
                           seed=cfg.cv.seed + spec.index + 1009 * spec.repeat)
    trn, val = tr[itr], tr[iva]
    selected, inner_scores, fcfg = None, None, cfg
    if cfg.cv.scheme == "nested":
        selected, inner_scores = _select_point(cfg, data, spec, groups, bar)
        fcfg = with_point(cfg, selected)
        console.print(f"{spec.key}: inner CV selected {selected}")
    res = _train(fcfg, data, trn, val, seed_offset=1000 * spec.index + 100_003 * spec.repeat,
                 fit_seed_offset=spec.index + 7919 * spec.repeat, description=f"{spec.key} (of {n_folds})", bar=bar)
    p_val = predict_proba(res.model, data.images[val], device=device, tta=cfg.train.tta)
    p_test = predict_proba(res.model, data.images[te], device=device, tta=cfg.train.tta)
    temperature = None
    p_val_use, p_test_use = p_val, p_test
    if cfg.evaluate.calibration == "temperature":
        ts = TemperatureScaler().fit(p_val, data.y[val])
        temperature = ts.temperature_
        p_val_use, p_test_use = ts.transform(p_val), ts.transform(p_test)
    thr = io.choose_threshold(cfg, data.y[val], p_val_use)
    save_checkpoint(res.model, ckpt, io.checkpoint_meta(cfg, data, h, fold=spec.key, best_epoch=res.best_epoch,
                                                        threshold=thr, temperature=temperature, selected=selected))
    return {"config_hash": h, "fold": spec.key, "test_ids": [data.cases[i].case_id for i in te],
            "proba": p_test_use.tolist(), "proba_raw": p_test.tolist(), "threshold": thr,
            "temperature": temperature, "selected": selected, "inner_scores": inner_scores,
            "best_epoch": res.best_epoch, "history": res.history, "n_train": int(len(trn)), "n_val": int(len(val))}


def _load_fold(path: Path, ckpt: Path, h: str, data: PreparedData, te: np.ndarray) -> dict | None:
    if not (path.exists() and (ckpt / "model.safetensors").exists()):
        return None
    try:
        rec = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if rec.get("config_hash") != h or rec.get("test_ids") != [data.cases[i].case_id for i in te]:
        return None
    from medtl.train.checkpoint import CorruptCheckpointError, verify_checkpoint

    try:  # a corrupt or partial checkpoint means the fold is retrained, never loaded
        verify_checkpoint(ckpt)
    except CorruptCheckpointError as exc:
        console.print(f"[yellow]{path.stem}: {exc}; retraining this fold[/]")
        return None
    return rec


def train_official(cfg: Config, out_dir: str | Path, *, progress: bool = True, data: PreparedData | None = None) -> dict:
    """Train on the official ``train`` split, select (epoch, temperature, threshold) on ``val``,
    report on ``test`` with patient-bootstrap CIs."""
    out_dir, progress = _rank_out(out_dir, progress)
    t0 = time.time()
    out, h = io.start_run(cfg, out_dir, resume=False)
    data = data if data is not None else prepare(cfg, progress=progress)
    io.write_json(out / "skipped.json", data.skipped)
    trn, val, tst = data.subset("train"), data.subset("val"), data.subset("test")
    if len(trn) == 0 or len(val) == 0 or len(tst) == 0:
        raise DataError(f"Official-split training needs train, val and test cases; found {len(trn)}/{len(val)}/"
                        f"{len(tst)}. Use data.format=medmnist with data.split=official, or a manifest with a "
                        "'split' column (train/val/test); or run `medtl cv` instead.")
    device = resolve_device(cfg.train.device)
    with (io.progress_bar() if progress else nullcontext()) as bar:
        res = _train(cfg, data, trn, val, seed_offset=0, fit_seed_offset=0, description="train", bar=bar)
    p_val = predict_proba(res.model, data.images[val], device=device, tta=cfg.train.tta)
    p_test = predict_proba(res.model, data.images[tst], device=device, tta=cfg.train.tta)
    temperature, p_val_use, p_test_cal = None, p_val, None
    if cfg.evaluate.calibration == "temperature":
        ts = TemperatureScaler().fit(p_val, data.y[val])
        temperature, p_val_use, p_test_cal = ts.temperature_, ts.transform(p_val), ts.transform(p_test)
    thr = io.choose_threshold(cfg, data.y[val], p_val_use)
    save_checkpoint(res.model, out / "checkpoints" / "final",
                    io.checkpoint_meta(cfg, data, h, best_epoch=res.best_epoch, threshold=thr, temperature=temperature))
    pseudo = Pseudonymizer.for_run(out, reveal=cfg.privacy.reveal_ids)
    groups = data.groups
    scored = _score(cfg, data.y[tst], p_test, groups[tst], thr, p_test_cal)
    shown = p_test_cal if p_test_cal is not None else p_test
    io.write_predictions(out / "predictions.csv", data, tst, shown, ["test"] * len(tst), pseudo, thr)
    plots = io.write_plots(out, data.y[tst], p_test, data.class_names, thr, res.history, None,
                           "official test split", p_test_cal)
    metrics = {
        "task": "official", "name": cfg.name, "test": scored["metrics"],
        "val": compute_metrics(data.y[val], p_val_use, threshold=thr), "calibration": scored["calibration"],
        "temperature": temperature, "bootstrap": scored["bootstrap"], "threshold": thr,
        "threshold_rule": cfg.evaluate.threshold, "best_epoch": res.best_epoch, "class_names": data.class_names,
        "n_train": int(len(trn)), "n_val": int(len(val)), "n_test": int(len(tst)), "n_skipped": len(data.skipped),
        "model": cfg.model.name, "pretrained": cfg.model.pretrained, "plots": plots, "device": str(device),
        "seconds": round(time.time() - t0, 1), "config_hash": h, "history": res.history,
    }
    if "multiclass" in scored:
        metrics["multiclass"] = scored["multiclass"]
    io.write_json(out / "metrics.json", metrics)
    io.print_summary(f"{cfg.name}: official test split ({len(tst)} cases)", scored["metrics"])
    _track(cfg, out, metrics)
    return metrics


def _track(cfg: Config, out: Path, metrics: dict) -> None:
    if cfg.tracking == "mlflow":
        from medtl.evaluate.tracking import log_run

        log_run(cfg, out, metrics)
