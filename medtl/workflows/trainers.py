"""Fold trainers: what the one CV driver calls to turn a fold's training cases into a model.

A trainer has one method, ``fit(cfg, data, train_idx, val_idx, seeds, description=, bar=)``,
returning a :class:`FoldFit`. The driver (:mod:`medtl.workflows._folds`) does everything
else the same way for every trainer: inner validation split, temperature, threshold,
checkpoint, test predictions, fold record, resume.

* :class:`FineTune`: fine-tunes the configured encoder (any ``train.strategy`` except
  ``linear_probe``), keeping the epoch with the best validation score.
* :class:`LinearProbe`: the frozen encoder's features, extracted once per run (and cached on
  disk when ``train.strategy.feature_cache``), with a scikit-learn probe whose ``C`` is picked
  by grouped inner CV on the fold's training patients.
* :class:`NestedSelection` wraps any trainer: an inner grouped k-fold over the fold's
  training patients scores every point of ``cv.grid``, and the best point is refitted.

Example:
    >>> trainer = make_trainer(cfg)                        # doctest: +SKIP
    >>> fit = trainer.fit(cfg, data, trn, val, FoldSeeds(0, 0, 3), description="fold3", bar=None)  # doctest: +SKIP
    >>> fit.predict(test_idx).shape                        # doctest: +SKIP
    (20, 2)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from medtl._runtime import FoldSeeds, console, resolve_device, seed_everything
from medtl.adapt.domain import adaptation_inputs
from medtl.adapt.probe import LinearProbe as _Probe
from medtl.adapt.probe import default_cache_dir, extract_features, feature_cache_key
from medtl.config import Config
from medtl.data.prepare import PreparedData
from medtl.data.tasks import target_matrix
from medtl.evaluate.schemes import grid_points, with_point
from medtl.evaluate.splits import outer_splits
from medtl.models.heads import MultiTaskHead
from medtl.training.checkpoint import ModelSpec, save_checkpoint
from medtl.training.loop import fit, predict_outputs, predict_proba, validation_scores

__all__ = ["FineTune", "FoldFit", "FoldTrainer", "LinearProbe", "NestedSelection", "fold_head", "make_model",
           "make_trainer", "n_outputs", "recalibrate_regression"]


@dataclass
class FoldFit:
    """A fitted fold model, as the driver sees it.

    Attributes:
        predict: case indices into the prepared data -> ``(n, K)`` probabilities of the fold's model.
        predict_val: ``() -> (n_val, K)`` probabilities of the validation cases from a model that
            never trained on them (threshold, temperature and nested-CV scores use these).
        save: ``(folder, meta) -> None`` writes the checkpoint, or ``None`` when there is none.
        info: what the trainer chose (``best_epoch``, ``history``, ``C``, ...), kept in the fold record.
        meta: extra checkpoint metadata (e.g. the strategy; multi-task runs: ``tasks``, the heads).
        predict_tasks: multi-task runs: case indices -> ``{task: (n, k)}`` every head's outputs
            (:func:`medtl.training.loop.predict_outputs`); ``None`` for a single task.
    """

    predict: Callable[[np.ndarray], np.ndarray]
    predict_val: Callable[[], np.ndarray]
    save: Callable[[Path, dict], None] | None
    info: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    predict_tasks: Callable[[np.ndarray], dict[str, np.ndarray]] | None = None


class FoldTrainer(Protocol):
    name: str

    def fit(self, cfg: Config, data: PreparedData, trn: np.ndarray, val: np.ndarray, seeds: FoldSeeds, *,
            description: str, bar) -> FoldFit: ...


def make_model(cfg: Config, n_classes: int):
    """The configured encoder with a fresh ``n_classes`` head (see :class:`~medtl.training.ModelSpec`)."""
    return ModelSpec.from_config(cfg, n_classes).build(pretrained=cfg.model.pretrained,
                                                       weights_path=cfg.model.weights_path)


def n_outputs(data: PreparedData) -> int:
    """Outputs of the run's network: the classes, or every head's outputs of a multi-task run."""
    return MultiTaskHead.from_targets(data.tasks).n_outputs if data.tasks else len(data.class_names)


def fold_head(data: PreparedData, trn: np.ndarray) -> MultiTaskHead:
    """The multi-task heads of a fold: regression targets standardised with the fold's training
    cases (``trn``, labelled ones; std 1 when fewer than two or constant)."""
    stats = {}
    for t in data.tasks:
        if t.kind == "regression":
            v = t.values[trn]
            v = v[~np.isnan(v)]
            sd = float(v.std()) if len(v) > 1 else 0.0
            stats[t.name] = (float(v.mean()) if len(v) else 0.0, sd if sd > 0 else 1.0)
    return MultiTaskHead.from_targets(data.tasks).with_stats(stats)


class FineTune:
    """Fine-tune the configured encoder on the fold (``train.strategy`` and ``adapt`` apply)."""

    name = "finetune"

    def fit(self, cfg: Config, data: PreparedData, trn: np.ndarray, val: np.ndarray, seeds: FoldSeeds, *,
            description: str, bar) -> FoldFit:
        if data.tasks:
            return self._fit_tasks(cfg, data, trn, val, seeds, description=description, bar=bar)
        seed_everything(seeds.int("init"))  # the new head's initialisation
        model = make_model(cfg, len(data.class_names))
        tcfg = cfg.train.model_copy(update={"seed": seeds.int("fit")})  # augmentation and batch order
        res = fit(model, data.images[trn], data.y[trn], data.images[val], data.y[val], tcfg,
                  num_classes=len(data.class_names), description=description, progress=bar,
                  **adaptation_inputs(cfg.adapt, data.images, [c.site for c in data.cases], trn, val))
        device = resolve_device(cfg.train.device)

        def predict(idx: np.ndarray) -> np.ndarray:
            return predict_proba(res.model, data.images[idx], device=device, tta=cfg.train.tta)

        return FoldFit(predict=predict, predict_val=lambda: predict(val),
                       save=lambda folder, meta: save_checkpoint(res.model, folder, meta),
                       info={"best_epoch": res.best_epoch, "history": res.history})

    def _fit_tasks(self, cfg: Config, data: PreparedData, trn: np.ndarray, val: np.ndarray, seeds: FoldSeeds, *,
                   description: str, bar) -> FoldFit:
        """One encoder, one head per task (:class:`~medtl.models.heads.MultiTaskHead`), missing labels masked."""
        head = fold_head(data, trn)
        seed_everything(seeds.int("init"))
        model = make_model(cfg, head.n_outputs)
        tcfg = cfg.train.model_copy(update={"seed": seeds.int("fit")})
        res = fit(model, data.images[trn], target_matrix(data.tasks, trn), data.images[val],
                  target_matrix(data.tasks, val), tcfg, num_classes=len(data.class_names), description=description,
                  progress=bar, head=head)
        device = resolve_device(cfg.train.device)
        train_stats = {h.name: [h.mean, h.std] for h in head.heads if h.kind == "regression"}
        head, recal = recalibrate_regression(head, predict_outputs(res.model, data.images[val], head, device=device,
                                                                   tta=cfg.train.tta), data, val)
        cache: dict[bytes, dict] = {}

        def outputs(idx: np.ndarray) -> dict[str, np.ndarray]:
            key = np.asarray(idx).tobytes()
            if key not in cache:  # the test cases are asked for twice (primary, then every head)
                cache[key] = predict_outputs(res.model, data.images[idx], head, device=device, tta=cfg.train.tta)
            return cache[key]

        return FoldFit(predict=lambda idx: outputs(idx)[head.primary.name],
                       predict_val=lambda: outputs(val)[head.primary.name],
                       save=lambda folder, meta: save_checkpoint(res.model, folder, meta),
                       info={"best_epoch": res.best_epoch, "history": res.history, "task_weights": res.task_weights,
                             "task_stats": train_stats,
                             "task_recalibration": recal},
                       meta={"tasks": head.to_dict(), "task_weighting": cfg.train.task_weighting},
                       predict_tasks=outputs)


def recalibrate_regression(head: MultiTaskHead, val_outputs: dict[str, np.ndarray], data: PreparedData,
                           val: np.ndarray) -> tuple[MultiTaskHead, dict]:
    """Each regression head shrunk towards the training-fold mean, by a factor fitted on the fold's
    validation cases (never its test cases), as temperature scaling is for probabilities:
    ``value' = mean + b * (value - mean)``, ``b`` the least-squares slope through the training mean on
    the labelled validation cases, held to [0, 1]. ``b = 1`` keeps the head; ``b = 0`` predicts the
    training-fold mean (the baseline), which a head without signal cannot do worse than by much.
    Folded into the head (``std' = b * std``), so the checkpoint predicts the shrunk value. Needs
    5 labelled validation cases; with fewer the head is kept.

    Returns ``(head, {task: {"b", "n_val"}})``."""
    stats, info = {}, {}
    for t in data.tasks:
        if t.kind != "regression":
            continue
        h = head[t.name]
        y, v = t.values[val], np.asarray(val_outputs[t.name], dtype=np.float64)[:, 0]
        lab = ~np.isnan(y)
        if lab.sum() < 5:
            info[t.name] = {"b": 1.0, "n_val": int(lab.sum())}
            continue
        dv, dy = v[lab] - h.mean, y[lab] - h.mean
        ss = float(dv @ dv)
        b = float(np.clip((dv @ dy) / ss, 0.0, 1.0)) if ss > 0 else 0.0
        stats[t.name] = (h.mean, b * h.std)
        info[t.name] = {"b": b, "n_val": int(lab.sum())}
    return head.with_stats(stats), info


class LinearProbe:
    """A probe on frozen features: features once per encoder, a probe per fold.

    The probe's ``C`` is chosen by grouped inner CV on all the fold's training patients
    (``train_idx`` and ``val_idx`` together); the validation probabilities come from a probe
    refitted at that ``C`` on ``train_idx`` alone, so threshold and temperature are chosen on
    cases that probe never saw. The checkpoint is the frozen encoder with the probe folded
    into its final linear layer (so ``medtl explain`` and ``predict`` work on probe runs).
    """

    name = "linear_probe"

    def __init__(self) -> None:
        self._features: dict[str, tuple[torch.nn.Module, np.ndarray]] = {}
        self.feature_info_: dict = {}

    def features(self, cfg: Config, data: PreparedData, progress: bool = False) -> tuple[torch.nn.Module, np.ndarray]:
        """``(frozen model, (N, F) features)`` of every prepared image, computed once per encoder."""
        m = cfg.model
        key = repr((m.name, m.pretrained, m.weights_path, m.layout, m.channel_mapping, cfg.train.tta,
                    cfg.train.seed if not m.pretrained else None))
        if key not in self._features:
            t0 = time.time()
            if cfg.train.num_threads:  # as fit() does for fine-tuning
                torch.set_num_threads(cfg.train.num_threads)
            seed_everything(cfg.train.seed)  # random-init encoders (model.pretrained=false) are reproducible
            model = make_model(cfg, len(data.class_names))
            device = resolve_device(cfg.train.device)
            cache_dir, ckey, state = None, None, "off"
            if cfg.train.strategy.feature_cache:
                cache_dir = default_cache_dir()
                extra = {"intensity": cfg.data.intensity.model_dump(mode="json"),
                         "image_size": list(cfg.data.image_size), "spacing": cfg.data.spacing}
                ckey = feature_cache_key(model, data.images, tta=cfg.train.tta, extra=extra)
                state = "hit" if (cache_dir / f"{ckey}.npy").is_file() else "miss"
            feats = extract_features(model, data.images, batch_size=cfg.train.batch_size, device=device,
                                     cache_dir=cache_dir, cache_key=ckey, tta=cfg.train.tta, progress=progress)
            self._features[key] = (model, feats)
            self.feature_info_ = {"feature_dim": int(feats.shape[1]), "feature_seconds": round(time.time() - t0, 2),
                                  "feature_cache": state}
        return self._features[key]

    @staticmethod
    def _probe(cfg: Config, seed: int, C_grid=None) -> _Probe:
        s = cfg.train.strategy
        return _Probe(head=s.probe_head, C_grid=list(C_grid or s.probe_C),
                      class_weight="balanced" if cfg.train.class_weighted else None,
                      inner_splits=cfg.cv.inner_splits, random_state=seed)

    def fit(self, cfg: Config, data: PreparedData, trn: np.ndarray, val: np.ndarray, seeds: FoldSeeds, *,
            description: str, bar) -> FoldFit:
        model, feats = self.features(cfg, data)
        k = len(data.class_names)
        tr = np.concatenate([trn, val])
        seed = seeds.int("probe")
        probe = self._probe(cfg, seed).fit(feats[tr], data.y[tr], groups=data.groups[tr])

        def predict_val() -> np.ndarray:
            sub = self._probe(cfg, seed, [probe.C_]).fit(feats[trn], data.y[trn])
            return _full_proba(sub, feats[val], k)

        return FoldFit(predict=lambda idx: _full_proba(probe, feats[idx], k), predict_val=predict_val,
                       save=(lambda folder, meta: _save_folded(model, probe, folder, meta))
                       if cfg.train.strategy.probe_head == "logistic" else None,
                       info={"C": probe.C_, "inner_auc": probe.cv_scores_, "best_epoch": None},
                       meta={"strategy": "linear_probe", "probe_C": probe.C_})


class NestedSelection:
    """Nested CV around any trainer: ``cv.grid`` points scored by inner grouped k-fold.

    Inside one outer fold, the training patients (``train_idx`` and ``val_idx``) are split
    into ``cv.inner_splits`` grouped folds; every grid point is trained on each inner training
    part and scored (``train.select_metric``) on its inner held-out part. The best mean score
    wins, and the wrapped trainer is fitted once more at that point. The outer test patients
    are never seen.
    """

    def __init__(self, inner: FoldTrainer) -> None:
        self.inner = inner
        self.name = f"nested({inner.name})"

    def fit(self, cfg: Config, data: PreparedData, trn: np.ndarray, val: np.ndarray, seeds: FoldSeeds, *,
            description: str, bar) -> FoldFit:
        tr = np.concatenate([trn, val])
        splits = outer_splits(data.y[tr], data.groups[tr], n_splits=cfg.cv.inner_splits,
                              seed=seeds.int("nested_split"))
        metric, k = cfg.train.select_metric, len(data.class_names)
        scores = []
        for gi, point in enumerate(grid_points(cfg.cv.grid)):
            pcfg = with_point(cfg, point)
            vals = []
            for j, (itr, ite) in enumerate(splits):
                res = self.inner.fit(pcfg, data, tr[itr], tr[ite], seeds.child(j),
                                     description=f"{description} inner {j + 1}/{len(splits)} grid {gi + 1}", bar=bar)
                vals.append(_score(data.y[tr[ite]], res.predict_val(), metric, k))
            scores.append({"point": point, "inner_mean": float(np.nanmean(vals)) if np.isfinite(vals).any()
                           else float("nan"), "inner": vals})
        defined = [s for s in scores if np.isfinite(s["inner_mean"])] or scores
        best = (min if metric == "loss" else max)(defined, key=lambda s: s["inner_mean"])
        console.print(f"{description}: inner CV selected {best['point']}")
        final = self.inner.fit(with_point(cfg, best["point"]), data, trn, val, seeds, description=description,
                               bar=bar)
        final.info.update({"selected": best["point"], "inner_scores": scores})
        final.meta.update({"selected": best["point"]})
        return final


def make_trainer(cfg: Config) -> FoldTrainer:
    """The trainer of ``cfg``: fine-tune or linear probe, wrapped in nested selection for ``cv.scheme: nested``."""
    base: FoldTrainer = LinearProbe() if cfg.train.strategy.name == "linear_probe" else FineTune()
    return NestedSelection(base) if cfg.cv.scheme == "nested" else base


def _score(y: np.ndarray, proba: np.ndarray, metric: str, k: int) -> float:
    if metric == "loss":
        p = np.clip(proba[np.arange(len(y)), y], 1e-8, 1.0)
        return float(-np.mean(np.log(p)))
    return float(validation_scores(y, proba, k)[metric])


def _full_proba(probe: _Probe, X: np.ndarray, n_classes: int) -> np.ndarray:
    """``(n, n_classes)`` probabilities even when a training fold missed a class."""
    p = probe.predict_proba(X)
    full = np.zeros((len(X), n_classes))
    full[:, probe.classes_.astype(int)] = p
    return full


def _save_folded(model: torch.nn.Module, probe: _Probe, folder: Path, meta: dict) -> None:
    """Checkpoint = frozen encoder + the probe folded into its final linear layer."""
    W, b = probe.as_linear()
    head = model.classifier_layer
    if not isinstance(head, torch.nn.Linear) or tuple(head.weight.shape) != W.shape:
        return  # no plain linear head to hold the probe: the run stays valid, only `explain` is unavailable
    with torch.no_grad():
        head.weight.copy_(torch.as_tensor(W, dtype=head.weight.dtype))
        head.bias.copy_(torch.as_tensor(b, dtype=head.bias.dtype))
    save_checkpoint(model, folder, meta)
