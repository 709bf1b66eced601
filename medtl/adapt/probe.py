"""Linear probing: frozen-encoder features computed once (and cached on disk), sklearn heads.

A frozen encoder's features do not depend on the training fold, so a whole k-fold linear
probe needs one forward pass over the data. :func:`extract_features` runs that pass
(eval mode, ``torch.inference_mode``, batched, optional left-right flip averaging) and,
given a cache folder, stores the ``(N, F)`` matrix as ``.npy`` under a key that changes
whenever the weights, the preprocessing or the pixels change. :class:`LinearProbe` is the
head: ``StandardScaler`` + ``LogisticRegression`` (or a small ``MLPClassifier``) with the
regularisation picked by grouped inner cross-validation on the training data only.

Example:
    >>> model = create_encoder("tf_efficientnet_lite0", num_classes=1000)
    >>> feats = extract_features(model, images, batch_size=64, device="cpu")   # (N, 1280)
    >>> probe = LinearProbe(C_grid=(0.01, 0.1, 1.0)).fit(feats[tr], y[tr], groups=g[tr])
    >>> proba = probe.predict_proba(feats[te])                                 # (n_te, K)
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedGroupKFold
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.validation import check_is_fitted
from threadpoolctl import threadpool_limits
from torch import nn

from medtl._fastpath import autocast, memory_format, resident
from medtl.config import PROBE_HEADS
from medtl.errors import ConfigError

__all__ = ["LinearProbe", "default_cache_dir", "extract_features", "feature_cache_key", "source_probabilities"]



def default_cache_dir() -> Path:
    """``MEDTL_CACHE_DIR/features`` (default ``~/.cache/medtl/features``)."""
    return Path(os.environ.get("MEDTL_CACHE_DIR", "~/.cache/medtl")).expanduser() / "features"


def feature_cache_key(model: nn.Module, images: np.ndarray, *, tta: bool = False, extra: dict | None = None) -> str:
    """sha256 naming one feature matrix: weights, preprocessing, pixels, image size, TTA.

    The key hashes the weight record (name, sha256, mean/std, channel mapping), the model's
    actual parameters except the classifier's (so random-init and ``weights_path`` models are
    told apart, while a freshly reset head does not change the key), the
    image array's shape, dtype and bytes, ``tta`` and ``extra`` (e.g. the intensity config).

    Args:
        model: a :class:`~medtl.models.encoders.MedtlClassifier` (any ``nn.Module`` works).
        images: ``(N, C, H, W)`` float array fed to the model.

    Example:
        >>> feature_cache_key(model, images, extra={"intensity": "range"})[:8]  # doctest: +SKIP
        '3f1c9a0b'
    """
    h = hashlib.sha256()
    rec = getattr(model, "weights_record", None)
    desc = {"record": rec.name if rec else type(model).__name__, "sha256": rec.sha256 if rec else None,
            "mean": list(rec.mean) if rec else None, "std": list(rec.std) if rec else None,
            "channel_mapping": getattr(model, "channel_mapping", None), "tta": bool(tta),
            "shape": list(images.shape), "dtype": str(images.dtype), "extra": extra or {}}
    h.update(json.dumps(desc, sort_keys=True, default=str).encode())
    head = getattr(model, "classifier_layer", None)
    skip = {id(p) for p in head.parameters()} if isinstance(head, nn.Module) else set()
    for name, t in model.state_dict(keep_vars=True).items():  # ~20 ms for EfficientNet-Lite0
        if id(t) in skip:  # the classifier does not change pre-logit features
            continue
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    h.update(np.ascontiguousarray(images).tobytes())
    return h.hexdigest()


def extract_features(model: nn.Module, images: np.ndarray, *, batch_size: int = 64,
                     device: str | torch.device = "cpu", cache_dir: str | Path | None = None,
                     cache_key: str | None = None, tta: bool = False, progress: bool = True) -> np.ndarray:
    """Pooled pre-logit features of a frozen encoder, ``(N, C, H, W)`` -> ``(N, F)`` float32.

    Runs ``model.forward_head(model.forward_features(x), pre_logits=True)`` in eval mode
    under ``torch.inference_mode``. With ``tta`` the features are averaged with those of
    the left-right flipped image. With ``cache_dir`` the result is read from / written to
    ``cache_dir/<key>.npy`` (atomic write; ``key`` defaults to :func:`feature_cache_key`).

    Args:
        model: encoder with the medtl contract (``forward_features``, ``forward_head``).
        images: ``(N, C, H, W)`` in [0, 1] (what :func:`medtl.data.prepare.prepare` returns).
        batch_size: images per forward pass, ``>= 1``.
        device: where to run (``"cpu"``, ``"cuda"`` or a ``torch.device``).

    Example:
        >>> f = extract_features(model, np.random.rand(4, 1, 64, 64).astype("float32"), device="cpu")
        >>> f.shape
        (4, 1280)
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ConfigError(f"The 'batch_size' parameter of extract_features must be an int >= 1. "
                          f"Got {batch_size!r} instead.")
    images = np.asarray(images)
    path = None
    if cache_dir is not None:
        key = cache_key or feature_cache_key(model, images, tta=tta)
        path = Path(cache_dir) / f"{key}.npy"
        if path.is_file():
            try:
                feats = np.load(path, allow_pickle=False)
                if feats.ndim == 2 and len(feats) == len(images):
                    return feats
            except (OSError, ValueError):  # truncated/corrupt cache entry: recompute and overwrite
                pass
    device = torch.device(device)
    was_training = model.training
    model.eval().to(device)
    out = []
    steps = range(0, len(images), batch_size)
    # the training fast path: data held once on the device, channels_last batches, bf16 on CUDA;
    # features stay on the device until one copy at the end
    data = resident(images, device)
    with torch.inference_mode(), autocast(device):
        for i in _track(steps, "Extracting features", progress):
            xb = memory_format(data.slice(i, i + batch_size))
            f = _pooled(model, xb).float()
            if tta:
                f = 0.5 * (f + _pooled(model, torch.flip(xb, dims=(-1,))).float())
            out.append(f)
    model.train(was_training)
    feats = torch.cat(out).cpu().numpy().astype(np.float32) if out else np.zeros((0, 0), np.float32)
    if path is not None:
        _atomic_save(path, feats)
    return feats


def source_probabilities(model: nn.Module, features: np.ndarray) -> np.ndarray | None:
    """Source-task class probabilities ``(N, Z)`` from pooled features ``(N, F)``, or ``None``.

    The encoder's own classifier (e.g. the 1000-class ImageNet head) applied to the
    features :func:`extract_features` returned, then softmax (what LEEP needs). ``None``
    when the model has no source head (a record with ``num_classes == 0`` or a head
    already replaced for a new task).
    """
    rec = getattr(model, "weights_record", None)
    head = model.classifier_layer if hasattr(model, "classifier_layer") else None
    if rec is None or rec.num_classes <= 0 or not isinstance(head, nn.Linear) or head.out_features != rec.num_classes:
        return None
    with torch.inference_mode():
        logits = head(torch.as_tensor(features, dtype=torch.float32, device=head.weight.device))
        return logits.double().softmax(-1).cpu().numpy()


class LinearProbe(ClassifierMixin, BaseEstimator):
    """Scaled linear (or small MLP) head on frozen features, with C chosen by grouped inner CV.

    ``fit(X, y, groups=None)`` standardises the features and fits
    ``LogisticRegression(C)`` (``head="logistic"``) or ``MLPClassifier(alpha=1/C)``
    (``head="mlp"``). With more than one value in ``C_grid`` the value is chosen by
    ``inner_splits``-fold ``StratifiedGroupKFold`` on the data given to ``fit`` (ROC AUC,
    one-vs-rest for >2 classes), then refitted on all of it: the outer test fold is never
    seen. Without ``groups`` each sample is its own group.

    Attributes (after fit): ``classes_``, ``C_`` (the chosen value), ``cv_scores_``
    (``{C: mean inner AUC}``), ``pipeline_`` (the fitted sklearn ``Pipeline``).

    Example:
        >>> probe = LinearProbe(C_grid=(0.1, 1.0)).fit(X_train, y_train, groups=g_train)
        >>> probe.predict_proba(X_test).shape
        (n_test, 2)
    """

    def __init__(self, head: str = "logistic", C_grid: Sequence[float] = (0.01, 0.1, 1.0, 10.0),
                 class_weight: str | dict | None = None, inner_splits: int = 3, max_iter: int = 2000,
                 random_state: int = 0) -> None:
        self.head = head
        self.C_grid = C_grid
        self.class_weight = class_weight
        self.inner_splits = inner_splits
        self.max_iter = max_iter
        self.random_state = random_state

    def _validate(self) -> list[float]:
        if self.head not in PROBE_HEADS:
            raise ConfigError(f"The 'head' parameter of LinearProbe must be one of {PROBE_HEADS}. "
                              f"Got {self.head!r} instead.")
        grid = list(self.C_grid) if not np.isscalar(self.C_grid) else [self.C_grid]
        if not grid or any(isinstance(c, bool) or not isinstance(c, (int, float)) or c <= 0 for c in grid):
            raise ConfigError(f"The 'C_grid' parameter of LinearProbe must be a non-empty list of floats > 0. "
                              f"Got {self.C_grid!r} instead.")
        if not isinstance(self.inner_splits, int) or self.inner_splits < 2:
            raise ConfigError(f"The 'inner_splits' parameter of LinearProbe must be an int >= 2. "
                              f"Got {self.inner_splits!r} instead.")
        if self.head == "mlp" and self.class_weight is not None:
            raise ConfigError("The 'class_weight' parameter of LinearProbe is only supported with head='logistic' "
                              f"(sklearn's MLPClassifier has none). Got {self.class_weight!r} with head='mlp'.")
        return [float(c) for c in grid]

    def _pipeline(self, C: float) -> Pipeline:
        if self.head == "logistic":
            clf = LogisticRegression(C=C, class_weight=self.class_weight, max_iter=self.max_iter,
                                     random_state=self.random_state)
        else:
            clf = MLPClassifier(hidden_layer_sizes=(256,), alpha=1.0 / C, max_iter=self.max_iter // 10,
                                early_stopping=True, random_state=self.random_state)
        return Pipeline([("scale", StandardScaler()), ("clf", clf)])

    def fit(self, X: np.ndarray, y: np.ndarray, groups: np.ndarray | None = None) -> LinearProbe:
        """Fit on ``X (N, F)``, ``y (N,)``; ``groups (N,)`` keeps a patient on one side of inner splits."""
        grid = self._validate()
        X, y = np.asarray(X, dtype=np.float64), np.asarray(y)
        groups = np.arange(len(y)) if groups is None else np.asarray(groups)
        self.cv_scores_ = {}
        C = grid[0]
        min_groups = min(len(np.unique(groups[y == c])) for c in np.unique(y))
        if len(grid) > 1 and min_groups >= self.inner_splits:
            cv = StratifiedGroupKFold(n_splits=self.inner_splits, shuffle=True, random_state=self.random_state)
            scoring = "roc_auc" if len(np.unique(y)) == 2 else "roc_auc_ovr"
            search = GridSearchCV(self._pipeline(grid[0]), {"clf__C" if self.head == "logistic" else "clf__alpha":
                                  grid if self.head == "logistic" else [1.0 / c for c in grid]},
                                  scoring=scoring, cv=cv, refit=False)
            with threadpool_limits(limits=1):  # BLAS threads slow these small fits ~30x (see below)
                search.fit(X, y, groups=groups)
            scores = np.nan_to_num(search.cv_results_["mean_test_score"], nan=-np.inf)
            self.cv_scores_ = {c: float(s) for c, s in zip(grid, scores)}
            C = grid[int(np.argmax(scores))]
        self.C_ = C
        with threadpool_limits(limits=1):
            # Small dense problems (N ~ 1e3, F ~ 1e3): multi-threaded OpenBLAS spends its time
            # synchronising; one thread fits ~30x faster on a busy 2-core machine (measured).
            self.pipeline_ = clone(self._pipeline(C)).fit(X, y)
        self.classes_ = self.pipeline_.classes_
        self.n_features_in_ = X.shape[1]
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """``(N, len(classes_))`` class probabilities."""
        check_is_fitted(self, "pipeline_")
        with threadpool_limits(limits=1):
            return self.pipeline_.predict_proba(np.asarray(X, dtype=np.float64))

    def predict(self, X: np.ndarray) -> np.ndarray:
        """``(N,)`` predicted classes (argmax of :meth:`predict_proba`)."""
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]

    def as_linear(self) -> tuple[np.ndarray, np.ndarray]:
        """The logistic head folded with its scaler: ``(W (K, F), b (K,))`` on raw features.

        ``softmax(features @ W.T + b)`` equals :meth:`predict_proba` (for two classes the
        first row is zero), so the probe can be written as an encoder's final linear layer.
        """
        check_is_fitted(self, "pipeline_")
        if self.head != "logistic":
            raise ConfigError("LinearProbe.as_linear needs head='logistic'; an MLP head is not linear.")
        scale, clf = self.pipeline_.named_steps["scale"], self.pipeline_.named_steps["clf"]
        sd = np.where(scale.scale_ > 0, scale.scale_, 1.0)
        W = clf.coef_ / sd
        b = clf.intercept_ - W @ scale.mean_
        if len(self.classes_) == 2:
            W, b = np.vstack([np.zeros_like(W), W]), np.concatenate([[0.0], b])
        return W, b


# --------------------------------------------------------------------------- helpers


def _pooled(model: nn.Module, xb: torch.Tensor) -> torch.Tensor:
    return model.forward_head(model.forward_features(xb), pre_logits=True).flatten(1)


def _atomic_save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.save(fh, array, allow_pickle=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _track(items, desc: str, enabled: bool):
    if not enabled:
        yield from items
        return
    from rich.progress import track

    yield from track(items, description=desc, transient=True)
