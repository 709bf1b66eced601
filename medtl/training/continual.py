"""Continual learning across sites: elastic weight consolidation, a bounded replay buffer, one training stage.

A model meets sites one after the other (stage ``t`` trains on site ``t`` only). Plain
sequential fine-tuning tends to forget the earlier sites; two standard remedies live here:

* :class:`EWC` (Kirkpatrick et al., 2017): after a stage, the diagonal Fisher information
  ``F`` of that stage's training images is stored with the weights ``theta*``; later stages
  add ``lambda / 2 * sum_p F_p (theta_p - theta*_p)^2`` to the loss, once per earlier stage.
* :class:`ReplayBuffer` (experience replay, Chaudhry et al., 2019): a bounded, seeded memory of
  earlier stages' cases; every training step of a later stage appends a batch drawn from it.

:func:`train_stage` is one stage: AdamW with a warm-up then cosine schedule, whole-batch
augmentation on the device (:class:`medtl.data.batch_augment.BatchAugment`), the optional
EWC penalty and replay batches, and the epoch with the best validation score kept, as in
:func:`medtl.training.fit`. The buffer and the Fisher hold case indices and tensors only;
the workflow (:mod:`medtl.workflows.continual`) decides sites, splits and scoring.

Example:
    >>> ewc = EWC(lam=100.0).consolidate(model, x_site_a, batch_size=32)        # doctest: +SKIP
    >>> buf = ReplayBuffer(32, policy="class_balanced", seed=0).add(idx_a, y_a, "site_a")  # doctest: +SKIP
    >>> res = train_stage(model, x_b, y_b, xv_b, yv_b, cfg.train, num_classes=2, epochs=6,
    ...                   penalty=ewc.penalty, replay=(x_all[buf.indices()], y_all[buf.indices()]))  # doctest: +SKIP
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from medtl._fastpath import autocast, batches, memory_format, resident
from medtl._runtime import resolve_device, seed_everything
from medtl.adapt.strategies import make_strategy
from medtl.config import TrainConfig
from medtl.config._choices import REPLAY_POLICIES
from medtl.data.batch_augment import BatchAugment
from medtl.errors import ConfigError
from medtl.training.loop import FitResult, improves, predict_proba, validation_scores

__all__ = ["EWC", "REPLAY_POLICIES", "ReplayBuffer", "fisher_diagonal", "train_stage"]

# --------------------------------------------------------------------------- EWC

def fisher_diagonal(model: nn.Module, images: np.ndarray, *, batch_size: int = 32, device: torch.device | None = None,
                    max_samples: int | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """The diagonal Fisher information of ``model`` on ``images``, one tensor per trainable parameter.

    ``F_p = mean_i sum_c p(c | x_i) (d log p(c | x_i) / d theta_p)^2``: the expectation is over the
    model's own predictive distribution (the true Fisher, as in EWC), not the labels, so no label
    is needed. The model is in eval mode (BatchNorm running statistics, no dropout); each image
    is its own backward pass, so the per-image square is exact.

    Args:
        model: ``(B, C, *S) -> (B, K)`` logits.
        images: ``(N, C, *S)`` in [0, 1].
        max_samples: use at most this many images, a seeded random subset (``None``: all).
        seed: the subset's seed.

    Returns:
        ``{parameter name: (same shape) float32 tensor on the CPU}`` for every parameter that
        requires grad.

    Example:
        >>> F = fisher_diagonal(model, x, max_samples=64)          # doctest: +SKIP
        >>> sorted(F)[:1]                                          # doctest: +SKIP
        ['classifier.bias']
    """
    device = device or next(model.parameters()).device
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ConfigError("fisher_diagonal needs a model with trainable parameters; every parameter has "
                          "requires_grad=False. Unfreeze the parameters EWC should protect.")
    n = len(images)
    if n == 0:
        raise ConfigError("fisher_diagonal needs at least one image of the earlier stage. Got none.")
    pick = np.arange(n)
    if max_samples is not None and n > max_samples:
        pick = np.sort(np.random.default_rng(seed).choice(n, int(max_samples), replace=False))
    fisher = {k: torch.zeros_like(p, dtype=torch.float32) for k, p in params.items()}
    was_training = model.training
    model.eval()
    names, tensors = list(params), list(params.values())
    sub = images[pick]
    for xb in batches(sub, batch_size, device):
        for x in xb:
            logp = torch.log_softmax(model(x.unsqueeze(0)).float(), -1)[0]
            prob = logp.detach().exp()
            for c in range(len(logp)):
                grads = torch.autograd.grad(logp[c], tensors, retain_graph=c < len(logp) - 1, allow_unused=True)
                for k, g in zip(names, grads, strict=True):
                    if g is not None:
                        fisher[k] += prob[c] * g.detach().float() ** 2
    model.train(was_training)
    return {k: (v / len(pick)).cpu() for k, v in fisher.items()}


class EWC:
    """Elastic weight consolidation: a quadratic pull towards every earlier stage's weights.

    ``penalty(model) = lam / 2 * sum_j sum_p F_j[p] * (theta[p] - theta*_j[p])^2`` over the
    stages ``j`` consolidated so far (one term each, not a running average).

    Args:
        lam: the penalty weight ``lambda`` (>= 0; 0 makes EWC plain fine-tuning).

    Attributes:
        terms_: ``[(fisher, anchor)]``, one per consolidated stage; both ``{name: tensor}`` on the CPU.

    Example:
        >>> ewc = EWC(lam=100.0).consolidate(model, x_a)           # doctest: +SKIP
        >>> float(ewc.penalty(model))                              # doctest: +SKIP
        0.0
    """

    def __init__(self, lam: float) -> None:
        if isinstance(lam, bool) or not isinstance(lam, numbers.Real) or not math.isfinite(lam) or lam < 0:
            raise ConfigError(f"The 'lam' parameter of EWC must be a float >= 0. Got {lam!r} instead.")
        self.lam = float(lam)
        self.terms_: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = []
        self._on: dict = {}

    def consolidate(self, model: nn.Module, images: np.ndarray, *, batch_size: int = 32,
                    device: torch.device | None = None, max_samples: int | None = None, seed: int = 0) -> EWC:
        """Store the Fisher of ``images`` (the stage just finished) and the model's current weights."""
        fisher = fisher_diagonal(model, images, batch_size=batch_size, device=device, max_samples=max_samples,
                                 seed=seed)
        anchor = {k: p.detach().float().cpu().clone() for k, p in model.named_parameters() if k in fisher}
        self.terms_.append((fisher, anchor))
        self._on = {}
        return self

    def penalty(self, model: nn.Module) -> torch.Tensor:
        """The scalar penalty for the model's current weights (differentiable; zero before any stage)."""
        params = dict(model.named_parameters())
        device = next(model.parameters()).device
        if not self.terms_ or self.lam == 0:
            return torch.zeros((), device=device)
        if self._on.get("device") != device:  # the terms move to the training device once
            self._on = {"device": device, "terms": [({k: f.to(device) for k, f in F.items()},
                                                     {k: a.to(device) for k, a in A.items()}) for F, A in self.terms_]}
        total = torch.zeros((), device=device)
        for F, A in self._on["terms"]:
            for k, f in F.items():
                p = params.get(k)
                if p is not None and p.requires_grad:
                    total = total + (f * (p.float() - A[k]) ** 2).sum()
        return 0.5 * self.lam * total

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat ``{"<j>.fisher.<name>" | "<j>.anchor.<name>": tensor}`` (for safetensors)."""
        out = {}
        for j, (F, A) in enumerate(self.terms_):
            out.update({f"{j}.fisher.{k}": v.contiguous() for k, v in F.items()})
            out.update({f"{j}.anchor.{k}": v.contiguous() for k, v in A.items()})
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> EWC:
        """Restore the terms written by :meth:`state_dict`."""
        terms: dict[int, tuple[dict, dict]] = {}
        for key, v in state.items():
            j, kind, name = key.split(".", 2)
            F, A = terms.setdefault(int(j), ({}, {}))
            (F if kind == "fisher" else A)[name] = v
        self.terms_ = [terms[j] for j in sorted(terms)]
        self._on = {}
        return self


# --------------------------------------------------------------------------- replay

class ReplayBuffer:
    """A bounded, seeded memory of earlier stages' cases (indices into the prepared data).

    Args:
        size: the most cases it holds (>= 1).
        policy: ``reservoir``: Vitter's algorithm R over every case offered so far, in a seeded
            order, so each offered case is kept with equal probability ``size / seen``;
            ``class_balanced``: equal slots for every (site, class) seen so far (the remainder
            to the first groups in sorted order), each group's cases a seeded random subset;
            when a new site arrives, earlier groups give up their last-drawn cases.
        seed: seeds every draw; the same offers in the same order give the same buffer.

    Attributes:
        items_: ``[(index, label, site)]`` held now.
        seen_: how many cases have been offered.

    Example:
        >>> buf = ReplayBuffer(4, policy="class_balanced", seed=0)
        >>> buf = buf.add(np.arange(10), np.array([0, 1] * 5), "site_a")
        >>> len(buf), sorted(buf.counts().values())
        (4, [2, 2])
    """

    def __init__(self, size: int, *, policy: str = "reservoir", seed: int = 0) -> None:
        if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
            raise ConfigError(f"The 'size' parameter of ReplayBuffer must be an int >= 1. Got {size!r} instead.")
        if policy not in REPLAY_POLICIES:
            raise ConfigError(f"The 'policy' parameter of ReplayBuffer must be one of {list(REPLAY_POLICIES)}. "
                              f"Got {policy!r} instead.")
        self.size, self.policy, self.seed = int(size), policy, int(seed)
        self.items_: list[tuple[int, int, str]] = []
        self.seen_ = 0
        self._rng = np.random.default_rng(self.seed)

    def __len__(self) -> int:
        return len(self.items_)

    def add(self, indices: Sequence[int] | np.ndarray, labels: Sequence[int] | np.ndarray, site: str) -> ReplayBuffer:
        """Offer one stage's cases (``indices`` ``(n,)`` with their ``labels`` ``(n,)``) from ``site``."""
        idx, lab = np.asarray(indices, dtype=np.int64).ravel(), np.asarray(labels, dtype=np.int64).ravel()
        if idx.shape != lab.shape:
            raise ConfigError(f"ReplayBuffer.add needs one label per index. Got {idx.size} indices and {lab.size} "
                              "labels.")
        order = self._rng.permutation(len(idx))
        offered = [(int(idx[i]), int(lab[i]), str(site)) for i in order]
        if self.policy == "reservoir":
            for item in offered:
                self.seen_ += 1
                if len(self.items_) < self.size:
                    self.items_.append(item)
                else:
                    j = int(self._rng.integers(0, self.seen_))
                    if j < self.size:
                        self.items_[j] = item
        else:
            self.seen_ += len(offered)
            groups: dict[tuple[str, int], list[tuple[int, int, str]]] = {}
            for item in self.items_ + offered:  # kept items first: they keep their slots where quotas allow
                groups.setdefault((item[2], item[1]), []).append(item)
            keys = sorted(groups)
            quota = {k: self.size // len(keys) + (i < self.size % len(keys)) for i, k in enumerate(keys)}
            spare = sum(max(0, quota[k] - len(groups[k])) for k in keys)  # small groups lend unused slots
            kept = []
            for k in keys:
                extra = min(spare, max(0, len(groups[k]) - quota[k]))
                spare -= extra
                kept += groups[k][:quota[k] + extra]
            self.items_ = kept
        return self

    def indices(self) -> np.ndarray:
        """``(len,)`` int64 indices held, sorted."""
        return np.sort(np.array([i for i, _, _ in self.items_], dtype=np.int64))

    def counts(self) -> dict[str, int]:
        """Cases held per ``"<site>/<class index>"``."""
        out: dict[str, int] = {}
        for _, y, s in self.items_:
            out[f"{s}/{y}"] = out.get(f"{s}/{y}", 0) + 1
        return dict(sorted(out.items()))

    def state(self) -> dict:
        """A JSON-safe snapshot (for resuming); :meth:`from_state` restores it exactly."""
        return {"size": self.size, "policy": self.policy, "seed": self.seed, "seen": self.seen_,
                "items": [list(t) for t in self.items_], "rng": self._rng.bit_generator.state}

    @classmethod
    def from_state(cls, state: dict) -> ReplayBuffer:
        buf = cls(state["size"], policy=state["policy"], seed=state["seed"])
        buf.seen_ = int(state["seen"])
        buf.items_ = [(int(i), int(y), str(s)) for i, y, s in state["items"]]
        buf._rng.bit_generator.state = state["rng"]
        return buf


# --------------------------------------------------------------------------- one stage

def _cosine(opt: torch.optim.Optimizer, warm: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    warm = min(warm, total - 1)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def train_stage(model: nn.Module, x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
                cfg: TrainConfig, *, num_classes: int, epochs: int,
                penalty: Callable[[nn.Module], torch.Tensor] | None = None,
                replay: tuple[np.ndarray, np.ndarray] | None = None, replay_batch: int = 0,
                description: str = "stage", progress=None) -> FitResult:
    """Train ``model`` on one stage's cases and keep the epoch with the best validation score.

    Same recipe as :func:`medtl.training.fit` (``cfg``: lr, weight decay, warm-up + cosine,
    batch size, augmentation, label smoothing, class weights, ``select_metric``, seed, device,
    ``strategy`` finetune/llrd/partial), plus the two continual-learning terms:

    Args:
        model: ``(B, C, *S) -> (B, K)`` logits, trained in place and returned with the best weights.
        x_train, x_val: ``(N, C, *S)`` images in [0, 1]; y_*: ``(N,)`` class indices.
        epochs: epochs of this stage (the cosine schedule restarts every stage).
        penalty: ``model -> scalar`` added to every step's loss (e.g. :meth:`EWC.penalty`).
        replay: ``(images (M, C, *S), labels (M,))`` of earlier stages (a :class:`ReplayBuffer`'s cases);
            every step appends ``replay_batch`` of them, drawn without replacement from a seeded stream.
        progress: a ``rich.progress.Progress`` or ``None``.

    Returns:
        :class:`~medtl.training.FitResult`; ``history`` rows also hold ``penalty`` (mean per step).
    """
    seed_everything(cfg.seed)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = resolve_device(cfg.device)
    strategy = make_strategy(cfg.strategy)
    model = strategy.prepare(model).to(device)
    if x_train.ndim == 4:
        model.to(memory_format=torch.channels_last)
    aug = BatchAugment(cfg.augment, spatial_dims=x_train.ndim - 2, seed=cfg.seed)
    data, val_data = resident(x_train, device), resident(x_val, device)
    mem = resident(replay[0], device) if replay is not None and len(replay[0]) and replay_batch > 0 else None
    mem_y = torch.as_tensor(replay[1], dtype=torch.long, device=device) if mem is not None else None
    rb = min(replay_batch, len(replay[0])) if mem is not None else 0
    weight = None
    if cfg.class_weighted:
        ys = np.concatenate([y_train, replay[1]]) if mem is not None else y_train
        counts = np.bincount(ys, minlength=num_classes).astype(np.float64)
        weight = torch.tensor(counts.sum() / (num_classes * np.maximum(counts, 1)), dtype=torch.float32, device=device)
    criterion = nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)
    opt = torch.optim.AdamW(strategy.param_groups(model, cfg.lr, cfg.weight_decay), lr=cfg.lr)
    bs = min(cfg.batch_size, len(x_train))
    steps = max(1, len(x_train) // bs)  # the last partial batch is dropped (BatchNorm needs > 1 sample)
    sched = _cosine(opt, cfg.warmup_epochs * steps, epochs * steps)
    gen, rgen = np.random.default_rng(cfg.seed), np.random.default_rng([cfg.seed, 2])
    best: tuple[float, int, dict | None, float] = (-math.inf, 0, None, math.inf)  # score, epoch, weights, val loss
    history = []
    task = progress.add_task(description, total=epochs * steps) if progress is not None else None
    for epoch in range(1, epochs + 1):
        model.train()
        strategy.on_epoch_start(model, epoch)
        order = gen.permutation(len(x_train))
        y_order = torch.as_tensor(y_train[order], dtype=torch.long).to(device)
        loss_sum, pen_sum = torch.zeros((), device=device), torch.zeros((), device=device)
        t0 = time.perf_counter()
        for s in range(steps):
            xb, yb = data.take(order[s * bs:(s + 1) * bs]), y_order[s * bs:(s + 1) * bs]
            if mem is not None:
                pick = rgen.choice(len(mem_y), rb, replace=False)
                xb, yb = torch.cat([xb, mem.take(pick)]), torch.cat([yb, mem_y[torch.as_tensor(pick, device=device)]])
            with autocast(device):
                loss = criterion(model(memory_format(aug(xb))).float(), yb)
            if penalty is not None:
                pen = penalty(model)
                loss = loss + pen
                pen_sum += pen.detach()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.detach()
            if task is not None:
                progress.update(task, advance=1, description=f"{description} epoch {epoch}/{epochs}")
        train_loss, seconds = float(loss_sum) / steps, time.perf_counter() - t0
        proba = predict_proba(model, val_data, batch_size=max(bs, 64), device=device, tta=cfg.tta)
        val_loss = float(nn.functional.nll_loss(torch.log(torch.as_tensor(proba).clamp_min(1e-8)),
                                                torch.as_tensor(y_val)).item())
        m = validation_scores(y_val, proba, num_classes)
        score = -val_loss if cfg.select_metric == "loss" else m[cfg.select_metric]
        score = -math.inf if math.isnan(score) else score
        history.append({"epoch": epoch, "train_loss": train_loss, "penalty": float(pen_sum) / steps,
                        "val_loss": val_loss, "val_auc": m["auc"], "val_acc": m["acc"],
                        "lr": max(g["lr"] for g in opt.param_groups), "train_seconds": seconds,
                        "train_images_per_s": steps * (bs + rb) / seconds})
        if best[2] is None or improves(score, val_loss, best[0], best[3]):
            best = (score, epoch, {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()},
                    val_loss)
    if task is not None:
        progress.update(task, visible=False)
    model.load_state_dict(best[2])
    model = strategy.finalize(model)
    return FitResult(model=model, best_epoch=best[1], best_score=best[0], history=history)
