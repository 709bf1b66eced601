"""Evaluation figures written as PNG files: ROC curves, confusion matrices, training curves.

Figures are built as ``matplotlib.figure.Figure`` objects and written by the Agg
renderer, without pyplot: no global figure registry to leak figures into during long
cross-validation runs, no display needed on servers/CI, and importing this module does
not switch the backend of a user's notebook session (a module-level
``matplotlib.use("Agg")`` would).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import matplotlib.lines
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import confusion_matrix, roc_auc_score, roc_curve

from medtl._io import atomic_write_bytes
from medtl.errors import DataError

__all__ = ["plot_roc", "plot_confusion", "plot_training_curves", "plot_reliability"]

_DPI = 110
# history keys (or their quantity, the key without "train_"/"val_") that are bookkeeping, not curves
_NOT_CURVES = {"epoch", "fold", "step", "lr", "time", "seconds", "elapsed_s", "images_per_s", "repeat"}
_QUANTITY_TITLES = {"loss": "Loss", "auc": "AUC", "acc": "Accuracy", "balanced_acc": "Balanced accuracy"}
# larger text for figures shown scaled down in the HTML report
_READABLE = {"font.size": 12, "axes.titlesize": 13, "axes.labelsize": 12, "xtick.labelsize": 11,
             "ytick.labelsize": 11, "legend.fontsize": 11}


def plot_roc(
    y_true: np.ndarray,
    proba: np.ndarray,
    class_names: Sequence[str],
    path: str | Path,
    *,
    fold_ids: np.ndarray | None = None,
    title: str = "ROC",
) -> Path:
    """Plot ROC curves to a PNG file.

    Binary (``K == 2``): the pooled ROC of ``proba[:, 1]`` with its AUC in the legend,
    plus one thin curve per fold when ``fold_ids`` is given. Multiclass: one
    one-vs-rest curve per class. Curves that are undefined (a class absent) are skipped.

    Args:
        y_true: ``(N,)`` integer class indices.
        proba: ``(N, K)`` class probabilities.
        class_names: ``K`` names, in class-index order.
        path: output PNG file (parent folders are created).
        fold_ids: optional ``(N,)`` outer-fold index of each case.
        title: figure title.

    Returns:
        The written path.

    Example:
        >>> y = np.array([0, 0, 1, 1]); p = np.array([[.9, .1], [.6, .4], [.3, .7], [.2, .8]])
        >>> plot_roc(y, p, ["benign", "malignant"], "/tmp/roc.png").name
        'roc.png'
    """
    y, p = _check_probs(y_true, proba, class_names)
    fig, ax = _subplots(1, 1, (5.5, 5.0))
    ax = ax[0][0]
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey", linewidth=1, label="chance")
    if p.shape[1] == 2:
        if fold_ids is not None:
            folds = np.asarray(fold_ids)
            if folds.shape != y.shape:
                raise DataError(f"plot_roc: 'fold_ids' must have one entry per case ({len(y)}); got shape {folds.shape}.")
            for i, fold in enumerate(np.unique(folds)):
                sel = folds == fold
                if len(np.unique(y[sel])) < 2:
                    continue
                fpr, tpr, _ = roc_curve(y[sel], p[sel, 1])
                ax.plot(fpr, tpr, linewidth=0.8, alpha=0.45, color="tab:blue",
                        label="single folds" if i == 0 else None)
        if len(np.unique(y)) == 2:
            fpr, tpr, _ = roc_curve(y, p[:, 1])
            auc = roc_auc_score(y, p[:, 1])
            ax.plot(fpr, tpr, linewidth=2.2, color="tab:red",
                    label=f"{class_names[1]} vs {class_names[0]} (pooled AUC = {auc:.3f})")
    else:
        for k, name in enumerate(class_names):
            pos = (y == k).astype(int)
            if pos.min() == pos.max():
                continue
            fpr, tpr, _ = roc_curve(pos, p[:, k])
            ax.plot(fpr, tpr, linewidth=1.8, label=f"{name} vs rest (AUC = {roc_auc_score(pos, p[:, k]):.3f})")
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), xlabel="False positive rate (1 - specificity)",
           ylabel="True positive rate (sensitivity)", title=title)
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def plot_confusion(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    class_names: Sequence[str],
    path: str | Path,
    *,
    normalize: bool = False,
    title: str = "Confusion matrix",
) -> Path:
    """Plot a confusion matrix (rows: true class, columns: predicted) to a PNG file.

    Cells show counts; with ``normalize=True`` the colours and the first number are the
    share of each true class (row) and the count follows in brackets. Drawn with
    ``imshow`` rather than sklearn's ``ConfusionMatrixDisplay``, which cannot annotate
    a cell with both the share and the count.

    Args:
        y_true: ``(N,)`` true class indices.
        y_pred: ``(N,)`` predicted class indices.
        class_names: ``K`` names, in class-index order.
        path: output PNG file.
        normalize: colour by row share instead of counts.
        title: figure title.

    Returns:
        The written path.

    Example:
        >>> plot_confusion([0, 1, 1], [0, 1, 0], ["a", "b"], "/tmp/cm.png").suffix
        '.png'
    """
    y, yp = np.asarray(y_true), np.asarray(y_pred)
    k = len(class_names)
    if y.ndim != 1 or y.shape != yp.shape or len(y) == 0:
        raise DataError(f"plot_confusion expects non-empty 1-D 'y_true' and 'y_pred' of equal length; got {y.shape} and {yp.shape}.")
    for name, arr in (("y_true", y), ("y_pred", yp)):
        if arr.min() < 0 or arr.max() >= k:
            raise DataError(f"plot_confusion: '{name}' holds class indices outside 0..{k - 1} ({k} class_names given).")
    cm = confusion_matrix(y, yp, labels=np.arange(k))
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(cm.sum(1, keepdims=True) > 0, cm / cm.sum(1, keepdims=True), 0.0)
    shown = share if normalize else cm
    size = max(4.0, 1.0 + 0.9 * k)
    fig, ax = _subplots(1, 1, (size + 1.0, size))
    ax = ax[0][0]
    im = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1 if normalize else max(1, cm.max()))
    fig.colorbar(im, ax=ax, shrink=0.85, label="share of true class" if normalize else "cases")
    for i in range(k):
        for j in range(k):
            text = f"{share[i, j]:.2f}\n({cm[i, j]})" if normalize else f"{cm[i, j]}"
            dark = shown[i, j] > 0.5 * (1 if normalize else max(1, cm.max()))
            ax.text(j, i, text, ha="center", va="center", fontsize=10, color="white" if dark else "black")
    ax.set_xticks(np.arange(k), labels=list(class_names), rotation=30 if k > 3 else 0, ha="right" if k > 3 else "center")
    ax.set_yticks(np.arange(k), labels=list(class_names))
    ax.set(xlabel="Predicted class", ylabel="True class", title=title)
    return _save(fig, path)


def plot_training_curves(history: list[dict], path: str | Path, *, title: str = "Training") -> Path:
    """Plot the per-epoch curves of a run to a PNG file: one panel per quantity.

    Series are grouped by quantity, the key without its ``train_``/``val_`` prefix:
    ``train_loss`` and ``val_loss`` share the "loss" panel, ``val_auc`` gets an "auc"
    panel, and so on. Each series has one colour (training solid, validation dashed);
    every fold is a thin, faint line and the mean over the folds a thick one, so the
    figure stays readable with 5, 10 or 25 folds. Bookkeeping keys (``epoch``, ``fold``,
    ``lr``, ``train_seconds``, ``train_images_per_s``, ...) are not plotted. Panels are
    laid out two per row from three quantities on, with the legend in a spare cell.

    Args:
        history: per-epoch dicts, e.g. ``{"epoch": 1, "train_loss": 0.6,
            "val_loss": 0.7, "val_auc": 0.8, "fold": 0}``; ``fold`` is optional.
        path: output PNG file.
        title: figure title.

    Returns:
        The written path.

    Example:
        >>> h = [{"epoch": e, "train_loss": 1 / e, "val_auc": 0.5 + e / 10} for e in (1, 2, 3)]
        >>> plot_training_curves(h, "/tmp/train.png").exists()
        True
    """
    if not isinstance(history, (list, tuple)) or not history or not all(isinstance(h, dict) for h in history):
        raise DataError("plot_training_curves expects a non-empty list of per-epoch dicts, e.g. "
                        "[{'epoch': 1, 'train_loss': 0.6, 'val_auc': 0.8}]. Got an empty or invalid history.")
    panels: dict[str, list[str]] = {}  # quantity -> its series keys, in first-seen order
    for rec in history:
        for key, val in rec.items():
            quantity = _quantity(key)
            if key in _NOT_CURVES or quantity in _NOT_CURVES or not _is_number(val):
                continue
            keys = panels.setdefault(quantity, [])
            if key not in keys:
                keys.append(key)
    if not panels:
        raise DataError("plot_training_curves: the history holds no numeric series to plot "
                        "(expected keys such as 'train_loss', 'val_loss', 'val_auc').")
    if "loss" in panels:  # the loss first, as the eye expects
        panels = {"loss": panels.pop("loss"), **panels}
    folds = list(dict.fromkeys(rec.get("fold", 0) for rec in history))
    n = len(panels)
    cols = n if n < 3 else 2
    rows = math.ceil(n / cols)
    series = list(dict.fromkeys(k for keys in panels.values() for k in keys))
    colours = {key: matplotlib.colormaps["tab10"](i % 10) for i, key in enumerate(series)}
    with matplotlib.rc_context(_READABLE):
        fig, axes = _subplots(rows, cols, (5.0 * cols if cols > 1 else 6.0, 3.6 * rows + 0.5))
        for ax, (quantity, keys) in zip(axes.flat, panels.items()):
            for key in keys:
                _plot_series(ax, history, folds, key, colours[key])
            ax.set_title(_QUANTITY_TITLES.get(quantity, quantity.replace("_", " ")))
            ax.set_xlabel("epoch")
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.grid(alpha=0.3)
        handles = [matplotlib.lines.Line2D([], [], color=colours[k], lw=2.4, ls=_style(k)) for k in series]
        labels = [k.replace("_", " ") + (" (mean of folds)" if len(folds) > 1 else "") for k in series]
        if len(folds) > 1:
            handles.append(matplotlib.lines.Line2D([], [], color="grey", lw=0.9, alpha=0.6))
            labels.append(f"single folds ({len(folds)})")
        spare = list(axes.flat)[n:]
        if spare:  # the legend fills the empty cell of the grid
            for ax in spare:
                ax.axis("off")
            spare[0].legend(handles, labels, loc="center", frameon=False)
        else:
            fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 3), frameon=False)
        fig.suptitle(title, fontsize="x-large")
        return _save(fig, path)


def _quantity(key: str) -> str:
    """``train_loss`` -> ``loss``; ``val_auc`` -> ``auc``; ``train_seconds`` -> ``seconds``."""
    for prefix in ("train_", "val_", "valid_", "test_"):
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def _style(key: str) -> str:
    return "--" if key.startswith(("val", "test")) else "-"


def _plot_series(ax: object, history: list[dict], folds: list, key: str, colour: object) -> None:
    """One series: a thin line per fold and, with several folds, their mean as a thick line."""
    per_epoch: dict[float, list[float]] = {}
    for fold in folds:
        recs = [r for r in history if r.get("fold", 0) == fold]
        pts = [(r.get("epoch", i + 1), float(r[key])) for i, r in enumerate(recs) if _is_number(r.get(key))]
        if not pts:
            continue
        for x, v in pts:
            per_epoch.setdefault(x, []).append(v)
        if len(folds) > 1:
            x, v = zip(*pts)
            ax.plot(x, v, color=colour, ls=_style(key), lw=0.9, alpha=0.45)
    if per_epoch:
        x = sorted(per_epoch)
        ax.plot(x, [float(np.mean(per_epoch[e])) for e in x], color=colour, ls=_style(key), lw=2.4,
                marker="o" if len(x) <= 20 else None, markersize=4)


# --------------------------------------------------------------------------- helpers


def plot_reliability(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: str | Path, *, n_bins: int = 10,
                     title: str = "Reliability") -> Path:
    """Reliability diagram: observed frequency against predicted probability, one line per set.

    Args:
        curves: ``{label: (y_true (N,), proba (N, K))}``, e.g. ``{"uncalibrated": ..., "temperature": ...}``;
            binary sets bin P(class 1), multiclass sets bin top-label confidence. The legend gives
            each set's ECE.
        path: PNG file to write.
    """
    from medtl.evaluate.calibration import expected_calibration_error, reliability_bins

    fig, axes = _subplots(1, 1, (4.6, 4.2))
    ax = axes[0, 0]
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect calibration")
    for label, (y, p) in curves.items():
        b = reliability_bins(y, p, n_bins=n_bins)
        ok = b["count"] > 0
        ece = expected_calibration_error(y, p, n_bins=n_bins)
        ax.plot(b["confidence"][ok], b["accuracy"][ok], marker="o", lw=1.5, label=f"{label} (ECE {ece:.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("predicted probability")
    ax.set_ylabel("observed frequency")
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8)
    return _save(fig, path)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) and math.isfinite(value)


def _check_probs(y_true: object, proba: object, class_names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true)
    p = np.asarray(proba, dtype=np.float64)
    if y.ndim != 1 or p.ndim != 2 or len(y) != len(p) or len(y) == 0:
        raise DataError(f"plot_roc expects 'y_true' (N,) and 'proba' (N, K); got {y.shape} and {p.shape}.")
    if len(class_names) != p.shape[1]:
        raise DataError(f"plot_roc: {len(class_names)} class_names given but 'proba' has {p.shape[1]} columns.")
    if y.min() < 0 or y.max() >= p.shape[1]:
        raise DataError(f"plot_roc: 'y_true' holds class indices outside 0..{p.shape[1] - 1}.")
    return y.astype(np.int64), p


def _subplots(rows: int, cols: int, figsize: tuple[float, float]) -> tuple[Figure, np.ndarray]:
    """A pyplot-free figure with an Agg canvas and a ``(rows, cols)`` array of axes."""
    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, cols, squeeze=False)


def _save(fig: Figure, path: str | Path) -> Path:
    """PNG written atomically (a full disk never leaves half a figure)."""
    buf = io.BytesIO()
    try:
        fig.savefig(buf, dpi=_DPI, format="png")
    finally:
        fig.clear()  # release artists now; no pyplot registry holds the figure
    return atomic_write_bytes(path, buf.getvalue())
