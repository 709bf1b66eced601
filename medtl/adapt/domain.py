"""Domain adaptation across sites: AdaBN, domain-specific BN, DANN, MMD and CORAL.

The pieces plug into :func:`medtl.training.fit` (``adapt=cfg.adapt``, ``x_target=...``):

* ``adabn`` (Li et al., 2016): after training, :func:`adabn` re-estimates every BatchNorm's
  running statistics on the unlabelled target images; nothing else changes.
* ``dsbn`` (Chang et al., CVPR 2019): :func:`convert_dsbn` gives every BatchNorm one set of
  running statistics per domain (affine parameters shared); each sample is normalised with
  its own domain's statistics (:func:`domain_context`). Target batches flow through the
  network during training (no loss) so the target statistics are learnt;
  :func:`collapse_dsbn` then keeps the target domain's statistics only.
* ``dann`` (Ganin et al., JMLR 2016): a :class:`DomainClassifier` behind a
  :func:`grad_reverse` layer on the pooled features; the encoder learns features the
  classifier cannot tell apart.
* ``mmd`` (multi-kernel Gaussian MMD, Long et al., 2015) and ``coral`` (Sun & Saenko, 2016):
  a distance between source and target pooled features added to the loss.

MMD/CORAL/GRL are a few lines each; they are written here rather than taken from a DA
library (pytorch-adapt, ADAPT) to avoid a dependency for ~40 lines of tensor code.

Example:
    >>> xs, xt = torch.randn(64, 16), torch.randn(64, 16) + 2.0
    >>> bool(coral_loss(xs, xs) < 1e-6), bool(mmd_loss(xs, xt) > mmd_loss(xs, xs))
    (True, True)
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
from torch import nn

from medtl.config import DomainAdaptConfig
from medtl.errors import ConfigError, did_you_mean

__all__ = [
    "adabn", "DomainSpecificBatchNorm", "convert_dsbn", "collapse_dsbn", "domain_context",
    "GradientReversal", "grad_reverse", "dann_lambda", "DomainClassifier", "mmd_loss", "coral_loss",
    "DomainObjective", "DomainSetup", "TRAINING_METHODS", "adaptation_inputs",
]

#: methods whose training loop needs unlabelled target batches
TRAINING_METHODS = ("dsbn", "dann", "mmd", "coral")


# -- AdaBN ---------------------------------------------------------------------------------
@torch.no_grad()
def adabn(model: nn.Module, images: np.ndarray | torch.Tensor, *, batch_size: int = 64,
          device: torch.device | None = None) -> nn.Module:
    """Re-estimate every BatchNorm's running mean/var on ``images`` (in place); returns ``model``.

    Statistics are the cumulative average (``momentum=None``) over near-equal chunks of
    ``images`` ``(N, C, *S)`` (exact when ``batch_size >= N``; otherwise the variance is the
    mean within-chunk variance). Dropout and all other layers stay in eval mode.

    Example:
        >>> adabn(model, target_images)                                   # doctest: +SKIP
    """
    device = device or next(model.parameters()).device
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        raise ConfigError("adapt.method=adabn needs a model with BatchNorm layers; this one has none.")
    if len(images) < 2:
        raise ConfigError(f"adapt.method=adabn needs at least 2 target images. Got {len(images)}.")
    was_training = model.training
    model.eval()
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    # near-equal chunks: the cumulative average of chunk means is then ~ the mean over all
    # images (exact with one chunk, i.e. batch_size >= N); no chunk has a single sample
    n_chunks = max(1, min(math.ceil(len(images) / max(2, batch_size)), len(images) // 2))
    for chunk in np.array_split(np.arange(len(images)), n_chunks):
        model(torch.as_tensor(np.asarray(images)[chunk], dtype=torch.float32, device=device))
    for m, mom in zip(bns, momenta):
        m.momentum = mom
    model.train(was_training)
    return model


# -- DSBN ----------------------------------------------------------------------------------
class DomainSpecificBatchNorm(nn.Module):
    """Wraps a BatchNorm (any ``_BatchNorm`` subclass, e.g. timm's ``BatchNormAct2d``) with
    one set of running statistics per domain; weight, bias (and any fused activation) are shared.

    Input ``(B, C, *S)``; the domain of each sample is set with :func:`domain_context`.
    Samples are normalised domain by domain (in training with their domain's batch
    statistics, which update that domain's running statistics).
    """

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, n_domains: int) -> None:
        super().__init__()
        self.bn = bn
        self.n_domains = n_domains
        self.domains: torch.Tensor | None = None
        for d in range(n_domains):
            self.register_buffer(f"mean{d}", bn.running_mean.detach().clone())
            self.register_buffer(f"var{d}", bn.running_var.detach().clone())
            self.register_buffer(f"count{d}", bn.num_batches_tracked.detach().clone())
        self._use(0)

    def _use(self, d: int) -> None:
        # the BatchNorm updates these tensors in place, so domain d's buffers learn
        self.bn.running_mean = getattr(self, f"mean{d}")
        self.bn.running_var = getattr(self, f"var{d}")
        self.bn.num_batches_tracked = getattr(self, f"count{d}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.domains is None:
            raise RuntimeError("A domain-specific BatchNorm was called without domain indices; wrap the call in "
                               "medtl.adapt.domain.domain_context(model, domains), or collapse_dsbn() first.")
        dom = self.domains.to(x.device)
        present = torch.unique(dom).tolist()
        try:
            if len(present) == 1:
                self._use(int(present[0]))
                return self.bn(x)
            out = None
            for d in present:
                idx = torch.nonzero(dom == d).flatten()
                self._use(int(d))
                y = self.bn(x.index_select(0, idx))
                out = y.new_empty((x.shape[0], *y.shape[1:])) if out is None else out
                out = out.index_copy(0, idx, y)
            return out
        finally:
            # the inner BatchNorm always aliases domain 0 between calls, so state_dict()
            # and load_state_dict() see the same tensor under its keys
            self._use(0)


def _replace(model: nn.Module, match, make) -> int:
    n = 0
    for name, m in list(model.named_modules()):
        for child_name, child in list(m.named_children()):
            if match(child):
                setattr(m, child_name, make(child))
                n += 1
    return n


def convert_dsbn(model: nn.Module, n_domains: int) -> nn.Module:
    """Wrap every BatchNorm of ``model`` in :class:`DomainSpecificBatchNorm` (in place).

    Each domain starts from the BatchNorm's current (e.g. pretrained) running statistics.
    """
    if n_domains < 1:
        raise ConfigError(f"The 'n_domains' parameter of convert_dsbn must be an int >= 1. Got {n_domains} instead.")
    n = _replace(model, lambda c: isinstance(c, nn.modules.batchnorm._BatchNorm)
                 and not isinstance(c, DomainSpecificBatchNorm),
                 lambda c: DomainSpecificBatchNorm(c, n_domains))
    if n == 0:
        raise ConfigError("adapt.method=dsbn needs a model with BatchNorm layers; this one has none.")
    return model


def collapse_dsbn(model: nn.Module, domain: int) -> nn.Module:
    """Replace every :class:`DomainSpecificBatchNorm` by its BatchNorm holding ``domain``'s
    statistics (in place): the model becomes a plain encoder for that domain."""
    def unwrap(w: DomainSpecificBatchNorm) -> nn.Module:
        bn = w.bn
        bn.running_mean = getattr(w, f"mean{domain}").clone()
        bn.running_var = getattr(w, f"var{domain}").clone()
        bn.num_batches_tracked = getattr(w, f"count{domain}").clone()
        return bn

    _replace(model, lambda c: isinstance(c, DomainSpecificBatchNorm), unwrap)
    return model


@contextlib.contextmanager
def domain_context(model: nn.Module, domains: torch.Tensor | np.ndarray | int | None):
    """Within the block, DSBN layers normalise sample ``i`` with domain ``domains[i]``.

    ``domains``: ``(B,)`` integer domain per sample, or one int for the whole batch.
    """
    layers = [m for m in model.modules() if isinstance(m, DomainSpecificBatchNorm)]
    if isinstance(domains, (int, np.integer)):
        domains = torch.tensor([int(domains)])
    dom = None if domains is None else torch.as_tensor(np.asarray(domains), dtype=torch.long)
    old = [m.domains for m in layers]
    for m in layers:
        m.domains = dom
    try:
        yield
    finally:
        for m, o in zip(layers, old):
            m.domains = o


# -- DANN ----------------------------------------------------------------------------------
class GradientReversal(torch.autograd.Function):
    """Identity forward; multiplies the gradient by ``-lambd`` backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, lambd: float) -> torch.Tensor:
        ctx.lambd = lambd
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return -ctx.lambd * grad, None


def grad_reverse(x: torch.Tensor, lambd: float = 1.0) -> torch.Tensor:
    """Gradient reversal layer: ``y = x``, ``dL/dx = -lambd * dL/dy``."""
    return GradientReversal.apply(x, lambd)


def dann_lambda(progress: float, gamma: float = 10.0) -> float:
    """Ganin et al.'s schedule ``2 / (1 + exp(-gamma p)) - 1``, from 0 at ``p=0`` towards 1."""
    return float(2.0 / (1.0 + math.exp(-gamma * progress)) - 1.0)


class DomainClassifier(nn.Module):
    """Gradient reversal then an MLP: pooled features ``(B, F)`` -> domain logit ``(B,)`` (1 = target)."""

    def __init__(self, in_features: int, hidden: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Dropout(0.5), nn.Linear(hidden, 1))

    def forward(self, features: torch.Tensor, lambd: float = 1.0) -> torch.Tensor:
        return self.net(grad_reverse(features, lambd)).squeeze(-1)


# -- feature distances ---------------------------------------------------------------------
def mmd_loss(xs: torch.Tensor, xt: torch.Tensor, *, n_kernels: int = 5, kernel_mul: float = 2.0) -> torch.Tensor:
    """Squared MMD (biased estimate) with a sum of Gaussian kernels.

    Bandwidths are ``base * kernel_mul ** (i - n_kernels // 2)``, ``base`` = mean pairwise
    squared distance of the pooled sample (detached), as in DAN.

    Args:
        xs: source features ``(Bs, F)``; xt: target features ``(Bt, F)``.

    Returns:
        A scalar >= 0 (0 for identical samples).
    """
    x = torch.cat([xs, xt]).float()
    d2 = torch.cdist(x, x).pow(2)
    n = len(x)
    base = d2.detach().sum() / max(1, n * n - n)
    base = base.clamp_min(1e-8)
    k = sum(torch.exp(-d2 / (base * kernel_mul ** (i - n_kernels // 2))) for i in range(n_kernels))
    ns = len(xs)
    return (k[:ns, :ns].mean() + k[ns:, ns:].mean() - 2 * k[:ns, ns:].mean()).clamp_min(0)


def coral_loss(xs: torch.Tensor, xt: torch.Tensor) -> torch.Tensor:
    """CORAL: ``||cov(xs) - cov(xt)||_F^2 / (4 F^2)`` for features ``(B, F)``."""
    xs, xt = xs.float(), xt.float()
    f = xs.shape[1]

    def cov(x: torch.Tensor) -> torch.Tensor:
        x = x - x.mean(0, keepdim=True)
        return x.T @ x / max(1, len(x) - 1)

    return (cov(xs) - cov(xt)).pow(2).sum() / (4 * f * f)


# -- the training term ---------------------------------------------------------------------
class DomainObjective(nn.Module):
    """The extra loss of a DA method, from pooled source and target features ``(B, F)``.

    ``dann``: BCE of a :class:`DomainClassifier` (its parameters join the optimizer);
    ``mmd`` / ``coral``: the feature distance. ``weight`` multiplies the term. Other
    methods give 0 (``dsbn`` only needs the target batch to flow through the network).
    """

    def __init__(self, cfg: DomainAdaptConfig, num_features: int | None = None) -> None:
        super().__init__()
        self.method, self.weight = cfg.method, cfg.weight
        self.classifier = DomainClassifier(num_features) if cfg.method == "dann" and num_features else None
        if cfg.method == "dann" and self.classifier is None:
            raise ConfigError("adapt.method=dann needs the encoder's feature size (model.num_features).")

    @property
    def uses_target(self) -> bool:
        return self.method in TRAINING_METHODS

    @property
    def needs_features(self) -> bool:
        return self.method in ("dann", "mmd", "coral")

    def forward(self, fs: torch.Tensor, ft: torch.Tensor, progress: float) -> torch.Tensor:
        if self.method == "dann":
            logits = self.classifier(torch.cat([fs, ft]).float(), dann_lambda(progress))
            target = torch.cat([torch.zeros(len(fs)), torch.ones(len(ft))]).to(logits.device)
            return self.weight * nn.functional.binary_cross_entropy_with_logits(logits, target)
        if self.method == "mmd":
            return self.weight * mmd_loss(fs, ft)
        if self.method == "coral":
            return self.weight * coral_loss(fs, ft)
        return fs.new_zeros(())


# -- inputs of a DA run --------------------------------------------------------------------
class DomainSetup:
    """Checks a DA run's inputs and maps sites to domain indices (used by :func:`medtl.training.fit`).

    Domains: one per distinct training site (sorted; a missing site counts as one site),
    then the target as the last domain.

    Attributes:
        cfg: the ``adapt`` section (``method: none`` when ``None`` was given).
        n_domains: source domains + 1; ``target_domain``: index of the target.
        train_domains ``(N_train,)``, val_domains ``(N_val,)``: domain index per image.
    """

    def __init__(self, cfg: DomainAdaptConfig | None, x_target: np.ndarray | None, sites_train=None,
                 sites_val=None, *, n_train: int, n_val: int) -> None:
        self.cfg = cfg if cfg is not None else DomainAdaptConfig()
        self.method = self.cfg.method
        names = sorted({_site(s) for s in sites_train}) if sites_train is not None else [""]
        self.target_domain = len(names)
        self.n_domains = len(names) + 1
        index = {s: i for i, s in enumerate(names)}
        self.train_domains = self._map(sites_train, index, n_train, "sites_train")
        # only DSBN needs a domain per validation image; elsewhere an unseen site is harmless
        self.val_domains = self._map(sites_val if self.method == "dsbn" else None, index, n_val, "sites_val")
        if self.method == "none":
            return
        if not self.cfg.use_target_unlabelled:
            raise ConfigError(f"adapt.method={self.method} learns from unlabelled target images, but "
                              "adapt.use_target_unlabelled is false. Set it to true, or adapt.method=none.")
        if x_target is None or len(x_target) < 2:
            got = "none" if x_target is None else f"{len(x_target)} image(s)"
            raise ConfigError(f"adapt.method={self.method} needs unlabelled images of the target site (x_target, "
                              f">= 2); got {got}. In `medtl cv` use cv.scheme=leave_one_site_out (the held-out "
                              "site is the target) or set adapt.target_site to a site of the test data.")
        target = self.cfg.target_site
        if target is not None and sites_train is not None and target in names:
            raise ConfigError(f"adapt.target_site='{target}' also appears among the training sites, so its labels "
                              "would be used for training. Hold that site out of training.")

    @staticmethod
    def _map(sites, index: dict, n: int, what: str) -> np.ndarray:
        if sites is None:
            return np.zeros(n, dtype=np.int64)
        sites = [_site(s) for s in sites]
        if len(sites) != n:
            raise ConfigError(f"fit: '{what}' must give one site per image ({n}). Got {len(sites)}.")
        unknown = sorted(set(sites) - set(index))
        if unknown:
            raise ConfigError(f"fit: '{what}' holds site(s) {unknown} that are not among the training sites "
                              f"{sorted(index)}; domain-specific BatchNorm has no statistics for them.")
        return np.array([index[s] for s in sites], dtype=np.int64)


def _site(s) -> str:
    return "" if s is None else str(s)


def adaptation_inputs(cfg: DomainAdaptConfig, images: np.ndarray, sites, train_idx: np.ndarray,
                      val_idx: np.ndarray) -> dict:
    """Keyword arguments for :func:`medtl.training.fit` from a run's cached data and split.

    The target images are the unlabelled images of every case at a site that is in neither
    ``train_idx`` nor ``val_idx`` (in leave-one-site-out CV: the held-out site), restricted to
    ``cfg.target_site`` when it is set. Returns ``{}`` for ``method: none``.

    Args:
        images: all cached images ``(N, C, *S)``; sites: ``(N,)`` site per case (``None`` allowed).
        train_idx, val_idx: indices of the training and validation cases.

    Example:
        >>> kw = adaptation_inputs(cfg.adapt, data.images, [c.site for c in data.cases], trn, val)  # doctest: +SKIP
        >>> fit(model, ..., cfg.train, num_classes=2, **kw)                                          # doctest: +SKIP
    """
    if cfg.method == "none":
        return {}
    s = np.array([_site(x) for x in sites], dtype=object)
    seen = set(s[train_idx]) | set(s[val_idx])
    if cfg.target_site is not None:
        if cfg.target_site in seen:
            raise ConfigError(f"adapt.target_site='{cfg.target_site}' has cases in the training/validation data, "
                              "so its labels would be used. Use cv.scheme=leave_one_site_out, or hold that site "
                              "out of training.")
        target = np.flatnonzero(s == cfg.target_site)
        if len(target) == 0:
            valid = sorted(set(s) - {""})
            hint = did_you_mean(cfg.target_site, valid)
            raise ConfigError(f"adapt.target_site='{cfg.target_site}' matches no case.{hint} Sites in the data: {valid}.")
    else:
        target = np.flatnonzero(~np.isin(s, list(seen)))
    return {"adapt": cfg, "x_target": images[target] if len(target) else None,
            "sites_train": list(s[train_idx]), "sites_val": list(s[val_idx])}
