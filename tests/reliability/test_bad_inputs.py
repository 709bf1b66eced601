"""Generated bad inputs: each fails with a specific, named reason (or error), never a crash.

Files: empty, random bytes, NaN/Inf, zero-size, 4D/5D NIfTI. Series folders: missing slices,
uneven spacing, mixed orientations. Manifests: missing columns, unknown labels, duplicate
rows, paths outside the data root. Configs: unknown keys.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid
from reliability_util import write_ct

from medtl.config import load_config
from medtl.data.manifest import read_labelled_folder, read_manifest
from medtl.data.prepare import prepare
from medtl.data.readers import read_image
from medtl.errors import ConfigError, DataError, UnreadableFileError


def _reason(path: Path) -> str:
    with pytest.raises(UnreadableFileError) as exc:
        read_image(path)
    assert exc.value.path == str(path)
    return exc.value.reason


# --------------------------------------------------------------------------- single files
@pytest.mark.parametrize("name", ["scan.dcm", "scan", "scan.nii", "scan.nii.gz", "scan.png"])
def test_empty_file(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_bytes(b"")
    assert _reason(tmp_path / name) == "empty file (0 bytes): the export or copy did not finish"


@pytest.mark.parametrize("name,needle", [
    ("noise.dcm", "not a DICOM file"), ("noise", "not a DICOM file"),
    ("noise.nii", "not a valid NIfTI file"), ("noise.nii.gz", "not a valid NIfTI file"),
    ("noise.png", "not a valid PNG image"), ("noise.tiff", "not a valid TIFF image"),
])
def test_random_bytes(tmp_path: Path, name: str, needle: str) -> None:
    (tmp_path / name).write_bytes(np.random.default_rng(1).bytes(4096))
    assert needle in _reason(tmp_path / name)


def test_random_bytes_behind_a_dicom_preamble(tmp_path: Path) -> None:
    path = tmp_path / "fake.dcm"
    path.write_bytes(b"\0" * 128 + b"DICM" + np.random.default_rng(2).bytes(3000))
    reason = _reason(path)
    assert reason.startswith(("truncated file", "not a DICOM file", "unparsable DICOM header", "invalid VR")), reason


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_inf_volumes(tmp_path: Path, bad: float) -> None:
    vol = np.ones((4, 5, 6), np.float32)
    vol[1, 2, 3] = bad
    nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / "v.nii.gz")
    assert _reason(tmp_path / "v.nii.gz") == "NaN/Inf in image data (1 of 120 voxels)"


def test_inf_in_float_dicom(tmp_path: Path) -> None:
    path = write_ct(tmp_path / "f.dcm", np.zeros((2, 2)))
    ds = pydicom.dcmread(path)
    del ds.PixelData, ds.PixelRepresentation, ds.RescaleSlope, ds.RescaleIntercept
    ds.BitsAllocated = 32
    ds.FloatPixelData = np.array([[0, np.inf], [1, 2]], dtype=np.float32).tobytes()
    ds.save_as(path, enforce_file_format=True)
    assert _reason(path) == "NaN/Inf in pixel data (1 of 4 values)"


def test_zero_size_images(tmp_path: Path) -> None:
    nib.save(nib.Nifti1Image(np.zeros((0, 3, 3), np.float32), np.eye(4)), tmp_path / "z.nii")
    assert _reason(tmp_path / "z.nii") == "empty or 1D image (shape (0, 3, 3))"
    path = write_ct(tmp_path / "z.dcm", np.zeros((4, 4)))
    ds = pydicom.dcmread(path)
    ds.Columns, ds.PixelData = 0, b""
    ds.save_as(path, enforce_file_format=True)
    assert _reason(path).startswith("empty image: Rows=4, Columns=0")
    ds = pydicom.dcmread(write_ct(tmp_path / "nopix.dcm", np.zeros((4, 4))))
    ds.PixelData = b""
    ds.save_as(tmp_path / "nopix.dcm", enforce_file_format=True)
    assert _reason(tmp_path / "nopix.dcm").startswith("empty Pixel Data element (0 bytes)")


def test_4d_and_5d_nifti_where_3d_is_expected(tmp_path: Path) -> None:
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 3, 2), np.float32), np.eye(4)), tmp_path / "t.nii.gz")
    assert _reason(tmp_path / "t.nii.gz").startswith("4D volume (shape (4, 4, 3, 2)); medtl reads 2D images and 3D")
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 3, 2, 2), np.float32), np.eye(4)), tmp_path / "f.nii.gz")
    assert _reason(tmp_path / "f.nii.gz").startswith("5D volume")
    # a trailing singleton time axis is just a 3D volume
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 3, 1), np.float32), np.eye(4)), tmp_path / "s.nii.gz")
    assert read_image(tmp_path / "s.nii.gz").array.shape == (1, 4, 4, 3)  # RAS (x, y, z)


# --------------------------------------------------------------------------- DICOM series folders
def _series(folder: Path, z: list[float], orientations: list[tuple] | None = None) -> Path:
    uid = generate_uid()
    for i, zi in enumerate(z):
        iop = orientations[i] if orientations else (1, 0, 0, 0, 1, 0)
        write_ct(folder / f"IM{i:03d}.dcm", np.full((6, 6), 1000 + i), position=(0.0, 0.0, zi),
                 orientation=iop, series_uid=uid)
    return folder


def test_even_series_loads(tmp_path: Path) -> None:
    img = read_image(_series(tmp_path / "ok", [0.0, 2.5, 5.0, 7.5, 10.001]))
    assert img.array.shape == (1, 6, 6, 5) and img.spacing[2] == pytest.approx(2.5, abs=1e-3)  # RAS: slices last


def test_series_with_missing_slices(tmp_path: Path) -> None:
    reason = _reason(_series(tmp_path / "gap", [0.0, 2.5, 5.0, 12.5, 15.0]))
    assert reason.startswith("missing slices: 2 slice(s) absent from a series spaced 2.5 mm (gap after sorted slice 3)")


def test_series_with_inconsistent_spacing(tmp_path: Path) -> None:
    reason = _reason(_series(tmp_path / "uneven", [0.0, 2.5, 5.0, 8.0, 10.0]))
    assert reason.startswith("inconsistent slice spacing: steps between slices range from 2 to 3 mm")


def test_series_with_mixed_orientations(tmp_path: Path) -> None:
    axial, coronal = (1, 0, 0, 0, 1, 0), (1, 0, 0, 0, 0, -1)
    folder = _series(tmp_path / "mixed", [0.0, 2.5, 5.0], [axial, axial, coronal])
    assert _reason(folder).startswith("mixed orientations in the series: 2 slices are axial (ImageOrientationPatient "
                                      "[1, 0, 0, 0, 1, 0]) but 1 coronal ([1, 0, 0, 0, 0, -1]): IM002.dcm")


def test_series_with_a_corrupt_member_names_the_file(tmp_path: Path) -> None:
    folder = _series(tmp_path / "cut", [0.0, 2.5, 5.0])
    raw = (folder / "IM001.dcm").read_bytes()
    (folder / "IM001.dcm").write_bytes(raw[:-20])
    assert _reason(folder).startswith("IM001.dcm: truncated")


# --------------------------------------------------------------------------- manifests
def _manifest(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "manifest.csv"
    path.write_text(text)
    return path


def test_manifest_missing_columns(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"lacks column\(s\) \['label', 'patient_id'\]"):
        read_manifest(_manifest(tmp_path, "path,site\na.dcm,s1\n"))


def test_manifest_duplicate_rows(tmp_path: Path) -> None:
    text = "path,label,patient_id\na.dcm,0,P1\nb.dcm,1,P2\n./a.dcm,0,P3\nb.dcm,1,P2\n"
    with pytest.raises(DataError) as exc:
        read_manifest(_manifest(tmp_path, text))
    msg = str(exc.value)
    assert "2 malformed row(s)" in msg
    assert "row 4: path './a.dcm' is already listed in row 2" in msg and "row 5: path 'b.dcm'" in msg
    assert len(read_manifest(tmp_path / "manifest.csv", allow_duplicates=True)) == 4  # the audit's view


def test_manifest_paths_outside_the_data_root(tmp_path: Path) -> None:
    root = tmp_path / "data"
    root.mkdir()
    (root / "link.dcm").symlink_to(tmp_path / "elsewhere.dcm")
    text = "path,label,patient_id\nin.dcm,0,P1\n../secret.dcm,1,P2\n/etc/passwd,1,P3\nlink.dcm,0,P4\n"
    path = _manifest(root, text)
    with pytest.raises(DataError) as exc:
        read_manifest(path, root=root)
    msg = str(exc.value)
    assert "3 malformed row(s)" in msg and "outside the data root" in msg
    assert all(f"row {n}:" in msg for n in (3, 4, 5)) and "row 2:" not in msg
    assert len(read_manifest(path)) == 4  # no root given: paths are the user's choice


def test_labelled_folder_duplicate_rows(tmp_path: Path) -> None:
    write_ct(tmp_path / "img" / "a.dcm", np.zeros((4, 4)))
    (tmp_path / "labels.csv").write_text("file,label\na.dcm,0\na.dcm,1\n")
    with pytest.raises(DataError, match="row 3: file 'a.dcm' is already listed in row 2"):
        read_labelled_folder(tmp_path / "img", tmp_path / "labels.csv", file_column="file", label_column="label")


def test_unknown_labels_and_missing_files(tmp_path: Path) -> None:
    for i in range(3):
        write_ct(tmp_path / f"{i}.dcm", np.full((8, 8), 900 + 50 * i))
    path = _manifest(tmp_path, "path,label,patient_id\n0.dcm,yes,P0\n1.dcm,no,P1\n2.dcm,maybe,P2\n")
    cfg = load_config({"data": {"path": str(path), "class_names": ["no", "yes"], "image_size": [16, 16],
                                "intensity": {"mode": "minmax"}}})
    with pytest.raises(DataError, match=r"Labels \['maybe'\] are not in data.class_names=\['no', 'yes'\]"):
        prepare(cfg, progress=False)
    path = _manifest(tmp_path, "path,label,patient_id\n0.dcm,yes,P0\ngone.dcm,no,P1\n")
    cfg = load_config({"data": {"path": str(path), "image_size": [16, 16]}})
    with pytest.raises(DataError, match=r"1 of 2 file\(s\) could not be used:\n  .*gone.dcm: file not found"):
        prepare(cfg, progress=False)


# --------------------------------------------------------------------------- configs
def test_unknown_config_keys_are_named_with_a_suggestion(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config({"data": {"path": "m.csv"}, "train": {"epoch": 3}, "modle": {}})
    msg = str(exc.value)
    assert "unknown key 'train.epoch'. Did you mean 'epochs'?" in msg
    assert "unknown key 'modle'. Did you mean 'model'?" in msg
    with pytest.raises(ConfigError, match="unknown key 'data.intensity.windw'"):
        load_config({"data": {"path": "m.csv"}}, ["data.intensity.windw=3"])
