"""Private helpers of the run drivers: run-directory set-up, atomic writers, tables, thresholds."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path

import numpy as np
import yaml
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from medtl import __version__
from medtl.config import Config, config_hash, dump_config
from medtl.data.prepare import PreparedData
from medtl.data.privacy import Pseudonymizer
from medtl.errors import MedtlError
from medtl.evaluate.metrics import METRIC_KEYS, bootstrap_ci, youden_threshold
from medtl.evaluate.plots import plot_confusion, plot_reliability, plot_roc, plot_training_curves

console = Console(stderr=True)


def progress_bar() -> Progress:
    return Progress(TextColumn("[progress.description]{task.description}"), BarColumn(),
                    TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(), console=console,
                    transient=True)


def _clean(obj):
    """JSON-safe copy: NaN/Inf become null (valid JSON for every reader), numpy scalars plain."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _clean(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def atomic_write_text(path: Path, text: str) -> Path:
    """Write via a temporary file in the same folder, fsync, then rename: never a half file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with tmp.open("w", encoding="utf-8", newline="") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def write_json(path: Path, obj) -> Path:
    return atomic_write_text(path, json.dumps(_clean(obj), indent=2, allow_nan=False))


def start_run(cfg: Config, out_dir: str | Path, *, resume: bool) -> tuple[Path, str]:
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
    tmp = out / ".config.yaml.tmp"
    dump_config(cfg, tmp)
    with tmp.open("a") as fh:
        fh.write(f"_config_hash: {h}\n_medtl_version: {__version__}\n")
    os.replace(tmp, old)
    return out, h


def checkpoint_meta(cfg: Config, data: PreparedData, h: str, **extra) -> dict:
    return {"class_names": data.class_names, "config_hash": h, "medtl_version": __version__,
            "data": {"intensity": cfg.data.intensity.model_dump(), "image_size": list(cfg.data.image_size),
                     "spatial_dims": cfg.data.spatial_dims},
            # everything create_encoder needs to rebuild the network before loading the weights
            "build": {"name": cfg.model.name, "num_classes": len(data.class_names),
                      "in_chans": int(data.images.shape[1]), "spatial_dims": cfg.data.spatial_dims,
                      "channel_mapping": cfg.model.channel_mapping, "drop_rate": cfg.model.drop_rate,
                      "conversion_3d": cfg.model.conversion_3d, "layout": cfg.model.layout,
                      "depth": cfg.data.image_size[0] if cfg.data.spatial_dims == 3 else None},
            **extra}


def predicted_class(proba: np.ndarray, threshold: float) -> np.ndarray:
    return (proba[:, 1] >= threshold).astype(int) if proba.shape[1] == 2 else proba.argmax(1)


def write_predictions(path: Path, data: PreparedData, idx: np.ndarray, proba: np.ndarray, folds: list,
                      pseudo: Pseudonymizer, threshold: float) -> None:
    """One row per case: id, pseudonymised patient, site, fold, label, prob_<class>..., pred."""
    names = data.class_names
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["id", "patient_id", "site", "fold", "label", *[f"prob_{n}" for n in names], "pred"])
    pred = predicted_class(proba, threshold)
    for i, p, f, c in zip(idx, proba, folds, pred):
        case = data.cases[i]
        w.writerow([case.case_id, pseudo(case.patient_id), case.site or "", f, names[data.y[i]],
                    *[f"{v:.6f}" for v in p], names[c]])
    atomic_write_text(path, buf.getvalue())


def write_plots(out: Path, y: np.ndarray, proba: np.ndarray, names: list[str], threshold: float,
                history: list[dict], fold_ids: np.ndarray | None, title: str,
                calibrated: np.ndarray | None = None) -> dict[str, str]:
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
    for k, v in metrics.items():
        if not isinstance(v, dict) or "value" not in v:
            continue
        lo, hi = v["ci95"]
        fmt = lambda x: "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.3f}"  # noqa: E731
        t.add_row(k, fmt(v["value"]), f"[{fmt(lo)}, {fmt(hi)}]")
    console.print(t)


def choose_threshold(cfg: Config, y_val: np.ndarray, p_val: np.ndarray) -> float:
    """Binary operating point from the inner validation split only (never the outer test fold).

    ``fixed``: 0.5; ``youden_val``: max sensitivity + specificity - 1; ``sensitivity_val``: the
    highest threshold whose validation sensitivity reaches ``evaluate.target_sensitivity``.
    """
    if p_val.shape[1] != 2 or len(np.unique(y_val)) < 2 or cfg.evaluate.threshold == "fixed":
        return 0.5
    if cfg.evaluate.threshold == "youden_val":
        return float(youden_threshold(y_val, p_val[:, 1]))
    pos = np.sort(p_val[y_val == 1, 1])[::-1]
    need = int(math.ceil(cfg.evaluate.target_sensitivity * len(pos)))
    return float(pos[max(need, 1) - 1])


def bootstrap(cfg: Config, y, proba, groups, threshold) -> tuple[dict, dict]:
    res = bootstrap_ci(y, proba, groups, n_boot=cfg.evaluate.n_bootstrap, seed=cfg.evaluate.seed, threshold=threshold)
    info = res.pop("_bootstrap", {})
    return res, info


def bootstrap_stat(fn, y: np.ndarray, proba: np.ndarray, groups: np.ndarray, *, n_boot: int, seed: int) -> dict:
    """Patient-bootstrap percentile CI for any ``fn(y, proba) -> float`` (ECE, Brier, ...)."""
    _, gi = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(gi == g) for g in range(gi.max() + 1)]
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(n_boot):
        take = np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))])
        v = fn(y[take], proba[take])
        if math.isfinite(v):
            vals.append(v)
    lo, hi = (np.percentile(vals, [2.5, 97.5]).tolist() if vals else [float("nan")] * 2)
    return {"value": fn(y, proba), "ci95": [lo, hi], "n_valid": len(vals)}


def mean_sd(values: list[float]) -> dict:
    v = np.asarray([np.nan if x is None else x for x in values], dtype=float)
    if np.isnan(v).all():
        return {"mean": float("nan"), "sd": float("nan")}
    return {"mean": float(np.nanmean(v)), "sd": float(np.nanstd(v, ddof=1)) if np.isfinite(v).sum() > 1 else 0.0}


def metric_keys() -> tuple[str, ...]:
    return METRIC_KEYS
