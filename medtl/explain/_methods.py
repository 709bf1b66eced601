"""The Captum calls behind :func:`medtl.explain.attribution.explain` (private).

Every function takes a batch ``x`` ``(B, C, *spatial)`` already on the model's device with
``requires_grad`` set, a ``(B,)`` target tensor, and returns ``(B, *spatial)`` (channels
summed). The batch goes through Captum in one call; each method's own batching knob
(IG ``internal_batch_size``, NoiseTunnel ``nt_samples_batch_size``, Occlusion
``perturbations_per_eval``) bounds how many images go through the model at once.
"""

from __future__ import annotations

import math
import warnings

import torch
from captum.attr import (
    GradientShap,
    GuidedGradCam,
    IntegratedGradients,
    LayerAttribution,
    LayerGradCam,
    NoiseTunnel,
    Occlusion,
    Saliency,
)
from torch import Tensor, nn

from medtl.errors import ConfigError

__all__: list[str] = []

#: Input values allowed through the model in one internal batch when the caller does not
#: say: 2**22 is 455 images of 96x96, 83 of 224x224, 2 volumes of 128^3 (bounds memory).
_VALUES_PER_PASS = 2 ** 22


#: On the CPU, passes larger than this are no faster (compute-bound) and thrash the caches.
_CPU_IMAGES_PER_PASS = 64


def auto_batch(x: Tensor, cap: int | None = None) -> int:
    """How many images like ``x[0]`` go through one internal forward pass by default."""
    n = max(1, _VALUES_PER_PASS // max(1, x[0].numel()))
    if x.device.type == "cpu":
        n = min(n, _CPU_IMAGES_PER_PASS)
    return min(n, cap) if cap else n


def interp_mode(x: Tensor) -> str:
    return "bilinear" if x.dim() == 4 else "trilinear"


def layer_at_stride(model: nn.Module, x: Tensor, max_stride: int) -> tuple[nn.Module, str, tuple[int, ...]]:
    """The deepest block whose output keeps at least ``input / max_stride`` cells per axis.

    One forward pass with hooks on every submodule; a module qualifies when it returns a
    tensor ``(B, C, *spatial)`` with as many spatial axes as ``x`` and each side at least
    ``ceil(side / max_stride)``. Of those, the one that *finishes* last is taken, so an
    outer block (``blocks.4``) wins over the layers inside it. Returns the module, its
    dotted name and its output's spatial shape.
    """
    need = tuple(math.ceil(s / max_stride) for s in x.shape[2:])
    seen: list[tuple[nn.Module, tuple[int, ...]]] = []

    def hook(module, _inputs, output):
        if isinstance(output, Tensor) and output.dim() == x.dim() and \
                all(o >= n for o, n in zip(output.shape[2:], need)):
            seen.append((module, tuple(output.shape[2:])))

    handles = [m.register_forward_hook(hook) for m in model.modules() if m is not model]
    try:
        with torch.no_grad():
            model(x[:1])
    finally:
        for h in handles:
            h.remove()
    if not seen:
        raise ConfigError(
            f"No block of {type(model).__name__} keeps a feature map of at least {need} cells for "
            f"input {tuple(x.shape)} (max_stride={max_stride}). Use the encoder's feature_layer "
            "(explain.gradcam_stride: null) or a larger stride."
        )
    module, shape = seen[-1]
    name = next(n for n, m in model.named_modules() if m is module)
    return module, name, shape


def gradcam(model: nn.Module, x: Tensor, target: Tensor, layer: nn.Module) -> Tensor:
    """Grad-CAM (ReLU'd, >= 0) upsampled (bi/trilinear) to the input grid."""
    cam = _hooked(lambda: LayerGradCam(model, layer).attribute(x, target=target,
                                                               relu_attributions=True), layer, model)
    _check_layer_output(cam, x)
    up = LayerAttribution.interpolate(cam, tuple(x.shape[2:]), interpolate_mode=interp_mode(x))
    return up[:, 0]


def guided_gradcam(model: nn.Module, x: Tensor, target: Tensor, layer: nn.Module) -> Tensor:
    """Guided Grad-CAM: guided backpropagation times the upsampled Grad-CAM (signed)."""
    with warnings.catch_warnings():  # Captum's note about hooks on ReLU modules, once per call
        warnings.filterwarnings("ignore", message="Setting backward hooks on ReLU")
        attr = _hooked(lambda: GuidedGradCam(model, layer).attribute(
            x, target=target, interpolate_mode=interp_mode(x)), layer, model)
    if attr.shape != x.shape:  # Captum returns an empty tensor when shapes cannot be matched
        raise ConfigError(
            f"Guided Grad-CAM could not bring the layer's map to the input shape {tuple(x.shape)}; "
            "point model.feature_layer at a convolutional block, or use method='gradcam'."
        )
    return attr.sum(dim=1)


def integrated_gradients(model: nn.Module, x: Tensor, target: Tensor, baseline: Tensor,
                         n_steps: int, internal_batch_size: int | None) -> tuple[Tensor, Tensor]:
    """Signed IG summed over channels and Captum's convergence delta ``(B,)``."""
    ibs = internal_batch_size or auto_batch(x)
    attr, delta = IntegratedGradients(model).attribute(
        x, baselines=baseline, target=target, n_steps=n_steps, internal_batch_size=ibs,
        return_convergence_delta=True)
    return attr.sum(dim=1), delta.detach().reshape(-1)


def gradient_shap(model: nn.Module, x: Tensor, target: Tensor, baseline: Tensor,
                  n_samples: int, noise: float) -> Tensor:
    """GradientShap (expected gradients) from the given baselines; signed, channels summed.

    ``baseline`` is a distribution ``(N_b, C, *spatial)``; each of the ``B * n_samples``
    evaluations picks one at random and adds Gaussian noise of ``noise * value range``.
    """
    stdev = float(noise) * _value_range(x)
    attr = GradientShap(model).attribute(x, baselines=baseline, n_samples=n_samples,
                                         stdevs=stdev, target=target)
    return attr.sum(dim=1)


def occlusion(model: nn.Module, x: Tensor, target: Tensor, baseline: float,
              window: tuple[int, ...], stride: tuple[int, ...], per_eval: int | None) -> Tensor:
    """Occlusion: the drop of the target logit when a window is set to ``baseline``.

    Windows and strides are per spatial axis; every window covers all channels. Positive =
    hiding the region lowers the score (evidence for the class).
    """
    c = x.shape[1]
    ppe = per_eval or auto_batch(x, cap=256) // max(1, x.shape[0]) or 1
    attr = Occlusion(model).attribute(
        x, sliding_window_shapes=(c, *window), strides=(c, *stride), baselines=float(baseline),
        target=target, perturbations_per_eval=max(1, ppe))
    return attr.sum(dim=1)


def smoothgrad(model: nn.Module, x: Tensor, target: Tensor, n_samples: int, noise: float) -> Tensor:
    """SmoothGrad: mean of ``|gradient|`` over noisy copies (NoiseTunnel + Saliency), >= 0."""
    stdev = float(noise) * _value_range(x)
    nsb = max(1, auto_batch(x, cap=256) // max(1, x.shape[0]))
    attr = NoiseTunnel(Saliency(model)).attribute(
        x, nt_type="smoothgrad", nt_samples=n_samples, nt_samples_batch_size=min(nsb, n_samples),
        stdevs=stdev, target=target, abs=True)
    return attr.sum(dim=1)


def default_window(spatial: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Occlusion window (about 1/8 of each side, >= 2) and stride (half the window)."""
    window = tuple(max(2, min(s, round(s / 8))) for s in spatial)
    stride = tuple(max(1, w // 2) for w in window)
    return window, stride


def _value_range(x: Tensor) -> float:
    r = float((x.amax() - x.amin()).detach())
    return r if r > 0 and math.isfinite(r) else 1.0


def _hooked(fn, layer: nn.Module, model: nn.Module) -> Tensor:
    """Run a layer method; turn Captum's 'hook never fired' assertion into a ConfigError."""
    try:
        return fn()
    except AssertionError as err:  # Captum's way of saying the hook never fired
        if "Forward hook" not in str(err):
            raise
        raise ConfigError(
            f"The Grad-CAM layer ({type(layer).__name__}) is never called in "
            f"{type(model).__name__}.forward, so it has no feature map. Point "
            "model.feature_layer (or layer=...) at a module the forward pass uses."
        ) from None


def _check_layer_output(cam: object, x: Tensor) -> None:
    if isinstance(cam, tuple) or cam.dim() != x.dim():
        shape = tuple(cam[0].shape) if isinstance(cam, tuple) else tuple(cam.shape)
        raise ConfigError(
            f"Grad-CAM needs a feature map shaped (B, C, *spatial) with the same number of "
            f"spatial dimensions as the input {tuple(x.shape)}; the chosen layer returned "
            f"{'a tuple starting with ' if isinstance(cam, tuple) else ''}{shape}. Point "
            "model.feature_layer (or layer=...) at a convolutional block, or use method='ig'."
        )
