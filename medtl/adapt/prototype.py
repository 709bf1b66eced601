"""Prototype classifier on frozen features: the simplest few-shot learner.

Every class is represented by the mean of its training features (its *prototype*); a case
belongs to the class whose prototype is nearest in cosine similarity. Features are
L2-normalised before the means are taken, and (``center=True``, the default) centred on the
mean of the training features first, which is SimpleShot's "CL2N" recipe (Wang et al., 2019).
There is nothing to tune: with one labelled case per class it is already defined, which is
why it is the baseline of few-shot evaluation and a fair rival of the linear probe when
labels are scarce.

Example:
    >>> clf = PrototypeClassifier().fit(X_train, y_train)     # X: (N, F) frozen features
    >>> clf.predict_proba(X_test).shape                       # softmax(temperature * cosine)
    (n_test, K)
"""

from __future__ import annotations

import numbers

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_is_fitted

from medtl.errors import ConfigError, DataError

__all__ = ["PrototypeClassifier"]

_EPS = 1e-12


class PrototypeClassifier(ClassifierMixin, BaseEstimator):
    """Nearest class mean of L2-normalised features, scored by cosine similarity.

    Args:
        center: subtract the mean training feature before normalising (SimpleShot CL2N).
        temperature: scale of the cosine similarities in :meth:`predict_proba`
            (``softmax(temperature * cos)``). It changes the probabilities' sharpness only:
            the predicted class and every ranking metric (AUC) do not depend on it.

    Attributes (after fit): ``classes_`` ``(K,)``, ``prototypes_`` ``(K, F)`` unit-norm class
    means, ``mean_`` ``(F,)`` the centring vector (zeros with ``center=False``),
    ``class_counts_`` ``(K,)`` training cases per class, ``n_features_in_``.

    Example:
        >>> X = np.array([[1.0, 0.1], [0.9, 0.0], [0.0, 1.0], [0.1, 0.8]]); y = np.array([0, 0, 1, 1])
        >>> PrototypeClassifier(center=False).fit(X, y).predict([[0.8, 0.2], [0.2, 0.9]]).tolist()
        [0, 1]
    """

    def __init__(self, center: bool = True, temperature: float = 10.0) -> None:
        self.center = center
        self.temperature = temperature

    def fit(self, X: np.ndarray, y: np.ndarray) -> PrototypeClassifier:
        """Class means of ``X (N, F)`` for labels ``y (N,)``; at least one case of two or more classes."""
        if not isinstance(self.center, (bool, np.bool_)):
            raise ConfigError(f"The 'center' parameter of PrototypeClassifier must be a bool. Got {self.center!r} "
                              "instead.")
        t = self.temperature
        if not isinstance(t, numbers.Real) or isinstance(t, bool) or not np.isfinite(t) or t <= 0:
            raise ConfigError(f"The 'temperature' parameter of PrototypeClassifier must be a float > 0. Got {t!r} "
                              "instead.")
        X = self._check_X(X, "fit")
        y = np.asarray(y)
        if y.ndim != 1 or len(y) != len(X):
            raise DataError(f"PrototypeClassifier.fit expects 'y' of shape ({len(X)},), one label per row of X. "
                            f"Got shape {y.shape} instead.")
        self.classes_, inverse = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise DataError(f"PrototypeClassifier.fit needs cases of at least 2 classes. Got only class "
                            f"{self.classes_.tolist()}; give at least one labelled case of every class.")
        self.mean_ = X.mean(axis=0) if self.center else np.zeros(X.shape[1])
        Z = _unit(X - self.mean_)
        protos = np.zeros((len(self.classes_), X.shape[1]))
        np.add.at(protos, inverse, Z)
        self.class_counts_ = np.bincount(inverse, minlength=len(self.classes_))
        self.prototypes_ = _unit(protos / self.class_counts_[:, None])
        self.n_features_in_ = X.shape[1]
        return self

    def similarities(self, X: np.ndarray) -> np.ndarray:
        """``(N, K)`` cosine similarity of each case to each class prototype, in ``[-1, 1]``."""
        check_is_fitted(self, "prototypes_")
        X = self._check_X(X, "similarities")
        if X.shape[1] != self.n_features_in_:
            raise DataError(f"PrototypeClassifier was fitted on {self.n_features_in_} features; X has "
                            f"{X.shape[1]}. Extract the features with the same encoder.")
        return _unit(X - self.mean_) @ self.prototypes_.T

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        """scikit-learn's convention: ``(N,)`` ``cos(class 1) - cos(class 0)`` for two classes, else ``(N, K)``."""
        s = self.similarities(X)
        return s[:, 1] - s[:, 0] if s.shape[1] == 2 else s

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """``(N, K)`` ``softmax(temperature * cosine similarity)``."""
        z = float(self.temperature) * self.similarities(X)
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)

    def predict(self, X: np.ndarray) -> np.ndarray:
        """``(N,)`` the class of the most similar prototype."""
        s = self.similarities(X)
        return self.classes_[np.argmax(s, axis=1)]

    @staticmethod
    def _check_X(X: object, func: str) -> np.ndarray:
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or len(X) == 0:
            raise DataError(f"PrototypeClassifier.{func} expects features of shape (N, F) with N >= 1. Got shape "
                            f"{X.shape} instead.")
        if not np.all(np.isfinite(X)):
            raise DataError(f"PrototypeClassifier.{func}: the features hold NaN or infinite values; check the "
                            "encoder's output (e.g. an image of NaNs).")
        return X


def _unit(A: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (a zero row stays zero)."""
    return A / np.maximum(np.linalg.norm(A, axis=-1, keepdims=True), _EPS)
