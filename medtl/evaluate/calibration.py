"""Calibration: expected calibration error, Brier score and temperature scaling.

Temperature scaling (Guo et al., 2017) divides the logits by one scalar ``T`` fitted by
minimising the negative log-likelihood on held-out data. medtl fits ``T`` on each fold's
*inner validation* split and applies it to that fold's outer test cases, so the outer
figures never see the data the temperature was fitted on.

The run drivers store probabilities, not logits. ``log p`` differs from the logits by a
per-case constant (the log-partition), which cancels inside the softmax, so
``softmax(log(p) / T)`` equals ``softmax(logits / T)`` exactly (for averaged TTA
probabilities it is the natural extension).

Example:
    >>> y = np.array([0, 1, 1, 0]); p = np.array([[.9, .1], [.2, .8], [.4, .6], [.6, .4]])
    >>> ts = TemperatureScaler().fit(p, y)
    >>> ts.transform(p).shape
    (4, 2)
"""

from __future__ import annotations

import numbers

import numpy as np
from scipy.optimize import minimize_scalar

from medtl.errors import ConfigError, DataError

__all__ = ["expected_calibration_error", "brier_score", "reliability_bins", "TemperatureScaler",
           "calibration_metrics", "CALIBRATION_KEYS"]

CALIBRATION_KEYS = ("ece", "brier", "nll")
_EPS = 1e-7


def _check(y: object, proba: object, func: str) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y)
    p = np.asarray(proba, dtype=np.float64)
    if p.ndim == 1:
        p = np.column_stack([1 - p, p])
    if p.ndim != 2 or y.ndim != 1 or len(y) != len(p):
        raise DataError(f"{func}: expected y of shape (N,) and proba of shape (N, K); got {y.shape} and {p.shape}.")
    if not np.isfinite(p).all():
        raise DataError(f"{func}: proba contains NaN or Inf; check the model's outputs.")
    if len(y) and (y.min() < 0 or y.max() >= p.shape[1]):
        raise DataError(f"{func}: labels must be class indices 0..{p.shape[1] - 1}; got {np.unique(y)[:10]}.")
    return y.astype(int), p


def reliability_bins(y_true: np.ndarray, proba: np.ndarray, *, n_bins: int = 10) -> dict[str, np.ndarray]:
    """Equal-width bins of top-label confidence.

    Args:
        y_true: ``(N,)`` class indices. proba: ``(N, K)`` probabilities (``(N,)`` = P(class 1)).
        n_bins: number of bins on ``[0, 1]`` (binary tasks use P(class 1), so the diagram
            reads as "predicted risk vs observed frequency"; K > 2 uses top-label confidence).

    Returns:
        ``{"edges" (n_bins+1,), "confidence" (n_bins,), "accuracy" (n_bins,), "count" (n_bins,)}``;
        empty bins hold ``nan``.
    """
    y, p = _check(y_true, proba, "reliability_bins")
    if not isinstance(n_bins, numbers.Integral) or n_bins < 1:
        raise ConfigError(f"The 'n_bins' parameter of reliability_bins must be an int >= 1. Got {n_bins!r} instead.")
    if p.shape[1] == 2:
        conf, hit = p[:, 1], (y == 1).astype(float)
    else:
        conf, hit = p.max(1), (p.argmax(1) == y).astype(float)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(idx, weights=conf, minlength=n_bins) / count
        mean_hit = np.bincount(idx, weights=hit, minlength=n_bins) / count
    return {"edges": edges, "confidence": mean_conf, "accuracy": mean_hit, "count": count}


def expected_calibration_error(y_true: np.ndarray, proba: np.ndarray, *, n_bins: int = 10) -> float:
    """ECE: count-weighted mean |observed frequency - mean predicted probability| over bins.

    Binary tasks bin P(class 1) against the positive rate; multiclass tasks bin the top-label
    confidence against accuracy (Guo et al., 2017). Returns ``nan`` for no cases.
    """
    b = reliability_bins(y_true, proba, n_bins=n_bins)
    n = b["count"].sum()
    if n == 0:
        return float("nan")
    ok = b["count"] > 0
    return float(np.sum(b["count"][ok] * np.abs(b["accuracy"][ok] - b["confidence"][ok])) / n)


def brier_score(y_true: np.ndarray, proba: np.ndarray) -> float:
    """Multiclass Brier score: mean over cases of sum_k (p_k - [y == k])^2 (binary: 2x the usual)."""
    y, p = _check(y_true, proba, "brier_score")
    if len(y) == 0:
        return float("nan")
    onehot = np.eye(p.shape[1])[y]
    return float(np.mean(np.sum((p - onehot) ** 2, axis=1)))


def _nll(y: np.ndarray, p: np.ndarray) -> float:
    return float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], _EPS, 1.0)))) if len(y) else float("nan")


def calibration_metrics(y_true: np.ndarray, proba: np.ndarray, *, n_bins: int = 10) -> dict[str, float]:
    """``{"ece", "brier", "nll"}`` for one set of predictions."""
    y, p = _check(y_true, proba, "calibration_metrics")
    return {"ece": expected_calibration_error(y, p, n_bins=n_bins), "brier": brier_score(y, p), "nll": _nll(y, p)}


def _scale(p: np.ndarray, t: float) -> np.ndarray:
    z = np.log(np.clip(p, _EPS, 1.0)) / t
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class TemperatureScaler:
    """Post-hoc temperature scaling on probabilities (scikit-learn conventions).

    Args:
        bounds: search interval for ``T`` (log-spaced bounded search).

    Attributes:
        temperature_: fitted ``T`` (``> 1`` softens over-confident models).
        nll_before_, nll_after_: validation NLL at ``T = 1`` and at ``temperature_``.
    """

    def __init__(self, bounds: tuple[float, float] = (0.05, 20.0)) -> None:
        self.bounds = bounds

    def fit(self, proba: np.ndarray, y: np.ndarray) -> "TemperatureScaler":
        """Fit ``T`` on held-out ``proba`` ``(N, K)`` and labels ``y`` ``(N,)``; returns ``self``."""
        y, p = _check(y, proba, "TemperatureScaler.fit")
        lo, hi = self.bounds
        if not (0 < lo < 1 < hi):
            raise ConfigError(f"The 'bounds' parameter of TemperatureScaler must satisfy 0 < lo < 1 < hi. "
                              f"Got {self.bounds!r} instead.")
        if len(y) < 2 or len(np.unique(y)) < 2:
            self.temperature_ = 1.0  # nothing to fit on: identity, recorded as such
        else:
            res = minimize_scalar(lambda lt: _nll(y, _scale(p, float(np.exp(lt)))),
                                  bounds=(np.log(lo), np.log(hi)), method="bounded", options={"xatol": 1e-4})
            self.temperature_ = float(np.exp(res.x))
        self.nll_before_ = _nll(y, p)
        self.nll_after_ = _nll(y, _scale(p, self.temperature_))
        return self

    def transform(self, proba: np.ndarray) -> np.ndarray:
        """Calibrated probabilities ``(N, K)``."""
        if not hasattr(self, "temperature_"):
            raise ConfigError("This TemperatureScaler instance is not fitted yet. Call 'fit' first.")
        p = np.asarray(proba, dtype=np.float64)
        if p.ndim == 1:
            p = np.column_stack([1 - p, p])
        return _scale(p, self.temperature_)
