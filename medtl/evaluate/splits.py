"""Patient-grouped, stratified data splits.

Every split in medtl is grouped by patient: all cases of one patient land on the same
side of a split, so a model is never tested on a patient it has seen in training. Within
that constraint the class balance is kept as close to the whole set's as possible
(scikit-learn's :class:`~sklearn.model_selection.StratifiedGroupKFold`).

Error messages never contain patient identifiers, only counts and class names.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
from sklearn.model_selection import GroupShuffleSplit, StratifiedGroupKFold

from medtl.errors import ConfigError, DataError

__all__ = ["outer_splits", "inner_split", "check_disjoint_groups"]


def outer_splits(
    y: np.ndarray,
    groups: np.ndarray,
    *,
    n_splits: int = 5,
    seed: int = 0,
    class_names: Sequence[str] | None = None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Patient-grouped, stratified k-fold splits for cross-validation.

    Args:
        y: ``(N,)`` class of each case (integer indices or class names).
        groups: ``(N,)`` patient of each case (any hashable id; never printed).
        n_splits: number of folds, ``>= 2``.
        seed: shuffling seed; the same seed gives the same folds.
        class_names: optional names for integer classes, used in error messages.

    Returns:
        ``n_splits`` pairs ``(train_idx, test_idx)`` of sorted int64 indices into
        ``y``. Every case is tested exactly once and no patient is in two test folds.

    Raises:
        ConfigError: ``n_splits`` or ``seed`` is not a valid int.
        DataError: fewer patients than folds, or a class held by too few patients.

    Example:
        >>> y = np.array([0, 0, 1, 1, 0, 1, 0, 1])
        >>> groups = np.array([1, 1, 2, 2, 3, 4, 5, 6])
        >>> folds = outer_splits(y, groups, n_splits=2, seed=0)
        >>> sorted(np.concatenate([test for _, test in folds]).tolist())
        [0, 1, 2, 3, 4, 5, 6, 7]
    """
    _check_int("n_splits", n_splits, "outer_splits", minimum=2)
    _check_int("seed", seed, "outer_splits", minimum=0)
    y, groups = _check_arrays(y, groups, "outer_splits")

    n_groups = len(np.unique(groups))
    if n_groups < n_splits:
        raise DataError(
            f"The data hold {n_groups} patient(s); {n_splits}-fold patient-grouped CV needs "
            f"at least {n_splits}. Lower cv.n_splits to {max(2, n_groups)} or add data."
            if n_groups >= 2
            else f"The data hold {n_groups} patient(s); patient-grouped CV needs at least 2 "
            "patients. Add data."
        )
    per_class = _groups_per_class(y, groups)
    for cls, count in per_class.items():
        if count < n_splits:
            name = _class_name(cls, class_names)
            lowest = min(per_class.values())
            advice = (
                f"Lower cv.n_splits to {lowest} or add data."
                if lowest >= 2
                else "Add data for this class (or remove the class)."
            )
            raise DataError(
                f"class '{name}' occurs in only {count} patient(s); {n_splits}-fold stratified "
                f"CV needs at least {n_splits}. {advice}"
            )

    cv = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    folds = [
        (np.sort(train).astype(np.int64), np.sort(test).astype(np.int64))
        for train, test in cv.split(np.zeros(len(y)), y, groups)
    ]
    _post_check(folds, groups, len(y))
    return folds


def inner_split(
    y: np.ndarray,
    groups: np.ndarray,
    *,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Patient-grouped, stratified train/validation split inside a training fold.

    Uses the first fold of ``StratifiedGroupKFold(n_splits=max(2, round(1 / val_fraction)))``.
    When some class is held by too few patients to stratify, it falls back to a plain
    patient-grouped ``GroupShuffleSplit`` and warns (``UserWarning``) that it did.

    Args:
        y: ``(N,)`` class of each case of the training fold.
        groups: ``(N,)`` patient of each case.
        val_fraction: share of patients for validation, ``0 < val_fraction < 0.5``.
        seed: shuffling seed.

    Returns:
        ``(train_idx, val_idx)``: sorted int64 indices into the given arrays, disjoint
        by patient, both non-empty.

    Raises:
        ConfigError: ``val_fraction`` or ``seed`` is invalid.
        DataError: fewer than 2 patients (nothing to split).

    Example:
        >>> y = np.array([0, 1] * 10)
        >>> groups = np.arange(20) // 2 * 2 + np.array([0, 1] * 10)
        >>> train, val = inner_split(y, groups, val_fraction=0.2, seed=0)
        >>> len(train) + len(val)
        20
    """
    if (
        not isinstance(val_fraction, numbers.Real)
        or isinstance(val_fraction, bool)
        or not 0.0 < float(val_fraction) < 0.5
    ):
        raise ConfigError(
            "The 'val_fraction' parameter of inner_split must be a float in the range "
            f"(0.0, 0.5). Got {val_fraction!r} instead."
        )
    _check_int("seed", seed, "inner_split", minimum=0)
    y, groups = _check_arrays(y, groups, "inner_split")

    n_groups = len(np.unique(groups))
    if n_groups < 2:
        raise DataError(
            f"The training fold holds {n_groups} patient(s); a patient-grouped validation "
            "split needs at least 2. Add data or lower cv.n_splits."
        )
    n_inner = max(2, round(1.0 / float(val_fraction)))
    per_class = _groups_per_class(y, groups)
    short = {cls: n for cls, n in per_class.items() if n < n_inner}
    if n_groups >= n_inner and not short:
        cv = StratifiedGroupKFold(n_splits=n_inner, shuffle=True, random_state=seed)
        train, val = next(cv.split(np.zeros(len(y)), y, groups))
    else:
        reason = (
            f"{len(short)} class(es) occur in fewer than {n_inner} patients"
            if short
            else f"only {n_groups} patients"
        )
        warnings.warn(
            f"inner_split: cannot stratify the validation split ({reason}); falling back to "
            "an unstratified patient-grouped split (GroupShuffleSplit). The validation set "
            "may miss a class; add data or raise val_fraction.",
            UserWarning,
            stacklevel=2,
        )
        gss = GroupShuffleSplit(n_splits=1, test_size=float(val_fraction), random_state=seed)
        train, val = next(gss.split(np.zeros(len(y)), y, groups))
    train, val = np.sort(train).astype(np.int64), np.sort(val).astype(np.int64)
    if len(train) == 0 or len(val) == 0 or np.intersect1d(groups[train], groups[val]).size:
        raise RuntimeError("inner_split produced an empty or patient-overlapping split (a bug).")
    return train, val


def check_disjoint_groups(groups_by_fold: Mapping[Hashable, np.ndarray]) -> None:
    """Raise when a patient appears in more than one fold.

    Args:
        groups_by_fold: ``{fold: (n_i,) patient ids of the fold's (test) cases}``.

    Raises:
        DataError: some patient is in two folds. The message names the folds and the
            number of shared patients, never the patients themselves.

    Example:
        >>> check_disjoint_groups({0: np.array(["a", "a", "b"]), 1: np.array(["c"])})
    """
    if not isinstance(groups_by_fold, Mapping):
        raise ConfigError(
            "The 'groups_by_fold' parameter of check_disjoint_groups must be a dict mapping "
            f"fold -> array of patient ids. Got {type(groups_by_fold).__name__} instead."
        )
    seen: dict[Hashable, Hashable] = {}
    clashes: dict[tuple, int] = {}
    for fold, fold_groups in groups_by_fold.items():
        for g in np.unique(np.asarray(fold_groups).ravel()).tolist():
            if g in seen:
                key = (seen[g], fold)
                clashes[key] = clashes.get(key, 0) + 1
            else:
                seen[g] = fold
    if clashes:
        detail = "; ".join(f"folds {a!r} and {b!r} share {n} patient(s)" for (a, b), n in clashes.items())
        raise DataError(
            f"Patient leakage between folds: {detail}. Every patient must be in exactly one "
            "fold; build folds with medtl.evaluate.splits.outer_splits (grouped by patient)."
        )


# --------------------------------------------------------------------------- helpers


def _check_int(name: str, value: object, func: str, *, minimum: int) -> None:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
        raise ConfigError(
            f"The '{name}' parameter of {func} must be an int >= {minimum}. Got {value!r} instead."
        )


def _check_arrays(y: object, groups: object, func: str) -> tuple[np.ndarray, np.ndarray]:
    y_arr, g_arr = np.asarray(y), np.asarray(groups)
    if y_arr.ndim != 1 or g_arr.ndim != 1:
        raise DataError(
            f"{func} expects 1-D 'y' and 'groups' (one entry per case). Got shapes "
            f"{y_arr.shape} and {g_arr.shape}."
        )
    if len(y_arr) != len(g_arr):
        raise DataError(
            f"{func}: 'y' has {len(y_arr)} entries but 'groups' has {len(g_arr)}; give one "
            "patient id per case."
        )
    if len(y_arr) == 0:
        raise DataError(f"{func}: no cases to split (empty 'y'). Check the manifest.")
    return y_arr, g_arr


def _groups_per_class(y: np.ndarray, groups: np.ndarray) -> dict:
    """``{class: number of distinct patients holding at least one case of it}``."""
    return {cls: len(np.unique(groups[y == cls])) for cls in np.unique(y).tolist()}


def _class_name(cls: object, class_names: Sequence[str] | None) -> str:
    if class_names is not None and isinstance(cls, numbers.Integral) and 0 <= cls < len(class_names):
        return str(class_names[cls])
    return str(cls)


def _post_check(folds: list[tuple[np.ndarray, np.ndarray]], groups: np.ndarray, n: int) -> None:
    """Invariants of a grouped k-fold; a violation is a bug, not a user error."""
    tested = np.concatenate([test for _, test in folds])
    if len(tested) != n or not np.array_equal(np.sort(tested), np.arange(n)):
        raise RuntimeError("outer_splits: not every case is tested exactly once (a bug).")
    for train, test in folds:
        if len(test) == 0:
            raise RuntimeError("outer_splits: an empty test fold was produced (a bug).")
        if np.intersect1d(train, test).size or np.intersect1d(groups[train], groups[test]).size:
            raise RuntimeError("outer_splits: a patient is in both train and test (a bug).")
    try:
        check_disjoint_groups({i: groups[test] for i, (_, test) in enumerate(folds)})
    except DataError as exc:
        raise RuntimeError(f"outer_splits: {exc} (a bug).") from exc
