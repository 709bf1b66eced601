"""Run drivers: official-split training and patient-grouped k-fold cross-validation.

Both write the run-directory contract::

    RUN_DIR/config.yaml        resolved config
    RUN_DIR/metrics.json       k-fold: {"folds": [...], "pooled": {key: {"value", "ci95"}}}
                               official: {"test": {key: {"value", "ci95"}}, "val": {...}}
    RUN_DIR/predictions.csv    id, patient_id (pseudonymised), fold, label, prob_<class>..., pred
    RUN_DIR/checkpoints/       fold<k>/ or final/: model.safetensors + meta.json
    RUN_DIR/roc.png, confusion.png, training.png, skipped.json

Cross-validation resumes: each finished fold is stored (``folds/fold<k>.json`` and its
checkpoint) under the config's hash; rerunning with the same config skips finished folds.
Folds are seeded independently, so a resumed run gives the same numbers as one that ran
straight through.
"""

from __future__ import annotations

import csv
import json
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import yaml
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from medtl import __version__
from medtl.config import Config, config_hash, dump_config
from medtl.data.prepare import PreparedData, prepare
from medtl.data.privacy import Pseudonymizer
from medtl.errors import DataError, MedtlError
from medtl.evaluate.metrics import METRIC_KEYS, bootstrap_ci, compute_metrics, youden_threshold
from medtl.evaluate.plots import plot_confusion, plot_roc, plot_training_curves
from medtl.evaluate.splits import check_disjoint_groups, inner_split, outer_splits
from medtl.models.encoders import create_encoder
from medtl.train.checkpoint import save_checkpoint
from medtl.train.loop import fit, predict_proba, resolve_device, seed_everything

__all__ = ["cross_validate", "train_official"]

console = Console(stderr=True)


def _progress() -> Progress:
    return Progress(TextColumn("[progress.description]{task.description}"), BarColumn(),
                    TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(), console=console,
                    transient=True)


def _start(cfg: Config, out_dir: str | Path, *, resume: bool) -> tuple[Path, str]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    h = config_hash(cfg)
    old = out / "config.yaml"
    if old.exists() and (out / "folds").exists() and resume:
        try:
            prev = yaml.safe_load(old.read_text()).get("_config_hash")
        except Exception:  # unreadable old config: treat as different
            prev = None
        if prev not in (None, h):
            raise MedtlError(f"'{out}' holds a run made with a different config (hash {prev}, now {h}). "
                             "Use a new --out directory, or --no-resume to overwrite it.")
    dump_config(cfg, old)
    with old.open("a") as fh:
        fh.write(f"_config_hash: {h}\n_medtl_version: {__version__}\n")
    return out, h


def _make_model(cfg: Config, n_classes: int):
    m = cfg.model
    return create_encoder(m.name, pretrained=m.pretrained, num_classes=n_classes, in_chans=1,
                          spatial_dims=len(cfg.data.image_size), channel_mapping=m.channel_mapping,
                          drop_rate=m.drop_rate, weights_path=m.weights_path)


def _meta(cfg: Config, data: PreparedData, h: str, **extra) -> dict:
    return {"class_names": data.class_names, "config_hash": h, "medtl_version": __version__,
            "data": {"intensity": cfg.data.intensity.model_dump(), "image_size": list(cfg.data.image_size)},
            **extra}


def _write_predictions(path: Path, data: PreparedData, idx: np.ndarray, proba: np.ndarray, folds: list,
                       pseudo: Pseudonymizer, threshold: float) -> None:
    names = data.class_names
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "patient_id", "site", "fold", "label", *[f"prob_{n}" for n in names], "pred"])
        for i, p, f in zip(idx, proba, folds):
            c = data.cases[i]
            pred = (1 if p[1] >= threshold else 0) if len(names) == 2 else int(np.argmax(p))
            w.writerow([c.case_id, pseudo(c.patient_id), c.site or "", f, names[data.y[i]],
                        *[f"{v:.6f}" for v in p], names[pred]])


def _plots(out: Path, y: np.ndarray, proba: np.ndarray, names: list[str], threshold: float, history: list[dict],
           fold_ids: np.ndarray | None, title: str) -> dict[str, str]:
    pred = (proba[:, 1] >= threshold).astype(int) if len(names) == 2 else proba.argmax(1)
    plots = {"roc": plot_roc(y, proba, names, out / "roc.png", fold_ids=fold_ids, title=f"ROC — {title}"),
             "confusion": plot_confusion(y, pred, names, out / "confusion.png", title=f"Confusion — {title}")}
    if history:
        plots["training"] = plot_training_curves(history, out / "training.png", title="Training curves")
    return {k: Path(v).name for k, v in plots.items()}


def _summary(title: str, metrics: dict) -> None:
    t = Table(title=title)
    t.add_column("metric")
    t.add_column("value", justify="right")
    t.add_column("95% CI (patient bootstrap)", justify="right")
    for k in METRIC_KEYS:
        v = metrics[k]
        t.add_row(k, f"{v['value']:.3f}", f"[{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}]")
    console.print(t)


def _threshold(cfg: Config, y_val: np.ndarray, p_val: np.ndarray) -> float:
    if cfg.evaluate.threshold == "youden_val" and p_val.shape[1] == 2 and len(np.unique(y_val)) == 2:
        return float(youden_threshold(y_val, p_val[:, 1]))
    return 0.5


def _ci(cfg: Config, y, proba, groups, threshold) -> tuple[dict, dict]:
    res = bootstrap_ci(y, proba, groups, n_boot=cfg.evaluate.n_bootstrap, seed=cfg.evaluate.seed, threshold=threshold)
    info = res.pop("_bootstrap", {})
    return res, info


def cross_validate(cfg: Config, out_dir: str | Path, *, resume: bool = True, progress: bool = True,
                   data: PreparedData | None = None) -> dict:
    """Patient-grouped, stratified k-fold CV with an inner grouped validation split per fold.

    Returns the ``metrics.json`` dict. See the module docstring for the files written.
    """
    t0 = time.time()
    out, h = _start(cfg, out_dir, resume=resume)
    data = data if data is not None else prepare(cfg, progress=progress)
    (out / "skipped.json").write_text(json.dumps(data.skipped, indent=2))
    if data.skipped:
        console.print(f"[yellow]Skipped {len(data.skipped)} unreadable case(s); see {out / 'skipped.json'}[/]")
    groups = data.groups
    folds = outer_splits(data.y, groups, n_splits=cfg.cv.n_splits, seed=cfg.cv.seed, class_names=data.class_names)
    check_disjoint_groups({k: groups[te] for k, (_, te) in enumerate(folds)})
    pseudo = Pseudonymizer.for_run(out, reveal=cfg.privacy.reveal_ids)
    device = resolve_device(cfg.train.device)
    (out / "folds").mkdir(exist_ok=True)
    oof = np.zeros((len(data.y), len(data.class_names)))
    fold_of = np.full(len(data.y), -1)
    per_fold, history, thresholds = [], [], []
    with (_progress() if progress else nullcontext()) as bar:
        for k, (tr, te) in enumerate(folds):
            record_path = out / "folds" / f"fold{k}.json"
            ckpt = out / "checkpoints" / f"fold{k}"
            done = _load_fold(record_path, ckpt, h, data, te) if resume else None
            if done is None:
                done = _run_fold(cfg, data, k, tr, te, groups, h, ckpt, device, bar)
                tmp = record_path.with_suffix(".part")
                tmp.write_text(json.dumps(done))
                tmp.replace(record_path)
            else:
                console.print(f"fold {k}: finished earlier, loaded from {record_path.name}")
            proba = np.asarray(done["proba"])
            oof[te], fold_of[te] = proba, k
            thresholds.append(done["threshold"])
            history += [{**row, "fold": k} for row in done["history"]]
            fm = compute_metrics(data.y[te], proba, threshold=done["threshold"])
            per_fold.append({"fold": k, "n_test": int(len(te)), "n_test_patients": int(len(set(groups[te]))),
                             "best_epoch": done["best_epoch"], "threshold": done["threshold"], **fm})
    threshold = float(np.mean(thresholds))
    pooled, binfo = _ci(cfg, data.y, oof, groups, threshold)
    _write_predictions(out / "predictions.csv", data, np.arange(len(data.y)), oof, list(fold_of), pseudo, threshold)
    plots = _plots(out, data.y, oof, data.class_names, threshold, history, fold_of, f"{cfg.cv.n_splits}-fold CV")
    metrics = {
        "task": "cv", "name": cfg.name, "folds": per_fold, "pooled": pooled,
        "fold_mean": {k: _mean_sd([f[k] for f in per_fold]) for k in METRIC_KEYS},
        "bootstrap": binfo, "threshold": threshold, "class_names": data.class_names,
        "n_cases": int(len(data.y)), "n_patients": int(len(set(groups))), "n_skipped": len(data.skipped),
        "class_counts": {n: int((data.y == i).sum()) for i, n in enumerate(data.class_names)},
        "model": cfg.model.name, "pretrained": cfg.model.pretrained, "plots": plots,
        "device": str(device), "seconds": round(time.time() - t0, 1), "config_hash": h,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    _summary(f"{cfg.name}: {cfg.cv.n_splits}-fold CV, pooled out-of-fold ({metrics['n_cases']} cases, "
             f"{metrics['n_patients']} patients)", pooled)
    return metrics


def _mean_sd(values: list[float]) -> dict:
    v = np.asarray(values, dtype=float)
    return {"mean": float(np.nanmean(v)), "sd": float(np.nanstd(v, ddof=1)) if len(v) > 1 else 0.0}


def _run_fold(cfg, data, k, tr, te, groups, h, ckpt, device, bar) -> dict:
    itr, iva = inner_split(data.y[tr], groups[tr], val_fraction=cfg.cv.val_fraction, seed=cfg.cv.seed + k)
    trn, val = tr[itr], tr[iva]
    seed_everything(cfg.train.seed + 1000 * k)  # fold-specific: resumable, order-independent
    model = _make_model(cfg, len(data.class_names))
    tcfg = cfg.train.model_copy(update={"seed": cfg.train.seed + k})
    res = fit(model, data.images[trn], data.y[trn], data.images[val], data.y[val], tcfg,
              num_classes=len(data.class_names), description=f"fold {k + 1}/{cfg.cv.n_splits}",
              progress=bar)
    p_val = predict_proba(res.model, data.images[val], device=device, tta=cfg.train.tta)
    thr = _threshold(cfg, data.y[val], p_val)
    proba = predict_proba(res.model, data.images[te], device=device, tta=cfg.train.tta)
    save_checkpoint(res.model, ckpt, _meta(cfg, data, h, fold=k, best_epoch=res.best_epoch, threshold=thr))
    return {"config_hash": h, "fold": k, "test_ids": [data.cases[i].case_id for i in te], "proba": proba.tolist(),
            "threshold": thr, "best_epoch": res.best_epoch, "history": res.history,
            "n_train": int(len(trn)), "n_val": int(len(val))}


def _load_fold(path: Path, ckpt: Path, h: str, data: PreparedData, te: np.ndarray) -> dict | None:
    if not (path.exists() and (ckpt / "model.safetensors").exists()):
        return None
    try:
        rec = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    if rec.get("config_hash") != h or rec.get("test_ids") != [data.cases[i].case_id for i in te]:
        return None
    return rec


def train_official(cfg: Config, out_dir: str | Path, *, progress: bool = True, data: PreparedData | None = None) -> dict:
    """Train on the official ``train`` split, select on ``val``, report on ``test``."""
    t0 = time.time()
    out, h = _start(cfg, out_dir, resume=False)
    data = data if data is not None else prepare(cfg, progress=progress)
    (out / "skipped.json").write_text(json.dumps(data.skipped, indent=2))
    trn, val, tst = data.subset("train"), data.subset("val"), data.subset("test")
    if len(trn) == 0 or len(val) == 0 or len(tst) == 0:
        raise DataError(f"Official-split training needs train, val and test cases; found {len(trn)}/{len(val)}/"
                        f"{len(tst)}. Use data.format=medmnist with data.split=official, or a manifest with a "
                        "'split' column (train/val/test); or run `medtl cv` instead.")
    device = resolve_device(cfg.train.device)
    seed_everything(cfg.train.seed)
    model = _make_model(cfg, len(data.class_names))
    with (_progress() if progress else nullcontext()) as bar:
        res = fit(model, data.images[trn], data.y[trn], data.images[val], data.y[val], cfg.train,
                  num_classes=len(data.class_names), description="train",
                  progress=bar)
    p_val = predict_proba(res.model, data.images[val], device=device, tta=cfg.train.tta)
    thr = _threshold(cfg, data.y[val], p_val)
    p_test = predict_proba(res.model, data.images[tst], device=device, tta=cfg.train.tta)
    save_checkpoint(res.model, out / "checkpoints" / "final", _meta(cfg, data, h, best_epoch=res.best_epoch, threshold=thr))
    pseudo = Pseudonymizer.for_run(out, reveal=cfg.privacy.reveal_ids)
    groups = data.groups
    test, binfo = _ci(cfg, data.y[tst], p_test, groups[tst], thr)
    _write_predictions(out / "predictions.csv", data, tst, p_test, ["test"] * len(tst), pseudo, thr)
    plots = _plots(out, data.y[tst], p_test, data.class_names, thr, res.history, None, "official test split")
    metrics = {
        "task": "official", "name": cfg.name, "test": test, "val": compute_metrics(data.y[val], p_val, threshold=thr),
        "bootstrap": binfo, "threshold": thr, "best_epoch": res.best_epoch, "class_names": data.class_names,
        "n_train": int(len(trn)), "n_val": int(len(val)), "n_test": int(len(tst)), "n_skipped": len(data.skipped),
        "model": cfg.model.name, "pretrained": cfg.model.pretrained, "plots": plots, "device": str(device),
        "seconds": round(time.time() - t0, 1), "config_hash": h, "history": res.history,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    _summary(f"{cfg.name}: official test split ({len(tst)} cases)", test)
    return metrics
