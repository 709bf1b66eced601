"""Calibration (ECE, Brier, temperature scaling) and statistics (DeLong, multiclass, QWK)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import brier_score_loss, roc_auc_score

from medtl.errors import ConfigError, DataError
from medtl.evaluate.calibration import (TemperatureScaler, brier_score, calibration_metrics,
                                        expected_calibration_error, reliability_bins)
from medtl.evaluate.stats import _fast_delong, delong_test, multiclass_metrics


def _overconfident(n=400, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    logit = (2 * y - 1) * 1.0 + rng.normal(0, 1.5, n)
    p1 = 1 / (1 + np.exp(-4 * logit))  # logits inflated 4x: over-confident
    return y, np.column_stack([1 - p1, p1])


def test_ece_zero_for_perfectly_calibrated_bins_and_positive_for_overconfident():
    y = np.array([0] * 8 + [1] * 2 + [0] * 2 + [1] * 8)
    p1 = np.array([0.2] * 10 + [0.8] * 10)
    assert expected_calibration_error(y, p1) == pytest.approx(0.0, abs=1e-12)
    yo, po = _overconfident()
    assert expected_calibration_error(yo, po) > 0.1


def test_brier_matches_sklearn_binary_times_two():
    y, p = _overconfident()
    assert brier_score(y, p) == pytest.approx(2 * brier_score_loss(y, p[:, 1]))


def test_temperature_scaling_softens_overconfident_model_and_lowers_ece_on_new_data():
    y, p = _overconfident(seed=0)
    ts = TemperatureScaler().fit(p, y)
    assert ts.temperature_ > 2.0  # the logits were inflated 4x
    assert ts.nll_after_ < ts.nll_before_
    y2, p2 = _overconfident(seed=1)  # fitted on one split, applied to another
    before, after = calibration_metrics(y2, p2), calibration_metrics(y2, ts.transform(p2))
    assert after["ece"] < before["ece"] and after["nll"] < before["nll"]
    # monotone for binary tasks: ranking (AUC) unchanged
    assert roc_auc_score(y2, ts.transform(p2)[:, 1]) == pytest.approx(roc_auc_score(y2, p2[:, 1]))


def test_temperature_scaler_contract_and_errors():
    with pytest.raises(ConfigError, match="not fitted"):
        TemperatureScaler().transform(np.array([[0.5, 0.5]]))
    with pytest.raises(DataError, match="NaN"):
        TemperatureScaler().fit(np.array([[np.nan, 1.0], [0.5, 0.5]]), np.array([0, 1]))
    ts = TemperatureScaler().fit(np.array([[0.9, 0.1], [0.8, 0.2]]), np.array([0, 0]))  # one class: identity
    assert ts.temperature_ == 1.0


def test_reliability_bins_counts_every_case():
    y, p = _overconfident()
    b = reliability_bins(y, p, n_bins=5)
    assert b["count"].sum() == len(y) and len(b["edges"]) == 6


def _brute_delong_var(y, s):
    pos, neg = s[y == 1], s[y == 0]
    psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    v10, v01 = psi.mean(1), psi.mean(0)
    return np.var(v10, ddof=1) / len(pos) + np.var(v01, ddof=1) / len(neg)


def test_delong_auc_and_variance_match_brute_force():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 120)
    s = np.round(y + rng.normal(0, 1.2, 120), 1)  # ties on purpose
    order = np.argsort(-y, kind="mergesort")
    aucs, cov = _fast_delong(s[order][None], int(y.sum()))
    assert aucs[0] == pytest.approx(roc_auc_score(y, s))
    assert cov[0, 0] == pytest.approx(_brute_delong_var(y, s), rel=1e-9)


def test_delong_detects_a_better_model_and_not_an_identical_one():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    good, bad = y + rng.normal(0, 0.7, 300), y + rng.normal(0, 3, 300)
    res = delong_test(y, good, bad)
    assert res["diff"] > 0 and res["p_value"] < 0.01 and res["ci"][0] > 0
    same = delong_test(y, good, good)
    assert same["p_value"] == 1.0 and same["diff"] == 0.0
    with pytest.raises(DataError, match="same length"):
        delong_test(y, good, bad[:-1])
    with pytest.raises(DataError, match="both positive and negative"):
        delong_test(np.ones(5), np.arange(5), np.arange(5))


def test_multiclass_macro_micro_auc_and_qwk():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 200)
    logits = np.eye(4)[y] * 2 + rng.normal(0, 1, (200, 4))
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    m = multiclass_metrics(y, p, ordinal=True)
    assert m["auc_macro"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr", average="macro"))
    assert 0.5 < m["auc_micro"] <= 1 and 0 < m["qwk"] <= 1
    perfect = multiclass_metrics(y, np.eye(4)[y] * 0.9 + 0.025, ordinal=True)
    assert perfect["qwk"] == pytest.approx(1.0)
