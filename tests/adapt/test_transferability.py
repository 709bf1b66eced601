"""LogME and LEEP: informative features / source predictions outscore random ones; LogME matches
the reference (ICML 2021) evidence formula; the quick probe AUC."""

from __future__ import annotations

import numpy as np
import pytest

from medtl.adapt.transferability import leep, logme, probe_auc
from medtl.errors import ConfigError, DataError


def _icml_logme(f: np.ndarray, y: np.ndarray) -> float:
    """Direct transcription of the ICML 2021 algorithm (D x D eigendecomposition, per class)."""
    N, D = f.shape
    v, s, vh = np.linalg.svd(f.T @ f)
    out = []
    for k in range(int(y.max()) + 1):
        t = (y == k).astype(float)
        alpha = beta = lam = 1.0
        proj = vh @ (f.T @ t)
        for _ in range(200):
            gamma = (s / (s + lam)).sum()
            m = v @ (proj * beta / (alpha + beta * s))
            a_de, b_de = (m * m).sum(), ((t - f @ m) ** 2).sum()
            alpha, beta = gamma / a_de, (N - gamma) / b_de
            if abs(alpha / beta - lam) / lam < 1e-10:
                break
            lam = alpha / beta
        ev = (D / 2 * np.log(alpha) + N / 2 * np.log(beta) - 0.5 * np.log(alpha + beta * s).sum()
              - beta / 2 * b_de - alpha / 2 * a_de - N / 2 * np.log(2 * np.pi))
        out.append(ev / N)
    return float(np.mean(out))


@pytest.mark.parametrize("n,d,k", [(200, 12, 2), (150, 20, 3), (40, 90, 2)])
def test_logme_matches_the_reference_evidence(n, d, k):
    rng = np.random.default_rng(n + d)
    y = np.arange(n) % k
    f = rng.normal(size=(n, d)) + 0.4 * y[:, None]
    assert logme(f, y, max_iter=200, tol=1e-10) == pytest.approx(_icml_logme(f, y), abs=2e-3)


def test_logme_ranks_informative_features_above_random_ones():
    rng = np.random.default_rng(0)
    y = np.arange(300) % 3
    noise = rng.normal(size=(300, 32))
    informative = noise.copy()
    informative[:, :3] += 2.0 * np.eye(3)[y]
    weak = noise.copy()
    weak[:, :3] += 0.5 * np.eye(3)[y]
    s_inf, s_weak, s_rand = logme(informative, y), logme(weak, y), logme(rng.normal(size=(300, 32)), y)
    assert s_inf > s_weak > s_rand
    assert np.isfinite([s_inf, s_weak, s_rand]).all()


def test_leep_prefers_source_predictions_that_track_the_labels():
    rng = np.random.default_rng(0)
    n, z = 400, 50
    y = np.arange(n) % 2
    logits = rng.normal(size=(n, z))
    random_theta = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    aligned = logits.copy()
    aligned[:, 0] += 3.0 * y  # source class 0 fires for the positives
    aligned_theta = np.exp(aligned) / np.exp(aligned).sum(1, keepdims=True)
    s_aligned, s_random = leep(aligned_theta, y), leep(random_theta, y)
    assert s_aligned > s_random
    assert s_aligned <= 0 and s_random <= 0
    assert s_random == pytest.approx(np.log(0.5), abs=0.02)  # uninformative: the class prior
    perfect = np.eye(2)[y]
    assert leep(perfect, y) == pytest.approx(0.0, abs=1e-9)


def test_leep_matches_the_papers_formula_on_a_small_case():
    theta = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    y = np.array([0, 1, 1])
    joint = np.array([[0.9, 0.1], [0.8, 1.2]]) / 3  # P(y, z)
    cond = joint / joint.sum(0)
    expected = np.mean([np.log(theta[i] @ cond[y[i]]) for i in range(3)])
    assert leep(theta, y) == pytest.approx(expected)


def test_probe_auc_separates_signal_from_noise():
    rng = np.random.default_rng(0)
    y = np.arange(200) % 2
    f = rng.normal(size=(200, 10))
    groups = np.repeat(np.arange(100), 2)
    assert probe_auc(f + 2.0 * y[:, None] * (np.arange(10) == 0), y, groups) > 0.9
    assert 0.3 < probe_auc(f, y, groups) < 0.7


def test_input_errors_are_clear():
    y = np.array([0, 1, 0, 1])
    with pytest.raises(DataError, match="2-D \\(N, F\\) array and 1-D labels"):
        logme(np.zeros(4), y)
    with pytest.raises(DataError, match="NaN/Inf"):
        logme(np.full((4, 2), np.nan), y)
    with pytest.raises(DataError, match="source-class probabilities"):
        leep(np.ones((4, 3)), y)
    with pytest.raises(ConfigError, match="'n_splits' parameter of probe_auc must be an int >= 2"):
        probe_auc(np.zeros((4, 2)), y, n_splits=1)
    with pytest.raises(DataError, match="smallest class"):
        probe_auc(np.random.rand(4, 2), y, n_splits=3)
