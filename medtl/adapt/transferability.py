"""Transferability scores: how well a frozen encoder's features suit a task, without fine-tuning.

* :func:`logme` — LogME (You et al., ICML 2021): the maximum log marginal evidence of a
  Bayesian linear model from features to each one-hot label column, averaged over classes
  and divided by N. Higher is better. Evidence maximisation by the fixed-point iteration of
  the reference implementation (thuml/LogME, ``_fit_fixed_point``), vectorised over
  classes on one thin SVD of the features.
* :func:`leep` — LEEP (Nguyen et al., ICML 2020): the mean log-likelihood of the target
  labels under the "expected empirical predictor" built from the source model's class
  probabilities. Higher (closer to 0) is better. Needs a source head (e.g. ImageNet's 1000
  classes); encoders without one get ``None`` from the ranking code.
* :func:`probe_auc` — a quick grouped k-fold linear-probe ROC AUC on the features.

Example:
    >>> feats = extract_features(model, images)            # (N, F)
    >>> logme(feats, y), leep(source_probabilities(model, feats), y)
    (-0.61, -0.55)
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold

from medtl.adapt.probe import LinearProbe
from medtl.errors import ConfigError, DataError

__all__ = ["leep", "logme", "probe_auc"]


def logme(features: np.ndarray, y: np.ndarray, *, max_iter: int = 11, tol: float = 1e-3) -> float:
    """LogME score of features ``(N, F)`` for integer labels ``y (N,)`` (classification).

    For each class ``k`` the target is the indicator ``y == k``; the evidence of
    ``t = f·m + noise`` with prior ``m ~ N(0, 1/alpha)`` and noise precision ``beta`` is
    maximised over ``alpha, beta`` by the fixed point ``alpha = gamma / |m|^2``,
    ``beta = (N - gamma) / |t - f·m|^2`` (MacKay), with ``gamma = sum(s / (s + alpha/beta))``
    over the eigenvalues ``s`` of ``fᵀf``. Unlike the reference's fast path, the ``F - rank``
    zero eigenvalues are counted in the log-determinant when ``N < F``, so the value equals
    the reference ICML formulation in every case.

    Args:
        features: ``(N, F)`` raw features (not standardised, as in the paper).
        y: ``(N,)`` class indices ``0..K-1``.
        max_iter, tol: fixed-point iterations and relative tolerance on ``alpha/beta``.

    Returns:
        mean over classes of ``evidence / N`` (a float, usually in about ``[-2, 2]``).

    Example:
        >>> rng = np.random.default_rng(0)
        >>> y = rng.integers(0, 2, 200)
        >>> logme(np.c_[y + 0.1 * rng.normal(size=200), rng.normal(size=(200, 5))], y) > \
        ...     logme(rng.normal(size=(200, 6)), y)
        True
    """
    f, y = _check(features, y, "logme")
    N, D = f.shape
    u, s, vh = np.linalg.svd(f, full_matrices=False)  # thin SVD: u (N, k), s (k,)
    keep = s > 1e-10 * max(1.0, s.max(initial=0.0))
    u, s = u[:, keep], s[keep]
    sigma = (s ** 2)[:, None]  # (k, 1) nonzero eigenvalues of fᵀf
    k = len(s)
    classes = np.arange(int(y.max()) + 1)
    Y = (y[:, None] == classes[None, :]).astype(np.float64)  # (N, K) one-hot targets
    x2 = (u.T @ Y) ** 2  # (k, K)
    res_x2 = (Y ** 2).sum(0) - x2.sum(0)  # (K,) part of |t|^2 outside the span of f
    alpha, beta = np.ones(len(classes)), np.ones(len(classes))
    active = np.ones(len(classes), dtype=bool)
    for _ in range(max_iter):
        t = alpha / beta
        gamma = (sigma / (sigma + t)).sum(0)
        m2 = (sigma * x2 / (t + sigma) ** 2).sum(0)
        res2 = (x2 / (1 + sigma / t) ** 2).sum(0) + res_x2
        new_alpha, new_beta = gamma / (m2 + 1e-5), (N - gamma) / (res2 + 1e-5)
        alpha, beta = np.where(active, new_alpha, alpha), np.where(active, new_beta, beta)
        active &= np.abs(alpha / beta - t) / t > tol
        if not active.any():
            break
    t = alpha / beta
    m2 = (sigma * x2 / (t + sigma) ** 2).sum(0)
    res2 = (x2 / (1 + sigma / t) ** 2).sum(0) + res_x2
    logdet = np.log(alpha + beta * sigma).sum(0) + (D - k) * np.log(alpha)
    evidence = (D / 2 * np.log(alpha) + N / 2 * np.log(beta) - 0.5 * logdet - beta / 2 * res2
                - alpha / 2 * m2 - N / 2 * np.log(2 * np.pi))
    return float(np.mean(evidence / N))


def leep(source_proba: np.ndarray, y: np.ndarray) -> float:
    """LEEP score from source-class probabilities ``(N, Z)`` and target labels ``y (N,)``.

    ``P(y, z) = mean_i theta_z(x_i) [y_i = y]``, ``P(y | z) = P(y, z) / P(z)``, and
    ``LEEP = mean_i log sum_z P(y_i | z) theta_z(x_i)``. Always ``<= 0``; higher is better.

    Example:
        >>> leep(np.array([[0.9, 0.1], [0.2, 0.8]]), np.array([0, 1]))  # doctest: +ELLIPSIS
        -0.2...
    """
    theta, y = _check(source_proba, y, "leep")
    if (theta < 0).any() or not np.allclose(theta.sum(1), 1.0, atol=1e-4):
        raise DataError("leep expects source-class probabilities (rows >= 0 summing to 1), e.g. the softmax of an "
                        "ImageNet head. Got rows summing to "
                        f"[{theta.sum(1).min():.3g}, {theta.sum(1).max():.3g}].")
    N = len(y)
    Y = (y[:, None] == np.arange(int(y.max()) + 1)[None, :]).astype(np.float64)  # (N, K)
    joint = Y.T @ theta / N  # (K, Z)
    cond = joint / np.maximum(joint.sum(0, keepdims=True), 1e-300)  # P(y | z)
    eep = (theta @ cond.T)[np.arange(N), y]  # (N,)
    return float(np.mean(np.log(np.maximum(eep, 1e-300))))


def probe_auc(features: np.ndarray, y: np.ndarray, groups: np.ndarray | None = None, *, n_splits: int = 5,
              C: float = 1.0, seed: int = 0) -> float:
    """Out-of-fold ROC AUC of a scaled logistic probe under grouped stratified k-fold.

    One fixed ``C`` (no inner search: this is a quick score). Multiclass: macro one-vs-rest.

    Example:
        >>> probe_auc(feats, y, groups=patient_ids, n_splits=5)  # doctest: +SKIP
        0.87
    """
    f, y = _check(features, y, "probe_auc")
    if not isinstance(n_splits, int) or isinstance(n_splits, bool) or n_splits < 2:
        raise ConfigError(f"The 'n_splits' parameter of probe_auc must be an int >= 2. Got {n_splits!r} instead.")
    groups = np.arange(len(y)) if groups is None else np.asarray(groups)
    classes = np.unique(y)
    per_class = min(len(np.unique(groups[y == c])) for c in classes)
    if len(classes) < 2 or per_class < n_splits:
        raise DataError(f"probe_auc needs >= 2 classes each held by >= {n_splits} patients; the smallest class "
                        f"has {per_class}. Lower n_splits or add data.")
    oof = np.zeros((len(y), len(classes)))
    for tr, te in StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed).split(f, y, groups):
        probe = LinearProbe(C_grid=[C]).fit(f[tr], y[tr])
        oof[np.ix_(te, np.searchsorted(classes, probe.classes_))] = probe.predict_proba(f[te])
    if len(classes) == 2:
        return float(roc_auc_score(y, oof[:, 1]))
    return float(roc_auc_score(y, oof, multi_class="ovr", labels=classes))


def _check(a: np.ndarray, y: np.ndarray, func: str) -> tuple[np.ndarray, np.ndarray]:
    a, y = np.asarray(a, dtype=np.float64), np.asarray(y)
    if a.ndim != 2 or y.ndim != 1 or len(a) != len(y):
        raise DataError(f"{func} expects a 2-D (N, F) array and 1-D labels (N,). Got shapes {a.shape} and {y.shape}.")
    if len(y) < 2 or not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
        raise DataError(f"{func} expects >= 2 samples with integer class indices >= 0. Got {len(y)} samples of "
                        f"dtype {y.dtype}.")
    if not np.isfinite(a).all():
        raise DataError(f"{func}: the input holds {int((~np.isfinite(a)).sum())} NaN/Inf values.")
    return a, y.astype(np.int64)
