"""Linear-probe cross-validation (``train.strategy.name: linear_probe``).

The encoder is frozen, so its features do not depend on the fold: one feature pass over
every image (cached on disk under ``MEDTL_CACHE_DIR/features`` when
``train.strategy.feature_cache`` is on), then the same patient-grouped outer folds as
:func:`medtl.evaluate.runs.cross_validate`, each with a :class:`~medtl.adapt.probe.LinearProbe`
whose ``C`` is picked by grouped inner CV on the training fold only.

Writes the same run-directory contract as ``cross_validate``: ``config.yaml``,
``metrics.json`` (pooled out-of-fold metrics with patient-bootstrap CIs, per-fold metrics
and their mean ± sd), ``predictions.csv`` (pseudonymised patient ids), ``roc.png``,
``confusion.png``, ``skipped.json``, ``folds/fold<k>.json`` and, for the logistic head,
``checkpoints/fold<k>/`` holding the frozen encoder with the probe folded into its final
linear layer (so ``medtl explain`` works on a linear-probe run).
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from medtl.adapt.probe import LinearProbe, default_cache_dir, extract_features, feature_cache_key
from medtl.config import Config
from medtl.data.prepare import PreparedData, prepare
from medtl.data.privacy import Pseudonymizer
from medtl.errors import ConfigError
from medtl.evaluate import _runio as io
from medtl.evaluate.calibration import TemperatureScaler, expected_calibration_error
from medtl.evaluate.metrics import METRIC_KEYS, compute_metrics
from medtl.evaluate.runs import _per_site, _score, _title, _track, make_model
from medtl.evaluate.schemes import fold_plan
from medtl.evaluate.splits import inner_split
from medtl.train.checkpoint import save_checkpoint
from medtl.train.loop import resolve_device, seed_everything

__all__ = ["cross_validate_linear_probe", "run_features"]

console = io.console


def run_features(cfg: Config, data: PreparedData, model: torch.nn.Module, *, progress: bool = True
                 ) -> tuple[np.ndarray, dict]:
    """Frozen features ``(N, F)`` of ``data.images`` for a run, and ``{"seconds", "cache", "dim"}``.

    Uses ``cfg.train.batch_size``, ``cfg.train.tta`` (flip-averaged features), the
    resolved ``cfg.train.device`` and the disk cache when ``cfg.train.strategy.feature_cache``.
    """
    t0 = time.time()
    device = resolve_device(cfg.train.device)
    cache_dir, key, state = None, None, "off"
    if cfg.train.strategy.feature_cache:
        cache_dir = default_cache_dir()
        extra = {"intensity": cfg.data.intensity.model_dump(mode="json"), "image_size": list(cfg.data.image_size),
                 "spacing": cfg.data.spacing}
        key = feature_cache_key(model, data.images, tta=cfg.train.tta, extra=extra)
        state = "hit" if (cache_dir / f"{key}.npy").is_file() else "miss"
    feats = extract_features(model, data.images, batch_size=cfg.train.batch_size, device=device,
                             cache_dir=cache_dir, cache_key=key, tta=cfg.train.tta, progress=progress)
    return feats, {"seconds": round(time.time() - t0, 2), "cache": state, "dim": int(feats.shape[1])}


def cross_validate_linear_probe(cfg: Config, out_dir: str | Path, *, progress: bool = True,
                                data: PreparedData | None = None) -> dict:
    """Patient-grouped stratified CV of a linear probe on frozen encoder features.

    Folds come from ``cv.scheme`` exactly as in :func:`medtl.evaluate.runs.cross_validate`
    (``kfold``, ``repeated``, ``leave_one_site_out``; ``nested`` is refused: the probe's
    ``C`` is already chosen by grouped inner CV). Per fold, ``C``, the temperature
    (``evaluate.calibration``) and the threshold (``evaluate.threshold``) are chosen on the
    training patients only.

    Args:
        cfg: a config with ``train.strategy.name == "linear_probe"`` (head, C grid and
            cache in ``train.strategy``; folds in ``cv``; CIs in ``evaluate``).
        out_dir: run directory (see the module docstring for the files written).
        data: already prepared data (otherwise decoded from ``cfg.data``).

    Returns:
        The ``metrics.json`` dict (``pooled``, ``folds``, ``fold_mean``, ``strategy``, ...).

    Example:
        >>> cfg = load_config("configs/breastmnist_linear_probe.yaml")
        >>> cross_validate_linear_probe(cfg, "runs/lp")["pooled"]["auc"]["value"]  # doctest: +SKIP
        0.86
    """
    if cfg.train.strategy.name != "linear_probe":
        raise ConfigError("cross_validate_linear_probe needs train.strategy.name=linear_probe. Got "
                          f"{cfg.train.strategy.name!r} instead; use medtl.cross_validate for fine-tuning.")
    if cfg.cv.scheme == "nested":
        raise ConfigError("cv.scheme=nested does not apply to train.strategy.name=linear_probe: the probe already "
                          "picks C by grouped inner CV on each training fold (train.strategy.probe_C). "
                          "Use cv.scheme=kfold (or repeated / leave_one_site_out).")
    t0 = time.time()
    out, h = io.start_run(cfg, out_dir, resume=False)
    data = data if data is not None else prepare(cfg, progress=progress)
    io.write_json(out / "skipped.json", data.skipped)
    if data.skipped:
        console.print(f"[yellow]Skipped {len(data.skipped)} unreadable case(s); see {out / 'skipped.json'}[/]")
    groups, names = data.groups, data.class_names
    sites = np.array([c.site for c in data.cases], dtype=object)
    plan = fold_plan(cfg, data.y, groups, sites, names)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    seed_everything(cfg.train.seed)  # random-init encoders (model.pretrained=false) are reproducible
    model = make_model(cfg, len(names))
    feats, finfo = run_features(cfg, data, model, progress=progress)
    pseudo = Pseudonymizer.for_run(out, reveal=cfg.privacy.reveal_ids)
    (out / "folds").mkdir(exist_ok=True)
    n, k_cls = len(data.y), len(names)
    n_rep = max(f.repeat for f in plan) + 1
    oof, oof_raw = np.zeros((n_rep, n, k_cls)), np.zeros((n_rep, n, k_cls))
    fold_of = np.full((n_rep, n), "", dtype=object)
    per_fold, thresholds = [], []
    calibrate = cfg.evaluate.calibration != "none"
    with (io.progress_bar() if progress else nullcontext()) as bar:
        task = bar.add_task("linear probe folds", total=len(plan)) if bar is not None else None
        for spec in plan:
            tr, te = spec.train, spec.test
            seed = cfg.cv.seed + spec.index + 1009 * spec.repeat
            probe, thr, ts = _fit_fold(cfg, feats, data.y, groups, tr, seed)
            p_raw = _full_proba(probe, feats[te], k_cls)
            proba = ts.transform(p_raw) if ts is not None else p_raw
            temperature = ts.temperature_ if ts is not None else None
            oof[spec.repeat, te], oof_raw[spec.repeat, te], fold_of[spec.repeat, te] = proba, p_raw, spec.key
            thresholds.append(thr)
            if cfg.train.strategy.probe_head == "logistic":
                _save_folded(model, probe, out / "checkpoints" / spec.key,
                             io.checkpoint_meta(cfg, data, h, fold=spec.key, best_epoch=None, threshold=thr,
                                                temperature=temperature, strategy="linear_probe", probe_C=probe.C_))
            io.write_json(out / "folds" / f"{spec.key}.json",
                          {"config_hash": h, "fold": spec.key, "test_ids": [data.cases[i].case_id for i in te],
                           "proba": proba, "proba_raw": p_raw, "threshold": thr, "temperature": temperature,
                           "C": probe.C_, "inner_auc": probe.cv_scores_, "n_train": int(len(tr))})
            fm = compute_metrics(data.y[te], proba, threshold=thr)
            per_fold.append({"fold": spec.key, "repeat": spec.repeat, "site": spec.site, "n_test": int(len(te)),
                             "n_test_patients": int(len(set(groups[te]))), "best_epoch": None, "C": probe.C_,
                             "threshold": thr, "temperature": temperature, **fm,
                             "ece": expected_calibration_error(data.y[te], proba)})
            if task is not None:
                bar.advance(task)
    threshold = float(np.mean(thresholds))
    pooled_p, pooled_raw = oof.mean(0), oof_raw.mean(0)
    scored = _score(cfg, data.y, pooled_raw, groups, threshold, pooled_p if calibrate else None)
    io.write_predictions(out / "predictions.csv", data, np.arange(n), pooled_p,
                         ["|".join(fold_of[:, i]) for i in range(n)], pseudo, threshold)
    keys = [f.key for f in plan]
    fold_ids = np.array([keys.index(f) for f in fold_of[0]])
    title = f"{_title(cfg, plan)}, linear probe"
    plots = io.write_plots(out, data.y, pooled_raw, names, threshold, [], fold_ids, title,
                           pooled_p if calibrate else None)
    s = cfg.train.strategy
    metrics = {
        "task": "cv", "scheme": cfg.cv.scheme, "name": cfg.name, "folds": per_fold, "pooled": scored["metrics"],
        "fold_mean": {k: io.mean_sd([f[k] for f in per_fold]) for k in (*METRIC_KEYS, "ece")},
        "calibration": scored["calibration"], "bootstrap": scored["bootstrap"], "threshold": threshold,
        "threshold_rule": cfg.evaluate.threshold, "class_names": names, "n_cases": int(n),
        "n_patients": int(len(set(groups))), "n_skipped": len(data.skipped),
        "class_counts": {c: int((data.y == i).sum()) for i, c in enumerate(names)},
        "model": cfg.model.name, "pretrained": cfg.model.pretrained, "plots": plots,
        "strategy": {"name": "linear_probe", "head": s.probe_head, "C_grid": list(s.probe_C),
                     "C_per_fold": [f["C"] for f in per_fold], "feature_dim": finfo["dim"],
                     "feature_seconds": finfo["seconds"], "feature_cache": finfo["cache"], "tta": cfg.train.tta},
        "device": str(resolve_device(cfg.train.device)), "seconds": round(time.time() - t0, 1), "config_hash": h,
    }
    if "multiclass" in scored:
        metrics["multiclass"] = scored["multiclass"]
    site_metrics = _per_site(cfg, data, np.arange(n), pooled_p, threshold)
    if site_metrics:
        metrics["per_site"] = site_metrics
    io.write_json(out / "metrics.json", metrics)
    io.print_summary(f"{cfg.name}: {title} on frozen {cfg.model.name} ({n} cases, "
                     f"{metrics['n_patients']} patients)", scored["metrics"])
    _track(cfg, out, metrics)
    return metrics


def _probe(cfg: Config, seed: int, C_grid=None) -> LinearProbe:
    s = cfg.train.strategy
    return LinearProbe(head=s.probe_head, C_grid=list(C_grid or s.probe_C),
                       class_weight="balanced" if cfg.train.class_weighted else None,
                       inner_splits=cfg.cv.inner_splits, random_state=seed)


def _fit_fold(cfg: Config, feats: np.ndarray, y: np.ndarray, groups: np.ndarray, tr: np.ndarray, seed: int
              ) -> tuple[LinearProbe, float, TemperatureScaler | None]:
    """Probe fitted on the training fold (C by grouped inner CV), its threshold and temperature.

    Threshold and temperature (when configured) come from a probe refitted at the chosen
    ``C`` on the inner training split and scored on the inner validation split.
    """
    probe = _probe(cfg, seed).fit(feats[tr], y[tr], groups=groups[tr])
    thr, ts = 0.5, None
    if cfg.evaluate.threshold != "fixed" or cfg.evaluate.calibration != "none":
        itr, iva = inner_split(y[tr], groups[tr], val_fraction=cfg.cv.val_fraction, seed=seed)
        sub = _probe(cfg, seed, [probe.C_]).fit(feats[tr[itr]], y[tr[itr]])
        p_val = _full_proba(sub, feats[tr[iva]], int(y.max()) + 1)
        if cfg.evaluate.calibration == "temperature":
            ts = TemperatureScaler().fit(p_val, y[tr[iva]])
            p_val = ts.transform(p_val)
        thr = io.choose_threshold(cfg, y[tr[iva]], p_val)
    return probe, float(thr), ts


def _full_proba(probe: LinearProbe, X: np.ndarray, n_classes: int) -> np.ndarray:
    """``(n, n_classes)`` probabilities even when a training fold missed a class."""
    p = probe.predict_proba(X)
    full = np.zeros((len(X), n_classes))
    full[:, probe.classes_.astype(int)] = p
    return full


def _save_folded(model: torch.nn.Module, probe: LinearProbe, folder: Path, meta: dict) -> None:
    """Checkpoint = frozen encoder + the probe folded into its final linear layer."""
    W, b = probe.as_linear()
    head = model.classifier_layer
    if not isinstance(head, torch.nn.Linear) or tuple(head.weight.shape) != W.shape:
        return  # no plain linear head to hold the probe: the run stays valid, only `explain` is unavailable
    with torch.no_grad():
        head.weight.copy_(torch.as_tensor(W, dtype=head.weight.dtype))
        head.bias.copy_(torch.as_tensor(b, dtype=head.bias.dtype))
    save_checkpoint(model, folder, meta)
