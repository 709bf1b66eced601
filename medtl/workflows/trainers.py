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
* :class:`SeedEnsemble` wraps fine-tuning (``train.ensemble_seeds`` n > 1): n fine-tunes of the
  fold from n seeds, predicting as one model, the mean of their probabilities.
* :class:`NestedSelection` wraps any trainer: an inner grouped k-fold over the fold's
  training patients scores every point of ``cv.grid``, and the best point is refitted
  (``cv.search: optuna``: :class:`~medtl.workflows.search.OptunaSelection` searches instead).

Example:
    >>> trainer = make_trainer(cfg)                        # doctest: +SKIP
    >>> fit = trainer.fit(cfg, data, trn, val, FoldSeeds(0, 0, 3), description="fold3", bar=None)  # doctest: +SKIP
    >>> fit.predict(test_idx).shape                        # doctest: +SKIP
    (20, 2)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from medtl._runtime import FoldSeeds, resolve_device, seed_everything
from medtl.adapt.domain import adaptation_inputs
from medtl.adapt.probe import LinearProbe as _Probe
from medtl.adapt.probe import default_cache_dir, extract_features, feature_cache_key
from medtl.config import Config
from medtl.data.prepare import PreparedData
from medtl.data.tasks import target_matrix
from medtl.errors import ConfigError
from medtl.evaluate.schemes import grid_points, with_point
from medtl.models.heads import MultiTaskHead
from medtl.training.checkpoint import ModelSpec, save_checkpoint
from medtl.training.loop import fit, predict_outputs, predict_proba
from medtl.workflows.rundir import epochs_trained
from medtl.workflows.search import Choice, InnerSearch, OptunaSelection, config_point

__all__ = ["RIDGE_ALPHAS", "RIDGE_INNER_SPLITS", "FineTune", "FoldFit", "FoldTrainer", "LinearProbe",
           "NestedSelection", "SeedEnsemble", "base_trainer", "fold_head", "make_model", "make_trainer",
           "multitask_model", "n_outputs", "recalibrate_regression", "refit_regression"]


@dataclass
class FoldFit:
    """A fitted fold model, as the driver sees it.

    Attributes:
        predict: case indices into the prepared data -> ``(n, K)`` probabilities of the fold's model.
        predict_val: ``() -> (n_val, K)`` probabilities of the validation cases from a model that
            never trained on them (threshold, temperature and nested-CV scores use these).
        save: ``(folder, meta) -> None`` writes the checkpoint, or ``None`` when there is none.
        info: what the trainer chose (``best_epoch``, ``history``, ``C``, ...), kept in the fold record;
            ``epochs_trained`` where the epochs trained differ from the history's length (a seed
            ensemble: every member's epochs; :func:`~medtl.workflows.rundir.epochs_trained`).
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
        """One encoder, one head per task (:class:`~medtl.models.heads.MultiTaskHead`), missing labels masked.

        The primary head starts as a single-task run's head of the same seed would
        (:func:`multitask_model`), so the two runs compare like for like. After fine-tuning,
        regression heads with ``refit: ridge`` are refitted on the frozen encoder's features of
        the fold's training patients (:func:`refit_regression`); the other regression heads are
        shrunk on the validation cases (:func:`recalibrate_regression`)."""
        head = fold_head(data, trn)
        model = multitask_model(cfg, head, seeds.int("init"))
        tcfg = cfg.train.model_copy(update={"seed": seeds.int("fit")})
        res = fit(model, data.images[trn], target_matrix(data.tasks, trn), data.images[val],
                  target_matrix(data.tasks, val), tcfg, num_classes=len(data.class_names), description=description,
                  progress=bar, head=head)
        device = resolve_device(cfg.train.device)
        train_stats = {h.name: [h.mean, h.std] for h in head.heads if h.kind == "regression"}
        refit = refit_regression(res.model, head, data, np.concatenate([trn, val]), device=device,
                                 tta=cfg.train.tta, batch_size=max(cfg.train.batch_size, 64))
        head, recal = recalibrate_regression(head, predict_outputs(res.model, data.images[val], head, device=device,
                                                                   tta=cfg.train.tta), data, val,
                                             keep=[k for k, v in refit.items() if v.get("alpha") is not None])
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
                             "task_recalibration": recal, "task_refit": refit},
                       meta={"tasks": head.to_dict(), "task_weighting": cfg.train.task_weighting},
                       predict_tasks=outputs)


class SeedEnsemble:
    """``train.ensemble_seeds`` n > 1: n fine-tunes of the same fold from n seeds, predicting as one model.

    Every member trains on the same cases and chooses its own epoch on the same validation cases;
    member ``j`` draws its randomness (the head's init, augmentation, batch order) from the fold's
    streams with ``train.seed + j`` in place of ``train.seed``, so member 0 is exactly the single model
    of this config. (A run with ``train.seed + j`` would also draw another inner validation split.) The
    fold's model is the mean of the members' class probabilities (each flip-averaged with
    ``train.tta``), and the driver chooses temperature and threshold on that mean, as for any fold.
    Multi-task members average every head's output (probabilities, regression values in the
    target's units), each member through its own head.
    The checkpoint is an ensemble checkpoint over ``member<j>/`` subfolders
    (:func:`~medtl.training.checkpoint.save_ensemble_checkpoint`), which ``predict`` and ``export``
    load as one :class:`~medtl.models.ensemble.EnsembleClassifier`.

    Why: with a few dozen patients per fold, the epoch chosen on a handful of validation cases and
    the head's random init move a fold's AUC by several points from seed to seed. Averaging models
    that differ only in those draws (a deep ensemble, Lakshminarayanan et al., NeurIPS 2017) removes
    most of that variance, and usually raises the AUC, for n times the training cost.
    """

    def __init__(self, inner: FineTune, n: int) -> None:
        if n < 2:
            raise ConfigError(f"SeedEnsemble needs at least 2 members (train.ensemble_seeds); got {n}. Use the "
                              "trainer itself for one model.")
        self.inner, self.n, self.name = inner, int(n), inner.name

    def fit(self, cfg: Config, data: PreparedData, trn: np.ndarray, val: np.ndarray, seeds: FoldSeeds, *,
            description: str, bar) -> FoldFit:
        from medtl.training.checkpoint import save_ensemble_checkpoint

        fits = [self.inner.fit(cfg, data, trn, val, FoldSeeds(seeds.seed + j, seeds.repeat, seeds.fold, seeds.path),
                               description=f"{description} seed {j + 1}/{self.n}", bar=bar) for j in range(self.n)]
        tasks = fits[0].predict_tasks is not None
        cache: dict[bytes, dict[str, np.ndarray]] = {}

        def outputs(idx: np.ndarray) -> dict[str, np.ndarray]:
            key = np.asarray(idx).tobytes()
            if key not in cache:
                each = [f.predict_tasks(idx) for f in fits]
                cache[key] = {name: np.mean([e[name] for e in each], axis=0) for name in each[0]}
            return cache[key]

        def predict(idx: np.ndarray) -> np.ndarray:
            if tasks:
                return outputs(idx)[data.tasks[0].name]
            return np.mean([f.predict(idx) for f in fits], axis=0)

        def save(folder: Path, meta: dict) -> None:
            keys = [f"member{j}" for j in range(self.n)]
            for j, (key, f) in enumerate(zip(keys, fits)):
                f.save(Path(folder) / key, {**meta, **f.meta, "member": j, "seed": int(cfg.train.seed) + j,
                                            "best_epoch": f.info.get("best_epoch")})
            save_ensemble_checkpoint(folder, keys, meta, tta=cfg.train.tta)

        info = {"best_epoch": fits[0].info.get("best_epoch"), "history": fits[0].info.get("history"),
                "ensemble_seeds": [int(cfg.train.seed) + j for j in range(self.n)],
                "member_best_epochs": [f.info.get("best_epoch") for f in fits],
                "epochs_trained": sum(epochs_trained(f.info) for f in fits)}
        meta = fits[0].meta
        if tasks:
            # the ensemble's head: the fold's, before any member shrank its regression heads on validation
            # cases, so its std is > 0 and the ensemble module maps the members' mean values back exactly
            meta = {**fits[0].meta, "tasks": fold_head(data, trn).to_dict()}
            info["member_task_info"] = [{k: f.info.get(k) for k in ("task_weights", "task_recalibration", "task_refit")}
                                        for f in fits]
        return FoldFit(predict=predict, predict_val=lambda: predict(val), save=save, info=info, meta=meta,
                       predict_tasks=outputs if tasks else None)


def multitask_model(cfg: Config, head: MultiTaskHead, seed: int) -> torch.nn.Module:
    """The configured encoder with ``head.n_outputs`` outputs that starts exactly as a single-task
    run's model of the same ``seed``: every weight of that model, its final layer's rows included,
    becomes the primary head's (an encoder's own init draws a ``K``-output model differently from a
    ``K + extra`` one: timm scales the head by its row count, and without pretrained weights the
    head's construction shifts the random stream of the whole body). The other heads' rows keep
    the ``head.n_outputs`` model's own init. Where the final layer is not a plain linear layer,
    only the weights of equal shape are taken."""
    seed_everything(seed)
    single = make_model(cfg, head.primary.n_outputs)
    seed_everything(seed)
    model = make_model(cfg, head.n_outputs)
    own, theirs = model.state_dict(), single.state_dict()
    with torch.no_grad():
        for key, value in theirs.items():
            if key in own and own[key].shape == value.shape:
                own[key].copy_(value)
        src, dst = getattr(single, "classifier_layer", None), getattr(model, "classifier_layer", None)
        if isinstance(src, torch.nn.Linear) and isinstance(dst, torch.nn.Linear):
            rows = head.slice(head.primary.name)
            dst.weight[rows] = src.weight
            if dst.bias is not None and src.bias is not None:
                dst.bias[rows] = src.bias
    return model


#: the ridge penalties a refitted regression head chooses from, on standardised features: from
#: almost no penalty to one that leaves only the intercept (the training mean)
RIDGE_ALPHAS = tuple(float(a) for a in np.logspace(-1, 6, 15))
#: grouped inner folds that choose a refitted head's penalty (fewer when fewer patients are labelled)
RIDGE_INNER_SPLITS = 5


def refit_regression(model: torch.nn.Module, head: MultiTaskHead, data: PreparedData, tr: np.ndarray, *,
                     device: torch.device | str = "cpu", tta: bool = False, batch_size: int = 64,
                     n_splits: int = RIDGE_INNER_SPLITS) -> dict[str, dict]:
    """Refit each ``refit: ridge`` regression head on the frozen encoder's pooled features.

    A linear head trained by gradient steps alongside the encoder, on a few dozen cases, ends
    wherever the epoch chosen for the primary task left it; a ridge regression on the same
    features, its penalty chosen by patient-grouped inner CV, is a linear head fitted for the task
    itself, and falls back to the training mean when the features carry no signal. The features
    ``(n, F)`` of the cases ``tr`` (the fold's training and validation cases: its training
    patients, never its test ones) are standardised, and the penalty is chosen from
    :data:`RIDGE_ALPHAS` by ``min(n_splits, patients)``-fold grouped CV on the mean squared error
    with the one-standard-error rule: the largest penalty whose inner score is within one standard
    error of the best. The encoder was fine-tuned on most of these cases, so their features fit
    them better than they will fit new patients, and the plain best penalty is too small; the rule
    (Hastie, Tibshirani & Friedman, *Elements of Statistical Learning*, 7.10) leans to the
    simpler head. scikit-learn's ``GridSearchCV`` over ``StandardScaler`` + ``Ridge`` does the
    search (the rule is its ``refit`` callable); the refitted ridge is folded into the head's rows
    of the model's final linear layer (in place), in the head's standardised units, so the model,
    and its checkpoint, predict the ridge's values. A task with fewer than 5 labelled cases or 2
    labelled patients keeps its trained head.

    Returns ``{task: {"alpha", "alpha_best", "alpha_grid_edge", "inner_mse", "n_train", "n_patients"}}``
    (``alpha`` ``None`` where the head was kept; ``alpha_best`` the penalty of the best inner score);
    ``alpha_grid_edge`` is ``"high"`` when the largest penalty was chosen, i.e. the features predicted
    nothing the training mean did not.
    """
    from sklearn.linear_model import Ridge
    from sklearn.model_selection import GridSearchCV, GroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    tasks = [t for t in data.tasks if t.kind == "regression" and t.refit == "ridge"]
    if not tasks:
        return {}
    layer = getattr(model, "classifier_layer", None)
    if not isinstance(layer, torch.nn.Linear) or layer.bias is None or layer.out_features != head.n_outputs:
        raise ConfigError(f"tasks[].refit=ridge folds a ridge regression into the model's final linear layer, but "
                          f"{type(model).__name__} has {type(layer).__name__} there (needs nn.Linear with bias and "
                          f"{head.n_outputs} outputs). Set refit: none on the regression tasks.")
    tr = np.asarray(tr)
    feats = extract_features(model, data.images[tr], batch_size=batch_size, device=device, tta=tta, progress=False)
    info: dict[str, dict] = {}
    for t in tasks:
        y = t.values[tr]
        lab = ~np.isnan(y)
        groups = data.groups[tr][lab]
        k = min(int(n_splits), len(set(groups.tolist())))
        row = {"alpha": None, "alpha_best": None, "alpha_grid_edge": None, "inner_mse": None,
               "n_train": int(lab.sum()), "n_patients": len(set(groups.tolist()))}
        if lab.sum() < 5 or k < 2:
            info[t.name] = row
            continue
        search = GridSearchCV(make_pipeline(StandardScaler(), Ridge()), {"ridge__alpha": list(RIDGE_ALPHAS)},
                              cv=GroupKFold(n_splits=k), scoring="neg_mean_squared_error", refit=_one_standard_error)
        search.fit(feats[lab], y[lab], groups=groups)
        scaler, ridge = search.best_estimator_.named_steps.values()
        w = ridge.coef_ / scaler.scale_  # value = feats @ w + b, in the target's units
        b = float(ridge.intercept_ - w @ scaler.mean_)
        h, rows = head[t.name], head.slice(t.name)
        with torch.no_grad():
            layer.weight[rows] = torch.as_tensor(w / h.std, dtype=layer.weight.dtype, device=layer.weight.device)
            layer.bias[rows] = (b - h.mean) / h.std
        res = search.cv_results_
        alpha = float(res["param_ridge__alpha"][search.best_index_])
        best = int(np.argmax(res["mean_test_score"]))
        row.update(alpha=alpha, alpha_best=float(res["param_ridge__alpha"][best]),
                   inner_mse=float(-res["mean_test_score"][search.best_index_]),
                   alpha_grid_edge="high" if alpha == RIDGE_ALPHAS[-1] else "low" if alpha == RIDGE_ALPHAS[0] else None)
        info[t.name] = row
    return info


def _one_standard_error(cv_results: dict) -> int:
    """``GridSearchCV(refit=...)``: the index of the largest ``ridge__alpha`` whose mean inner score is
    within one standard error (SD over the inner folds / sqrt(folds)) of the best mean score."""
    mean = np.asarray(cv_results["mean_test_score"], dtype=np.float64)
    n_folds = sum(k.startswith("split") and k.endswith("_test_score") for k in cv_results)
    se = np.asarray(cv_results["std_test_score"], dtype=np.float64) / np.sqrt(max(n_folds, 1))
    best = int(np.nanargmax(mean))
    alphas = np.asarray(cv_results["param_ridge__alpha"], dtype=np.float64)
    ok = np.flatnonzero(mean >= mean[best] - se[best])
    return int(ok[np.argmax(alphas[ok])])


def recalibrate_regression(head: MultiTaskHead, val_outputs: dict[str, np.ndarray], data: PreparedData,
                           val: np.ndarray, *, keep: Sequence[str] = ()) -> tuple[MultiTaskHead, dict]:
    """Each regression head shrunk towards the training-fold mean, by a factor fitted on the fold's
    validation cases (never its test cases), as temperature scaling is for probabilities:
    ``value' = mean + b * (value - mean)``, ``b`` the least-squares slope through the training mean on
    the labelled validation cases, held to [0, 1]. ``b = 1`` keeps the head; ``b = 0`` predicts the
    training-fold mean (the baseline), which a head without signal cannot do worse than by much.
    Folded into the head (``std' = b * std``), so the checkpoint predicts the shrunk value. Needs
    5 labelled validation cases; with fewer the head is kept. Heads named in ``keep`` (refitted by
    :func:`refit_regression`, whose penalty already chose the shrinkage, on these validation cases
    among others) are kept as they are.

    Returns ``(head, {task: {"b", "n_val"}})`` (``b`` ``None`` for a head in ``keep``)."""
    stats, info = {}, {}
    for t in data.tasks:
        if t.kind != "regression":
            continue
        if t.name in keep:
            info[t.name] = {"b": None, "n_val": int((~np.isnan(t.values[val])).sum())}
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


class NestedSelection(InnerSearch):
    """Nested CV around any trainer: ``cv.grid`` points scored by inner grouped k-fold.

    Inside one outer fold, the training patients (``train_idx`` and ``val_idx``) are split
    into ``cv.inner_splits`` grouped folds; every grid point is trained on each inner training
    part and scored (``train.select_metric``) on its inner held-out part. The best mean score
    wins, and the wrapped trainer is fitted once more at that point. The outer test patients
    are never seen (:class:`~medtl.workflows.search.InnerSearch`; ``cv.search: optuna`` is
    :class:`~medtl.workflows.search.OptunaSelection`).
    """

    def select(self, cfg: Config, data: PreparedData, tr: np.ndarray, splits: list, seeds: FoldSeeds, *,
               description: str, bar) -> Choice:
        metric, t0, images = cfg.train.select_metric, time.perf_counter(), 0
        scores = []
        for gi, point in enumerate(grid_points(cfg.cv.grid)):
            vals = []
            for value, n in self.score_folds(with_point(cfg, config_point(point)), data, tr, splits, seeds,
                                             description=f"{description} grid {gi + 1}", bar=bar):
                vals.append(value)
                images += n
            scores.append({"point": point, "inner_mean": float(np.nanmean(vals)) if np.isfinite(vals).any()
                           else float("nan"), "inner": vals})
        defined = [s for s in scores if np.isfinite(s["inner_mean"])] or scores
        best = (min if metric == "loss" else max)(defined, key=lambda s: s["inner_mean"])
        n_ok = sum(bool(np.isfinite(s["inner_mean"])) for s in scores)
        cost = {"method": "grid", "trials": len(scores), "complete": n_ok, "pruned": 0, "failed": len(scores) - n_ok,
                "interrupted": 0, "wall_s": round(time.perf_counter() - t0, 3), "images": int(images),
                "wall_s_here": round(time.perf_counter() - t0, 3),
                "metric": metric, "best_value": best["inner_mean"] if np.isfinite(best["inner_mean"]) else None,
                "best_params": config_point(best["point"])}
        return Choice(config_point(best["point"]), {"inner_scores": scores, "search": cost}, images=images)


def base_trainer(cfg: Config) -> FoldTrainer:
    """Linear probe or fine-tuning, the latter as a :class:`SeedEnsemble` when ``train.ensemble_seeds`` > 1."""
    if cfg.train.strategy.name == "linear_probe":
        return LinearProbe()
    return SeedEnsemble(FineTune(), cfg.train.ensemble_seeds) if cfg.train.ensemble_seeds > 1 else FineTune()


def make_trainer(cfg: Config, search_dir: Path | None = None, *, resume: bool = True) -> FoldTrainer:
    """The trainer of ``cfg``: fine-tune or linear probe, wrapped in nested selection for ``cv.scheme: nested``
    (``cv.search: optuna``: :class:`~medtl.workflows.search.OptunaSelection`, its studies kept in ``search_dir``,
    reopened when ``resume``)."""
    base = base_trainer(cfg)
    if cfg.cv.scheme != "nested":
        return base
    return OptunaSelection(base, search_dir, resume=resume) if cfg.cv.search == "optuna" else NestedSelection(base)


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
