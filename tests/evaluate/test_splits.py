"""Patient-grouped stratified splits: leakage, coverage, stratification, errors."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pydicom
import pytest

from medtl.errors import ConfigError, DataError
from medtl.evaluate.splits import check_disjoint_groups, inner_split, outer_splits


def _cohort(n_patients: int = 60, pos_share: float = 0.3, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Patients with 1-4 cases; most patients single-class, some with both classes."""
    rng = np.random.default_rng(seed)
    y, groups = [], []
    for p in range(n_patients):
        n = int(rng.integers(1, 5))
        label = int(rng.random() < pos_share)
        labels = np.full(n, label)
        if n > 1 and rng.random() < 0.15:  # patient with cases in both classes
            labels[0] = 1 - label
        y.extend(labels.tolist())
        groups.extend([f"PATIENT-SECRET-{p:04d}"] * n)
    return np.array(y), np.array(groups)


def test_outer_splits_no_leakage_full_coverage_and_stratified():
    y, groups = _cohort()
    folds = outer_splits(y, groups, n_splits=5, seed=0)
    assert len(folds) == 5
    tested = np.concatenate([test for _, test in folds])
    assert np.array_equal(np.sort(tested), np.arange(len(y)))  # every index tested exactly once
    seen: set = set()
    overall = y.mean()
    for train, test in folds:
        assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(len(y)))
        test_patients = set(groups[test].tolist())
        assert not test_patients & set(groups[train].tolist())  # train/test patient-disjoint
        assert not test_patients & seen  # no patient in two test folds
        seen |= test_patients
        assert abs(y[test].mean() - overall) < 0.12  # class balance roughly kept
        assert set(y[test].tolist()) == {0, 1}
    check_disjoint_groups({i: groups[test] for i, (_, test) in enumerate(folds)})


def test_outer_splits_reproducible_and_seed_dependent():
    y, groups = _cohort()
    a = outer_splits(y, groups, n_splits=4, seed=3)
    b = outer_splits(y, groups, n_splits=4, seed=3)
    c = outer_splits(y, groups, n_splits=4, seed=4)
    assert all(np.array_equal(t1, t2) for (_, t1), (_, t2) in zip(a, b))
    assert not all(np.array_equal(t1, t2) for (_, t1), (_, t2) in zip(a, c))


def test_outer_splits_class_with_too_few_patients_names_the_class():
    y = np.array(["benign"] * 20 + ["malignant"] * 6)
    groups = np.array([f"PATIENT-SECRET-{i}" for i in range(20)] + ["PATIENT-SECRET-90"] * 2
                      + ["PATIENT-SECRET-91"] * 2 + ["PATIENT-SECRET-92"] * 2)
    with pytest.raises(DataError) as exc:
        outer_splits(y, groups, n_splits=5)
    msg = str(exc.value)
    assert "class 'malignant' occurs in only 3 patient" in msg
    assert "5-fold" in msg and "Lower cv.n_splits to 3" in msg
    assert "SECRET" not in msg  # never leaks patient ids
    # integer labels are named through class_names
    y_int = (y == "malignant").astype(int)
    with pytest.raises(DataError, match="class 'malignant' occurs in only 3"):
        outer_splits(y_int, groups, n_splits=5, class_names=["benign", "malignant"])
    assert len(outer_splits(y_int, groups, n_splits=3)) == 3  # the advised value works


def test_outer_splits_parameter_and_shape_errors():
    y, groups = _cohort(20)
    with pytest.raises(ConfigError, match=re.escape(
            "The 'n_splits' parameter of outer_splits must be an int >= 2. Got 1 instead.")):
        outer_splits(y, groups, n_splits=1)
    with pytest.raises(ConfigError, match="n_splits"):
        outer_splits(y, groups, n_splits=2.5)
    with pytest.raises(ConfigError, match="seed"):
        outer_splits(y, groups, seed=-1)
    with pytest.raises(DataError, match="'y' has 5 entries but 'groups' has 4"):
        outer_splits(np.zeros(5), np.arange(4))
    with pytest.raises(DataError, match=r"4 patient\(s\); 5-fold .* Lower cv.n_splits to 4"):
        outer_splits(np.array([0, 1, 0, 1, 0, 1, 0, 1]), np.repeat(np.arange(4), 2), n_splits=5)


def test_check_disjoint_groups_detects_leakage_without_naming_patients():
    check_disjoint_groups({0: np.array(["PATIENT-SECRET-a"] * 3), 1: np.array(["PATIENT-SECRET-b"])})
    with pytest.raises(DataError) as exc:
        check_disjoint_groups({0: np.array(["PATIENT-SECRET-a", "PATIENT-SECRET-b"]),
                               1: np.array(["PATIENT-SECRET-c"]),
                               2: np.array(["PATIENT-SECRET-b"])})
    assert "folds 0 and 2 share 1 patient" in str(exc.value)
    assert "SECRET" not in str(exc.value)


def test_inner_split_grouped_stratified_and_silent():
    y, groups = _cohort(80)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the stratified path must not warn
        train, val = inner_split(y, groups, val_fraction=0.2, seed=0)
    assert not set(groups[train].tolist()) & set(groups[val].tolist())
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(len(y)))
    share = len(set(groups[val].tolist())) / len(set(groups.tolist()))
    assert 0.12 < share < 0.28
    assert set(y[val].tolist()) == {0, 1}
    again = inner_split(y, groups, val_fraction=0.2, seed=0)
    assert np.array_equal(again[1], val)


def test_inner_split_falls_back_with_a_warning():
    # class 1 is held by 2 patients only: 5-way stratification is impossible
    y = np.array([0] * 20 + [1] * 4)
    groups = np.array(list(range(20)) + [100, 100, 101, 101])
    with pytest.warns(UserWarning, match="GroupShuffleSplit"):
        train, val = inner_split(y, groups, val_fraction=0.2, seed=0)
    assert len(train) and len(val)
    assert not set(groups[train].tolist()) & set(groups[val].tolist())


def test_inner_split_errors():
    y, groups = _cohort(20)
    for bad in (0.0, 0.5, -0.1, "0.2"):
        with pytest.raises(ConfigError, match=r"'val_fraction' parameter of inner_split must be a float in the range \(0.0, 0.5\)"):
            inner_split(y, groups, val_fraction=bad)
    with pytest.raises(DataError, match="at least 2"):
        inner_split(np.array([0, 1, 0]), np.array(["p", "p", "p"]))


def test_outer_splits_on_real_ct_patients(shared_data):
    """100 real CT slices from 54 patients, 9 of whom have slices in both classes."""
    files = sorted((shared_data / "ct-contrast-tcga" / "dicom").glob("*.dcm"))
    assert len(files) == 100
    patients = np.array([str(pydicom.dcmread(f, stop_before_pixels=True).PatientID) for f in files])
    y = np.array([int(f.name.split("CONTRAST_")[1][0]) for f in files])
    folds = outer_splits(y, patients, n_splits=5, seed=0)
    check_disjoint_groups({i: patients[test] for i, (_, test) in enumerate(folds)})
    assert sum(len(test) for _, test in folds) == 100
    for train, test in folds:
        assert not set(patients[train].tolist()) & set(patients[test].tolist())
        assert set(y[test].tolist()) == {0, 1}
    # a naive case-level split of these data would leak: show that the check catches it
    naive = {i: patients[i::5] for i in range(5)}
    with pytest.raises(DataError, match="Patient leakage"):
        check_disjoint_groups(naive)
