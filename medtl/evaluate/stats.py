"""Statistics for comparing and summarising runs: paired DeLong test, multiclass and ordinal metrics.

DeLong's test (DeLong et al., 1988) compares two correlated ROC AUCs measured on the same
cases. It is implemented here with the fast midrank algorithm of Sun & Xu (2014) because
neither scikit-learn nor SciPy ships it; the tests check the AUCs against scikit-learn and
the variance against a brute-force placement-value computation.

Example:
    >>> rng = np.random.default_rng(0); y = rng.integers(0, 2, 200)
    >>> a = y + rng.normal(0, 1, 200); b = y + rng.normal(0, 2, 200)
    >>> res = delong_test(y, a, b)
    >>> res["auc_a"] > res["auc_b"], res["p_value"] < 0.05
    (True, True)
"""

from __future__ import annotations

import numpy as np
from scipy.stats import norm
from sklearn.metrics import cohen_kappa_score, roc_auc_score

from medtl.errors import DataError

__all__ = ["bootstrap_stat", "delong_test", "mean_sd", "multiclass_metrics"]


def _midrank(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    n = len(x)
    ranks = np.zeros(n)
    i = 0
    while i < n:
        j = i
        while j < n and xs[j] == xs[i]:
            j += 1
        ranks[i:j] = 0.5 * (i + j - 1) + 1
        i = j
    out = np.empty(n)
    out[order] = ranks
    return out


def _fast_delong(scores: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """scores: ``(k, N)`` with the ``m`` positives first. Returns (aucs (k,), covariance (k, k))."""
    n = scores.shape[1] - m
    pos, neg = scores[:, :m], scores[:, m:]
    tx = np.stack([_midrank(r) for r in pos])
    ty = np.stack([_midrank(r) for r in neg])
    tz = np.stack([_midrank(r) for r in scores])
    aucs = tz[:, :m].sum(axis=1) / (m * n) - (m + 1.0) / (2.0 * n)
    v01 = (tz[:, :m] - tx) / n
    v10 = 1.0 - (tz[:, m:] - ty) / m
    sx = np.atleast_2d(np.cov(v01))
    sy = np.atleast_2d(np.cov(v10))
    return aucs, sx / m + sy / n


def delong_test(y_true: np.ndarray, score_a: np.ndarray, score_b: np.ndarray, *, ci: float = 0.95) -> dict:
    """Paired two-sided DeLong test of ``AUC(a) == AUC(b)`` on the same cases.

    Args:
        y_true: ``(N,)`` binary labels (1 = positive).
        score_a, score_b: ``(N,)`` scores of the two models for the same cases, same order.
        ci: level of the interval on the AUC difference.

    Returns:
        ``{"auc_a", "auc_b", "diff" (a - b), "ci": [lo, hi], "z", "p_value", "n", "n_pos"}``.
    """
    y = np.asarray(y_true).astype(int).ravel()
    a, b = np.asarray(score_a, float).ravel(), np.asarray(score_b, float).ravel()
    if not (len(y) == len(a) == len(b)):
        raise DataError(f"delong_test: y, score_a and score_b must have the same length; got {len(y)}, {len(a)}, "
                        f"{len(b)}. Compare runs on the same cases.")
    if set(np.unique(y)) - {0, 1}:
        raise DataError(f"delong_test needs binary labels 0/1; got classes {np.unique(y)[:10].tolist()}.")
    m = int(y.sum())
    if m == 0 or m == len(y):
        raise DataError("delong_test needs both positive and negative cases; all cases have one label.")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise DataError("delong_test: scores contain NaN or Inf.")
    order = np.argsort(-y, kind="mergesort")  # positives first
    aucs, cov = _fast_delong(np.stack([a[order], b[order]]), m)
    diff = float(aucs[0] - aucs[1])
    var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    if var <= 1e-15:
        z, p = 0.0, 1.0
    else:
        z = diff / np.sqrt(var)
        p = float(2 * norm.sf(abs(z)))
    half = norm.ppf(0.5 + ci / 2) * np.sqrt(max(var, 0.0))
    return {"auc_a": float(aucs[0]), "auc_b": float(aucs[1]), "diff": diff, "ci": [float(diff - half), float(diff + half)],
            "z": float(z), "p_value": p, "n": int(len(y)), "n_pos": m}


def multiclass_metrics(y_true: np.ndarray, proba: np.ndarray, *, ordinal: bool = False) -> dict[str, float]:
    """Extra metrics for K > 2: macro and micro one-vs-rest AUC, and quadratic-weighted kappa
    (``ordinal=True``: classes are ordered grades, index order = grade order).

    Returns ``nan`` for a metric that is undefined on these cases (e.g. a class absent).
    """
    y = np.asarray(y_true).astype(int)
    p = np.asarray(proba, float)
    k = p.shape[1]
    out: dict[str, float] = {}
    onehot = np.eye(k)[y]
    for avg in ("macro", "micro"):
        try:
            out[f"auc_{avg}"] = float(roc_auc_score(onehot, p, average=avg))
        except ValueError:
            out[f"auc_{avg}"] = float("nan")
    if ordinal:
        out["qwk"] = float(cohen_kappa_score(y, p.argmax(1), weights="quadratic", labels=list(range(k))))
    return out


def bootstrap_stat(fn, y: np.ndarray, proba: np.ndarray, groups: np.ndarray, *, n_boot: int, seed: int) -> dict:
    """Patient-bootstrap percentile CI of any ``fn(y, proba) -> float`` (ECE, Brier, ...).

    Returns ``{"value", "ci95": [lo, hi], "n_valid"}``; resamples where ``fn`` is undefined are dropped
    and counted out of ``n_valid``.
    """
    _, gi = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(gi == g) for g in range(gi.max() + 1)]
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(n_boot):
        take = np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))])
        v = fn(y[take], proba[take])
        if np.isfinite(v):
            vals.append(v)
    lo, hi = (np.percentile(vals, [2.5, 97.5]).tolist() if vals else [float("nan")] * 2)
    return {"value": fn(y, proba), "ci95": [lo, hi], "n_valid": len(vals)}


def mean_sd(values: list[float | None]) -> dict:
    """``{"mean", "sd"}`` over the defined values (``None``/NaN left out); sd with ddof=1."""
    v = np.asarray([np.nan if x is None else x for x in values], dtype=float)
    if np.isnan(v).all():
        return {"mean": float("nan"), "sd": float("nan")}
    return {"mean": float(np.nanmean(v)), "sd": float(np.nanstd(v, ddof=1)) if np.isfinite(v).sum() > 1 else 0.0}
