"""``medtl rank``: score candidate encoders on the user's data without fine-tuning.

Each candidate is a frozen encoder run once over the data; its pooled features are scored
with LogME (the ranking key), LEEP (from the encoder's ImageNet head, when it has a
trained one) and a quick grouped 5-fold linear-probe AUC. A random-init encoder is scored
as a baseline; a pretrained candidate whose LogME falls below it gets a negative-transfer
warning.

Candidate specs: ``"tf_efficientnet_lite0"`` (pretrained weights: a weight record or any
timm name), ``"resnet18:scratch"`` (random initialisation, same preprocessing) or
``"name:pretrained"`` (explicit). With an official split (MedMNIST ``official`` or a
manifest ``split`` column) only the ``train`` and ``val`` cases are scored, so the ranking
never sees the test set it may later be judged on.

LEEP needs source-class probabilities: for a pretrained encoder with its source classifier
(e.g. the 1000 ImageNet classes) it is the softmax of that head on the pooled features.
Random-init encoders and weight sets without a classifier (``num_classes == 0`` in the
record) have no trained source head: their LEEP is ``None`` (shown as "n/a").
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from rich.table import Table

from medtl._compute import ComputeBill
from medtl._io import atomic_write_text, write_json
from medtl._runtime import console, resolve_device, seed_everything
from medtl.adapt.probe import (
    default_cache_dir,
    extract_features,
    feature_cache_key,
    source_probabilities,
)
from medtl.adapt.transferability import leep, logme, probe_auc
from medtl.config import Config
from medtl.data.prepare import PreparedData, prepare
from medtl.errors import ConfigError
from medtl.models.encoders import create_encoder
from medtl.models.records import resolve_record
from medtl.workflows.rundir import RunDir

__all__ = ["parse_candidate", "rank"]

_MODES = {"pretrained": True, "scratch": False}


def parse_candidate(spec: str) -> tuple[str, bool]:
    """``"name[:pretrained|:scratch]"`` -> ``(name, pretrained)``.

    Example:
        >>> parse_candidate("resnet18:scratch")
        ('resnet18', False)
    """
    name, _, mode = str(spec).strip().partition(":")
    if not name or (mode and mode not in _MODES):
        raise ConfigError(f"Candidate '{spec}' is not of the form NAME, NAME:pretrained or NAME:scratch "
                          "(e.g. tf_efficientnet_lite0 or resnet18:scratch).")
    return name, _MODES.get(mode, True)


def rank(cfg: Config, candidates: list[str], *, out_dir: str | Path | None = None, progress: bool = True,
                  baseline: str | None = "auto", data: PreparedData | None = None) -> list[dict]:
    """Score and rank candidate encoders on ``cfg``'s data, best LogME first.

    Args:
        cfg: the run config (data, ``model.channel_mapping``, ``train.batch_size``/``device``/
            ``seed``, ``train.strategy.feature_cache``, ``cv.n_splits``/``seed`` for the probe).
        candidates: encoder specs (see the module docstring), at least one.
        out_dir: when given, ``rank.json``, ``rank.md`` and ``config.yaml`` are written there.
        baseline: a random-init spec to compare against; ``"auto"`` adds
            ``"<first candidate>:scratch"`` unless a ``:scratch`` candidate is given; ``None``: none.
        data: already prepared data.

    Returns:
        One dict per encoder, ranked: ``{"rank", "encoder", "logme", "leep", "probe_auc",
        "feature_dim", "seconds", "pretrained", "baseline", "warning"}``.

    Example:
        >>> cfg = load_config("configs/breastmnist.yaml", ["data.image_size=[64, 64]"])
        >>> rows = rank(cfg, ["tf_efficientnet_lite0", "tf_efficientnet_lite1"])  # doctest: +SKIP
        >>> rows[0]["encoder"], rows[0]["logme"]  # doctest: +SKIP
        ('tf_efficientnet_lite1', -0.52)
    """
    if isinstance(candidates, str) or not candidates:
        raise ConfigError("The 'candidates' parameter of rank must be a non-empty list of encoder specs, "
                          f"e.g. ['tf_efficientnet_lite0', 'resnet18:scratch']. Got {candidates!r} instead.")
    specs = [(s, *parse_candidate(s)) for s in candidates]
    if len({s for s, *_ in specs}) != len(specs):
        raise ConfigError(f"Candidates must be distinct. Got {list(candidates)}.")
    if baseline == "auto":
        has_scratch = any(not p for _, _, p in specs)
        baseline = None if has_scratch else f"{resolve_record(specs[0][1]).architecture}:scratch"
    if baseline is not None and baseline not in {s for s, *_ in specs}:
        specs.append((baseline, *parse_candidate(baseline)))
    t0 = time.time()
    bill = ComputeBill(resolve_device(cfg.train.device), cfg.train.cpu_watts_per_core)
    if data is None:
        with bill.stage("decode"):
            data = prepare(cfg, progress=progress)
        bill.add_images("decode", len(data.y))
    idx, used = _scored_cases(data)
    images, y, groups = data.images[idx], data.y[idx], data.groups[idx]
    n_splits = min(cfg.cv.n_splits, min(len(np.unique(groups[y == c])) for c in np.unique(y)))
    rows = [_score(cfg, spec, name, pretrained, images, y, groups, max(2, n_splits), progress, bill)
            for spec, name, pretrained in specs]
    base_rows = [r for r in rows if not r["pretrained"]]
    floor = max(base_rows, key=lambda r: r["logme"]) if base_rows else None
    for r in rows:
        r["baseline"] = r["encoder"] == baseline or (baseline is None and not r["pretrained"])
        r["warning"] = None
        if floor is not None and r["pretrained"] and r["logme"] < floor["logme"]:
            r["warning"] = (f"{r['encoder']} scores below the random-init baseline {floor['encoder']} (LogME "
                            f"{r['logme']:.3f} < {floor['logme']:.3f}; probe AUC {r['probe_auc']:.3f} vs "
                            f"{floor['probe_auc']:.3f}): its pretrained features transfer worse than random ones "
                            "here (negative transfer).")
    rows.sort(key=lambda r: -r["logme"])
    for i, r in enumerate(rows, 1):
        r["rank"] = i
    _print(rows, cfg, len(idx), used)
    if out_dir is not None:
        _write(rows, cfg, out_dir, len(idx), used, time.time() - t0, bill.as_dict())
    return rows


def _scored_cases(data: PreparedData) -> tuple[np.ndarray, str]:
    splits = {getattr(c, "split", None) for c in data.cases}
    if "test" in splits:
        idx = np.array([i for i, c in enumerate(data.cases) if getattr(c, "split", None) != "test"], dtype=int)
        return idx, "train+val (official test split held out)"
    return np.arange(len(data.cases)), "all cases"


def _score(cfg: Config, spec: str, name: str, pretrained: bool, images: np.ndarray, y: np.ndarray,
           groups: np.ndarray, n_splits: int, progress: bool, bill: ComputeBill) -> dict:
    t = time.time()
    record = resolve_record(name, pretrained=pretrained)
    seed_everything(cfg.train.seed)  # random-init candidates are reproducible
    # as many input channels as the images have (multi-window CT: one per window), mapped onto the
    # weights' first convolution by model.channel_mapping as in training
    model = create_encoder(name, pretrained=pretrained, num_classes=max(record.num_classes, 1),
                           in_chans=int(images.shape[1]), channel_mapping=cfg.model.channel_mapping, drop_rate=0.0)
    cache_dir = key = None
    if cfg.train.strategy.feature_cache:
        cache_dir = default_cache_dir()
        key = feature_cache_key(model, images, extra={"intensity": cfg.data.intensity.model_dump(mode="json"),
                                                      "image_size": list(cfg.data.image_size)})
    if progress:
        console.print(f"scoring {spec} ...")
    tf = time.perf_counter()
    with bill.stage("features"):
        feats = extract_features(model, images, batch_size=cfg.train.batch_size,
                                 device=resolve_device(cfg.train.device), cache_dir=cache_dir, cache_key=key,
                                 progress=progress)
    features_s = time.perf_counter() - tf
    bill.add_images("features", len(images))
    with bill.stage("evaluation"):
        src = source_probabilities(model, feats) if pretrained else None
        scores = {"logme": logme(feats, y), "leep": leep(src, y) if src is not None else None,
                  "probe_auc": probe_auc(feats, y, groups, n_splits=n_splits, seed=cfg.cv.seed)}
    return {"encoder": spec, "model": name, "pretrained": pretrained, "weights": record.name, **scores,
            "feature_dim": int(feats.shape[1]), "seconds": round(time.time() - t, 1),
            "features_images_per_s": round(len(images) / features_s, 1) if features_s > 0 else None}


def _fmt(v, nd=3) -> str:
    return "n/a" if v is None else f"{v:.{nd}f}"


def _print(rows: list[dict], cfg: Config, n: int, used: str) -> None:
    t = Table(title=f"{cfg.name}: encoders ranked by LogME ({n} cases, {used}; image size "
                    f"{'x'.join(map(str, cfg.data.image_size))})")
    for col, just in [("rank", "right"), ("encoder", "left"), ("LogME", "right"), ("LEEP", "right"),
                      ("probe AUC", "right"), ("feature dim", "right"), ("seconds", "right")]:
        t.add_column(col, justify=just, no_wrap=col == "encoder")
    for r in rows:
        t.add_row(str(r["rank"]), r["encoder"] + (" (baseline)" if r["baseline"] else ""), _fmt(r["logme"]),
                  _fmt(r["leep"]), _fmt(r["probe_auc"]), str(r["feature_dim"]), f"{r['seconds']:.1f}")
    console.print(t)
    for r in rows:
        if r["warning"]:
            console.print(f"[yellow]warning:[/] {r['warning']}", highlight=False)


def _write(rows: list[dict], cfg: Config, out_dir: str | Path, n: int, used: str, seconds: float,
           compute: dict) -> None:
    run = RunDir(out_dir)
    h = run.start(cfg, resume=False)
    out = run.path
    doc = {"task": "rank", "name": cfg.name, "ranked_by": "logme", "n_cases": n, "cases_used": used,
           "image_size": list(cfg.data.image_size), "candidates": rows, "seconds": round(seconds, 1),
           "config_hash": h, "compute": compute}
    write_json(out / "rank.json", doc)
    lines = [f"# {cfg.name}: encoders ranked by LogME", "",
             f"{n} cases ({used}), image size {'x'.join(map(str, cfg.data.image_size))}, no fine-tuning.", "",
             "| rank | encoder | LogME | LEEP | probe AUC | feature dim | seconds |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['rank']} | {r['encoder']}{' (baseline)' if r['baseline'] else ''} | {_fmt(r['logme'])} | "
                     f"{_fmt(r['leep'])} | {_fmt(r['probe_auc'])} | {r['feature_dim']} | {r['seconds']:.1f} |")
    lines += ["", (f"Compute: {compute['wall_s']:.1f} s on {compute['device_name']}, peak memory "
                   f"{compute['peak_rss_bytes'] / 2**30:.2f} GiB, energy {compute['energy_wh']:.3g} Wh "
                   f"({compute['energy_method']})")]
    warnings = [r["warning"] for r in rows if r["warning"]]
    if warnings:
        lines += ["", *[f"- warning: {w}" for w in warnings]]
    atomic_write_text(out / "rank.md", "\n".join(lines) + "\n")
