"""Trust checks for saliency maps.

* :func:`randomization_check`: the cascading model-parameter randomisation test of Adebayo
  et al., "Sanity Checks for Saliency Maps" (NeurIPS 2018). The learned weights are
  replaced by random ones stage by stage, from the classifier down towards the input, and
  after every stage the maps are compared with the original ones (Spearman rank
  correlation and SSIM of their magnitudes). If a map barely changes, it shows the input
  (edges, bright blobs), not what the model learned, and should not be trusted.
* :func:`mask_agreement`: how well a map agrees with an expert segmentation: share of the
  positive attribution inside the mask (compare with the mask's area, the chance level)
  and the pointing game (Zhang et al., ECCV 2016): is the map's maximum inside the mask?

Faithfulness (deletion/insertion curves) lives in :mod:`medtl.explain.faithfulness`.
"""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import torch
from scipy import ndimage, stats
from torch import Tensor, nn

from medtl.errors import ConfigError, DataError
from medtl.explain._stages import cascade_stages, randomise
from medtl.explain.attribution import (
    ConvergenceWarning,
    _check_input,
    _frozen_eval,
    _model_device_dtype,
    _resolve_target,
    explain,
    resolve_method,
)

__all__ = ["RANDOMIZATION_THRESHOLD", "randomization_check", "mask_agreement", "ssim"]

#: A method "passes" when the mean ``|Spearman rho|`` between original and randomised-model
#: maps, with every cascade stage randomised, is below this value: fewer than half of the
#: rank relations survive, so the map depends on the learned weights. Adebayo et al. report
#: rank correlations of roughly 0.0-0.4 for weight-dependent methods and close to 1 for
#: methods that act like edge detectors.
RANDOMIZATION_THRESHOLD = 0.5


def randomization_check(
    model: nn.Module,
    x: Tensor,
    target: int | Tensor | None = None,
    method: str = "gradcam",
    *,
    max_steps: int = 5,
    seed: int = 0,
    threshold: float = RANDOMIZATION_THRESHOLD,
    original: Tensor | None = None,
    **explain_kwargs: object,
) -> dict:
    """Cascading model-parameter randomisation test (Adebayo et al. 2018).

    The model's parametrised modules are grouped into stages (the classifier, then the
    blocks below it, see :func:`medtl.explain._stages.cascade_stages`). A deep copy is
    randomised cumulatively from the top: step 1 re-initialises the classifier, step 2 the
    classifier and the last block, ...; the last step re-initialises every stage. After
    each step the maps are recomputed for the *same* target classes and compared with the
    original maps per sample.

    Args:
        model: the trained classifier (left untouched).
        x: ``(B, C, H, W)`` or ``(B, C, D, H, W)`` images in ``[0, 1]``.
        target: as in :func:`~medtl.explain.attribution.explain`; ``None`` uses the original
            model's predicted classes for every map.
        method: attribution method.
        max_steps: cascade steps: the top ``max_steps - 1`` stages one at a time, then all
            of them (``>= 2``).
        seed: seed for the random re-initialisation.
        threshold: the method passes when the mean ``|rho|`` after the last step is below it.
        original: the trained model's maps ``(B, *spatial)`` if already computed.
        **explain_kwargs: forwarded to ``explain`` (``n_steps``, ``internal_batch_size``, ...;
            ``layer``: a submodule of ``model``, mapped to the same module of the copy).

    Returns:
        JSON-ready dict: ``method``, ``threshold``, ``steps`` (one dict per step:
        ``randomized`` (stage name, top down), ``spearman`` and ``ssim`` per sample,
        ``mean_abs_spearman``, ``mean_ssim``), ``spearman`` / ``mean_abs_spearman`` (last
        step), ``passed_per_sample``, ``passed`` and a plain-language ``verdict``.

    Example:
        >>> res = randomization_check(model, x[:4], method="gradcam")   # doctest: +SKIP
        >>> [round(s["mean_abs_spearman"], 2) for s in res["steps"]], res["passed"]  # doctest: +SKIP
        ([0.41, 0.22, 0.12, 0.1, 0.05], True)
    """
    name = resolve_method(method)
    if not isinstance(max_steps, int) or isinstance(max_steps, bool) or max_steps < 2:
        raise ConfigError(f"The 'max_steps' parameter of randomization_check must be an int >= 2. "
                          f"Got {max_steps!r} instead.")
    if not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
        raise ConfigError(
            f"The 'threshold' parameter of randomization_check must be a float in (0, 1]. "
            f"Got {threshold!r} instead."
        )
    _check_input(x)
    if target is None:  # fix the classes so every map explains the same logit
        device, dtype = _model_device_dtype(model, x)
        with _frozen_eval(model):
            target = _resolve_target(model, x.detach().to(device, dtype), None)
    layer = explain_kwargs.pop("layer", None)
    explain_kwargs.pop("return_delta", None)
    if original is None:
        original = explain(model, x, target, name, layer=layer, **explain_kwargs)
    orig = original.abs().cpu().numpy()
    clone = copy.deepcopy(model)
    clone_layer = _same_module(model, clone, layer)
    stages = cascade_stages(clone)
    if not stages:
        raise ConfigError(f"randomization_check found no module with parameters in {type(model).__name__}.")
    plan = [[s] for s in stages[: max_steps - 1]]
    if len(stages) > max_steps - 1:
        plan.append(stages[max_steps - 1:])
    steps = []
    generator = torch.Generator().manual_seed(seed)
    for group in plan:
        for _, modules in group:
            randomise(modules, generator)
        with warnings.catch_warnings():  # IG of a random network: its convergence is not the question
            warnings.simplefilter("ignore", ConvergenceWarning)
            maps = explain(clone, x, target, name, layer=clone_layer, **explain_kwargs).abs().cpu().numpy()
        rhos = [_spearman(o, r) for o, r in zip(orig, maps)]
        ssims = [ssim(o, r) for o, r in zip(orig, maps)]
        label = group[0][0] if len(group) == 1 else f"all ({len(stages)} stages)"
        steps.append({"randomized": label, "spearman": rhos, "ssim": ssims,
                      "mean_abs_spearman": _mean_abs(rhos), "mean_ssim": _mean(ssims)})
    last = steps[-1]
    passed = [r is not None and abs(r) < threshold for r in last["spearman"]]
    mean_rho = last["mean_abs_spearman"]
    ok = mean_rho is not None and mean_rho < threshold
    return {
        "method": name,
        "threshold": float(threshold),
        "steps": steps,
        "spearman": last["spearman"],
        "mean_abs_spearman": mean_rho,
        "passed_per_sample": passed,
        "passed": bool(ok),
        "verdict": _verdict(steps, threshold, ok),
    }


def ssim(a: np.ndarray, b: np.ndarray) -> float | None:
    """SSIM of two maps' magnitudes, each scaled to ``[0, 1]`` (2D or 3D; scikit-image).

    ``None`` when a map is constant or a side is shorter than 3.

    Example:
        >>> m = np.random.rand(16, 16)
        >>> round(ssim(m, m), 3)
        1.0
    """
    from skimage.metrics import structural_similarity

    a, b = (np.abs(np.asarray(v, dtype=np.float64)) for v in (a, b))
    if np.ptp(a) == 0 or min(a.shape) < 3:
        return None
    a = a / a.max()
    b = b / b.max() if b.max() > 0 else b
    win = min(7, min(a.shape) - (1 - min(a.shape) % 2))
    return float(structural_similarity(a, b, data_range=1.0, win_size=win))


def _mean(values: list[float | None]) -> float | None:
    finite = [v for v in values if v is not None]
    return float(np.mean(finite)) if finite else None


def _mean_abs(values: list[float | None]) -> float | None:
    finite = [abs(v) for v in values if v is not None]
    return float(np.mean(finite)) if finite else None


def _verdict(steps: list[dict], threshold: float, ok: bool) -> str:
    first = next((s["randomized"] for s in steps
                  if s["mean_abs_spearman"] is not None and s["mean_abs_spearman"] < threshold), None)
    final = steps[-1]["mean_abs_spearman"]
    if ok:
        return (f"passed: the maps change when the learned weights are randomised (mean |rho| "
                f"falls below {threshold:g} once '{first}' is randomised; {_fmt(final)} with every "
                "stage random), so they depend on what the model learned.")
    return (f"FAILED: the maps barely change when the learned weights are randomised (mean |rho| "
            f"{_fmt(final)} >= {threshold:g} even with every stage random). They mostly reflect "
            "the image itself (edges, bright structures), not the model; do not read them as "
            "the model's reasoning.")


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}"


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


def _spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman rho of two flattened maps; ``0.0`` if only ``b`` is constant, ``None`` if ``a`` is."""
    a, b = a.ravel(), b.ravel()
    if np.ptp(a) == 0:
        return None
    if np.ptp(b) == 0:
        return 0.0
    rho = float(stats.spearmanr(a, b).statistic)
    return None if math.isnan(rho) else rho
