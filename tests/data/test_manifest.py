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
    import medtl.data.readers as readers

    calls = []
    real = readers.read_image
    monkeypatch.setattr(readers, "read_image", lambda p: calls.append(p) or real(p))
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
