"""Summary plots of the trust checks as PNG bytes (matplotlib Agg, no pyplot state; private)."""

from __future__ import annotations

import io

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from medtl.explain.overlay import METHOD_TITLES

__all__ = ["randomization_plot", "faithfulness_plot"]


def randomization_plot(results: dict[str, dict], threshold: float) -> bytes:
    """Mean ``|Spearman rho|`` and mean SSIM per cascade step, one line per method.

    ``results``: method -> merged :func:`~medtl.explain.sanity.randomization_check` result.
    """
    fig = Figure(figsize=(10.0, 4.0), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax_rho, ax_ssim = fig.subplots(1, 2)
    labels: list[str] = []
    for method, res in results.items():
        steps = res["steps"]
        labels = [s["randomized"] for s in steps] if len(steps) > len(labels) else labels
        xs = np.arange(1, len(steps) + 1)
        name = METHOD_TITLES.get(method, method)
        ax_rho.plot(xs, [_nan(s["mean_abs_spearman"]) for s in steps], marker="o", label=name)
        ax_ssim.plot(xs, [_nan(s["mean_ssim"]) for s in steps], marker="o", label=name)
    ax_rho.axhline(threshold, color="grey", ls="--", lw=1, label=f"pass below {threshold:g}")
    for ax, what in ((ax_rho, "mean |Spearman rho|"), (ax_ssim, "mean SSIM")):
        ax.set_ylim(-0.05, 1.05)
        ax.set_ylabel(what, fontsize=11)
        ax.set_xticks(np.arange(1, len(labels) + 1), [_short(l) for l in labels], rotation=30,
                      ha="right", fontsize=10)
        ax.set_xlabel("randomised from the top down to (cumulative)", fontsize=10)
        ax.tick_params(axis="y", labelsize=10)
        ax.grid(alpha=0.3)
    ax_rho.legend(fontsize=10)
    fig.suptitle("Model-parameter randomisation: similarity to the trained model's maps", fontsize=12)
    return _png(fig)


def faithfulness_plot(curves: dict[str, list[dict]]) -> bytes:
    """Mean deletion and insertion curves per method, dashed: the random pixel order."""
    fig = Figure(figsize=(10.0, 4.0), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax_del, ax_ins = fig.subplots(1, 2)
    colors = {}
    for i, (method, rows) in enumerate(curves.items()):
        if not rows:
            continue
        color = colors.setdefault(method, f"C{i}")
        f = np.asarray(rows[0]["fractions"])
        name = METHOD_TITLES.get(method, method)
        for ax, key in ((ax_del, "deletion"), (ax_ins, "insertion")):
            ax.plot(f, np.mean([r[key] for r in rows], axis=0), color=color, label=name)
            ax.plot(f, np.mean([r[f"random_{key}"] for r in rows], axis=0), color=color, ls=":",
                    lw=1)
    for ax, what in ((ax_del, "Deletion (lower area = more faithful)"),
                     (ax_ins, "Insertion (higher area = more faithful)")):
        ax.set_title(what, fontsize=12)
        ax.set_xlabel("fraction of pixels removed / restored,\nhighest attribution first", fontsize=10)
        ax.set_ylabel("probability of the explained class", fontsize=10)
        ax.tick_params(labelsize=10)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    ax_del.legend(fontsize=10, title="dotted: random order", title_fontsize=10)
    return _png(fig)


def _short(label: str) -> str:
    return label if len(label) <= 18 else "…" + label[-17:]


def _nan(v: float | None) -> float:
    return float("nan") if v is None else float(v)


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    return buf.getvalue()
