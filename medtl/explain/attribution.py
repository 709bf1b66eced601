"""Saliency maps for medtl classifiers: one verb, :func:`explain`, for every method.

Two methods are offered, both from Captum:

* ``"gradcam"`` (alias ``"layergradcam"``): :class:`captum.attr.LayerGradCam` on
  ``model.feature_layer`` (the last convolutional feature map), ReLU'd as in the original
  paper and upsampled to the input with :meth:`captum.attr.LayerAttribution.interpolate`
  (bilinear in 2D, trilinear in 3D). Coarse, class-discriminative, always ``>= 0``.
* ``"ig"`` (alias ``"integrated_gradients"``): :class:`captum.attr.IntegratedGradients`
  from a constant baseline (``0.0`` = a black image in windowed ``[0, 1]`` space), summed
  over input channels. Pixel-exact and **signed**: positive values push the target logit
  up, negative ones push it down, and the values add up to
  ``f(x)[target] - f(baseline)[target]`` (completeness).

Sign convention (decided here, relied on by :mod:`medtl.explain.overlay`):
:func:`explain` returns the *signed* IG sum, so no information is lost and completeness can
be checked on the returned tensor. Displays (overlays, the HTML report) show the magnitude
``|attribution|``; the sanity checks compare magnitudes as well. Grad-CAM is non-negative,
so its magnitude is the map itself.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from captum.attr import IntegratedGradients, LayerAttribution, LayerGradCam
from torch import Tensor, nn

from medtl.errors import ConfigError, did_you_mean

__all__ = ["METHODS", "ALIASES", "explain", "resolve_method"]

METHODS: tuple[str, ...] = ("gradcam", "ig")
ALIASES: dict[str, str] = {"layergradcam": "gradcam", "integrated_gradients": "ig"}


def resolve_method(method: str) -> str:
    """Return the canonical method name (``"gradcam"`` or ``"ig"``) for a name or alias.

    Example:
        >>> resolve_method("integrated_gradients")
        'ig'
    """
    name = str(method).strip().lower().replace("-", "_")
    if name in METHODS:
        return name
    if name in ALIASES:
        return ALIASES[name]
    valid = [*METHODS, *ALIASES]
    raise ConfigError(
        f"The 'method' parameter of explain must be one of {', '.join(map(repr, METHODS))} "
        f"(aliases: {', '.join(map(repr, ALIASES))}). Got {method!r} instead."
        f"{did_you_mean(name, valid)}"
    )


def explain(
    model: nn.Module,
    x: Tensor,
    *,
    target: int | Tensor | None = None,
    method: str = "gradcam",
    layer: nn.Module | None = None,
    ig_steps: int = 32,
    baseline: float | Tensor = 0.0,
    internal_batch_size: int | None = None,
) -> Tensor:
    """Attribute the target logit of ``model`` to the pixels/voxels of ``x``.

    Args:
        model: classifier mapping ``(B, C, H, W)`` or ``(B, C, D, H, W)`` images in ``[0, 1]``
            to logits ``(B, K)``; exposes ``feature_layer`` (used by Grad-CAM).
        x: the batch, ``(B, C, H, W)`` (2D) or ``(B, C, D, H, W)`` (3D).
        target: class index per sample: an int for all, a ``(B,)`` integer tensor, or
            ``None`` for each sample's predicted class.
        method: ``"gradcam"`` / ``"layergradcam"`` or ``"ig"`` / ``"integrated_gradients"``.
        layer: Grad-CAM layer; defaults to ``model.feature_layer``.
        ig_steps: number of integration steps for IG.
        baseline: IG baseline, a constant or a tensor broadcastable to ``x``.
        internal_batch_size: IG evaluates ``B * ig_steps`` images; this caps how many go
            through the model at once (set it for 3D volumes to bound memory).

    Returns:
        float32 tensor ``(B, 1, *spatial)`` at input resolution, on ``x``'s device,
        detached. Grad-CAM is ``>= 0``; IG is signed (see the module docstring).

    The model is put in ``eval()`` and every module's previous train/eval mode is restored
    afterwards; parameters are frozen during the computation, so no ``.grad`` is written
    into them and their ``requires_grad`` flags are restored.

    Example:
        >>> attr = explain(model, x, method="ig", ig_steps=16)   # doctest: +SKIP
        >>> attr.shape == (x.shape[0], 1, *x.shape[2:])          # doctest: +SKIP
        True
    """
    name = resolve_method(method)
    _check_input(x)
    _check_positive_int("ig_steps", ig_steps)
    if internal_batch_size is not None:
        _check_positive_int("internal_batch_size", internal_batch_size)
    device, dtype = _model_device_dtype(model, x)
    inputs = x.detach().to(device=device, dtype=dtype)

    with _frozen_eval(model):
        targets = _resolve_target(model, inputs, target)
        inputs = inputs.clone().requires_grad_(True)
        if name == "gradcam":
            attr = _gradcam(model, inputs, targets, layer)
        else:
            attr = _integrated_gradients(model, inputs, targets, ig_steps, baseline,
                                         internal_batch_size)
    return attr.detach().to(device=x.device, dtype=torch.float32)


def _gradcam(model: nn.Module, x: Tensor, target: Tensor, layer: nn.Module | None) -> Tensor:
    """Grad-CAM ``(B, 1, *spatial)`` upsampled to ``x``; ReLU'd (non-negative)."""
    if layer is None:
        layer = getattr(model, "feature_layer", None)
        if not isinstance(layer, nn.Module):
            raise ConfigError(
                f"Grad-CAM needs the model's last convolutional feature map, but "
                f"{type(model).__name__} has no 'feature_layer' module. Pass layer=... "
                "explicitly or use method='ig'."
            )
    elif not any(m is layer for m in model.modules()):
        raise ConfigError(
            f"The 'layer' parameter of explain must be a submodule of the model (e.g. "
            f"model.feature_layer). Got a {type(layer).__name__} that is not part of "
            f"{type(model).__name__}."
        )
    try:
        cam = LayerGradCam(model, layer).attribute(x, target=target, relu_attributions=True)
    except AssertionError as err:  # Captum's way of saying the hook never fired
        if "Forward hook" not in str(err):
            raise
        raise ConfigError(
            f"The Grad-CAM layer ({type(layer).__name__}) is never called in "
            f"{type(model).__name__}.forward, so it has no feature map. Point "
            "model.feature_layer (or layer=...) at a module the forward pass uses."
        ) from None
    if isinstance(cam, tuple) or cam.dim() != x.dim():
        shape = tuple(cam[0].shape) if isinstance(cam, tuple) else tuple(cam.shape)
        raise ConfigError(
            f"Grad-CAM needs a feature map shaped (B, C, *spatial) with the same number of "
            f"spatial dimensions as the input {tuple(x.shape)}; the chosen layer returned "
            f"{'a tuple starting with ' if isinstance(cam, tuple) else ''}{shape}. Point "
            "model.feature_layer (or layer=...) at a convolutional block, or use method='ig'."
        )
    mode = "bilinear" if x.dim() == 4 else "trilinear"
    return LayerAttribution.interpolate(cam, tuple(x.shape[2:]), interpolate_mode=mode)


def _integrated_gradients(model: nn.Module, x: Tensor, target: Tensor, steps: int,
                          baseline: float | Tensor, internal_batch_size: int | None) -> Tensor:
    """Signed IG summed over channels, ``(B, 1, *spatial)``."""
    if isinstance(baseline, Tensor):
        try:
            base = torch.broadcast_to(baseline.detach().to(x.device, x.dtype), x.shape)
        except RuntimeError:
            raise ConfigError(
                f"The 'baseline' parameter of explain must be a number or a tensor "
                f"broadcastable to the input shape {tuple(x.shape)}. Got a tensor of shape "
                f"{tuple(baseline.shape)} instead."
            ) from None
        base = base.contiguous()
    elif isinstance(baseline, (int, float)) and not isinstance(baseline, bool):
        base = torch.full_like(x, float(baseline))
    else:
        raise ConfigError(
            f"The 'baseline' parameter of explain must be a float or a tensor. "
            f"Got {type(baseline).__name__} instead."
        )
    attr = IntegratedGradients(model).attribute(
        x, baselines=base, target=target, n_steps=steps, internal_batch_size=internal_batch_size
    )
    return attr.sum(dim=1, keepdim=True)


def _resolve_target(model: nn.Module, x: Tensor, target: int | Tensor | None) -> Tensor:
    """A ``(B,)`` long tensor of class indices, validated against the number of logits."""
    with torch.no_grad():
        logits = model(x)
    if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[0] != x.shape[0]:
        got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ConfigError(
            f"explain needs a classifier returning logits shaped (B, K) = ({x.shape[0]}, K). "
            f"The model returned {got} instead."
        )
    n_classes = logits.shape[1]
    if target is None:
        return logits.argmax(dim=1)
    if isinstance(target, Tensor):
        t = target.detach().to(x.device).reshape(-1)
        if t.is_floating_point() or t.numel() not in (1, x.shape[0]):
            raise ConfigError(
                f"The 'target' parameter of explain must be an int or an integer tensor of "
                f"shape ({x.shape[0]},). Got a {t.dtype} tensor with {t.numel()} values."
            )
        t = t.long().expand(x.shape[0]).clone()
    elif isinstance(target, int) and not isinstance(target, bool):
        t = torch.full((x.shape[0],), int(target), dtype=torch.long, device=x.device)
    else:
        raise ConfigError(
            f"The 'target' parameter of explain must be an int, an integer tensor or None. "
            f"Got {type(target).__name__} instead."
        )
    if bool(((t < 0) | (t >= n_classes)).any()):
        raise ConfigError(
            f"The 'target' parameter of explain must be a class index in [0, {n_classes - 1}] "
            f"(the model has {n_classes} logits). Got {t.tolist()} instead."
        )
    return t


@contextlib.contextmanager
def _frozen_eval(model: nn.Module) -> Iterator[None]:
    """``eval()`` + frozen parameters; restore each module's mode and each ``requires_grad``."""
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for m, was_training in modes:
            m.training = was_training
        for p, req in flags:
            p.requires_grad_(req)


def _model_device_dtype(model: nn.Module, x: Tensor) -> tuple[torch.device, torch.dtype]:
    """The device and floating dtype of the model's first parameter (else ``x``'s)."""
    for p in model.parameters():
        return p.device, (p.dtype if p.is_floating_point() else torch.float32)
    return x.device, (x.dtype if x.is_floating_point() else torch.float32)


def _check_input(x: object) -> None:
    if not isinstance(x, Tensor):
        raise ConfigError(
            f"The 'x' parameter of explain must be a torch.Tensor shaped (B, C, H, W) or "
            f"(B, C, D, H, W). Got {type(x).__name__} instead."
        )
    if x.dim() not in (4, 5) or x.shape[0] == 0:
        raise ConfigError(
            f"The 'x' parameter of explain must be a non-empty batch shaped (B, C, H, W) or "
            f"(B, C, D, H, W). Got shape {tuple(x.shape)} instead; add the batch and channel "
            "axes with x[None, None] for a single image."
        )


def _check_positive_int(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(
            f"The '{name}' parameter of explain must be an int >= 1. Got {value!r} instead."
        )
