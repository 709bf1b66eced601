"""Learning-curve statistics: metrics by training-set size, a power-law fit, patients needed, episodes.

Arrays in, numbers out; nothing here trains a model.

* :func:`bootstrap_curve`: every metric at every training-set size as the mean over repeats of
  the pooled out-of-fold metric, with a 95 % CI from a two-level bootstrap: test patients are
  resampled (the same draw at every size, so the sizes stay paired) and the repeats (training
  subsamples) are resampled within each size.
* :func:`fit_power_law`: ``err(n) = a * n**(-b) + c`` with ``err = 1 - metric`` (every metric
  here is higher-better in [0, 1]); ``1 - c`` is the metric the curve levels off at.
* :func:`curve_fit_summary`: the fit on the point estimates, refitted on every bootstrap draw
  for CIs of ``a``, ``b``, ``c``, of the fitted curve, and of the patients a target metric needs.
* :func:`sample_episode` and :func:`mean_ci`: N-way K-shot episodes with disjoint patients, and
  the mean over episodes with its t-interval.

Example:
    >>> n = np.array([20, 40, 80, 160, 320]); auc = 1 - (0.9 * n ** -0.5 + 0.05)
    >>> fit = fit_power_law(n, 1 - auc)
    >>> round(fit["c"], 3), patients_needed(fit, 1 - 0.9) > 320
    (0.05, True)
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from scipy import stats

from medtl.errors import ConfigError, DataError
from medtl.evaluate.metrics import METRIC_KEYS, _weighted_metrics

__all__ = ["bootstrap_curve", "curve_fit_summary", "fit_power_law", "fit_power_laws", "mean_ci", "patients_needed", "power_law",
           "sample_episode"]

_B_MAX = 3.0  # steeper than n^-3 is not a learning curve
_NEVER = 1e300  # stands for "never reached" in percentiles


def power_law(n: np.ndarray | float, a: float, b: float, c: float) -> np.ndarray:
    """``a * n**(-b) + c``: the error at ``n`` training patients."""
    return a * np.power(np.asarray(n, dtype=np.float64), -b) + c


def fit_power_law(n: np.ndarray, err: np.ndarray, sigma: np.ndarray | None = None) -> dict | None:
    """Weighted least squares ``err(n) = a * n**(-b) + c`` with ``a >= 0``, ``0 <= b <= 3``, ``0 <= c <= 1``.

    Args:
        n: ``(S,)`` training patients at each size (> 0).
        err: ``(S,)`` error (``1 - metric``) at each size; NaN points are left out.
        sigma: ``(S,)`` standard error of each point (weights ``1 / sigma**2``); ``None``: equal weights.

    Returns:
        ``{"a", "b", "c", "rmse", "n_points"}``, or ``None`` when fewer than 3 points are defined.
    """
    n, err = np.asarray(n, dtype=np.float64), np.asarray(err, dtype=np.float64)
    if n.shape != err.shape or n.ndim != 1:
        raise DataError(f"fit_power_law expects 'n' and 'err' of the same shape (S,). Got {n.shape} and "
                        f"{err.shape} instead.")
    return fit_power_laws(n, err[None], sigma)[0]


def fit_power_laws(n: np.ndarray, err: np.ndarray, sigma: np.ndarray | None = None) -> list[dict | None]:
    """:func:`fit_power_law` of every row of ``err (B, S)`` at once (bootstrap draws).

    Variable projection: for a fixed exponent ``b`` the model is linear in ``a`` and ``c``, which
    have a closed-form constrained least-squares solution; ``b`` is searched on a grid of step
    0.01 over ``[0, 3]`` and refined by a parabola through the best grid point and its neighbours.
    """
    n, E = np.asarray(n, dtype=np.float64), np.atleast_2d(np.asarray(err, dtype=np.float64))
    w = np.ones(n.shape) if sigma is None else 1.0 / np.maximum(np.asarray(sigma, dtype=np.float64), 1e-3) ** 2
    ok = np.isfinite(E) & (np.isfinite(n) & (n > 0) & np.isfinite(w))[None]
    W = np.where(ok, w[None], 0.0)  # (B, S)
    Ec = np.where(ok, np.clip(E, 0.0, 1.0), 0.0)
    logn = np.log(np.where(n > 0, n, 1.0))
    grid = np.linspace(0.0, _B_MAX, round(_B_MAX / 0.01) + 1)
    sse = np.stack([_ac_for_b(np.exp(-b * logn), Ec, W)[2] for b in grid], axis=1)  # (B, G)
    best = np.argmin(sse, axis=1)
    out: list[dict | None] = []
    for i in range(len(E)):
        if ok[i].sum() < 3:
            out.append(None)
            continue
        j, b = best[i], grid[best[i]]
        if 0 < j < len(grid) - 1:  # parabola through the neighbours
            y0, y1, y2 = sse[i, j - 1], sse[i, j], sse[i, j + 1]
            den = y0 - 2 * y1 + y2
            if den > 0:
                b = float(np.clip(b + 0.5 * (grid[1] - grid[0]) * (y0 - y2) / den, grid[j - 1], grid[j + 1]))
        x = np.exp(-b * logn)
        a, c, _ = (v[0] for v in _ac_for_b(x, Ec[i:i + 1], W[i:i + 1]))
        m = ok[i]
        rmse = float(np.sqrt(np.mean((a * x[m] + c - Ec[i, m]) ** 2)))
        out.append({"a": float(a), "b": float(b), "c": float(c), "rmse": rmse, "n_points": int(m.sum())})
    return out


def _ac_for_b(x: np.ndarray, E: np.ndarray, W: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weighted least-squares ``a >= 0``, ``0 <= c <= 1`` of ``E ~ a x + c`` per row; ``(a, c, sse)``, each ``(B,)``."""
    sw = W.sum(1)
    sw = np.where(sw > 0, sw, 1.0)
    mx, me = (W * x).sum(1) / sw, (W * E).sum(1) / sw
    vx = (W * (x - mx[:, None]) ** 2).sum(1)
    cov = (W * (x - mx[:, None]) * (E - me[:, None])).sum(1)
    a = np.where(vx > 1e-15, cov / np.where(vx > 1e-15, vx, 1.0), 0.0)
    c = me - a * mx
    neg = a < 0  # the best line rises with n: flat at the mean
    a, c = np.where(neg, 0.0, a), np.where(neg, me, c)
    sxx = np.maximum((W * x * x).sum(1), 1e-300)
    for bound in (0.0, 1.0):  # c outside [0, 1]: pin it and refit a through that intercept
        out = (c < bound) if bound == 0.0 else (c > bound)
        a_b = np.maximum((W * x * (E - bound)).sum(1) / sxx, 0.0)
        a, c = np.where(out, a_b, a), np.where(out, bound, c)
    sse = (W * (E - a[:, None] * x - c[:, None]) ** 2).sum(1)
    return a, c, sse


def patients_needed(fit: dict | None, target_err: float) -> float:
    """Training patients at which the fitted error falls to ``target_err``.

    ``inf`` when the fit levels off at or above ``target_err`` (never reached), ``nan`` without
    a fit; at least 1.
    """
    if fit is None:
        return float("nan")
    a, b, c = fit["a"], fit["b"], fit["c"]
    gap = target_err - c
    if gap <= 0:
        return float("inf")
    if a <= 0:
        return 1.0
    if b <= 0:  # a flat curve at a + c
        return 1.0 if a <= gap else float("inf")
    return max(1.0, (a / gap) ** (1.0 / b))


def bootstrap_curve(y: np.ndarray, proba: list[np.ndarray], groups: np.ndarray, *,
                    thresholds: list[np.ndarray] | None = None, n_boot: int = 1000, seed: int = 0) -> dict:
    """Every metric at every size: mean over repeats of the pooled out-of-fold metric, with CIs.

    Args:
        y: ``(N,)`` class of each case.
        proba: one ``(R_s, N, K)`` array per size: out-of-fold probabilities of ``R_s`` repeats
            (every case predicted once per repeat, by a model that never saw its patient).
        groups: ``(N,)`` patient of each case.
        thresholds: binary decision thresholds, one ``(R_s,)`` array per size (default 0.5).
        n_boot: bootstrap draws (>= 10).
        seed: seed of the draws.

    Returns:
        ``{"metrics": {key: [{"value", "ci95", "sd_repeats", "n_valid"}] * S}, "draws": {key: (n_boot, S)},
        "bootstrap": {...}}``. ``draws`` holds each draw's repeat-mean metric (NaN where undefined):
        what :func:`curve_fit_summary` refits. The same ``seed`` and patients draw the same patients,
        so the draws of two strategies on the same cases are paired (their difference has a CI).

    Example:
        >>> res = bootstrap_curve(y, [p_small, p_large], groups, n_boot=200)      # doctest: +SKIP
        >>> res["metrics"]["auc"][1]["ci95"]                                      # doctest: +SKIP
        [0.81, 0.88]
    """
    y = np.asarray(y)
    sizes = [np.asarray(p, dtype=np.float64) for p in proba]
    for p in sizes:
        if p.ndim != 3 or p.shape[1] != len(y) or len(p) == 0:
            raise DataError(f"bootstrap_curve expects one (R, N, K) array per size with N = {len(y)} cases and "
                            f"R >= 1. Got {p.shape} instead.")
    if not isinstance(n_boot, int) or isinstance(n_boot, bool) or n_boot < 10:
        raise ConfigError(f"The 'n_boot' parameter of bootstrap_curve must be an int >= 10. Got {n_boot!r} instead.")
    S = len(sizes)
    thr = [np.full(len(p), 0.5) if thresholds is None else np.broadcast_to(np.asarray(t, dtype=np.float64), len(p))
           for p, t in zip(sizes, thresholds or [None] * S)]
    _, gi = np.unique(np.asarray(groups), return_inverse=True)
    gi = gi.ravel()
    n_groups = int(gi.max()) + 1
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n_groups, np.full(n_groups, 1.0 / n_groups), size=n_boot)
    weights = counts[:, gi].astype(np.float64)  # (B, N): every size sees the same patients
    ones = np.ones((1, len(y)))
    out: dict[str, list] = {k: [] for k in METRIC_KEYS}
    draws = {k: np.empty((n_boot, S)) for k in METRIC_KEYS}
    for s, p in enumerate(sizes):
        R = len(p)
        pick = rng.integers(0, R, size=(n_boot, R))  # the repeats, drawn with replacement
        point = {k: np.empty(R) for k in METRIC_KEYS}
        boot = {k: np.empty((n_boot, R)) for k in METRIC_KEYS}
        for r in range(R):
            pt = _weighted_metrics(y, p[r], ones, float(thr[s][r]))
            bt = _weighted_metrics(y, p[r], weights, float(thr[s][r]))
            for k in METRIC_KEYS:
                point[k][r], boot[k][:, r] = pt[k][0], bt[k]
        for k in METRIC_KEYS:
            draws[k][:, s] = np.take_along_axis(boot[k], pick, axis=1).mean(axis=1)
            valid = np.isfinite(draws[k][:, s])
            lo, hi = (np.percentile(draws[k][valid, s], [2.5, 97.5]).tolist() if valid.any()
                      else [float("nan")] * 2)
            out[k].append({"value": float(np.mean(point[k])), "ci95": [float(lo), float(hi)],
                           "sd_repeats": float(np.std(point[k], ddof=1)) if R > 1 else 0.0,
                           "n_valid": int(valid.sum())})
    info = {"n_boot": n_boot, "unit": "patient (test), then repeat (training subsample) within each size",
            "n_groups": n_groups, "ci": 0.95, "method": "percentile", "seed": int(seed)}
    return {"metrics": out, "draws": draws, "bootstrap": info}


def curve_fit_summary(n: np.ndarray, value: np.ndarray, draws: np.ndarray, *, target: float | None,
                      metric: str = "auc", n_grid: int = 60) -> dict:
    """Power-law fit of a higher-better metric with bootstrap CIs, and the patients a target needs.

    Args:
        n: ``(S,)`` training patients at each size.
        value: ``(S,)`` the metric at each size (the point estimates).
        draws: ``(B, S)`` the metric in each bootstrap draw (:func:`bootstrap_curve`), refitted one by one.
        target: the metric to reach (e.g. 0.90 AUC), or ``None``.
        metric: its name, for the statement.
        n_grid: points of the fitted band (log-spaced).

    Returns:
        ``{"model", "fit": {"a", "b", "c", "asymptote"} each as ``{"value", "ci95"}``, "rmse",
        "band": {"n", "value", "lo", "hi"}, "target": {...} or None}``; ``fit`` is ``None`` when the
        points cannot be fitted. ``target`` holds ``patients`` (``{"value", "ci95"}``, ``null`` for
        "not reached"), ``status`` (``reached``: within the measured sizes, ``extrapolated``,
        ``not_reached``: the fit levels off below the target), ``p_not_reached`` (share of draws
        that never reach it) and a one-line ``statement``.
    """
    n, value, draws = (np.asarray(n, dtype=np.float64), np.asarray(value, dtype=np.float64),
                       np.asarray(draws, dtype=np.float64))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a size whose metric is undefined in every draw
        sigma = np.nanstd(draws, axis=0)
    good = np.isfinite(sigma) & (sigma > 0)
    sigma = np.where(good, sigma, np.median(sigma[good]) if good.any() else 1.0)
    base = fit_power_law(n, 1.0 - value, sigma)
    model = "1 - metric = a * n^(-b) + c (n: training patients), least squares weighted by 1 / bootstrap variance"
    if base is None:
        return {"model": model, "fit": None, "rmse": None, "band": None,
                "target": None if target is None else {
                    "metric": metric, "value": float(target), "patients": None, "status": "no_fit",
                    "p_not_reached": None,
                    "statement": f"{metric.upper()} {target:g}: no power law could be fitted (fewer than 3 "
                                 "defined sizes, or the optimiser did not converge)."}}
    fits = fit_power_laws(n, 1.0 - draws, sigma)
    fits = [f for f in fits if f is not None]
    grid = np.geomspace(max(1.0, n.min() * 0.8), n.max() * 4.0, n_grid)
    curves = np.array([1.0 - power_law(grid, f["a"], f["b"], f["c"]) for f in fits]) if fits else None

    def est(name: str, fn=lambda f, k: f[k]) -> dict:
        vals = np.array([fn(f, name) for f in fits]) if fits else np.array([])
        ci = np.percentile(vals, [2.5, 97.5]).tolist() if len(vals) else [None, None]
        return {"value": fn(base, name), "ci95": ci}

    fit = {k: est(k) for k in ("a", "b", "c")}
    fit["asymptote"] = est("c", lambda f, k: 1.0 - f["c"])
    band = {"n": grid.tolist(), "value": (1.0 - power_law(grid, base["a"], base["b"], base["c"])).tolist(),
            "lo": np.percentile(curves, 2.5, axis=0).tolist() if curves is not None else None,
            "hi": np.percentile(curves, 97.5, axis=0).tolist() if curves is not None else None}
    out = {"model": model, "fit": fit, "rmse": base["rmse"], "n_fits": len(fits), "band": band, "target": None}
    if target is not None:
        out["target"] = _target_summary(base, fits, float(target), metric, float(n.max()), n, value)
    return out


def _target_summary(base: dict, fits: list[dict], target: float, metric: str, n_max: float, n: np.ndarray,
                    value: np.ndarray) -> dict:
    need = patients_needed(base, 1.0 - target)
    boot = np.array([patients_needed(f, 1.0 - target) for f in fits]) if fits else np.array([np.nan])
    boot = boot[~np.isnan(boot)]
    p_inf = float(np.mean(np.isinf(boot))) if len(boot) else None
    if len(boot):  # "never" sorts last: a bound among the never-reaching draws is "not reached"
        lo, hi = np.percentile(np.where(np.isinf(boot), _NEVER, boot), [2.5, 97.5], method="lower")
        ci = [None if lo >= _NEVER else float(lo), None if hi >= _NEVER else float(hi)]
    else:
        ci = [None, None]
    seen = [round(x) for x, v in zip(n, value) if np.isfinite(v) and v >= target]
    name = metric.upper() if metric == "auc" else metric
    ci_text = f"95% CI {_count(ci[0])} to {_count(ci[1])}"
    if math.isinf(need):
        status, patients = "not_reached", None
        top = np.percentile([1.0 - f["c"] for f in fits], [2.5, 97.5]) if fits else [np.nan, np.nan]
        statement = (f"{name} {target:g} is not reached: the fitted curve levels off at {1 - base['c']:.3f} "
                     f"(95% CI {top[0]:.3f} to {top[1]:.3f}); {p_inf:.0%} of the bootstrap refits never reach it.")
    elif need <= n_max:
        status, patients = "reached", float(need)
        statement = (f"{name} {target:g} is reached at about {_count(need)} training patients ({ci_text}), "
                     f"within the measured sizes (up to {round(n_max)}).")
    else:
        status, patients = "extrapolated", float(need)
        far = " far beyond the measured range: treat it as a rough guide" if need > 10 * n_max else ""
        statement = (f"{name} {target:g} would need about {_count(need)} training patients ({ci_text}), "
                     f"{need / n_max:.1f}x the largest size measured ({round(n_max)}),{far or ' extrapolated'}.")
    if seen:
        statement += f" Measured: reached at {min(seen)} patients."
    return {"metric": metric, "value": target, "patients": {"value": patients, "ci95": ci}, "status": status,
            "p_not_reached": p_inf, "largest_measured": n_max, "statement": statement}


def _count(x: float | None) -> str:
    return "never" if x is None or not math.isfinite(x) else f"{round(x):,}"


def sample_episode(y: np.ndarray, groups: np.ndarray, k: int, rng: np.random.Generator,
                   classes: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One N-way K-shot episode: ``k`` support cases per class from distinct patients; the query is
    every case of every other patient.

    Args:
        y: ``(N,)`` class of each case; groups: ``(N,)`` patient of each case.
        k: shots per class (>= 1).
        rng: the episode's generator.
        classes: the N ways (default: every class in ``y``).

    Returns:
        ``(support_idx (N_ways * k,), query_idx)``; no patient is on both sides.

    Raises:
        DataError: a class has fewer than ``k + 1`` patients (nothing of it left to query).
    """
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise ConfigError(f"The 'k' parameter of sample_episode must be an int >= 1. Got {k!r} instead.")
    y, g = np.asarray(y), np.asarray(groups)
    classes = np.unique(y) if classes is None else np.asarray(classes)
    taken: set = set()
    support = []
    for c in classes:
        patients = np.unique(g[y == c])
        free = np.array([p for p in patients if p not in taken], dtype=patients.dtype)
        if len(free) < k + 1:
            raise DataError(f"A {k}-shot episode needs at least {k + 1} patients of every class ({k} to learn "
                            f"from, >= 1 to test); class {c!r} has {len(free)}. Lower curve.shots to at most "
                            f"{max(len(free) - 1, 0)}.")
        for p in rng.choice(free, size=k, replace=False):
            taken.add(p)
            support.append(int(rng.choice(np.flatnonzero((g == p) & (y == c)))))
    query = np.flatnonzero(~np.isin(g, np.array(sorted(taken, key=str), dtype=g.dtype)))
    return np.array(support, dtype=np.int64), query.astype(np.int64)


def mean_ci(values: np.ndarray | list[float]) -> dict:
    """``{"mean", "ci95", "sd", "n"}`` over the defined values, with the t-interval of the mean."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return {"mean": float("nan"), "ci95": [float("nan")] * 2, "sd": float("nan"), "n": 0}
    if len(v) == 1:
        return {"mean": float(v[0]), "ci95": [float("nan")] * 2, "sd": 0.0, "n": 1}
    m, sd = float(v.mean()), float(v.std(ddof=1))
    h = float(stats.t.ppf(0.975, len(v) - 1)) * sd / math.sqrt(len(v))
    return {"mean": m, "ci95": [m - h, m + h], "sd": sd, "n": len(v)}
