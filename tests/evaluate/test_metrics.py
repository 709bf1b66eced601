"""Metrics against hand-computed values and scikit-learn; the patient-level bootstrap."""

from __future__ import annotations

import re
import time
import warnings

import numpy as np
import pytest
from sklearn import metrics as skm

from medtl.errors import ConfigError, DataError
from medtl.evaluate.metrics import (
    METRIC_KEYS,
    _weighted_metrics,
    bootstrap_ci,
    compute_metrics,
    youden_threshold,
)

Y_BIN = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
P_BIN = np.array([0.9, 0.8, 0.6, 0.3, 0.7, 0.4, 0.2, 0.1, 0.55, 0.05])


def _two_col(p1: np.ndarray) -> np.ndarray:
    return np.column_stack([1.0 - p1, p1])


def _scores(n: int, n_classes: int, rng: np.random.Generator, signal: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    y = rng.integers(0, n_classes, n)
    logits = np.round(rng.normal(size=(n, n_classes)), 1)  # rounding makes ties
    logits[np.arange(n), y] += signal
    p = np.exp(logits)
    return y, p / p.sum(axis=1, keepdims=True)


def test_binary_hand_computed():
    # predictions at 0.5: TP=3 (0.9, 0.8, 0.6), FN=1 (0.3), FP=2 (0.7, 0.55), TN=4
    m = compute_metrics(Y_BIN, _two_col(P_BIN))
    assert set(m) == set(METRIC_KEYS)
    assert m["acc"] == pytest.approx(7 / 10)
    assert m["sensitivity"] == pytest.approx(3 / 4)
    assert m["specificity"] == pytest.approx(4 / 6)
    assert m["balanced_acc"] == pytest.approx((3 / 4 + 4 / 6) / 2)
    assert m["f1"] == pytest.approx(2 * 3 / (2 * 3 + 2 + 1))
    assert m["auc"] == pytest.approx(20 / 24)  # 20 of 24 (pos, neg) pairs ranked right
    # threshold: at 0.75 only 0.9 and 0.8 are positive
    m75 = compute_metrics(Y_BIN, _two_col(P_BIN), threshold=0.75)
    assert (m75["sensitivity"], m75["specificity"]) == (0.5, 1.0)
    assert m75["auc"] == m["auc"]
    # p == threshold counts as positive; a 1-D proba means P(class 1)
    assert compute_metrics([1, 0], [0.5, 0.2])["sensitivity"] == 1.0
    assert compute_metrics(Y_BIN, P_BIN) == m


def test_three_class_hand_computed():
    y = np.array([0, 0, 1, 1, 2, 2])
    proba = np.array([
        [0.7, 0.2, 0.1],  # pred 0, true 0
        [0.3, 0.6, 0.1],  # pred 1, true 0
        [0.1, 0.8, 0.1],  # pred 1, true 1
        [0.2, 0.5, 0.3],  # pred 1, true 1
        [0.1, 0.2, 0.7],  # pred 2, true 2
        [0.5, 0.1, 0.4],  # pred 0, true 2
    ])
    m = compute_metrics(y, proba)
    assert m["acc"] == pytest.approx(4 / 6)
    assert m["sensitivity"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)  # macro recall
    assert m["balanced_acc"] == pytest.approx(m["sensitivity"])
    assert m["specificity"] == pytest.approx((3 / 4 + 3 / 4 + 4 / 4) / 3)
    assert m["f1"] == pytest.approx((2 / 4 + 4 / 5 + 2 / 3) / 3)
    # per-class OvR AUCs by hand: class 0: 7/8; class 1: 7/8; class 2: 8/8
    assert m["auc"] == pytest.approx((7 / 8 + 7 / 8 + 1) / 3)
    assert m["auc"] == pytest.approx(skm.roc_auc_score(y, proba, multi_class="ovr", average="macro"))


@pytest.mark.parametrize("n_classes", [2, 3, 5])
def test_matches_sklearn_on_random_data(n_classes):
    rng = np.random.default_rng(n_classes)
    for _ in range(10):
        y, p = _scores(150, n_classes, rng)
        m = compute_metrics(y, p)
        if n_classes == 2:
            pred = (p[:, 1] >= 0.5).astype(int)
            ref = {"auc": skm.roc_auc_score(y, p[:, 1]), "sensitivity": skm.recall_score(y, pred),
                   "specificity": skm.recall_score(y, pred, pos_label=0), "f1": skm.f1_score(y, pred)}
        else:
            pred = p.argmax(axis=1)
            cm = skm.confusion_matrix(y, pred)
            fp = cm.sum(axis=0) - np.diag(cm)
            tn = cm.sum() - cm.sum(axis=0) - cm.sum(axis=1) + np.diag(cm)
            ref = {"auc": skm.roc_auc_score(y, p, multi_class="ovr"),
                   "sensitivity": skm.recall_score(y, pred, average="macro"),
                   "specificity": float(np.mean(tn / (tn + fp))), "f1": skm.f1_score(y, pred, average="macro")}
        ref |= {"acc": skm.accuracy_score(y, pred), "balanced_acc": skm.balanced_accuracy_score(y, pred)}
        for key, want in ref.items():
            assert m[key] == pytest.approx(want, abs=1e-12), key


def test_undefined_metrics_are_nan_not_errors():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = compute_metrics(np.ones(4, dtype=int), _two_col(np.array([0.9, 0.2, 0.6, 0.7])))
        assert np.isnan(m["auc"]) and np.isnan(m["specificity"]) and np.isnan(m["balanced_acc"])
        assert m["sensitivity"] == pytest.approx(3 / 4) and m["acc"] == pytest.approx(3 / 4)
        # multiclass with a class absent from y_true: macro AUC and recall are undefined
        m3 = compute_metrics(np.array([0, 1, 0, 1]), np.full((4, 3), 1 / 3))
        assert np.isnan(m3["auc"]) and np.isnan(m3["sensitivity"]) and m3["acc"] == 0.5


def test_input_validation_messages():
    with pytest.raises(DataError, match="summing to 1.*softmax"):
        compute_metrics(Y_BIN, np.column_stack([P_BIN, P_BIN]))
    with pytest.raises(DataError, match="class indices 0..2 but 'proba' has 2 columns"):
        compute_metrics(np.array([0, 1, 2]), _two_col(np.array([0.1, 0.2, 0.3])))
    with pytest.raises(DataError, match="3 entries but 'proba' has 2 rows"):
        compute_metrics(np.array([0, 1, 1]), _two_col(np.array([0.1, 0.2])))
    with pytest.raises(ConfigError, match=re.escape(
            "The 'threshold' parameter of compute_metrics must be a float in the range [0.0, 1.0]. Got 1.5 instead.")):
        compute_metrics(Y_BIN, _two_col(P_BIN), threshold=1.5)
    g = np.arange(10)
    with pytest.raises(ConfigError, match=re.escape(
            "The 'n_boot' parameter of bootstrap_ci must be an int >= 1. Got 0 instead.")):
        bootstrap_ci(Y_BIN, _two_col(P_BIN), g, n_boot=0)
    with pytest.raises(ConfigError, match="'ci' parameter of bootstrap_ci"):
        bootstrap_ci(Y_BIN, _two_col(P_BIN), g, ci=95)
    with pytest.raises(DataError, match="one patient id per case"):
        bootstrap_ci(Y_BIN, _two_col(P_BIN), g[:5])


def test_weighted_kernel_equals_metrics_on_repeated_cases():
    """The bootstrap kernel with integer weights == compute_metrics on the repeated data."""
    rng = np.random.default_rng(7)
    for n_classes in (2, 3):
        y, p = _scores(120, n_classes, rng)
        w = rng.integers(0, 4, size=(5, len(y))).astype(float)
        got = _weighted_metrics(y, p, w, 0.5)
        for row in range(5):
            idx = np.repeat(np.arange(len(y)), w[row].astype(int))
            want = compute_metrics(y[idx], p[idx])
            for key in METRIC_KEYS:
                assert got[key][row] == pytest.approx(want[key], abs=1e-12, nan_ok=True), key


def test_bootstrap_structure_contains_point_and_is_reproducible():
    rng = np.random.default_rng(0)
    y, p = _scores(300, 2, rng)
    groups = np.arange(300) // 3
    res = bootstrap_ci(y, p, groups, n_boot=500, seed=1)
    point = compute_metrics(y, p)
    for key in METRIC_KEYS:
        lo, hi = res[key]["ci95"]
        assert res[key]["value"] == pytest.approx(point[key])
        assert lo <= res[key]["value"] <= hi and lo < hi
        assert res[key]["n_valid"] == 500
    assert res["_bootstrap"] == {"n_boot": 500, "n_valid": 500, "unit": "patient", "n_groups": 100,
                                 "ci": 0.95, "method": "percentile", "seed": 1}
    assert bootstrap_ci(y, p, groups, n_boot=500, seed=1) == res
    assert bootstrap_ci(y, p, groups, n_boot=500, seed=2)["auc"]["ci95"] != res["auc"]["ci95"]
    narrow = bootstrap_ci(y, p, groups, n_boot=500, seed=1, ci=0.5)["auc"]["ci95"]
    assert narrow[1] - narrow[0] < res["auc"]["ci95"][1] - res["auc"]["ci95"][0]


def _width(res: dict, key: str = "auc") -> float:
    lo, hi = res[key]["ci95"]
    return hi - lo


def test_bootstrap_narrows_with_more_patients():
    rng = np.random.default_rng(3)
    y_small, p_small = _scores(60, 2, rng)
    y_big, p_big = _scores(960, 2, rng)
    small = bootstrap_ci(y_small, p_small, np.arange(60), n_boot=400)
    big = bootstrap_ci(y_big, p_big, np.arange(960), n_boot=400)
    for key in ("auc", "acc", "sensitivity"):
        assert _width(big, key) < 0.5 * _width(small, key)  # ~ 1/sqrt(16) in theory


def test_bootstrap_resamples_patients_not_cases():
    """Copying each patient's case 10x adds no information: the patient bootstrap's CI
    stays as wide, while a case-level bootstrap (every copy its own 'patient') narrows it
    by about sqrt(10)."""
    rng = np.random.default_rng(5)
    y, p = _scores(80, 2, rng)
    base = bootstrap_ci(y, p, np.arange(80), n_boot=1000)
    y10, p10, patient10 = np.repeat(y, 10), np.repeat(p, 10, axis=0), np.repeat(np.arange(80), 10)
    by_patient = bootstrap_ci(y10, p10, patient10, n_boot=1000)
    by_case = bootstrap_ci(y10, p10, np.arange(800), n_boot=1000)
    assert by_patient["_bootstrap"]["n_groups"] == 80
    for key in ("auc", "acc"):
        assert by_patient[key]["value"] == pytest.approx(base[key]["value"])
        assert 0.75 < _width(by_patient, key) / _width(base, key) < 1.33
        assert _width(by_patient, key) > 2.0 * _width(by_case, key)


def test_bootstrap_drops_and_counts_undefined_resamples():
    # 10 patients, only one of them positive: ~0.9**10 = 35% of resamples have no positive
    y = np.array([0] * 18 + [1, 1])
    p = _two_col(np.linspace(0.05, 0.95, 20))
    groups = np.repeat(np.arange(10), 2)
    res = bootstrap_ci(y, p, groups, n_boot=1000, seed=0)
    assert 550 < res["auc"]["n_valid"] < 750
    assert res["sensitivity"]["n_valid"] == res["auc"]["n_valid"]
    assert res["acc"]["n_valid"] == res["specificity"]["n_valid"] == 1000
    assert res["_bootstrap"]["n_valid"] == res["auc"]["n_valid"]
    assert all(np.isfinite(res["auc"]["ci95"]))
    # no positive at all: the CI is [nan, nan], not an error
    none = bootstrap_ci(np.zeros(20, dtype=int), p, groups, n_boot=50)
    assert none["auc"]["n_valid"] == 0 and all(np.isnan(none["auc"]["ci95"]))


def test_bootstrap_speed_1000_resamples_800_cases():
    rng = np.random.default_rng(11)
    y, p = _scores(800, 2, rng)
    groups = np.arange(800) // 2
    start = time.perf_counter()
    bootstrap_ci(y, p, groups, n_boot=1000)
    assert time.perf_counter() - start < 3.0
    y3, p3 = _scores(800, 3, rng)
    start = time.perf_counter()
    res = bootstrap_ci(y3, p3, groups, n_boot=1000)
    assert time.perf_counter() - start < 3.0
    assert res["auc"]["n_valid"] == 1000


def test_youden_threshold():
    # thresholds 0.35 -> sens 1, spec 1
    assert youden_threshold(np.array([0, 0, 1, 1]), np.array([0.1, 0.3, 0.35, 0.8])) == 0.35
    thr = youden_threshold(Y_BIN, P_BIN)
    assert thr == 0.6  # J = 3/4 + 5/6 - 1, the best on this set
    m = compute_metrics(Y_BIN, P_BIN, threshold=thr)
    assert m["sensitivity"] + m["specificity"] - 1 == pytest.approx(3 / 4 + 5 / 6 - 1)
    with pytest.raises(DataError, match="both 0 and 1"):
        youden_threshold(np.zeros(4, dtype=int), np.array([0.1, 0.2, 0.3, 0.4]))
