"""Learning-curve statistics: the power-law fit, patients needed, the paired bootstrap, episodes."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medtl.errors import ConfigError, DataError
from medtl.evaluate.curve import (
    bootstrap_curve,
    curve_fit_summary,
    fit_power_law,
    mean_ci,
    patients_needed,
    power_law,
    sample_episode,
)
from medtl.evaluate.metrics import compute_metrics

N_SIZES = np.array([10.0, 20, 40, 80, 160, 320])


def test_the_fit_recovers_a_known_power_law_and_the_patients_a_target_needs():
    err = power_law(N_SIZES, 0.8, 0.45, 0.06)
    fit = fit_power_law(N_SIZES, err)
    assert fit["n_points"] == 6 and fit["rmse"] < 1e-6
    assert (fit["a"], fit["b"], fit["c"]) == pytest.approx((0.8, 0.45, 0.06), rel=1e-3)
    need = patients_needed(fit, 0.10)  # 0.8 n^-0.45 = 0.04  ->  n = 20^(1/0.45)
    assert need == pytest.approx(20 ** (1 / 0.45), rel=1e-3)
    assert power_law(need, fit["a"], fit["b"], fit["c"]) == pytest.approx(0.10)
    assert math.isinf(patients_needed(fit, 0.05))  # below the asymptote: never
    assert patients_needed(fit, 0.9) == 1.0  # already met with one patient
    assert math.isnan(patients_needed(None, 0.1))


def test_too_few_points_give_no_fit_and_nan_points_are_left_out():
    assert fit_power_law(N_SIZES[:2], np.array([0.3, 0.2])) is None
    err = power_law(N_SIZES, 0.8, 0.45, 0.06)
    err[2] = np.nan
    assert fit_power_law(N_SIZES, err)["n_points"] == 5
    with pytest.raises(DataError, match="same shape"):
        fit_power_law(N_SIZES, err[:3])


def _oof(y, quality, r, rng):
    """``(r, N, 2)`` probabilities whose separation grows with ``quality``."""
    s = np.clip(0.5 + (y - 0.5) * quality + rng.normal(scale=0.25, size=(r, len(y))), 0.01, 0.99)
    return np.stack([1 - s, s], axis=-1)


def test_bootstrap_curve_points_are_repeat_means_with_paired_draws():
    rng = np.random.default_rng(0)
    y = np.arange(120) % 2
    groups = np.arange(120) // 2  # two cases per patient
    probas = [_oof(y, q, r, rng) for q, r in ((0.1, 3), (0.3, 3), (0.6, 1))]
    res = bootstrap_curve(y, probas, groups, n_boot=200, seed=1)
    auc = res["metrics"]["auc"]
    assert len(auc) == 3 and res["draws"]["auc"].shape == (200, 3)
    for p, point in zip(probas, auc):
        assert point["value"] == pytest.approx(np.mean([compute_metrics(y, pr)["auc"] for pr in p]))
        lo, hi = point["ci95"]
        assert lo <= point["value"] <= hi and point["n_valid"] == 200
    assert auc[0]["value"] < auc[1]["value"] < auc[2]["value"]
    assert auc[2]["sd_repeats"] == 0.0 and auc[0]["sd_repeats"] > 0
    # the same seed gives the same draws; a second call is not a new sample
    again = bootstrap_curve(y, probas, groups, n_boot=200, seed=1)
    np.testing.assert_array_equal(again["draws"]["auc"], res["draws"]["auc"])
    assert res["bootstrap"]["n_groups"] == 60
    with pytest.raises(DataError, match=r"\(R, N, K\)"):
        bootstrap_curve(y, [probas[0][0]], groups)
    with pytest.raises(ConfigError, match="'n_boot' parameter"):
        bootstrap_curve(y, probas, groups, n_boot=5)


def test_summary_states_reached_extrapolated_or_not_reached_with_cis():
    rng = np.random.default_rng(0)
    truth = 1 - power_law(N_SIZES, 0.9, 0.5, 0.05)  # levels off at 0.95
    draws = truth + rng.normal(scale=0.01, size=(100, len(N_SIZES)))
    far = curve_fit_summary(N_SIZES, truth, draws, target=0.93, metric="auc")
    t = far["target"]
    assert t["status"] == "extrapolated" and t["patients"]["value"] > 320
    assert t["patients"]["value"] == pytest.approx((0.9 / 0.02) ** 2, rel=0.02)
    lo, hi = t["patients"]["ci95"]
    assert lo < t["patients"]["value"] and (hi is None or hi > t["patients"]["value"])
    assert "training patients" in t["statement"] and "x the largest size measured (320)" in t["statement"]
    fit = far["fit"]
    assert fit["c"]["ci95"][0] <= fit["c"]["value"] <= fit["c"]["ci95"][1]
    assert fit["asymptote"]["value"] == pytest.approx(0.95, abs=0.01)
    assert len(far["band"]["n"]) == len(far["band"]["lo"]) == 60
    near = curve_fit_summary(N_SIZES, truth, draws, target=0.85, metric="auc")["target"]
    assert near["status"] == "reached" and near["patients"]["value"] < 320 and "Measured: reached at" in near["statement"]
    never = curve_fit_summary(N_SIZES, truth, draws, target=0.99, metric="auc")["target"]
    assert never["status"] == "not_reached" and never["patients"]["value"] is None
    assert never["patients"]["ci95"][1] is None and never["p_not_reached"] > 0.5
    assert "not reached" in never["statement"]
    flat = curve_fit_summary(N_SIZES[:2], truth[:2], draws[:, :2], target=0.9)
    assert flat["fit"] is None and flat["target"]["status"] == "no_fit"
    assert curve_fit_summary(N_SIZES, truth, draws, target=None)["target"] is None


def test_episodes_draw_k_patients_per_class_and_query_everyone_else():
    y = np.repeat([0, 1, 0, 1, 2, 2, 0, 1, 2, 0, 1, 2], 2)
    groups = np.repeat(np.arange(12), 2)
    rng = np.random.default_rng(0)
    support, query = sample_episode(y, groups, 2, rng)
    assert len(support) == 6 and np.bincount(y[support]).tolist() == [2, 2, 2]
    assert len(set(groups[support].tolist())) == 6  # each support case from its own patient
    assert not set(groups[support].tolist()) & set(groups[query].tolist())
    assert len(query) == len(y) - 12  # every case of every other patient
    other = sample_episode(y, groups, 2, np.random.default_rng(1))[0]
    assert sorted(support.tolist()) != sorted(other.tolist())
    with pytest.raises(DataError, match="at least 5 patients of every class"):
        sample_episode(y, groups, 4, rng)
    with pytest.raises(ConfigError, match="'k' parameter"):
        sample_episode(y, groups, 0, rng)


def test_mean_ci_is_the_t_interval_of_the_defined_values():
    res = mean_ci([1.0, 2.0, 3.0, np.nan])
    assert res["mean"] == 2.0 and res["n"] == 3 and res["sd"] == 1.0
    assert res["ci95"] == pytest.approx([2 - 4.302653 / math.sqrt(3), 2 + 4.302653 / math.sqrt(3)], rel=1e-6)
    assert mean_ci([0.5])["n"] == 1 and mean_ci([])["n"] == 0
