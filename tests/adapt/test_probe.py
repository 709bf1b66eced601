"""Frozen-feature extraction with its disk cache, and the sklearn-style LinearProbe head."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.exceptions import NotFittedError

from medtl.adapt.probe import LinearProbe, extract_features, feature_cache_key, source_probabilities
from medtl.errors import ConfigError
from medtl.models.encoders import create_encoder


@pytest.fixture(scope="module")
def lite0():
    return create_encoder("tf_efficientnet_lite0", pretrained=True, num_classes=1000, in_chans=1)


@pytest.fixture
def images():
    return np.random.default_rng(0).random((6, 1, 32, 32), dtype=np.float32)


def _blobs(n=120, d=8, seed=0, shift=2.0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    X = rng.normal(size=(n, d))
    X[:, 0] += shift * y
    return X, y


def test_extract_features_matches_the_encoder_contract_and_restores_train_mode(lite0, images):
    lite0.train()
    f = extract_features(lite0, images, batch_size=4, progress=False)
    assert f.shape == (6, lite0.num_features) and f.dtype == np.float32
    assert lite0.training  # mode restored
    lite0.eval()
    with torch.no_grad():
        ref = lite0.forward_head(lite0.forward_features(torch.as_tensor(images)), pre_logits=True)
    np.testing.assert_allclose(f, ref.numpy(), rtol=1e-4, atol=1e-5)
    # batching does not change the result
    np.testing.assert_allclose(extract_features(lite0, images, batch_size=1, progress=False), f, rtol=1e-4, atol=1e-5)


def test_flip_tta_averages_features_of_the_flipped_image(lite0, images):
    plain = extract_features(lite0, images, progress=False)
    flipped = extract_features(lite0, images[..., ::-1].copy(), progress=False)
    tta = extract_features(lite0, images, tta=True, progress=False)
    np.testing.assert_allclose(tta, 0.5 * (plain + flipped), rtol=1e-4, atol=1e-5)


def test_cache_is_written_atomically_and_reused(lite0, images, tmp_path, monkeypatch):
    f1 = extract_features(lite0, images, cache_dir=tmp_path, progress=False)
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].suffix == ".npy"  # no leftover temporary file
    assert files[0].stem == feature_cache_key(lite0, images)

    def boom(*a, **k):
        raise AssertionError("the encoder ran although the features were cached")

    monkeypatch.setattr(lite0, "forward_features", boom)
    np.testing.assert_array_equal(extract_features(lite0, images, cache_dir=tmp_path, progress=False), f1)


def test_cache_key_changes_with_pixels_weights_and_tta_but_not_with_the_head(lite0, images):
    key = feature_cache_key(lite0, images)
    assert feature_cache_key(lite0, images) == key
    other = images.copy()
    other[0, 0, 0, 0] += 0.5
    assert feature_cache_key(lite0, other) != key
    assert feature_cache_key(lite0, images, tta=True) != key
    assert feature_cache_key(lite0, images, extra={"intensity": "window"}) != key
    torch.manual_seed(1)
    scratch = create_encoder("tf_efficientnet_lite0", pretrained=False, num_classes=1000, in_chans=1)
    assert feature_cache_key(scratch, images) != key
    fresh_head = create_encoder("tf_efficientnet_lite0", pretrained=True, num_classes=3, in_chans=1)
    assert feature_cache_key(fresh_head, images) == feature_cache_key(
        create_encoder("tf_efficientnet_lite0", pretrained=True, num_classes=3, in_chans=1), images)


def test_corrupt_cache_entry_is_recomputed(lite0, images, tmp_path):
    key = feature_cache_key(lite0, images)
    (tmp_path / f"{key}.npy").write_bytes(b"not a numpy file")
    f = extract_features(lite0, images, cache_dir=tmp_path, progress=False)
    np.testing.assert_array_equal(np.load(tmp_path / f"{key}.npy"), f)


def test_source_probabilities_are_the_imagenet_softmax(lite0, images):
    f = extract_features(lite0, images, progress=False)
    p = source_probabilities(lite0, f)
    assert p.shape == (6, 1000)
    lite0.eval()
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-6)
    with torch.no_grad():
        ref = lite0(torch.as_tensor(images)).softmax(-1).numpy()
    np.testing.assert_allclose(p, ref, atol=1e-5)
    two = create_encoder("tf_efficientnet_lite0", pretrained=True, num_classes=2, in_chans=1)
    assert source_probabilities(two, f) is None  # the source head was replaced: no LEEP


def test_linear_probe_follows_sklearn_conventions():
    X, y = _blobs()
    probe = LinearProbe(C_grid=[0.01, 1.0], inner_splits=3)
    assert probe.get_params()["C_grid"] == [0.01, 1.0]
    assert not hasattr(probe, "classes_")
    with pytest.raises(NotFittedError):
        probe.predict_proba(X)
    assert probe.fit(X, y) is probe
    assert list(probe.classes_) == [0, 1] and probe.C_ in (0.01, 1.0) and probe.n_features_in_ == 8
    assert set(probe.cv_scores_) == {0.01, 1.0}
    p = probe.predict_proba(X)
    assert p.shape == (120, 2)
    np.testing.assert_allclose(p.sum(1), 1.0)
    assert (probe.predict(X) == y).mean() > 0.8
    assert probe.score(X, y) > 0.8  # ClassifierMixin
    c = clone(probe)
    assert c.get_params() == probe.get_params() and not hasattr(c, "pipeline_")


def test_linear_probe_picks_C_by_grouped_inner_cv_only():
    X, y = _blobs(n=90, shift=1.0)
    groups = np.repeat(np.arange(45), 2)
    probe = LinearProbe(C_grid=[1e-4, 10.0]).fit(X, y, groups=groups)
    assert probe.cv_scores_ and probe.C_ == max(probe.cv_scores_, key=probe.cv_scores_.get)
    # a class held by fewer groups than inner folds: no search, the first C, no crash
    few = LinearProbe(C_grid=[0.5, 2.0], inner_splits=5).fit(X[:8], y[:8], groups=np.array([0, 0, 1, 1, 2, 2, 3, 3]))
    assert few.C_ == 0.5 and few.cv_scores_ == {}


def test_linear_probe_folds_into_a_linear_layer():
    for n_classes in (2, 3):
        rng = np.random.default_rng(n_classes)
        y = np.arange(90) % n_classes
        X = rng.normal(size=(90, 5)) * [1, 10, 0.1, 1, 3] + y[:, None] + 7
        probe = LinearProbe(C_grid=[1.0], class_weight="balanced").fit(X, y)
        W, b = probe.as_linear()
        assert W.shape == (n_classes, 5)
        z = X @ W.T + b
        p = np.exp(z - z.max(1, keepdims=True))
        np.testing.assert_allclose(p / p.sum(1, keepdims=True), probe.predict_proba(X), atol=1e-8)


def test_mlp_head_and_parameter_errors():
    X, y = _blobs(n=100)
    mlp = LinearProbe(head="mlp", C_grid=[1.0]).fit(X, y)
    assert mlp.predict_proba(X).shape == (100, 2)
    with pytest.raises(ConfigError, match="as_linear needs head='logistic'"):
        mlp.as_linear()
    with pytest.raises(ConfigError, match="The 'head' parameter of LinearProbe must be one of"):
        LinearProbe(head="svm").fit(X, y)
    with pytest.raises(ConfigError, match="'C_grid' parameter of LinearProbe .* Got \\[0\\] instead"):
        LinearProbe(C_grid=[0]).fit(X, y)
    with pytest.raises(ConfigError, match="'batch_size' parameter of extract_features must be an int >= 1"):
        extract_features(torch.nn.Identity(), X, batch_size=0)
