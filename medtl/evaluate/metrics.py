"""Classification metrics and patient-level (cluster) bootstrap confidence intervals.

All metrics are computed by one vectorised kernel over a ``(B, N)`` matrix of case
weights: the point estimate uses a single row of ones, and each bootstrap resample is
a row holding how many times each case's patient was drawn. Computing the metrics
from weighted confusion counts and a weighted Mann-Whitney AUC (instead of calling
scikit-learn once per resample) is what makes 1000 resamples take well under a second;
the tests check the kernel against scikit-learn's metrics.

Conventions (binary, ``K == 2``): the positive class is index 1 and a case is called
positive when ``proba[:, 1] >= threshold``. Multiclass: the prediction is the argmax,
and AUC / sensitivity / specificity / F1 are macro averages of one-vs-rest per-class
values. A metric that is undefined (no positives, no negatives, ...) is ``nan``; a macro
average is ``nan`` when any class's value is undefined (e.g. a class absent from
``y_true``), like scikit-learn's ``roc_auc_score``.
"""

from __future__ import annotations

import numbers

import numpy as np
from sklearn.metrics import roc_curve

from medtl.config import THRESHOLD_RULES
from medtl.errors import ConfigError, DataError

__all__ = ["METRIC_KEYS", "THRESHOLD_RULES", "bootstrap_ci", "choose_threshold", "compute_metrics", "predicted_class",
           "youden_threshold"]



METRIC_KEYS: tuple[str, ...] = ("auc", "acc", "balanced_acc", "sensitivity", "specificity", "f1")

# Largest (resamples x cases) block evaluated at once; bounds memory to a few tens of MB.
_CHUNK_CELLS = 2_000_000


def compute_metrics(y_true: np.ndarray, proba: np.ndarray, *, threshold: float = 0.5) -> dict[str, float]:
    """Compute every metric in :data:`METRIC_KEYS` on one set of predictions.

    Args:
        y_true: ``(N,)`` integer class indices ``0..K-1``.
        proba: ``(N, K)`` class probabilities (rows sum to 1). For binary tasks an
            ``(N,)`` array is read as the probability of class 1.
        threshold: binary decision threshold on ``proba[:, 1]`` (ignored for K > 2).

    Returns:
        ``{"auc", "acc", "balanced_acc", "sensitivity", "specificity", "f1"}`` as floats;
        undefined metrics are ``nan`` (never an exception).

    Example:
        >>> y = np.array([0, 0, 1, 1])
        >>> p = np.array([[0.9, 0.1], [0.4, 0.6], [0.3, 0.7], [0.8, 0.2]])
        >>> m = compute_metrics(y, p)
        >>> m["acc"], m["sensitivity"], m["specificity"], m["auc"]
        (0.5, 0.5, 0.5, 0.75)
    """
    y, p = _check_inputs(y_true, proba, "compute_metrics")
    threshold = _check_threshold(threshold, "compute_metrics")
    out = _weighted_metrics(y, p, np.ones((1, len(y))), threshold)
    return {k: float(out[k][0]) for k in METRIC_KEYS}


def bootstrap_ci(
    y_true: np.ndarray,
    proba: np.ndarray,
    groups: np.ndarray,
    *,
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    threshold: float = 0.5,
) -> dict[str, dict]:
    """Metrics with percentile confidence intervals from a patient-level bootstrap.

    Each resample draws ``G`` patients with replacement (``G`` = number of distinct
    ``groups``) and takes all cases of every drawn patient, so cases of one patient are
    never treated as independent. Resamples in which a metric is undefined (e.g. no
    positive case, for AUC) are dropped for that metric and counted.

    Args:
        y_true: ``(N,)`` integer class indices.
        proba: ``(N, K)`` class probabilities (``(N,)`` = P(class 1) for binary tasks).
        groups: ``(N,)`` patient of each case (any hashable id; never printed).
        n_boot: number of resamples, ``>= 1``.
        ci: confidence level in ``(0, 1)``.
        seed: seed of the resampling; the same seed gives the same intervals.
        threshold: binary decision threshold (see :func:`compute_metrics`).

    Returns:
        ``{key: {"value": point estimate on all data, "ci95": [lo, hi], "n_valid": m}}``
        for every key in :data:`METRIC_KEYS`, plus ``"_bootstrap": {"n_boot", "n_valid",
        "unit": "patient", "n_groups", "ci", "method": "percentile", "seed"}`` where the
        top-level ``n_valid`` counts resamples in which every metric was defined. The
        interval key is ``"ci95"`` whatever ``ci`` is; the level used is ``"_bootstrap"["ci"]``.
        ``[nan, nan]`` when no resample was valid.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> y = rng.integers(0, 2, 200); p1 = np.clip(y * 0.3 + rng.random(200) * 0.7, 0, 1)
        >>> res = bootstrap_ci(y, np.column_stack([1 - p1, p1]), np.arange(200) // 2, n_boot=200)
        >>> lo, hi = res["auc"]["ci95"]; lo <= res["auc"]["value"] <= hi
        True
    """
    y, p = _check_inputs(y_true, proba, "bootstrap_ci")
    threshold = _check_threshold(threshold, "bootstrap_ci")
    if not isinstance(n_boot, numbers.Integral) or isinstance(n_boot, bool) or n_boot < 1:
        raise ConfigError(f"The 'n_boot' parameter of bootstrap_ci must be an int >= 1. Got {n_boot!r} instead.")
    if not isinstance(ci, numbers.Real) or isinstance(ci, bool) or not 0.0 < float(ci) < 1.0:
        raise ConfigError(
            f"The 'ci' parameter of bootstrap_ci must be a float in the range (0.0, 1.0). Got {ci!r} instead."
        )
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or seed < 0:
        raise ConfigError(f"The 'seed' parameter of bootstrap_ci must be an int >= 0. Got {seed!r} instead.")
    g = np.asarray(groups)
    if g.ndim != 1 or len(g) != len(y):
        raise DataError(
            f"bootstrap_ci: 'groups' must be 1-D with one patient id per case ({len(y)} cases). "
            f"Got shape {g.shape}."
        )
    _, group_idx = np.unique(g, return_inverse=True)
    group_idx = group_idx.ravel()
    n_groups = int(group_idx.max()) + 1

    point = _weighted_metrics(y, p, np.ones((1, len(y))), threshold)

    rng = np.random.default_rng(int(seed))
    # (n_boot, G) draw counts: G draws with replacement = a multinomial with equal odds.
    counts = rng.multinomial(n_groups, np.full(n_groups, 1.0 / n_groups), size=int(n_boot))
    chunk = max(1, _CHUNK_CELLS // max(1, len(y)))
    boot = {k: np.empty(int(n_boot)) for k in METRIC_KEYS}
    for start in range(0, int(n_boot), chunk):
        weights = counts[start : start + chunk][:, group_idx].astype(np.float64)  # (b, N)
        part = _weighted_metrics(y, p, weights, threshold)
        for k in METRIC_KEYS:
            boot[k][start : start + chunk] = part[k]

    alpha = (1.0 - float(ci)) / 2.0
    result: dict[str, dict] = {}
    all_valid = np.ones(int(n_boot), dtype=bool)
    for k in METRIC_KEYS:
        valid = np.isfinite(boot[k])
        all_valid &= valid
        if valid.any():
            lo, hi = np.percentile(boot[k][valid], [100.0 * alpha, 100.0 * (1.0 - alpha)])
        else:
            lo = hi = float("nan")
        result[k] = {"value": float(point[k][0]), "ci95": [float(lo), float(hi)], "n_valid": int(valid.sum())}
    result["_bootstrap"] = {
        "n_boot": int(n_boot),
        "n_valid": int(all_valid.sum()),
        "unit": "patient",
        "n_groups": n_groups,
        "ci": float(ci),
        "method": "percentile",
        "seed": int(seed),
    }
    return result


def youden_threshold(y_true: np.ndarray, p_pos: np.ndarray) -> float:
    """The threshold maximising Youden's J = sensitivity + specificity - 1.

    Use it on validation data only; applying it to the data it was chosen on inflates
    the metrics. A case is positive when ``p_pos >= threshold`` (as in
    :func:`compute_metrics`); among equally good thresholds the highest is returned.

    Args:
        y_true: ``(N,)`` binary labels (0/1).
        p_pos: ``(N,)`` scores of the positive class (1).

    Returns:
        One of the observed scores, as a float.

    Example:
        >>> youden_threshold(np.array([0, 0, 1, 1]), np.array([0.1, 0.3, 0.35, 0.8]))
        0.35
    """
    y = np.asarray(y_true)
    s = np.asarray(p_pos, dtype=np.float64)
    if y.ndim != 1 or s.ndim != 1 or len(y) != len(s):
        raise DataError(
            f"youden_threshold expects 1-D 'y_true' and 'p_pos' of equal length. Got shapes {y.shape} and {s.shape}."
        )
    if not np.all(np.isfinite(s)):
        raise DataError("youden_threshold: 'p_pos' holds NaN or infinite values.")
    labels = set(np.unique(y).tolist())
    if labels != {0, 1}:
        raise DataError(
            f"youden_threshold needs binary labels with both 0 and 1 present. Got classes {sorted(labels)}; "
            "choose the threshold on a validation set that holds both classes."
        )
    fpr, tpr, thresholds = roc_curve(y, s, drop_intermediate=False)
    j = (tpr - fpr)[1:]  # index 0 is sklearn's +inf threshold (nothing positive)
    return float(thresholds[1:][int(np.argmax(j))])


# --------------------------------------------------------------------------- kernel


def _weighted_metrics(y: np.ndarray, proba: np.ndarray, w: np.ndarray, threshold: float) -> dict[str, np.ndarray]:
    """Metrics for each row of case weights.

    Args:
        y: ``(N,)`` int class indices.
        proba: ``(N, K)`` probabilities.
        w: ``(B, N)`` non-negative case weights (bootstrap draw counts, or ones).
        threshold: binary threshold.

    Returns:
        ``{key: (B,) float64}``; ``nan`` where undefined.
    """
    n_classes = proba.shape[1]
    total = w.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        if n_classes == 2:
            pos = y == 1
            pred = proba[:, 1] >= threshold
            tp = w @ (pos & pred).astype(np.float64)
            fn = w @ (pos & ~pred).astype(np.float64)
            tn = w @ (~pos & ~pred).astype(np.float64)
            fp = w @ (~pos & pred).astype(np.float64)
            sens = _div(tp, tp + fn)
            spec = _div(tn, tn + fp)
            return {
                "auc": _weighted_auc(proba[:, 1], pos, w),
                "acc": _div(tp + tn, total),
                "balanced_acc": (sens + spec) / 2.0,
                "sensitivity": sens,
                "specificity": spec,
                "f1": _div(2.0 * tp, 2.0 * tp + fp + fn),
            }
        eye = np.eye(n_classes)
        true_1h = eye[y]  # (N, K)
        pred_1h = eye[np.argmax(proba, axis=1)]
        n_true = w @ true_1h  # (B, K)
        n_pred = w @ pred_1h
        tp = w @ (true_1h * pred_1h)
        fp = n_pred - tp
        tn = total[:, None] - n_true - fp
        recall = _div(tp, n_true)
        spec = _div(tn, total[:, None] - n_true)
        f1 = _div(2.0 * tp, n_true + n_pred)
        auc = np.stack([_weighted_auc(proba[:, k], y == k, w) for k in range(n_classes)], axis=1)
        sens = recall.mean(axis=1)  # nan if any class undefined
        return {
            "auc": auc.mean(axis=1),
            "acc": _div(tp.sum(axis=1), total),
            "balanced_acc": sens,
            "sensitivity": sens,
            "specificity": spec.mean(axis=1),
            "f1": f1.mean(axis=1),
        }


def _div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num / den`` with ``nan`` where ``den == 0``."""
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _weighted_auc(score: np.ndarray, pos: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted Mann-Whitney AUC (ties count one half) for each row of ``w``.

    Args:
        score: ``(N,)`` scores; pos: ``(N,)`` bool, True for positives; w: ``(B, N)``.

    Returns:
        ``(B,)`` AUC, ``nan`` for rows without positive or without negative weight.
    """
    order = np.argsort(score, kind="stable")
    s, pos_s = score[order], pos[order]
    n = len(s)
    is_start = np.r_[True, s[1:] != s[:-1]]
    block = np.cumsum(is_start) - 1  # (N,) tie-block id of each sorted case
    starts = np.flatnonzero(is_start)
    ends = np.r_[starts[1:], n]  # exclusive end of each block
    ws = w[:, order]
    neg_w = ws * ~pos_s
    pos_w = ws * pos_s
    cum_neg = np.concatenate([np.zeros((w.shape[0], 1)), np.cumsum(neg_w, axis=1)], axis=1)  # (B, N+1)
    below = cum_neg[:, starts[block]]  # negative weight strictly below each case's score
    tied = cum_neg[:, ends[block]] - below  # negative weight at the same score
    num = (pos_w * (below + 0.5 * tied)).sum(axis=1)
    return _div(num, pos_w.sum(axis=1) * neg_w.sum(axis=1))


# --------------------------------------------------------------------------- validation


def _check_inputs(y_true: object, proba: object, func: str) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true)
    p = np.asarray(proba, dtype=np.float64)
    if p.ndim == 1:
        p = np.column_stack([1.0 - p, p])
    if y.ndim != 1 or p.ndim != 2 or p.shape[1] < 2:
        raise DataError(
            f"{func} expects 'y_true' of shape (N,) and 'proba' of shape (N, K) with K >= 2. "
            f"Got {y.shape} and {np.asarray(proba).shape}."
        )
    if len(y) != len(p):
        raise DataError(f"{func}: 'y_true' has {len(y)} entries but 'proba' has {len(p)} rows.")
    if len(y) == 0:
        raise DataError(f"{func}: no predictions to score (empty 'y_true').")
    if y.dtype.kind == "b":
        y = y.astype(np.int64)
    if y.dtype.kind not in "iuf" or not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
        raise DataError(f"{func}: 'y_true' must hold integer class indices 0..K-1. Got dtype {y.dtype}.")
    y = y.astype(np.int64)
    k = p.shape[1]
    if y.min() < 0 or y.max() >= k:
        raise DataError(
            f"{func}: 'y_true' holds class indices {y.min()}..{y.max()} but 'proba' has {k} columns "
            f"(valid indices 0..{k - 1}). Map labels to indices with the run's class list."
        )
    if not np.all(np.isfinite(p)):
        raise DataError(f"{func}: 'proba' holds NaN or infinite values; check the model outputs.")
    if p.min() < -1e-6 or p.max() > 1 + 1e-6 or not np.allclose(p.sum(axis=1), 1.0, atol=1e-3):
        raise DataError(
            f"{func}: each row of 'proba' must be probabilities summing to 1 (got sums in "
            f"[{p.sum(axis=1).min():.4g}, {p.sum(axis=1).max():.4g}]). Apply softmax to the logits first."
        )
    return y, p


def _check_threshold(threshold: object, func: str) -> float:
    if (
        not isinstance(threshold, numbers.Real)
        or isinstance(threshold, bool)
        or not 0.0 <= float(threshold) <= 1.0
    ):
        raise ConfigError(
            f"The 'threshold' parameter of {func} must be a float in the range [0.0, 1.0]. Got {threshold!r} instead."
        )
    return float(threshold)


def predicted_class(proba: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """``(N,)`` predicted class indices: ``proba[:, 1] >= threshold`` when binary, else the argmax."""
    return (proba[:, 1] >= threshold).astype(int) if proba.shape[1] == 2 else proba.argmax(1)


def choose_threshold(y_val: np.ndarray, p_val: np.ndarray, rule: str = "fixed", *,
                     target_sensitivity: float = 0.9) -> float:
    """A binary operating point chosen on validation data only (never on the test cases).

    ``fixed``: 0.5; ``youden_val``: the threshold maximising sensitivity + specificity - 1;
    ``sensitivity_val``: the highest threshold whose validation sensitivity reaches
    ``target_sensitivity``. Multi-class problems and one-class validation sets get 0.5.

    Example:
        >>> choose_threshold(np.array([0, 0, 1, 1]), np.array([[.9, .1], [.6, .4], [.7, .3], [.2, .8]]),
        ...                  "sensitivity_val", target_sensitivity=1.0)
        0.3
    """
    if rule not in THRESHOLD_RULES:
        raise ConfigError(f"The 'rule' parameter of choose_threshold must be one of {THRESHOLD_RULES}. "
                          f"Got {rule!r} instead.")
    p_val = np.asarray(p_val)
    if p_val.ndim != 2 or p_val.shape[1] != 2 or len(np.unique(y_val)) < 2 or rule == "fixed":
        return 0.5
    if rule == "youden_val":
        return float(youden_threshold(y_val, p_val[:, 1]))
    pos = np.sort(p_val[np.asarray(y_val) == 1, 1])[::-1]
    need = int(np.ceil(target_sensitivity * len(pos)))
    return float(pos[max(need, 1) - 1])
