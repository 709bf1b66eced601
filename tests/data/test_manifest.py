"""Manifests, MedMNIST and folder+CSV sources, and the decode-once preprocessing."""

from __future__ import annotations

import numpy as np
import pytest

from medtl.config import load_config
from medtl.data.manifest import read_labelled_folder, read_manifest, read_medmnist
from medtl.data.prepare import prepare
from medtl.data.transforms import CT_WINDOWS, augment_transform, preprocess_transform
from medtl.config import AugmentConfig, IntensityConfig
from medtl.errors import DataError


def _write(tmp_path, text):
    p = tmp_path / "m.csv"
    p.write_text(text)
    return p


def test_manifest_reads_relative_paths_and_optional_columns(tmp_path):
    p = _write(tmp_path, "path,label,patient_id,site\na.dcm,1,P1,s1\nsub/b.dcm,0,P2,\n")
    cases = read_manifest(p)
    assert [c.case_id for c in cases] == ["row00002", "row00003"]
    assert cases[0].path == str(tmp_path / "a.dcm") and cases[0].site == "s1" and cases[1].site is None


@pytest.mark.parametrize("text,needle", [
    ("path,label\na,1\n", "lacks column(s) ['patient_id']"),
    ("path,label,patient_id\na,,P1\n", "row 2: empty label"),
    ("path,label,patient_id\na,nan,P1\n", "label is 'nan'"),
    ("path,label,patient_id\na,1,P1,extra\n", "more fields than columns"),
    ("path,label,patient_id\n", "no rows"),
    ("path,label,patient_id,split\na,1,P1,training\n", "split 'training'"),
])
def test_malformed_manifest_names_file_row_and_reason(tmp_path, text, needle):
    with pytest.raises(DataError) as err:
        read_manifest(_write(tmp_path, text))
    assert needle in str(err.value) and "m.csv" in str(err.value)


def test_all_bad_rows_reported_together(tmp_path):
    with pytest.raises(DataError) as err:
        read_manifest(_write(tmp_path, "path,label,patient_id\na,,P1\nb,1,\nc,1,P3\n"))
    assert "2 malformed row(s)" in str(err.value)


def test_medmnist_official_split(shared_data):
    cases = read_medmnist(shared_data / "medmnist" / "breastmnist.npz")
    splits = [c.split for c in cases]
    assert (splits.count("train"), splits.count("val"), splits.count("test")) == (546, 78, 156)
    assert cases[0].array.shape == (1, 28, 28) and cases[0].label in ("malignant", "normal_or_benign")


def test_labelled_folder_takes_patient_from_dicom(shared_data):
    root = shared_data / "ct-contrast-tcga"
    cases = read_labelled_folder(root / "dicom", root / "overview.csv", file_column="dicom_name",
                                 label_column="Contrast")
    assert len(cases) == 100
    assert len({c.patient_id for c in cases}) == 54
    assert {c.label for c in cases} == {"True", "False"}


def test_ct_windows_map_hu_to_unit_range():
    t = preprocess_transform(IntensityConfig(mode="window", preset="lung"), [8, 8])
    lo = CT_WINDOWS["lung"][0] - CT_WINDOWS["lung"][1] / 2
    x = np.full((1, 16, 16), lo, np.float32)
    x[:, :8] = 3000
    out = t(x)
    assert out.shape == (1, 8, 8) and out.dtype == np.float32
    assert out.min() == pytest.approx(0.0, abs=1e-4) and out.max() == pytest.approx(1.0, abs=1e-4)


def test_rgb_becomes_grey_and_3d_resizes():
    t2 = preprocess_transform(IntensityConfig(mode="range", vmin=0, vmax=255), [10, 12])
    assert t2(np.full((3, 20, 20), 255, np.float32)).shape == (1, 10, 12)
    t3 = preprocess_transform(IntensityConfig(mode="percentile"), [4, 8, 8])
    assert t3(np.random.rand(1, 8, 16, 16).astype(np.float32)).shape == (1, 4, 8, 8)


def test_augmentation_replays_with_seed():
    x = np.random.rand(1, 32, 32).astype(np.float32)
    a, b = augment_transform(AugmentConfig(), (32, 32)), augment_transform(AugmentConfig(), (32, 32))
    a.set_random_state(seed=3)
    b.set_random_state(seed=3)
    np.testing.assert_array_equal(np.asarray(a(x)), np.asarray(b(x)))


def test_prepare_decodes_once_and_lists_unreadable(tmp_path, monkeypatch, shared_data):
    samples = shared_data / "dicom-samples"
    rows = ["path,label,patient_id", f"{samples / 'CT_small.dcm'},a,P1", f"{samples / 'MR_small.dcm'},b,P2",
            f"{samples / 'MR_truncated.dcm'},a,P3", f"{samples / 'rtplan.dcm'},b,P4"]
    m = _write(tmp_path, "\n".join(rows) + "\n")
    from medtl.data import readers

    calls = []
    real = readers.read_image
    monkeypatch.setattr(readers, "read_image", lambda p, **kw: calls.append(p) or real(p, **kw))
    cfg = load_config({"data": {"path": str(m), "image_size": [32, 32]}})
    with pytest.raises(DataError) as err:
        prepare(cfg, progress=False)
    msg = str(err.value)
    assert "MR_truncated.dcm" in msg and "rtplan.dcm" in msg and "on_error=skip" in msg
    calls.clear()
    cfg = load_config({"data": {"path": str(m), "image_size": [32, 32], "on_error": "skip"}})
    data = prepare(cfg, progress=False)
    assert len(calls) == 4  # each file decoded exactly once
    assert data.images.shape == (2, 1, 32, 32) and len(data.skipped) == 2
    assert all(s["reason"] for s in data.skipped)


def test_resample_keeps_physical_size():
    """A 100 mm disc imaged at 1 mm and at 0.5 mm pixels is the same size after resampling to 2 mm."""
    t = preprocess_transform(IntensityConfig(mode="minmax"), [64, 64], spacing=[2.0, 2.0])
    yy, xx = np.mgrid[:200, :200]
    coarse = ((yy - 100) ** 2 + (xx - 100) ** 2 < 50 ** 2).astype(np.float32)[None]
    yy, xx = np.mgrid[:400, :400]
    fine = ((yy - 200) ** 2 + (xx - 200) ** 2 < 100 ** 2).astype(np.float32)[None]
    a, b = t(coarse, (1.0, 1.0)), t(fine, (0.5, 0.5))
    assert a.shape == b.shape == (1, 64, 64)
    assert abs(float((a > 0.5).sum()) - float((b > 0.5).sum())) < 30
    assert abs(float((a > 0.5).sum()) - np.pi * 25 ** 2) < 120


# --------------------------------------------------------------------------- labels mean what they say
def test_numeric_and_boolean_spellings_are_one_class_each(tmp_path, caplog):
    from medtl.data.manifest import label_spellings

    cases = read_manifest(_write(tmp_path, "path,label,patient_id\na,0,P1\nb,1.0,P2\nc, 1,P3\nd,0.0,P4\ne,+1,P5\n"))
    assert [c.label for c in cases] == ["0", "1", "1", "0", "1"]
    assert label_spellings(cases) == {"0": {"0.0": 1}, "1": {"+1": 1, "1.0": 1}}  # " 1" is just spacing
    assert "labels canonicalised: '0.0' -> '0' (1 row), '+1' -> '1' (1 row), '1.0' -> '1' (1 row)" in caplog.text
    cases = read_manifest(_write(tmp_path, "path,label,patient_id\na,True,P1\nb,true,P2\nc,FALSE,P3\nd,False,P4\n"))
    assert [c.label for c in cases] == ["True", "True", "False", "False"]
    assert label_spellings(cases) == {"False": {"FALSE": 1}, "True": {"true": 1}}


def test_consistent_labels_are_left_alone(tmp_path, caplog):
    cases = read_manifest(_write(tmp_path, "path,label,patient_id\na,benign,P1\nb,malignant,P2\nc,0.5,P3\n"))
    assert [c.label for c in cases] == ["benign", "malignant", "0.5"] and all(c.raw_label is None for c in cases)
    assert "canonicalised" not in caplog.text


@pytest.mark.parametrize("text,needle", [
    ("path,label,patient_id\na,1,P1\nb,true,P2\nc,0,P3\n",
     ("column 'label' mixes numeric labels ('0', '1') and true/false labels ('true'), so it is not clear which "
      "are the same class. Spell each class one way")),
    ("path,label,patient_id\na,Benign,P1\nb,benign,P2\nc,x,P3\n",
     "spells one class several ways that differ only in letter case or spacing ('Benign', 'benign')"),
    ("path,label,patient_id,label\na,0,P1,1\n",
     "repeats column name(s) in its header: 'label' in columns 2, 4. A CSV reader keeps only the last"),
    ("path, label,patient_id,label \na,0,P1,1\n", "'label' in columns 2, 4"),
])
def test_labels_that_cannot_be_read_one_way_are_refused(tmp_path, text, needle):
    with pytest.raises(DataError) as err:
        read_manifest(_write(tmp_path, text))
    assert needle in str(err.value) and "m.csv" in str(err.value)


def test_label_csv_with_repeated_columns_is_refused(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "labels.csv").write_text("file,label,label\na.dcm,0,1\n")
    with pytest.raises(DataError, match=r"labels.csv' repeats column name\(s\) in its header: 'label' in columns 2, 3"):
        read_labelled_folder(tmp_path / "img", tmp_path / "labels.csv", file_column="file", label_column="label")


def test_symlink_loops_in_manifests_and_label_csvs_are_named(tmp_path):
    (tmp_path / "loop.dcm").symlink_to("loop.dcm")
    with pytest.raises(DataError, match=r"row 2: path 'loop.dcm' is a symlink loop"):
        read_manifest(_write(tmp_path, "path,label,patient_id\nloop.dcm,0,P1\n"), root=tmp_path)
    (tmp_path / "labels.csv").write_text("file,label,patient\nloop.dcm,0,P1\n")
    with pytest.raises(DataError, match=r"row 2: file 'loop.dcm' is a symlink loop"):
        read_labelled_folder(tmp_path, tmp_path / "labels.csv", file_column="file", label_column="label",
                             patient_column="patient")


def _manifest_of(tmp_path, labels, patients=None, n_missing=0):
    rows = ["path,label,patient_id"]
    for i, label in enumerate(labels):
        rows.append(f"f{i}.dcm,{label},{patients[i] if patients else f'P{i}'}")
    return _write(tmp_path, "\n".join(rows) + "\n")


def test_a_single_class_is_refused_before_decoding(tmp_path, monkeypatch):
    from medtl.data import readers

    monkeypatch.setattr(readers, "read_image", lambda *a, **k: pytest.fail("nothing is decoded"))
    cfg = load_config({"data": {"path": str(_manifest_of(tmp_path, ["1", "1.0", "1"])), "image_size": [16, 16]}})
    with pytest.raises(DataError) as err:
        prepare(cfg, progress=False)
    assert str(err.value) == (
        "Only one class is present: all 3 labelled cases have label '1' (3 patient(s)). A classifier needs at least "
        "two classes. Check that data.label_column names the label column, or add cases of the other class(es).")


def test_a_class_with_fewer_patients_than_folds_is_refused(tmp_path, monkeypatch):
    from medtl.data import readers

    monkeypatch.setattr(readers, "read_image", lambda *a, **k: pytest.fail("nothing is decoded"))
    path = _manifest_of(tmp_path, ["0"] * 6 + ["1"] * 3, [f"P{i}" for i in range(6)] + ["Q1", "Q1", "Q2"])
    cfg = load_config({"data": {"path": str(path), "image_size": [16, 16]}})
    with pytest.raises(DataError) as err:
        prepare(cfg, progress=False, min_patients_per_class=5)
    assert str(err.value) == ("Class(es) '1' (2 patients) have fewer patients than the 5 folds: stratified k-fold CV "
                              "puts every class in each fold. Lower cv.n_splits to 2, or add patients of that class.")


def test_configured_class_names_take_the_labels_spelling(tmp_path, shared_data):
    samples = shared_data / "dicom-samples"
    path = _write(tmp_path, f"path,label,patient_id\n{samples / 'CT_small.dcm'},1.0,P1\n{samples / 'MR_small.dcm'},0,P2\n")
    cfg = load_config({"data": {"path": str(path), "image_size": [16, 16], "class_names": ["0.0", "1.0"]}})
    data = prepare(cfg, progress=False)
    assert data.class_names == ["0", "1"] and data.y.tolist() == [1, 0]
    cfg = load_config({"data": {"path": str(path), "image_size": [16, 16], "class_names": ["0", "2"]}})
    with pytest.raises(DataError, match=r"Class\(es\) \['2'\] of data.class_names have no case; .* The labels present "
                                        r"are \['0', '1'\]"):
        prepare(cfg, progress=False)


def test_a_cache_over_the_memory_budget_is_decoded_to_disk(tmp_path, monkeypatch):
    from medtl.data import readers

    seen = []

    def fake_read(path, **kw):
        seen.append(path)
        return readers.ScanImage(np.full((1, 64, 64), len(seen), np.float32), (1.0, 1.0))

    monkeypatch.setattr(readers, "read_image", fake_read)
    path = _manifest_of(tmp_path, ["0", "1"] * 10)
    cfg = load_config({"data": {"path": str(path), "image_size": [512, 512], "memory_budget": "16MiB",
                                "intensity": {"mode": "range", "vmin": 0, "vmax": 20}},
                       "train": {"batch_size": 8}, "explain": {"batch_size": 8}})
    data = prepare(cfg, progress=False, cache_dir=tmp_path / "decoded")  # 21 MB of images, 16.8 MB budget
    assert data.on_disk and data.images.shape == (20, 1, 512, 512) and len(seen) == 20
    assert np.asarray(data.images[[4]]).max() == pytest.approx(5 / 20)


def test_the_memory_budget_limits_each_file_and_memory_errors_are_per_file(tmp_path, monkeypatch, shared_data):
    import importlib

    prep = importlib.import_module("medtl.data.prepare")  # the package attribute is the function
    samples = shared_data / "dicom-samples"
    path = _write(tmp_path, f"path,label,patient_id\n{samples / 'CT_small.dcm'},0,P1\n"
                            f"{samples / 'MR_small.dcm'},1,P2\n")
    cfg = load_config({"data": {"path": str(path), "image_size": [16, 16], "on_error": "skip",
                                "memory_budget": "16MiB"}, "train": {"batch_size": 2}})
    seen = []
    real = prep._decode
    monkeypatch.setattr(prep, "_decode", lambda case, limit=None, *rest: seen.append(limit) or real(case, limit, *rest))
    prepare(cfg, progress=False)
    assert seen and all(limit <= 16 << 20 for limit in seen)

    real_transform = prep.preprocess_transform

    def transform(*args, **kwargs):
        t = real_transform(*args, **kwargs)
        calls = []

        def run(raw, spacing):
            calls.append(1)
            if len(calls) == 1:
                raise MemoryError
            return t(raw, spacing)
        return run

    monkeypatch.setattr(prep, "preprocess_transform", transform)
    with pytest.raises(DataError) as err:  # the other file alone is one class
        prepare(cfg, progress=False)
    assert "after 1 unreadable file(s) were skipped" in str(err.value)
    cfg = load_config({"data": {"path": str(path), "image_size": [16, 16], "on_error": "raise"}})
    with pytest.raises(DataError, match=r"CT_small.dcm: out of memory while decoding or preprocessing this file "
                                        r"\(MemoryError;"):
        prepare(cfg, progress=False)


def test_series_column_picks_one_series_of_a_folder(tmp_path):
    from medtl.data.readers import series_key
    from tests.data.test_dicom_series import write_series, write_slice

    write_series(tmp_path / "s", [0.0, 3.0, 6.0], series_uid="1.2.3.10", SeriesNumber=2)
    for i, z in enumerate([0.0, 5.0]):
        write_slice(tmp_path / "s" / f"B{i}.dcm", np.zeros((4, 3)), position=(0.0, 0.0, z), series_uid="1.2.3.20",
                    SeriesNumber=3)
    p = _write(tmp_path, f"path,label,patient_id,series\ns,a,P1,1\ns,b,P1,{series_key('1.2.3.20')}\ns,b,P2,\n")
    cases = read_manifest(p)  # one folder listed once per series is not a duplicate
    assert [c.series for c in cases] == ["1", series_key("1.2.3.20"), None]
    cfg = load_config({"data": {"path": str(p), "spatial_dims": 3, "image_size": [8, 8, 8], "on_error": "skip",
                                "intensity": {"mode": "minmax"}}})
    data = prepare(cfg, cases, progress=False, require_all_classes=False)
    assert [c.case_id for c in data.cases] == ["row00002", "row00003"]
    assert [g.shape for g in data.geometry] == [(3, 4, 3), (3, 4, 2)]  # (x, y, z): 3 and 2 slices
    assert "the folder holds 2 series" in data.skipped[0]["reason"] and "1.2.3." not in data.skipped[0]["reason"]
    with pytest.raises(DataError, match="already listed in row 2"):
        read_manifest(_write(tmp_path, "path,label,patient_id,series\ns,a,P1,1\ns,b,P1,1\n"))
