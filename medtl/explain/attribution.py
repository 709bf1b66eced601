"""Saliency maps for medtl classifiers: one verb, :func:`explain`, for every method.

All methods come from Captum, run on the model's device (the GPU when the model is there)
and take a whole batch at once, in 2D ``(B, C, H, W)`` and 3D ``(B, C, D, H, W)``:

==================  =====================================================  ===========
``method``          Captum                                                 values
==================  =====================================================  ===========
``gradcam``         ``LayerGradCam`` on ``model.feature_layer``, ReLU'd,   ``>= 0``
                    bi/trilinear upsampling to the input
``guided_gradcam``  ``GuidedGradCam`` (guided backprop x Grad-CAM)         signed
``ig``              ``IntegratedGradients`` from a constant baseline,      signed
                    ``internal_batch_size``, convergence delta checked
``gradient_shap``   ``GradientShap`` from baselines {0, batch mean}        signed
``occlusion``       ``Occlusion``, ``perturbations_per_eval`` batched       signed
``smoothgrad``      ``NoiseTunnel(Saliency)``, mean ``|gradient|``         ``>= 0``
==================  =====================================================  ===========

The Grad-CAM layer comes from the encoder contract (``model.feature_layer``, a module
object), never from a name. An ensemble's Grad-CAM (a module with its models in ``members``,
e.g. :class:`medtl.models.ensemble.EnsembleClassifier`) is the mean of the maps at that layer in
every member, each from the gradient of the ensemble's output, so it explains the ensemble and
not only the member whose layer was passed. Input channels are summed, so every map has the input's
spatial shape: ``(B, H, W)`` or ``(B, D, H, W)``. Signed maps keep their sign (IG
completeness can be checked on them); displays and sanity checks use the magnitude.
Guided backpropagation only modifies ``nn.ReLU`` modules (Captum); in networks built on
other activations (ReLU6, SiLU) the "guided" part is the plain gradient.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from medtl.config import EXPLAIN_METHODS
from medtl.errors import ConfigError, did_you_mean
from medtl.explain import _methods
from medtl.explain._stages import ensemble_members

__all__ = ["METHODS", "ALIASES", "SIGNED_METHODS", "ConvergenceWarning", "DELTA_THRESHOLD",
           "explain", "gradcam_layer", "member_layers", "relative_delta", "resolve_method"]

METHODS: tuple[str, ...] = EXPLAIN_METHODS
ALIASES: dict[str, str] = {"layergradcam": "gradcam", "grad_cam": "gradcam",
                           "guidedgradcam": "guided_gradcam", "integrated_gradients": "ig",
                           "gradientshap": "gradient_shap", "noise_tunnel": "smoothgrad",
                           "smooth_grad": "smoothgrad"}
#: Methods whose maps carry a sign (evidence against the class is negative).
SIGNED_METHODS: frozenset[str] = frozenset({"guided_gradcam", "ig", "gradient_shap", "occlusion"})
#: IG warns when ``|delta| / |f(x) - f(baseline)|`` exceeds this (5 % of the explained change).
DELTA_THRESHOLD = 0.05


class ConvergenceWarning(UserWarning):
    """Integrated Gradients did not converge: raise ``n_steps``."""


def resolve_method(method: str) -> str:
    """Return the canonical method name for a name or alias.

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
    target: int | Tensor | None = None,
    method: str = "gradcam",
    *,
    layer: nn.Module | None = None,
    n_steps: int = 32,
    baseline: float | Tensor = 0.0,
    internal_batch_size: int | None = None,
    n_samples: int = 16,
    noise: float = 0.1,
    window: tuple[int, ...] | None = None,
    stride: tuple[int, ...] | None = None,
    perturbations_per_eval: int | None = None,
    return_delta: bool = False,
    delta_threshold: float = DELTA_THRESHOLD,
) -> Tensor | tuple[Tensor, Tensor | None]:
    """Attribute the target logit of ``model`` to the pixels/voxels of ``x``.

    Args:
        model: classifier mapping ``(B, C, H, W)`` or ``(B, C, D, H, W)`` images in ``[0, 1]``
            to logits ``(B, K)``; exposes ``feature_layer`` (used by the Grad-CAM methods).
        x: the batch, ``(B, C, H, W)`` (2D) or ``(B, C, D, H, W)`` (3D).
        target: class index per sample: an int for all, a ``(B,)`` integer tensor, or
            ``None`` for each sample's predicted class.
        method: one of :data:`METHODS` (or an alias in :data:`ALIASES`).
        layer: Grad-CAM layer (a submodule); defaults to ``model.feature_layer``.
        n_steps: IG integration steps.
        baseline: IG/occlusion reference value (``0.0`` = black in windowed ``[0, 1]``
            space), or for IG a tensor broadcastable to ``x``.
        internal_batch_size: IG evaluates ``B * n_steps`` images; at most this many go
            through the model at once (default: sized to the input, small for volumes).
        n_samples: noisy samples per image for ``gradient_shap`` and ``smoothgrad``.
        noise: noise standard deviation for those, as a fraction of the batch's value range.
        window, stride: occlusion window and stride per spatial axis (default: about 1/8
            of each side, stride half of it).
        perturbations_per_eval: occluded copies per forward pass (default: sized to the input).
        return_delta: also return IG's convergence delta ``(B,)`` (``None`` for the others).
        delta_threshold: warn (:class:`ConvergenceWarning`) when any IG completeness error
            (:func:`relative_delta`) exceeds it.

    Returns:
        float32 maps ``(B, H, W)`` or ``(B, D, H, W)`` on ``x``'s device, detached
        (and the delta when ``return_delta``).

    The model is put in ``eval()`` and every module's previous train/eval mode is restored
    afterwards; parameters are frozen during the computation, so no ``.grad`` is written
    into them and their ``requires_grad`` flags are restored.

    Example:
        >>> maps = explain(model, x, method="ig", n_steps=16)    # doctest: +SKIP
        >>> maps.shape == (x.shape[0], *x.shape[2:])             # doctest: +SKIP
        True
    """
    name = resolve_method(method)
    _check_input(x)
    _check_positive_int("n_steps", n_steps)
    _check_positive_int("n_samples", n_samples)
    for knob, value in (("internal_batch_size", internal_batch_size),
                        ("perturbations_per_eval", perturbations_per_eval)):
        if value is not None:
            _check_positive_int(knob, value)
    if not isinstance(noise, (int, float)) or isinstance(noise, bool) or noise < 0:
        raise ConfigError(f"The 'noise' parameter of explain must be a float >= 0. Got {noise!r} instead.")
    device, dtype = _model_device_dtype(model, x)
    inputs = x.detach().to(device=device, dtype=dtype)

    delta = None
    with _frozen_eval(model):
        targets = _resolve_target(model, inputs, target)
        inputs = inputs.clone().requires_grad_(True)
        if name in ("gradcam", "guided_gradcam"):
            layer = _grad_cam_layer(model, layer)
            fn = _methods.gradcam if name == "gradcam" else _methods.guided_gradcam
            layers = member_layers(model, layer)
            attr = fn(model, inputs, targets, layers[0])
            for other in layers[1:]:
                attr = attr + fn(model, inputs, targets, other)
            attr = attr / len(layers)
        elif name == "ig":
            attr, delta = _methods.integrated_gradients(
                model, inputs, targets, _baseline_tensor(baseline, inputs), n_steps,
                internal_batch_size)
            _check_delta(attr, delta, delta_threshold, n_steps)
        elif name == "gradient_shap":
            base = torch.stack([torch.zeros_like(inputs[0]),
                                torch.full_like(inputs[0], float(inputs.detach().mean()))])
            attr = _methods.gradient_shap(model, inputs, targets, base, n_samples, noise)
        elif name == "occlusion":
            win, std = _occlusion_geometry(inputs, window, stride)
            attr = _methods.occlusion(model, inputs, targets, _baseline_float(baseline), win, std,
                                      perturbations_per_eval)
        else:
            attr = _methods.smoothgrad(model, inputs, targets, n_samples, noise)
    maps = attr.detach().to(device=x.device, dtype=torch.float32)
    if return_delta:
        return maps, None if delta is None else delta.to(x.device, torch.float32)
    return maps


def gradcam_layer(model: nn.Module, x: Tensor, max_stride: int | None = 16) -> tuple[nn.Module, str, tuple[int, ...]]:
    """Pick the Grad-CAM layer: the deepest block with output stride ``<= max_stride``.

    The encoder contract's ``feature_layer`` is the last feature map, at stride 32 in most
    CNNs: 3x3 cells for a 96 px image, 7x7 for 224 px, too coarse to point at a small
    lesion. This walks the model once (forward hooks, no names needed) and returns the
    last block whose map still has ``ceil(side / max_stride)`` cells per axis;
    ``max_stride=None`` returns ``model.feature_layer``.

    Args:
        model: the classifier; x: an example batch ``(B, C, *spatial)`` (only ``x[:1]`` runs).
        max_stride: largest accepted output stride, e.g. 16.

    Returns:
        ``(module, dotted name, spatial shape of its output)``.

    Example:
        >>> layer, name, grid = gradcam_layer(model, x, max_stride=16)   # doctest: +SKIP
        >>> name, grid                                                    # doctest: +SKIP
        ('net.blocks.4', (6, 6))
    """
    _check_input(x)
    device, dtype = _model_device_dtype(model, x)
    with _frozen_eval(model):
        xs = x[:1].detach().to(device, dtype)
        if max_stride is None:
            layer = _grad_cam_layer(model, None)
            grid: list[tuple[int, ...]] = []
            handle = layer.register_forward_hook(lambda m, i, o: grid.append(tuple(o.shape[2:])))
            try:
                with torch.no_grad():
                    model(xs)
            finally:
                handle.remove()
            name = next(n for n, m in model.named_modules() if m is layer)
            return layer, name, grid[0] if grid else ()
        _check_positive_int("max_stride", max_stride)
        return _methods.layer_at_stride(model, xs, max_stride)


def member_layers(model: nn.Module, layer: nn.Module) -> list[nn.Module]:
    """``layer`` and the same layer in every other member of an ensemble inside ``model``.

    ``[layer]`` for a single model, or when ``layer`` is not inside a member (or a member lacks it).

    Example:
        >>> ens = EnsembleClassifier([m1, m2])                           # doctest: +SKIP
        >>> member_layers(ens, m1.feature_layer) == [m1.feature_layer, m2.feature_layer]  # doctest: +SKIP
        True
    """
    members = ensemble_members(model)
    if members is None:
        return [layer]
    for member in members:
        name = next((n for n, m in member.named_modules() if m is layer), None)
        if name is not None:
            break
    else:
        return [layer]
    try:
        return [member.get_submodule(name) for member in members]
    except AttributeError:
        return [layer]


def _grad_cam_layer(model: nn.Module, layer: nn.Module | None) -> nn.Module:
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
    return layer


def _baseline_tensor(baseline: float | Tensor, x: Tensor) -> Tensor:
    if isinstance(baseline, Tensor):
        try:
            base = torch.broadcast_to(baseline.detach().to(x.device, x.dtype), x.shape)
        except RuntimeError:
            raise ConfigError(
                f"The 'baseline' parameter of explain must be a number or a tensor "
                f"broadcastable to the input shape {tuple(x.shape)}. Got a tensor of shape "
                f"{tuple(baseline.shape)} instead."
            ) from None
        return base.contiguous()
    return torch.full_like(x, _baseline_float(baseline))


def _baseline_float(baseline: object) -> float:
    if isinstance(baseline, (int, float)) and not isinstance(baseline, bool):
        return float(baseline)
    raise ConfigError(
        f"The 'baseline' parameter of explain must be a float (or, for IG, a tensor). "
        f"Got {type(baseline).__name__} instead."
    )


def _occlusion_geometry(x: Tensor, window, stride) -> tuple[tuple[int, ...], tuple[int, ...]]:
    spatial = tuple(x.shape[2:])
    auto_w, auto_s = _methods.default_window(spatial)
    out = []
    for knob, value, auto in (("window", window, auto_w), ("stride", stride, auto_s)):
        if value is None:
            out.append(auto)
            continue
        value = (value,) * len(spatial) if isinstance(value, int) else tuple(value)
        if len(value) != len(spatial) or not all(isinstance(v, int) and v >= 1 for v in value):
            raise ConfigError(
                f"The '{knob}' parameter of explain must be an int >= 1 or one int per spatial "
                f"axis ({len(spatial)} for input {tuple(x.shape)}). Got {value!r} instead."
            )
        out.append(value)
    return out[0], out[1]


def relative_delta(maps: Tensor, delta: Tensor) -> Tensor:
    """IG completeness error ``|delta| / max(|f(x) - f(baseline)|, 1)`` per image, ``(B,)``.

    ``maps`` ``(B, *spatial)`` are the IG maps, ``delta`` Captum's convergence delta. The
    denominator is floored at one logit unit so that images whose score barely changes
    along the path are judged by the absolute error instead of an exploding ratio.
    """
    change = maps.detach().flatten(1).sum(1) - delta  # = f(x) - f(baseline)
    return delta.abs() / change.abs().clamp_min(1.0)


def _check_delta(attr: Tensor, delta: Tensor, threshold: float, n_steps: int) -> None:
    """Warn when IG's completeness error is large relative to the explained change."""
    rel = relative_delta(attr, delta)
    worst = float(rel.max()) if rel.numel() else 0.0
    if worst > threshold:
        warnings.warn(
            f"Integrated Gradients did not converge: the attributions miss f(x) - f(baseline) "
            f"by up to {worst:.1%} (threshold {threshold:.1%}) with n_steps={n_steps}. Raise "
            "n_steps (explain.ig_steps) substantially (hundreds on deep ReLU6 networks such as "
            "EfficientNet-Lite), or use smoothgrad or occlusion.", ConvergenceWarning, stacklevel=3)


def _resolve_target(model: nn.Module, x: Tensor, target: int | Tensor | None) -> Tensor:
    """A ``(B,)`` long tensor of class indices, validated against the number of logits."""
    probe = x if target is None else x[:1]  # a given target only needs the number of classes
    with torch.no_grad():
        logits = model(probe)
    if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[0] != probe.shape[0]:
        got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ConfigError(
            f"explain needs a classifier returning logits shaped (B, K) = ({probe.shape[0]}, K). "
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
