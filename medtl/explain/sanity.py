"""Trust checks for saliency maps.

* :func:`randomization_check`: the model-parameter randomisation test of Adebayo et al.,
  "Sanity Checks for Saliency Maps" (NeurIPS 2018). If a map barely changes when the
  learned weights are replaced by random ones, it shows the input (edges, bright blobs),
  not what the model learned, and should not be trusted.
* :func:`mask_agreement`: how well a map agrees with an expert segmentation: share of the
  positive attribution inside the mask (compare with the mask's area, the chance level)
  and the pointing game (Zhang et al., ECCV 2016): is the map's maximum inside the mask?
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
from scipy import ndimage, stats
from torch import Tensor, nn

from medtl.errors import ConfigError, DataError
from medtl.explain.attribution import (
    _check_input,
    _frozen_eval,
    _model_device_dtype,
    _resolve_target,
    explain,
    resolve_method,
)

__all__ = ["RANDOMIZATION_THRESHOLD", "LAYER_CHOICES", "randomization_check", "mask_agreement"]

#: A map "passes" when ``|Spearman rho|`` between the original and the randomised-model map
#: is below this value: fewer than half of the rank relations survive randomisation, so the
#: map depends on the learned weights. Adebayo et al. report rank correlations of roughly
#: 0.0-0.4 for weight-dependent methods after randomising the top layers, and close to 1 for
#: methods that act like edge detectors.
RANDOMIZATION_THRESHOLD = 0.5
LAYER_CHOICES: tuple[str, ...] = ("head", "head+last_block", "all")


def randomization_check(
    model: nn.Module,
    x: Tensor,
    *,
    target: int | Tensor | None = None,
    method: str = "gradcam",
    layers: str = "head+last_block",
    seed: int = 0,
    threshold: float = RANDOMIZATION_THRESHOLD,
    **explain_kwargs: object,
) -> dict:
    """Model-parameter randomisation test (Adebayo et al. 2018).

    A deep copy of ``model`` has its weights re-initialised (each module's own
    ``reset_parameters()``, i.e. the distribution an untrained network starts from, drawn
    with ``seed``); maps are recomputed for the *same* target classes and compared with the
    original maps by Spearman rank correlation of their magnitudes, per sample.

    Args:
        model: the trained classifier (left untouched).
        x: ``(B, C, H, W)`` or ``(B, C, D, H, W)`` images in ``[0, 1]``.
        target: as in :func:`~medtl.explain.attribution.explain`; ``None`` uses the original
            model's predicted classes for both maps.
        method: attribution method (see :func:`~medtl.explain.attribution.explain`).
        layers: what to re-initialise: ``"head"`` (``model.classifier_layer``),
            ``"head+last_block"`` (plus the parameters of ``model.feature_layer``, when it
            has any) or ``"all"`` (every module with parameters).
        seed: seed for the random re-initialisation.
        threshold: pass when ``|rho| < threshold`` (default :data:`RANDOMIZATION_THRESHOLD`).
        **explain_kwargs: forwarded to ``explain`` (``ig_steps``, ``internal_batch_size``,
            ``layer``: a submodule of ``model``, mapped to the same module of the copy).

    Returns:
        JSON-ready dict: ``method``, ``layers``, ``threshold``, ``spearman`` (list of floats,
        ``None`` where the original map is constant so no ranking exists), ``passed_per_sample``
        (list of bools), ``mean_abs_spearman`` and ``passed`` (every sample passed).

    Example:
        >>> res = randomization_check(model, x[:4], method="gradcam")   # doctest: +SKIP
        >>> res["passed"], res["spearman"]                              # doctest: +SKIP
        (True, [0.08, -0.12, 0.21, 0.03])
    """
    name = resolve_method(method)
    if layers not in LAYER_CHOICES:
        raise ConfigError(
            f"The 'layers' parameter of randomization_check must be one of "
            f"{', '.join(map(repr, LAYER_CHOICES))}. Got {layers!r} instead."
        )
    if not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
        raise ConfigError(
            f"The 'threshold' parameter of randomization_check must be a float in (0, 1]. "
            f"Got {threshold!r} instead."
        )
    _check_input(x)
    if target is None:  # fix the classes so both maps explain the same logit
        device, dtype = _model_device_dtype(model, x)
        with _frozen_eval(model):
            target = _resolve_target(model, x.detach().to(device, dtype), None)
    layer = explain_kwargs.pop("layer", None)
    clone = _randomised_copy(model, layers, seed)
    clone_layer = _same_module(model, clone, layer)
    original = explain(model, x, target=target, method=name, layer=layer, **explain_kwargs)
    randomised = explain(clone, x, target=target, method=name, layer=clone_layer,
                         **explain_kwargs)

    rhos = [_spearman(o, r) for o, r in zip(original.abs().cpu().numpy(),
                                            randomised.abs().cpu().numpy())]
    passed = [rho is not None and abs(rho) < threshold for rho in rhos]
    finite = [abs(r) for r in rhos if r is not None]
    return {
        "method": name,
        "layers": layers,
        "threshold": float(threshold),
        "spearman": rhos,
        "passed_per_sample": passed,
        "mean_abs_spearman": float(np.mean(finite)) if finite else None,
        "passed": bool(passed) and all(passed),
    }


def mask_agreement(attr: np.ndarray, mask: np.ndarray, *, tolerance: int = 1) -> dict:
    """Agreement between one attribution map and one segmentation mask.

    Args:
        attr: attribution ``(H, W)`` or ``(D, H, W)``; only its positive part counts
            (evidence *for* the explained class; Grad-CAM is positive everywhere it is
            non-zero, for IG this drops the evidence against).
        mask: same shape, non-zero inside the region of interest.
        tolerance: the mask is dilated by this many pixels/voxels for the pointing game, to
            absorb resampling and upsampling offsets.

    Returns:
        JSON-ready dict: ``energy_in_mask`` (fraction of positive attribution inside the
        mask), ``mask_fraction`` (mask area / image area: what ``energy_in_mask`` would be by
        chance), ``lift`` (``energy_in_mask / mask_fraction``; > 1 beats chance) and
        ``pointing_hit`` (the map's maximum lies in the dilated mask). Values are ``None``
        when undefined: an empty mask, or a map with no positive value.

    Example:
        >>> a = np.zeros((4, 4)); a[0, 0] = 1.0
        >>> m = np.zeros((4, 4), bool); m[:2, :2] = True
        >>> mask_agreement(a, m)["energy_in_mask"]
        1.0
    """
    a = np.asarray(attr, dtype=np.float64)
    m = np.asarray(mask) != 0
    if a.ndim not in (2, 3) or a.shape != m.shape:
        raise DataError(
            f"mask_agreement needs an attribution and a mask of the same shape, (H, W) or "
            f"(D, H, W). Got attribution {a.shape} and mask {m.shape}; resample the mask to "
            "the image grid the model saw."
        )
    if not isinstance(tolerance, int) or isinstance(tolerance, bool) or tolerance < 0:
        raise ConfigError(
            f"The 'tolerance' parameter of mask_agreement must be an int >= 0. "
            f"Got {tolerance!r} instead."
        )
    positive = np.clip(np.nan_to_num(a, nan=0.0), 0.0, None)
    mask_fraction = float(m.mean())
    total = float(positive.sum())
    if not m.any() or total <= 0.0:
        return {"energy_in_mask": None, "mask_fraction": mask_fraction, "lift": None,
                "pointing_hit": None}
    energy = float(positive[m].sum() / total)
    # square/cubic neighbourhood: "within `tolerance` pixels" in every direction, diagonals too
    cube = ndimage.generate_binary_structure(m.ndim, m.ndim)
    grown = ndimage.binary_dilation(m, structure=cube, iterations=tolerance) if tolerance else m
    # every location attaining the maximum counts, so ties do not depend on scan order
    peaks = positive == positive.max()
    return {
        "energy_in_mask": energy,
        "mask_fraction": mask_fraction,
        "lift": energy / mask_fraction,
        "pointing_hit": bool((peaks & grown).any()),
    }


def _randomised_copy(model: nn.Module, layers: str, seed: int) -> nn.Module:
    """Deep copy of ``model`` with the chosen layers re-initialised under ``seed``."""
    clone = copy.deepcopy(model)
    if layers == "all":
        targets = [clone]
    else:
        head = getattr(clone, "classifier_layer", None)
        if not isinstance(head, nn.Module):
            raise ConfigError(
                f"randomization_check with layers={layers!r} needs the model's final linear "
                f"layer as 'classifier_layer', but {type(model).__name__} has none. Add it, "
                "or use layers='all'."
            )
        targets = [head]
        feature = getattr(clone, "feature_layer", None)
        if layers == "head+last_block" and isinstance(feature, nn.Module):
            targets.append(feature)
    devices = [p.device for p in clone.parameters() if p.device.type == "cuda"]
    with torch.random.fork_rng(devices=sorted({d.index or 0 for d in devices})):
        torch.manual_seed(seed)
        n_reset = sum(_reset(t) for t in targets)
    if n_reset == 0:
        raise ConfigError(
            f"randomization_check with layers={layers!r} found nothing to re-initialise "
            "(no module with reset_parameters() holds parameters there). Use layers='all'."
        )
    return clone


def _same_module(model: nn.Module, clone: nn.Module, layer: object) -> nn.Module | None:
    """The clone's counterpart of ``layer`` (a submodule of ``model``), or ``None``."""
    if layer is None:
        return None
    name = next((n for n, m in model.named_modules() if m is layer), None)
    if name is None:
        raise ConfigError(
            "The 'layer' parameter of randomization_check must be a submodule of the model "
            f"(e.g. model.feature_layer). Got {type(layer).__name__}, which is not part of it."
        )
    return clone.get_submodule(name)


def _reset(root: nn.Module) -> int:
    """Call ``reset_parameters()`` on every submodule of ``root`` that has one."""
    n = 0
    for module in root.modules():
        reset = getattr(module, "reset_parameters", None)
        if callable(reset) and any(True for _ in module.parameters(recurse=False)):
            reset()
            n += 1
    return n


def _spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman rho of two flattened maps; ``0.0`` if only ``b`` is constant, ``None`` if ``a`` is."""
    a, b = a.ravel(), b.ravel()
    if np.ptp(a) == 0:
        return None
    if np.ptp(b) == 0:
        return 0.0
    rho = float(stats.spearmanr(a, b).statistic)
    return None if math.isnan(rho) else rho
