"""Faithfulness of saliency maps: deletion and insertion curves (Petsiuk et al., RISE, 2018).

*Deletion* removes the pixels a map ranks highest first (sets them to ``deletion_value``,
black by default) and follows the target-class probability: a faithful map makes it fall
fast, so a **low** area under the curve is good. *Insertion* starts from a blurred copy of
the image and puts the top-ranked pixels back first: a faithful map makes the probability
rise fast, so a **high** AUC is good. Both are compared with the same curves for a random
pixel order (the baseline any map must beat).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor, nn

from medtl.errors import ConfigError
from medtl.explain.attribution import _check_input, _frozen_eval, _model_device_dtype, _resolve_target

__all__ = ["deletion_insertion", "summarize_faithfulness"]


def deletion_insertion(
    model: nn.Module,
    x: Tensor,
    maps: Tensor | np.ndarray,
    target: int | Tensor | None = None,
    *,
    n_steps: int = 16,
    deletion_value: float = 0.0,
    blur_sigma: float | None = None,
    seed: int = 0,
    batch_size: int = 128,
) -> list[dict]:
    """Deletion and insertion curves for each image, with a random-order baseline.

    Args:
        model: classifier taking ``(B, C, *spatial)`` in ``[0, 1]``.
        x: ``(B, C, H, W)`` or ``(B, C, D, H, W)``.
        maps: attributions ``(B, H, W)`` or ``(B, D, H, W)``; pixels are ranked by value
            (highest = strongest evidence for the target first).
        target: class per sample (``None``: the predicted class).
        n_steps: the curves have ``n_steps + 1`` points, from 0 to 100 % of the pixels.
        deletion_value: value deleted pixels take.
        blur_sigma: Gaussian sigma (pixels) of the insertion start image (default: the
            largest side / 16).
        seed: seed of the random pixel order.
        batch_size: perturbed images per forward pass.

    Returns:
        one JSON-ready dict per image: ``fractions``, ``deletion``, ``insertion``,
        ``random_deletion``, ``random_insertion`` (probabilities) and their AUCs
        ``deletion_auc``, ``insertion_auc``, ``random_deletion_auc``, ``random_insertion_auc``.

    Example:
        >>> curves = deletion_insertion(model, x, explain(model, x))   # doctest: +SKIP
        >>> curves[0]["deletion_auc"] < curves[0]["random_deletion_auc"]  # doctest: +SKIP
        True
    """
    _check_input(x)
    if not isinstance(n_steps, int) or isinstance(n_steps, bool) or n_steps < 2:
        raise ConfigError(f"The 'n_steps' parameter of deletion_insertion must be an int >= 2. "
                          f"Got {n_steps!r} instead.")
    m = torch.as_tensor(np.asarray(maps) if not isinstance(maps, Tensor) else maps.detach().cpu())
    if tuple(m.shape) != (x.shape[0], *x.shape[2:]):
        raise ConfigError(
            f"The 'maps' parameter of deletion_insertion must have shape (B, *spatial) = "
            f"{(x.shape[0], *x.shape[2:])} to match x {tuple(x.shape)}. Got {tuple(m.shape)} instead."
        )
    device, dtype = _model_device_dtype(model, x)
    xs = x.detach().to(device, dtype)
    sigma = blur_sigma if blur_sigma is not None else max(x.shape[2:]) / 16
    blurred = torch.from_numpy(ndimage.gaussian_filter(
        xs.cpu().numpy(), sigma=(0, 0, *([sigma] * (x.dim() - 2))))).to(device, dtype)
    fractions = np.linspace(0.0, 1.0, n_steps + 1)
    rng = np.random.default_rng(seed)
    out = []
    with _frozen_eval(model), torch.no_grad():
        targets = _resolve_target(model, xs, target)
        for i in range(x.shape[0]):
            n = m[i].numel()
            order = torch.argsort(-torch.nan_to_num(m[i].flatten().float()), stable=True)
            rank_map = torch.empty(n, dtype=torch.long)
            rank_map[order] = torch.arange(n)
            random_rank = torch.from_numpy(rng.permutation(n))
            row = {"fractions": fractions.tolist()}
            for tag, rank in (("", rank_map), ("random_", random_rank)):
                dele, ins = _curves(model, xs[i], blurred[i], rank.to(device), fractions,
                                    int(targets[i]), deletion_value, batch_size)
                row[f"{tag}deletion"], row[f"{tag}insertion"] = dele.tolist(), ins.tolist()
                row[f"{tag}deletion_auc"] = float(np.trapezoid(dele, fractions))
                row[f"{tag}insertion_auc"] = float(np.trapezoid(ins, fractions))
            out.append(row)
    return out


def summarize_faithfulness(rows: list[dict]) -> dict:
    """Mean AUCs over images and whether the map beats the random order on each curve.

    Example:
        >>> summarize_faithfulness(curves)["deletion_better_than_random"]   # doctest: +SKIP
        True
    """
    if not rows:
        return {}
    mean = {k: float(np.mean([r[k] for r in rows])) for k in
            ("deletion_auc", "random_deletion_auc", "insertion_auc", "random_insertion_auc")}
    mean["deletion_better_than_random"] = mean["deletion_auc"] < mean["random_deletion_auc"]
    mean["insertion_better_than_random"] = mean["insertion_auc"] > mean["random_insertion_auc"]
    mean["n_images"] = len(rows)
    return mean


def _curves(model: nn.Module, x: Tensor, blurred: Tensor, rank: Tensor, fractions: np.ndarray,
            target: int, deletion_value: float, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Target probabilities along deletion and insertion for one image ``x`` ``(C, *spatial)``."""
    n = rank.numel()
    counts = torch.as_tensor(np.round(fractions * n).astype(np.int64), device=x.device)
    probs = []
    for start_img, fill in ((x, None), (blurred, x)):
        scores = []
        for lo in range(0, len(counts), max(1, batch_size)):
            chunk = counts[lo: lo + batch_size]
            hit = (rank[None, :] < chunk[:, None]).view(len(chunk), 1, *x.shape[1:])
            if fill is None:   # deletion: top-ranked pixels -> deletion_value
                batch = torch.where(hit, torch.full_like(x, deletion_value), x)
            else:              # insertion: top-ranked pixels restored on the blurred image
                batch = torch.where(hit, fill, start_img)
            scores.append(torch.softmax(model(batch).float(), dim=1)[:, target].cpu())
        probs.append(torch.cat(scores).numpy())
    return probs[0], probs[1]
