"""The training loop: AdamW, cosine/one-cycle schedule, bf16 on CUDA, best-by-validation.

Inputs are cached arrays from :mod:`medtl.data.prepare` (``(N, C, *S)`` in [0, 1]). The fast
path (:mod:`medtl._fastpath`) holds them once as a compact tensor on the training device;
each step indexes a batch, augments it there in one go (:class:`medtl.data.batch_augment.BatchAugment`;
``train.augment.backend=monai`` runs the per-image MONAI preset on the host instead), and runs
in ``channels_last`` (2D) under bf16 autocast on CUDA, optionally ``torch.compile``d. The loss
is summed on the device and read once per epoch, so the host never waits for the device
mid-epoch. Augmentation is seeded from the config: the same config, data and seed give the same
weights on the same device.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from timm.utils import ModelEmaV3
from torch import nn

from medtl._fastpath import Resident, autocast, batches, memory_format, resident
from medtl._runtime import resolve_device, seed_everything
from medtl.adapt.domain import (
    DomainObjective,
    DomainSetup,
    adabn,
    collapse_dsbn,
    convert_dsbn,
    domain_context,
)
from medtl.adapt.strategies import make_strategy
from medtl.config import DomainAdaptConfig, TrainConfig
from medtl.data.batch_augment import BatchAugment
from medtl.data.transforms import augment_transform
from medtl.errors import ConfigError
from medtl.models.heads import MultiTaskHead
from medtl.training import distributed

__all__ = ["FitResult", "MultiTaskLoss", "TaskGate", "fit", "improves", "predict_outputs", "predict_proba",
           "validation_scores"]


def validation_scores(y: np.ndarray, proba: np.ndarray, num_classes: int) -> dict[str, float]:
    """The scores that pick the best epoch: ``{"auc", "acc", "balanced_acc"}`` (``nan`` when undefined).

    ``y`` is ``(N,)`` class indices, ``proba`` ``(N, K)``. AUC is binary (class 1) or the macro
    one-vs-rest AUC; it is ``nan`` when a class is missing from ``y``. The full metric set with
    confidence intervals is :mod:`medtl.evaluate`'s business, on a floor above training.
    """
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    y = np.asarray(y)
    if len(y) == 0:
        return {"auc": float("nan"), "acc": float("nan"), "balanced_acc": float("nan")}
    pred = proba[:, 1] >= 0.5 if num_classes == 2 else proba.argmax(1)
    auc = float("nan")
    if len(np.unique(y)) == num_classes:
        auc = float(roc_auc_score(y, proba[:, 1]) if num_classes == 2 else
                    roc_auc_score(y, proba, multi_class="ovr", average="macro", labels=list(range(num_classes))))
    return {"auc": auc, "acc": float(np.mean(pred.astype(int) == y)),
            "balanced_acc": float(balanced_accuracy_score(y, pred.astype(int)))}


@dataclass
class FitResult:
    """What :func:`fit` returns.

    Attributes:
        model: the model with the best validation weights loaded.
        best_epoch: 1-based epoch of the best validation score.
        best_score: that score (higher is better; ``-loss`` for ``select_metric=loss``).
        history: per-epoch dicts ``{"epoch", "train_loss", "val_loss", "val_auc", "val_acc", "lr",
            "train_seconds", "train_images_per_s"}`` (the last two time the training steps alone,
            without validation); multi-task runs add ``"tasks": {"val_loss": {task: ...}, "weight": {task: ...}}``.
        task_weights: multi-task runs: each task's loss weight at the best epoch (learned with
            ``train.task_weighting: uncertainty``), else ``None``.
    """

    model: nn.Module
    best_epoch: int
    best_score: float
    history: list[dict] = field(default_factory=list)
    task_weights: dict[str, float] | None = None


class MultiTaskLoss(nn.Module):
    """The summed loss of several heads, each with its missing labels masked out.

    ``forward(logits (B, n_outputs), targets (B, T))``: ``targets`` has one column per binary,
    multiclass (class index) or regression (value in its own units) head and one per label of a
    multilabel head, in head order; ``nan`` marks a missing label. A masked label contributes
    nothing, its gradient included: each head's loss is the mean over its labelled entries
    (cross-entropy; binary cross-entropy per label; for regression, on the standardised value
    ``(y - mean) / std`` with the head's training-fold statistics, the squared error or, with the
    head's ``loss="huber"``, the squared error within one SD and ``2|e| - 1`` beyond, whose
    gradient is bounded), and a head with no label in the batch adds 0.

    ``weighting="fixed"``: ``sum_t w_t L_t`` with the heads' ``weight``. ``"uncertainty"`` (Kendall,
    Gal & Cipolla 2018): a learned log-variance ``s_t`` per head, ``sum_t c_t exp(-s_t) L_t + s_t / 2``
    with ``c_t = 1/2`` for regression and 1 for classification; :meth:`weights` gives ``c_t exp(-s_t)``.

    Example:
        >>> head = MultiTaskHead([HeadSpec("a", "binary", ["n", "y"]), HeadSpec("b", "regression")])  # doctest: +SKIP
        >>> MultiTaskLoss(head)(torch.zeros(4, 3), torch.tensor([[0, 1.0], [1, float("nan")]] * 2))   # doctest: +SKIP
    """

    def __init__(self, head: MultiTaskHead, weighting: str = "fixed", *,
                 class_weights: dict[str, torch.Tensor] | None = None, label_smoothing: float = 0.0) -> None:
        super().__init__()
        if weighting not in ("fixed", "uncertainty"):
            raise ConfigError(f"train.task_weighting must be fixed or uncertainty. Got {weighting!r} instead.")
        self.head, self.weighting, self.label_smoothing = head, weighting, label_smoothing
        self.class_weights = dict(class_weights or {})
        self.columns, lo = [], 0
        for h in head.heads:
            n = h.n_outputs if h.kind == "multilabel" else 1
            self.columns.append(slice(lo, lo + n))
            lo += n
        self.n_targets = lo
        self.register_buffer("fixed", torch.tensor([h.weight for h in head.heads], dtype=torch.float32))
        self.register_buffer("factor", torch.tensor([0.5 if h.kind == "regression" else 1.0 for h in head.heads]))
        self.log_vars = nn.Parameter(torch.zeros(len(head.heads))) if weighting == "uncertainty" else None

    def task_losses(self, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(losses (H,), labelled entries (H,))``: each head's masked mean loss and how many labels it had."""
        losses, counts = [], []
        for h, cols in zip(self.head.heads, self.columns):
            z, t = logits[:, self.head.slice(h.name)].float(), targets[:, cols].float()
            m = ~torch.isnan(t)
            t0 = torch.where(m, t, torch.zeros_like(t))
            mf = m.float()
            if h.kind in ("binary", "multiclass"):
                cls = t0[:, 0].long()
                w = self.class_weights.get(h.name)
                per = nn.functional.cross_entropy(z, cls, weight=w, reduction="none",
                                                  label_smoothing=self.label_smoothing)
                den = (mf[:, 0] * (w[cls] if w is not None else 1.0)).sum()
                loss = (per * mf[:, 0]).sum() / den.clamp_min(1e-12)
            elif h.kind == "multilabel":
                per = nn.functional.binary_cross_entropy_with_logits(z, t0, reduction="none")
                loss = (per * mf).sum() / mf.sum().clamp_min(1.0)
            else:
                ts = torch.where(m, (t - h.mean) / h.std, torch.zeros_like(t))
                if h.loss == "huber":  # 2x PyTorch's Huber (delta 1): equal to the squared error within 1 SD
                    per = 2.0 * nn.functional.huber_loss(z, ts, reduction="none", delta=1.0)
                else:
                    per = (z - ts) ** 2
                loss = (per * mf).sum() / mf.sum().clamp_min(1.0)
            losses.append(loss)
            counts.append(mf.sum())
        return torch.stack(losses), torch.stack(counts)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        losses, counts = self.task_losses(logits, targets)
        if self.log_vars is None:
            return (self.fixed * losses).sum()
        s = self.log_vars
        has = (counts > 0).float()
        return (has * (self.factor * torch.exp(-s) * losses + 0.5 * s)).sum()

    def weights(self) -> dict[str, float]:
        """Each head's current loss weight (fixed, or ``c_t exp(-s_t)`` when learned)."""
        w = self.fixed if self.log_vars is None else self.factor * torch.exp(-self.log_vars.detach())
        return {h.name: float(v) for h, v in zip(self.head.heads, w.cpu())}

    def deactivate(self, outputs: dict[str, np.ndarray]) -> torch.Tensor:
        """Activated outputs (:meth:`MultiTaskHead.activate`) back to logits, for a validation loss."""
        parts = []
        for h in self.head.heads:
            o = torch.as_tensor(outputs[h.name], dtype=torch.float32)
            if h.kind in ("binary", "multiclass"):
                parts.append(o.clamp_min(1e-8).log())
            elif h.kind == "multilabel":
                o = o.clamp(1e-7, 1 - 1e-7)
                parts.append(torch.log(o) - torch.log1p(-o))
            else:
                parts.append((o - h.mean) / h.std)
        return torch.cat(parts, 1)


def _set_threads(cfg: TrainConfig) -> None:
    """Only when asked: torch's default (physical cores, or OMP_NUM_THREADS) is usually right."""
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)


def _schedule(opt, cfg: TrainConfig, steps_per_epoch: int):
    total = cfg.epochs * steps_per_epoch
    if cfg.scheduler == "onecycle":  # one max_lr per group keeps layer-wise LRs (llrd) apart
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in opt.param_groups],
                                                   total_steps=total, pct_start=0.2)
    warm = min(cfg.warmup_epochs * steps_per_epoch, total - 1)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(1, total - warm)
        return 0.5 * (1 + math.cos(math.pi * t))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


class _MonaiAugment:
    """``train.augment.backend=monai``: the per-image MONAI preset on the host, then to the device."""

    def __init__(self, cfg, image_size, seed: int) -> None:
        self.t = augment_transform(cfg, image_size)
        self.t.set_random_state(seed=seed)

    def __call__(self, xb: torch.Tensor) -> torch.Tensor:
        host = xb.cpu().numpy()
        out = torch.stack([torch.as_tensor(np.asarray(self.t(x)), dtype=torch.float32) for x in host])
        return out.to(xb.device, non_blocking=True)


def _augmenter(cfg: TrainConfig, image_size: tuple[int, ...]):
    if cfg.augment.backend == "monai":
        return _MonaiAugment(cfg.augment, image_size, cfg.seed)
    return BatchAugment(cfg.augment, spatial_dims=len(image_size), seed=cfg.seed)


@torch.no_grad()
def predict_proba(model: nn.Module, images: np.ndarray | Resident, *, batch_size: int = 64,
                  device: torch.device | None = None, tta: bool = False,
                  domains: np.ndarray | None = None, head: MultiTaskHead | None = None) -> np.ndarray:
    """Class probabilities ``(N, K)`` for cached images ``(N, C, *S)`` (or a :class:`Resident`).

    With ``tta`` the prediction is averaged with the left-right flipped image. ``domains``
    ``(N,)`` gives each image's domain index for a model with domain-specific BatchNorm
    (:func:`medtl.adapt.domain.convert_dsbn`); a model returned by :func:`fit` never needs it.
    Probabilities stay on the device until the end: one copy to the host per call. A
    multi-task model (``head``) gives its primary head's probabilities (see :func:`predict_outputs`).
    """
    if head is not None:
        return predict_outputs(model, images, head, batch_size=batch_size, device=device, tta=tta)[head.primary.name]
    return _predict(model, images, lambda z: z.float().softmax(-1), batch_size, device, tta, domains)


def _predict(model, images, activate, batch_size, device, tta, domains=None) -> np.ndarray:
    device = device or next(model.parameters()).device
    model.eval()
    out = []
    for i, xb in enumerate(batches(images, batch_size, device)):
        lo = i * batch_size
        ctx = domain_context(model, domains[lo: lo + batch_size]) if domains is not None else contextlib.nullcontext()
        with autocast(device), ctx:
            p = activate(model(xb))
            if tta:
                p = 0.5 * (p + activate(model(torch.flip(xb, dims=(-1,)))))
        out.append(p)
    return torch.cat(out).cpu().numpy().astype(np.float64)


@torch.no_grad()
def predict_outputs(model: nn.Module, images: np.ndarray | Resident, head: MultiTaskHead, *, batch_size: int = 64,
                    device: torch.device | None = None, tta: bool = False) -> dict[str, np.ndarray]:
    """Every head's output for cached images ``(N, C, *S)``: ``{task: (N, n)}`` class probabilities
    (binary, multiclass), label probabilities (multilabel) or values in the target's units
    (regression, ``(N, 1)``). With ``tta``, each is averaged with the flipped image's."""
    def activate(z: torch.Tensor) -> torch.Tensor:
        return torch.cat(list(head.activate(z).values()), 1)

    flat = _predict(model, images, activate, batch_size, device, tta)
    return {h.name: flat[:, head.slice(h.name)] for h in head.heads}


def _compiled(model: nn.Module, mode: str) -> nn.Module:
    """``train.compile``: the training forward through ``torch.compile`` (``reduce-overhead``: CUDA graphs)."""
    if mode == "off":
        return model
    return torch.compile(model, mode=mode)


def _features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Pooled features ``(B, F)`` through the encoder contract."""
    if not all(hasattr(model, a) for a in ("forward_features", "forward_head", "classifier_layer")):
        raise ConfigError("Feature-level domain adaptation (dann, mmd, coral) needs a model with the encoder "
                          "contract (forward_features, forward_head(pre_logits=True), classifier_layer); build "
                          "it with medtl.create_encoder.")
    return model.forward_head(model.forward_features(x), pre_logits=True)


def improves(score: float, val_loss: float, best_score: float, best_loss: float) -> bool:
    """Whether an epoch's validation result beats the best so far: a higher ``train.select_metric``
    score, or the same score with a lower validation loss.

    The tie-break matters on small validation sets: with a few dozen cases the AUC often ties
    (at 1.0 or a plateau) across epochs, and keeping the first of them keeps an early, less
    confident model whose probabilities pool badly with other folds'. Among equal scores the
    lower loss is the better-calibrated, more separated model. ``nan`` losses never win a tie.
    """
    if score != best_score:
        return score > best_score
    return val_loss < best_loss


def fit(model: nn.Module, x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
        cfg: TrainConfig, *, num_classes: int, description: str = "train", progress=None,
        adapt: DomainAdaptConfig | None = None, x_target: np.ndarray | None = None,
        sites_train: Sequence[str | None] | None = None, sites_val: Sequence[str | None] | None = None,
        head: MultiTaskHead | None = None) -> FitResult:
    """Fine-tune ``model`` and keep the weights with the best validation score.

    The strategy (``cfg.strategy``: which blocks train, per-block LRs, unfreezing schedule,
    adapters/LoRA) comes from :func:`medtl.adapt.strategies.make_strategy`; domain adaptation
    (``adapt``) from :mod:`medtl.adapt.domain`. Both plug into this one loop.

    Args:
        model: a :class:`~medtl.models.MedtlClassifier` (or any ``(B, C, *S) -> (B, K)`` module;
            feature-level DA needs the encoder contract).
        x_train, x_val: cached images ``(N, C, *S)`` in [0, 1]; y_*: class indices ``(N,)``.
        cfg: the ``train`` section of the config.
        progress: a ``rich.progress.Progress`` to add a task to, or ``None`` for no bars.
        adapt: the ``adapt`` section; ``None`` or ``method: none`` trains source-only.
        x_target: unlabelled target-site images ``(M, C, *S)`` (needed by every DA method;
            e.g. the held-out site's images in leave-one-site-out CV). Their labels are never used.
        sites_train, sites_val: site of each training/validation image (``dsbn`` keeps one
            set of BatchNorm statistics per training site; validation uses its site's set).
        head: a multi-task run's heads (:class:`~medtl.models.heads.MultiTaskHead`, regression
            heads carrying the training-fold ``mean``/``std``); ``y_*`` are then float
            ``(N, T)`` targets as :class:`MultiTaskLoss` takes them (``nan`` = missing), the loss is
            :class:`MultiTaskLoss` (``cfg.task_weighting``) and the epoch is picked on the primary
            head (``select_metric``; ``loss``: the summed validation loss with the fixed weights).

    Returns:
        :class:`FitResult`; its model is a plain encoder. With ``adabn`` its BatchNorm
        statistics are the target's; with ``dsbn`` it keeps the target domain's statistics; with
        ``adapters``/``lora`` the updates are merged into the weights.

    Example:
        >>> res = fit(model, x, y, xv, yv, cfg.train, num_classes=2, adapt=cfg.adapt, x_target=xt)  # doctest: +SKIP
    """
    seed_everything(cfg.seed)
    _set_threads(cfg)
    device = resolve_device(cfg.device)
    use_amp = cfg.amp == "on" or (cfg.amp == "auto" and device.type == "cuda")
    if cfg.amp == "on" and device.type != "cuda":
        raise ConfigError("train.amp=on needs a CUDA device; use train.amp=auto on CPU.")
    if distributed.is_distributed():
        device = distributed.local_device(device)
        _check_distributed(cfg, adapt)
        if head is not None and cfg.task_weighting == "uncertainty":
            raise ConfigError("train.task_weighting=uncertainty is not supported under torchrun (the learned "
                              "task weights are not synchronised across ranks). Use task_weighting=fixed there.")
    strategy = make_strategy(cfg.strategy)
    model = strategy.prepare(model)
    da = DomainSetup(adapt, x_target, sites_train, sites_val, n_train=len(x_train), n_val=len(x_val))
    objective = DomainObjective(da.cfg, getattr(model, "num_features", None) if da.method == "dann" else None)
    if da.method == "dsbn":
        convert_dsbn(model, da.n_domains)
    model.to(device)
    objective.to(device)
    if x_train.ndim == 4:
        model.to(memory_format=torch.channels_last)
    aug = _augmenter(cfg, tuple(x_train.shape[2:]))
    # weight averaging: a running mean of the weights is a cheap temporal ensemble that makes the epoch
    # picked on a small validation set less of a lottery. timm's implementation (with warm-up: the decay
    # grows as 1 - (1 + step)^-2/3 up to cfg.ema) averages BatchNorm statistics too.
    ema = ModelEmaV3(model, decay=cfg.ema, use_warmup=True, device=device) if cfg.ema > 0 else None
    eval_model = ema.module if ema is not None else model
    # the fast path: the data held once as a compact tensor on the device, batches are indices
    data = resident(x_train, device)
    val_data = resident(x_val, device)
    target_data = resident(x_target, device) if x_target is not None and len(x_target) else None
    weight = None
    if cfg.class_weighted:
        counts = np.bincount(y_train, minlength=num_classes).astype(np.float64)
        weight = torch.tensor(counts.sum() / (num_classes * np.maximum(counts, 1)), dtype=torch.float32, device=device)
    criterion = nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)
    gate = None
    if head is not None:
        criterion = _multitask_criterion(head, cfg, y_train, device)
        gate = TaskGate(model, head, cfg.task_gating, prior=_prior_logits(head, y_train))
    groups = strategy.param_groups(model, cfg.lr, cfg.weight_decay)
    if head is not None and criterion.log_vars is not None:
        groups.append({"params": [criterion.log_vars], "lr": cfg.lr, "weight_decay": 0.0, "name": "task_weights"})
    if objective.classifier is not None:
        groups.append({"params": list(objective.parameters()), "lr": cfg.lr, "weight_decay": cfg.weight_decay,
                       "name": "domain_classifier"})
    # fused AdamW: one kernel for all parameters (CPU and CUDA); the per-tensor loop took ~15 %
    # of a CPU training step for EfficientNet-Lite0
    opt = torch.optim.AdamW(groups, lr=cfg.lr, fused=True)
    # data parallel under torchrun: every rank draws the same global batch and trains on its share
    train_model = distributed.wrap(model, device)
    step_model = _compiled(train_model, cfg.compile)
    bs = min(cfg.batch_size, len(x_train))
    steps = max(1, len(x_train) // bs)  # drop the last partial batch (BatchNorm needs > 1 sample)
    sched = _schedule(opt, cfg, steps)
    # float16 autocast (GPUs without bf16) needs loss scaling; bf16 and fp32 do not.
    fp16 = use_amp and device.type == "cuda" and not torch.cuda.is_bf16_supported()
    scaler = torch.amp.GradScaler("cuda", enabled=fp16)
    gen = np.random.default_rng(cfg.seed)
    tgen = np.random.default_rng([cfg.seed, 1])  # target batches: their own stream
    bt = min(bs, len(x_target)) if objective.uses_target else 0
    best = (-math.inf, 0, None, math.inf)  # (score, epoch, weights, validation loss)
    history = []
    task_weights = None
    task = progress.add_task(description, total=cfg.epochs * steps) if progress is not None else None
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        objective.train()
        strategy.on_epoch_start(model, epoch)
        order = gen.permutation(len(x_train))
        y_order = torch.as_tensor(y_train[order], dtype=torch.long if head is None else torch.float32
                                  ).to(device, non_blocking=True)
        loss_sum = torch.zeros((), device=device)
        t0 = time.perf_counter()
        for s in range(steps):
            idx = order[s * bs:(s + 1) * bs]
            xb = memory_format(aug(data.take(idx)))
            yb = y_order[s * bs:(s + 1) * bs]
            with autocast(device, use_amp):
                if distributed.is_distributed():
                    n_global = len(xb)
                    xb, yb = distributed.local_share(xb, yb)
                    # DDP averages rank gradients; weighting by share size makes that the global mean
                    loss = criterion(step_model(xb).float(), yb) * (len(xb) * distributed.world_size() / n_global)
                elif not objective.uses_target:
                    loss = criterion(step_model(xb).float(), yb)
                else:
                    tidx = tgen.choice(len(target_data), bt, replace=False)
                    xt = memory_format(aug(target_data.take(tidx)))
                    loss = _adapted_loss(model, objective, criterion, xb, yb, xt, da.train_domains[idx],
                                         ((epoch - 1) * steps + s) / (cfg.epochs * steps), da)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            if ema is not None:
                ema.update(model, step=(epoch - 1) * steps + s + 1)
            loss_sum += loss.detach()
            if task is not None:  # no loss in the bar mid-epoch: reading it would make the host wait
                progress.update(task, advance=1, description=f"{description} epoch {epoch}/{cfg.epochs}")
        train_loss = float(loss_sum) / steps  # the one host sync of the epoch
        train_seconds = time.perf_counter() - t0
        if task is not None:
            progress.update(task, description=f"{description} epoch {epoch}/{cfg.epochs} loss {train_loss:.3f}")
        extra = {}
        if head is None:
            proba = predict_proba(eval_model, val_data, batch_size=max(bs, 64), device=device, tta=cfg.tta,
                                  domains=da.val_domains if da.method == "dsbn" else None)
            val_loss = float(nn.functional.nll_loss(torch.log(torch.as_tensor(proba).clamp_min(1e-8)),
                                                    torch.as_tensor(y_val)).item())
            y_primary = y_val
        else:
            proba, val_loss, extra = _multitask_validation(eval_model, val_data, y_val, head, criterion,
                                                           max(bs, 64), device, cfg.tta, gate)
            y_primary = y_val[:, 0].astype(np.int64)
        m = validation_scores(y_primary, proba, num_classes)  # once per epoch: history and selection share it
        score = -val_loss if cfg.select_metric == "loss" else m[cfg.select_metric]
        score = -math.inf if math.isnan(score) else score
        history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss,
                        "val_auc": m["auc"], "val_acc": m["acc"], "lr": max(g["lr"] for g in opt.param_groups),
                        "train_seconds": train_seconds, "train_images_per_s": steps * bs / train_seconds, **extra})
        if best[2] is None or improves(score, val_loss, best[0], best[3]):  # an undefined score keeps epoch 1
            best = (score, epoch, {k: v.detach().to("cpu", copy=True) for k, v in eval_model.state_dict().items()},
                    val_loss)
            task_weights = criterion.weights() if head is not None else None
    if task is not None:
        progress.update(task, visible=False)
    if gate is not None:
        gate.remove()
    model.load_state_dict(best[2])
    model = strategy.finalize(model)
    if da.method == "dsbn":
        collapse_dsbn(model, da.target_domain)
    elif da.method == "adabn":
        adabn(model, x_target, batch_size=max(bs, 64), device=device)
    return FitResult(model=model, best_epoch=best[1], best_score=best[0], history=history, task_weights=task_weights)


def _multitask_criterion(head: MultiTaskHead, cfg: TrainConfig, y_train: np.ndarray, device) -> MultiTaskLoss:
    """:class:`MultiTaskLoss` of ``head``; with ``class_weighted``, inverse-frequency weights per
    classification head from its labelled training cases."""
    weights = {}
    if cfg.class_weighted:
        col = 0
        for h in head.heads:
            if h.kind in ("binary", "multiclass"):
                t = y_train[:, col]
                k = h.n_outputs
                counts = np.bincount(t[~np.isnan(t)].astype(int), minlength=k).astype(np.float64)
                weights[h.name] = torch.tensor(counts.sum() / (k * np.maximum(counts, 1)), dtype=torch.float32,
                                               device=device)
            col += h.n_outputs if h.kind == "multilabel" else 1
    return MultiTaskLoss(head, cfg.task_weighting, class_weights=weights,
                         label_smoothing=cfg.label_smoothing).to(device)


def _multitask_validation(model, val_data, y_val, head, criterion, batch_size, device, tta, gate=None):
    """``(primary probabilities, summed fixed-weight loss, {"tasks": {...}})`` on the validation cases.

    ``"tasks"``: ``"val_loss"`` and ``"skill"`` per task (``None`` for a task without a validation
    label), ``"weight"`` (the loss weights) and, with a :class:`TaskGate`, ``"encoder_scale"``: the
    scale each head's gradient into the encoder had during this epoch, before the gate is updated
    with this epoch's skills for the next one."""
    outputs = predict_outputs(model, val_data, head, batch_size=batch_size, device=device, tta=tta)
    with torch.no_grad():
        cpu = MultiTaskLoss(head, label_smoothing=0.0)
        y = torch.as_tensor(y_val, dtype=torch.float32)
        losses, counts = cpu.task_losses(criterion.deactivate(outputs), y)
        skill = {}
        if gate is not None:
            base, _ = cpu.task_losses(gate.prior.expand(len(y), -1), y)
            skill = {h.name: (float(1 - v / b) if c > 0 and b > 0 else None)
                     for h, v, b, c in zip(head.heads, losses, base, counts)}
    per_task = {"val_loss": {h.name: (float(v) if c > 0 else None) for h, v, c in zip(head.heads, losses, counts)},
                "weight": criterion.weights()}
    if gate is not None:
        per_task.update(skill=skill, encoder_scale=gate.scales())
        gate.update(skill)
    return outputs[head.primary.name], float((cpu.fixed * losses).sum()), {"tasks": per_task}


def _prior_logits(head: MultiTaskHead, y_train: np.ndarray) -> torch.Tensor:
    """``(1, n_outputs)`` logits of the training prior: class log-frequencies (add-one smoothed),
    label log-odds, and 0 for a regression head (its training mean, standardised)."""
    parts, col = [], 0
    for h in head.heads:
        n = h.n_outputs if h.kind == "multilabel" else 1
        t = y_train[:, col:col + n]
        col += n
        if h.kind in ("binary", "multiclass"):
            v = t[~np.isnan(t)].astype(int)
            freq = (np.bincount(v, minlength=h.n_outputs) + 1.0) / (len(v) + h.n_outputs)
            parts.append(np.log(freq))
        elif h.kind == "multilabel":
            pos, lab = np.nansum(t, axis=0), (~np.isnan(t)).sum(axis=0)
            p = (pos + 1.0) / (lab + 2.0)
            parts.append(np.log(p) - np.log1p(-p))
        else:
            parts.append(np.zeros(1))
    return torch.as_tensor(np.concatenate(parts), dtype=torch.float32)[None]


class TaskGate:
    """How much each non-primary head's gradient reaches the shared encoder (``train.task_gating``).

    The heads stay row blocks of the one final linear layer; during training a forward hook on
    that layer computes each head's rows from the pooled features ``f`` ``(B, F)`` passed through
    ``s f + (1 - s) f.detach()``: the same value, but the head's gradient into the encoder is
    scaled by ``s`` while its own rows learn at full rate. The primary head always has ``s = 1``.

    ``mode="validation"``: every non-primary head starts at ``s = 0`` and, after each epoch, gets
    ``s = clip(skill, 0, 1)`` for the next one, ``skill = 1 - L_val / L_prior``: its validation
    loss against that of the training prior (the training mean of a regression target, class
    frequencies of a classification one): R² of the standardised target under ``mse``, the
    pseudo-R² of McFadden for cross-entropy. A head that predicts its task on held-out cases no
    better than the prior does not move the encoder the primary task depends on; one that does is
    let in as far as it does. A head with no labelled validation case keeps its scale.
    ``mode="off"``: ``s = 1`` throughout (the hook is not installed).

    Args:
        model: the network; its ``classifier_layer`` must be an ``nn.Linear`` with ``head.n_outputs`` rows.
        head: the heads, primary first.
        mode: ``off`` or ``validation``.
        prior: ``(1, n_outputs)`` logits of the training prior (see ``_prior_logits``).
    """

    def __init__(self, model: nn.Module, head: MultiTaskHead, mode: str = "validation", *,
                 prior: torch.Tensor | None = None) -> None:
        if mode not in ("off", "validation"):
            raise ConfigError(f"train.task_gating must be off or validation. Got {mode!r} instead.")
        self.head, self.mode = head, mode
        self.prior = prior if prior is not None else torch.zeros(1, head.n_outputs)
        self._scale = [1.0] + [0.0 if mode == "validation" else 1.0] * (len(head.heads) - 1)
        self._handle = None
        if mode == "off":
            return
        layer = getattr(model, "classifier_layer", None)
        if not isinstance(layer, nn.Linear) or layer.out_features != head.n_outputs:
            raise ConfigError(f"train.task_gating=validation scales each head's gradient at the model's final linear "
                              f"layer, but {type(model).__name__} has {type(layer).__name__} there (needs nn.Linear "
                              f"with {head.n_outputs} outputs). Set train.task_gating=off.")
        self._handle = layer.register_forward_hook(self._forward)

    def scales(self) -> dict[str, float]:
        """``{task: s}``: the scale of each head's gradient into the encoder."""
        return {h.name: s for h, s in zip(self.head.heads, self._scale)}

    def update(self, skill: dict[str, float | None]) -> None:
        """Set the non-primary heads' scales from their validation skills (``None``: keep)."""
        if self.mode == "off":
            return
        for i, h in enumerate(self.head.heads[1:], start=1):
            v = skill.get(h.name)
            if v is not None and math.isfinite(v):
                self._scale[i] = float(min(max(v, 0.0), 1.0))

    def remove(self) -> None:
        """Take the hook off (the returned model is a plain network)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _forward(self, layer: nn.Linear, inputs: tuple, out: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() or all(s == 1.0 for s in self._scale):
            return out
        f = inputs[0]
        parts = []
        for h, s in zip(self.head.heads, self._scale):
            rows = self.head.slice(h.name)
            x = f if s == 1.0 else f.detach() if s == 0.0 else s * f + (1.0 - s) * f.detach()
            parts.append(nn.functional.linear(x, layer.weight[rows], None if layer.bias is None else layer.bias[rows]))
        return torch.cat(parts, 1)


def _check_distributed(cfg: TrainConfig, adapt: DomainAdaptConfig | None) -> None:
    """Distributed training supports strategies with a fixed trainable set and post-hoc AdaBN."""
    if cfg.strategy.name == "gradual_unfreeze":
        raise ConfigError("train.strategy.name=gradual_unfreeze changes which parameters train during the run, "
                          "which DistributedDataParallel does not allow. Use llrd or partial under torchrun, or "
                          "run gradual unfreezing in one process.")
    if adapt is not None and adapt.method not in ("none", "adabn"):
        raise ConfigError(f"adapt.method={adapt.method} is not supported under torchrun (it needs per-batch "
                          "target images and feature-level losses). Run it in one process, or use adabn.")


def _adapted_loss(model, objective, criterion, xb, yb, xt, src_domains, progress_frac, da) -> torch.Tensor:
    """Source cross-entropy plus the DA term, with the target batch ``xt`` through the network."""
    n = len(xb)
    if da.method == "dsbn":  # per-domain statistics: target images only teach the target BNs
        with domain_context(model, np.concatenate([src_domains, np.full(len(xt), da.target_domain)])):
            logits = model(torch.cat([xb, xt]))[:n]
        return criterion(logits.float(), yb)
    feats = _features(model, torch.cat([xb, xt]))
    logits = model.classifier_layer(feats[:n])
    return criterion(logits.float(), yb) + objective(feats[:n], feats[n:], progress_frac)
