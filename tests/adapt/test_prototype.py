"""PrototypeClassifier: class means of L2-normalised features, cosine scores, the scikit-learn contract."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.metrics import roc_auc_score

from medtl.adapt import PrototypeClassifier
from medtl.errors import ConfigError, DataError


def _blobs(n=60, d=16, k=3, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d)) * 3
    y = np.arange(n) % k
    return centres[y] + rng.normal(size=(n, d)), y


def test_fit_stores_unit_norm_class_means_and_predicts_the_nearest_by_cosine():
    X, y = _blobs()
    clf = PrototypeClassifier(center=False).fit(X, y)
    assert clf.prototypes_.shape == (3, 16) and clf.n_features_in_ == 16
    np.testing.assert_allclose(np.linalg.norm(clf.prototypes_, axis=1), 1.0)
    np.testing.assert_array_equal(clf.class_counts_, [20, 20, 20])
    # by hand: mean of the unit rows of each class, normalised; the nearest by cosine
    Z = X / np.linalg.norm(X, axis=1, keepdims=True)
    P = np.stack([Z[y == c].mean(0) for c in range(3)])
    P /= np.linalg.norm(P, axis=1, keepdims=True)
    np.testing.assert_allclose(clf.prototypes_, P, atol=1e-12)
    np.testing.assert_array_equal(clf.predict(X), np.argmax(Z @ P.T, axis=1))
    assert clf.score(X, y) > 0.95  # ClassifierMixin: accuracy on well separated blobs


def test_center_subtracts_the_training_mean_before_normalising():
    # both classes point the same way and differ in length only: cosine needs the centring to tell them apart
    rng = np.random.default_rng(0)
    y = np.arange(40) % 2
    X = np.column_stack([1.0 + 2.0 * y, np.zeros(40)]) + rng.normal(scale=0.1, size=(40, 2))
    plain = PrototypeClassifier(center=False).fit(X, y)
    centred = PrototypeClassifier().fit(X, y)
    np.testing.assert_allclose(centred.mean_, X.mean(0))
    assert np.all(plain.mean_ == 0)
    assert centred.score(X, y) == 1.0 and plain.score(X, y) < 0.8


def test_probabilities_are_a_softmax_whose_temperature_changes_neither_class_nor_auc():
    X, y = _blobs(k=2, seed=1)
    sharp, soft = PrototypeClassifier(temperature=30.0).fit(X, y), PrototypeClassifier(temperature=1.0).fit(X, y)
    ps, pt = sharp.predict_proba(X), soft.predict_proba(X)
    np.testing.assert_allclose(ps.sum(1), 1.0)
    assert np.abs(ps - 0.5).mean() > np.abs(pt - 0.5).mean()  # sharper
    np.testing.assert_array_equal(ps.argmax(1), pt.argmax(1))
    assert roc_auc_score(y, ps[:, 1]) == roc_auc_score(y, pt[:, 1]) == roc_auc_score(y, sharp.decision_function(X))
    d = sharp.decision_function(X)
    s = sharp.similarities(X)
    assert d.shape == (len(X),) and np.allclose(d, s[:, 1] - s[:, 0]) and np.all(np.abs(s) <= 1 + 1e-12)


def test_string_labels_one_shot_and_clone():
    X = np.array([[1.0, 0.0], [0.0, 1.0]])
    clf = PrototypeClassifier(center=False).fit(X, np.array(["benign", "malignant"]))  # one case per class
    assert clf.predict([[0.9, 0.2], [0.1, 0.7]]).tolist() == ["benign", "malignant"]
    assert clf.decision_function([[0.9, 0.2]]).shape == (1,)
    fresh = clone(clf)
    assert fresh.get_params() == {"center": False, "temperature": 10.0} and not hasattr(fresh, "prototypes_")
    three = PrototypeClassifier().fit(*_blobs())
    assert three.decision_function(_blobs()[0][:4]).shape == (4, 3)


@pytest.mark.parametrize(("params", "message"), [({"temperature": 0}, "'temperature' parameter"),
                                                 ({"temperature": float("nan")}, "'temperature' parameter"),
                                                 ({"center": "yes"}, "'center' parameter")])
def test_bad_parameters_say_what_is_valid(params, message):
    with pytest.raises(ConfigError, match=message):
        PrototypeClassifier(**params).fit(*_blobs())


def test_bad_data_is_refused_with_what_was_received():
    X, y = _blobs()
    with pytest.raises(DataError, match="at least 2 classes"):
        PrototypeClassifier().fit(X, np.zeros(len(X)))
    with pytest.raises(DataError, match="NaN"):
        PrototypeClassifier().fit(np.where(np.eye(len(X), 16) > 0, np.nan, X), y)
    with pytest.raises(DataError, match=r"shape \(N, F\)"):
        PrototypeClassifier().fit(X[0], y[:1])
    with pytest.raises(NotFittedError):
        PrototypeClassifier().predict(X)
    with pytest.raises(DataError, match="fitted on 16 features; X has 8"):
        PrototypeClassifier().fit(X, y).predict(X[:, :8])
