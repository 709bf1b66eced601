"""Run-level summaries of the per-fold trust checks (private helpers of :mod:`medtl.workflows.explanation`)."""

from __future__ import annotations

import numpy as np

from medtl.explain.overlay import METHOD_TITLES
from medtl.explain.sanity import _mean, _mean_abs, _verdict

__all__ = ["merge_randomization", "localisation_summary", "notes"]


def merge_randomization(results: list[dict], threshold: float) -> dict:
    """One randomisation result from several (one per fold model): per-sample values pooled.

    Steps are matched by position (every fold model has the same architecture).
    """
    n_steps = min(len(r["steps"]) for r in results)
    steps = []
    for k in range(n_steps):
        rhos = [v for r in results for v in r["steps"][k]["spearman"]]
        ssims = [v for r in results for v in r["steps"][k]["ssim"]]
        steps.append({"randomized": results[0]["steps"][k]["randomized"], "spearman": rhos,
                      "ssim": ssims, "mean_abs_spearman": _mean_abs(rhos), "mean_ssim": _mean(ssims)})
    final = steps[-1]["mean_abs_spearman"]
    ok = final is not None and final < threshold
    return {"method": results[0]["method"], "threshold": threshold, "steps": steps,
            "n_images": len(steps[-1]["spearman"]), "mean_abs_spearman": final,
            "passed": bool(ok), "verdict": _verdict(steps, threshold, ok)}


def localisation_summary(agreement: dict[str, dict[str, dict]], methods: list[str], tolerance: int) -> dict:
    """Pointing game and attribution inside the mask per method, over the given cases.

    ``agreement``: case id -> method -> :func:`~medtl.explain.sanity.mask_agreement` result
    (with ``tolerance``) plus ``pointing_hit_1px``. A map with no positive value points
    nowhere and counts as a miss.
    """
    out = {}
    for method in methods:
        rows = [a[method] for a in agreement.values() if method in a]
        if not rows:
            continue
        hits = [bool(r["pointing_hit"]) for r in rows]
        strict = [bool(r.get("pointing_hit_1px")) for r in rows]
        energy = [r["energy_in_mask"] for r in rows if r["energy_in_mask"] is not None]
        chance = [r["mask_fraction"] for r in rows if r["mask_fraction"] is not None]
        out[method] = {
            "n_cases": len(rows),
            "tolerance_px": tolerance,
            "pointing_hits": int(sum(hits)),
            "pointing_game": float(np.mean(hits)),
            "pointing_hits_1px": int(sum(strict)),
            "pointing_game_1px": float(np.mean(strict)),
            "empty_maps": sum(r["pointing_hit"] is None for r in rows),
            "mean_energy_in_mask": float(np.mean(energy)) if energy else None,
            "mean_mask_fraction": float(np.mean(chance)) if chance else None,
        }
    return out


def notes(metrics: dict, local: dict, deltas: dict[str, float]) -> list[str]:
    """Plain-language remarks for the report."""
    out = []
    if metrics.get("task") == "cv":
        out.append("Every case is explained by the fold model that never saw it in training (out-of-fold).")
    for method, s in local.items():
        energy = "" if s["mean_energy_in_mask"] is None else (
            f"; on average {s['mean_energy_in_mask']:.0%} of the positive attribution lies inside it, "
            f"against {s['mean_mask_fraction']:.1%} by chance (the mask's area)")
        out.append(
            f"{METHOD_TITLES.get(method, method)}: over all {s['n_cases']} correctly classified case(s) "
            f"with a mask, the map's peak lies within {s['tolerance_px']} px of the mask in "
            f"{s['pointing_hits']} ({s['pointing_game']:.0%}; {s['pointing_hits_1px']} within 1 px){energy}.")
    if deltas:
        worst = max(deltas.values())
        out.append(f"Integrated Gradients completeness: the attributions sum to f(x) - f(baseline) within "
                   f"{worst:.1%} (worst case over {len(deltas)} image(s)).")
    return out
