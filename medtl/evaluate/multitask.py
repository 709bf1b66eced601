"""Per-task metrics of a multi-task run, each with a patient-bootstrap CI, missing labels masked.

One function per kind, arrays in and numbers out, every interval from the same patient-level
(cluster) bootstrap as :func:`medtl.evaluate.metrics.bootstrap_ci`: a resample draws ``G``
patients with replacement and weights each case by how often its patient was drawn.

* binary / multiclass: :func:`~medtl.evaluate.metrics.bootstrap_ci` on the labelled cases
  (AUC, accuracy, ...; multiclass AUC is the macro one-vs-rest AUC);
* multilabel: AUC per label (on the cases labelled for it) and the macro AUC (their mean,
  undefined in a resample where any label's AUC is);
* regression: MAE, RMSE and R²; with a baseline prediction (e.g. the training-fold mean) also
  the baseline's MAE and the paired difference ``MAE(model) - MAE(baseline)`` on the same resamples.

Every result says how many cases (and patients) it was computed on: nothing is dropped silently.

Example:
    >>> rng = np.random.default_rng(0); y = rng.normal(60, 10, 80); pred = y + rng.normal(0, 5, 80)
    >>> res = score_regression(y, pred, np.arange(80) // 2, baseline=np.full(80, 60.0), n_boot=200)
    >>> res["mae"]["value"] < res["baseline_mae"]["value"], res["mae_minus_baseline"]["ci95"][1] < 0
    (True, True)
"""

from __future__ import annotations

import numpy as np

from medtl.errors import DataError
from medtl.evaluate.metrics import _weighted_auc, bootstrap_ci

__all__ = ["score_binary", "score_multilabel", "score_regression", "score_task"]

_CHUNK_CELLS = 2_000_000


def score_task(kind: str, y: np.ndarray, outputs: np.ndarray, groups: np.ndarray, *, class_names: list[str],
               n_boot: int = 1000, seed: int = 0, threshold: float = 0.5, baseline: np.ndarray | None = None) -> dict:
    """Metrics of one task; ``y`` holds ``nan`` for missing labels (``(N,)``, or ``(N, L)`` for multilabel).

    Args:
        kind: binary, multiclass, multilabel or regression.
        outputs: ``(N, K)`` class probabilities, ``(N, L)`` label probabilities or ``(N,)``/``(N, 1)`` values.
        groups: ``(N,)`` patient of each case.
        baseline: regression only: ``(N,)`` a reference prediction (the training-fold mean).
    """
    y, out, g = np.asarray(y, dtype=np.float64), np.asarray(outputs, dtype=np.float64), np.asarray(groups)
    if len(y) != len(out) or len(g) != len(y):
        raise DataError(f"score_task: y ({len(y)}), outputs ({len(out)}) and groups ({len(g)}) must have one row "
                        "per case.")
    if kind == "multilabel":
        return score_multilabel(y, out, g, class_names, n_boot=n_boot, seed=seed)
    if kind == "regression":
        return score_regression(y, out.reshape(len(out), -1)[:, 0], g, baseline=baseline, n_boot=n_boot, seed=seed)
    if kind in ("binary", "multiclass"):
        return score_binary(y, out, g, n_boot=n_boot, seed=seed, threshold=threshold)
    raise DataError(f"score_task: kind must be binary, multiclass, multilabel or regression. Got {kind!r} instead.")


def score_binary(y: np.ndarray, proba: np.ndarray, groups: np.ndarray, *, n_boot: int = 1000, seed: int = 0,
                 threshold: float = 0.5) -> dict:
    """Binary or multiclass: :func:`bootstrap_ci` metrics on the labelled cases, with counts."""
    lab = ~np.isnan(y)
    res = _counts(lab, groups)
    if lab.sum() == 0:
        return res
    m = bootstrap_ci(y[lab].astype(np.int64), proba[lab], groups[lab], n_boot=n_boot, seed=seed, threshold=threshold)
    m.pop("_bootstrap", None)
    return {**res, **m}


def score_multilabel(y: np.ndarray, proba: np.ndarray, groups: np.ndarray, labels: list[str], *,
                     n_boot: int = 1000, seed: int = 0) -> dict:
    """Per-label AUC (``{"auc_per_label": {label: {...}}}``) and ``macro_auc``, each with a CI."""
    if y.ndim != 2 or proba.shape != y.shape or len(labels) != y.shape[1]:
        raise DataError(f"score_multilabel: y {y.shape} and proba {proba.shape} must both be (N, L) with L = "
                        f"{len(labels)} labels.")
    lab = ~np.isnan(y)
    gi, n_groups = _group_index(groups)
    point = np.array([_auc_rows(proba[:, j], y[:, j], lab[:, j], np.ones((1, len(y))))[0] for j in range(len(labels))])
    boot = np.empty((int(n_boot), len(labels)))
    for lo, w in _weight_chunks(gi, n_groups, len(y), n_boot, seed):
        for j in range(len(labels)):
            boot[lo: lo + len(w), j] = _auc_rows(proba[:, j], y[:, j], lab[:, j], w)
    per_label = {}
    for j, name in enumerate(labels):
        per_label[name] = {**_interval(point[j], boot[:, j]), "n_labelled": int(lab[:, j].sum()),
                           "n_positive": int((y[lab[:, j], j] == 1).sum())}
    macro = boot.mean(axis=1)  # nan where any label's AUC is undefined in that resample
    return {**_counts(lab.any(axis=1), groups), "auc_per_label": per_label,
            "macro_auc": _interval(float(point.mean()), macro)}


def score_regression(y: np.ndarray, pred: np.ndarray, groups: np.ndarray, *, baseline: np.ndarray | None = None,
                     n_boot: int = 1000, seed: int = 0) -> dict:
    """MAE, RMSE and R² on the labelled cases; with ``baseline`` its MAE and the paired MAE difference."""
    lab = ~np.isnan(y)
    res = _counts(lab, groups)
    if lab.sum() < 2:
        return res
    y, pred, g = y[lab], pred[lab], groups[lab]
    base = None if baseline is None else np.asarray(baseline, dtype=np.float64)[lab]
    gi, n_groups = _group_index(g)
    stats = _regression_rows(y, pred, base, np.ones((1, len(y))))
    boot = {k: np.empty(int(n_boot)) for k in stats}
    for lo, w in _weight_chunks(gi, n_groups, len(y), n_boot, seed):
        part = _regression_rows(y, pred, base, w)
        for k in part:
            boot[k][lo: lo + len(w)] = part[k]
    res.update({k: _interval(float(stats[k][0]), boot[k]) for k in stats})
    return res


def _regression_rows(y, pred, base, w) -> dict[str, np.ndarray]:
    sw = w.sum(axis=1)
    err = pred - y
    mae = (w * np.abs(err)).sum(axis=1) / sw
    mse = (w * err ** 2).sum(axis=1) / sw
    mean = (w * y).sum(axis=1) / sw
    var = (w * (y[None, :] - mean[:, None]) ** 2).sum(axis=1) / sw
    r2 = np.where(var > 0, 1 - mse / np.where(var > 0, var, 1.0), np.nan)
    out = {"mae": mae, "rmse": np.sqrt(mse), "r2": r2}
    if base is not None:
        bmae = (w * np.abs(base - y)).sum(axis=1) / sw
        out.update({"baseline_mae": bmae, "mae_minus_baseline": mae - bmae})
    return out


def _auc_rows(score, y, lab, w) -> np.ndarray:
    """Weighted AUC of one label over its labelled cases, per row of ``w``."""
    if lab.sum() == 0:
        return np.full(len(w), np.nan)
    return _weighted_auc(score[lab], y[lab] == 1, w[:, lab])


def _group_index(groups: np.ndarray) -> tuple[np.ndarray, int]:
    _, gi = np.unique(np.asarray(groups), return_inverse=True)
    gi = gi.ravel()
    return gi, int(gi.max()) + 1 if len(gi) else 0


def _weight_chunks(gi: np.ndarray, n_groups: int, n: int, n_boot: int, seed: int):
    """``(start, (b, N) weights)``: how often each case's patient was drawn, chunk by chunk."""
    rng = np.random.default_rng(int(seed))
    counts = rng.multinomial(n_groups, np.full(n_groups, 1.0 / n_groups), size=int(n_boot))
    chunk = max(1, _CHUNK_CELLS // max(1, n))
    for lo in range(0, int(n_boot), chunk):
        yield lo, counts[lo: lo + chunk][:, gi].astype(np.float64)


def _interval(value: float, boot: np.ndarray) -> dict:
    ok = boot[np.isfinite(boot)]
    lo, hi = np.percentile(ok, [2.5, 97.5]).tolist() if len(ok) else [float("nan")] * 2
    return {"value": float(value), "ci95": [lo, hi], "n_valid": len(ok)}


def _counts(lab: np.ndarray, groups: np.ndarray) -> dict:
    return {"n_labelled": int(lab.sum()), "n_missing": int((~lab).sum()),
            "n_patients": len(set(np.asarray(groups)[lab].tolist()))}
