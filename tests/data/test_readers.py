"""Tests for medtl.data.readers: synthetic DICOM/NIfTI/PNG files and the real corpora."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import get_decoder
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    MPEG2MPML,
    generate_uid,
)

from medtl.data.privacy import IDENTIFYING_TAGS
from medtl.data.readers import SUPPORTED_SUFFIXES, ScanImage, read_dicom_patient_id, read_image
from medtl.errors import UnreadableFileError

PATIENT_ID = "MRN-SECRET-4711"
PATIENT_NAME = "Doe^Jane"

def write_dicom(path: Path, pixels: np.ndarray, *, modality: str = "CT", photometric: str = "MONOCHROME2",
                slope: float | None = 1.0, intercept: float | None = -1024.0,
                position: tuple[float, float, float] | None = None,
                orientation: tuple[float, ...] = (1, 0, 0, 0, 1, 0), series_uid: str | None = None,
                instance: int | None = None, spacing: tuple[float, float] = (0.7, 0.6),
                patient_id: str = PATIENT_ID, **extra: object) -> Path:
    """Write a minimal but conformant DICOM image (Explicit VR LE) with identifying tags."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientID, ds.PatientName, ds.PatientBirthDate = patient_id, PATIENT_NAME, "19600101"
    ds.InstitutionName, ds.AccessionNumber = "General Hospital", "ACC998877"
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.Modality, ds.Manufacturer, ds.ManufacturerModelName = modality, "ACME", "Scan 3000"
    ds.PixelSpacing = list(spacing)
    if slope is not None:
        ds.RescaleSlope = slope
    if intercept is not None:
        ds.RescaleIntercept = intercept
    if position is not None:
        ds.ImagePositionPatient = list(position)
        ds.ImageOrientationPatient = list(orientation)
    if instance is not None:
        ds.InstanceNumber = instance
    for key, value in extra.items():
        setattr(ds, key, value)
    bits = 16 if pixels.dtype.itemsize == 2 else 8
    ds.set_pixel_data(pixels, photometric, bits)
    ds.save_as(path, enforce_file_format=True)
    return path


# --------------------------------------------------------------------------- DICOM files
def test_ct_rescale_gives_hounsfield_units(tmp_path: Path) -> None:
    stored = np.array([[0, 1024, 2024], [24, 1064, 4095]], dtype=np.uint16)
    img = read_image(write_dicom(tmp_path / "ct.dcm", stored))
    assert isinstance(img, ScanImage)
    assert img.array.dtype == np.float32 and img.array.shape == (1, 2, 3)
    np.testing.assert_allclose(img.array[0], stored.astype(float) - 1024)
    assert img.is_hu and img.modality == "CT"
    assert img.spacing == pytest.approx((0.7, 0.6))
    img2 = read_image(write_dicom(tmp_path / "ct2.dcm", stored, slope=2.0, intercept=-1000.0))
    np.testing.assert_allclose(img2.array[0], stored.astype(float) * 2 - 1000)


@pytest.mark.parametrize("signed", [False, True])
def test_bits_above_bits_stored_are_ignored(tmp_path: Path, signed: bool) -> None:
    """12 of 16 bits stored: values come from the stored bits, whether the unused ones are clean or not."""
    values = np.array([[0, 100, 2047], [-2048 if signed else 4095, -1 if signed else 3000, 5]])
    dtype = np.int16 if signed else np.uint16
    clean = values.astype(dtype)
    dirty = (clean.view(np.uint16) ^ np.uint16(0xA000)).view(dtype) if signed else clean | np.uint16(0xF000)
    for name, pixels in (("clean", clean), ("dirty", dirty)):
        path = write_dicom(tmp_path / f"{name}.dcm", pixels)
        ds = pydicom.dcmread(path)
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, int(signed)
        ds.save_as(path, enforce_file_format=True)
        img = read_image(path)
        np.testing.assert_array_equal(img.array[0], values - 1024.0)  # slope 1, intercept -1024
        reference = pydicom.dcmread(path).pixel_array  # pydicom's own correction
        np.testing.assert_array_equal(img.array[0], reference.astype(np.float64) - 1024.0)


def test_mr_without_rescale_is_not_hu(tmp_path: Path) -> None:
    stored = np.arange(12, dtype=np.uint16).reshape(3, 4)
    img = read_image(write_dicom(tmp_path / "mr.dcm", stored, modality="MR", slope=None, intercept=None))
    assert not img.is_hu and img.modality == "MR"
    np.testing.assert_array_equal(img.array[0], stored)


def test_monochrome1_is_inverted(tmp_path: Path) -> None:
    stored = np.array([[0, 100], [200, 1000]], dtype=np.uint16)
    path = write_dicom(tmp_path / "cr.dcm", stored, modality="CR", photometric="MONOCHROME1",
                       slope=None, intercept=None)
    arr = read_image(path).array[0]
    # low stored values are white in MONOCHROME1 → they must become the brightest
    np.testing.assert_allclose(arr, 1000 - stored.astype(float))
    assert arr[0, 0] == arr.max() and arr[1, 1] == arr.min()


def test_meta_is_technical_and_never_identifying(tmp_path: Path) -> None:
    img = read_image(write_dicom(tmp_path / "ct.dcm", np.zeros((4, 4), np.uint16), KVP=120,
                                 ConvolutionKernel="B30f", ContrastBolusAgent="IOPAMIDOL"))
    assert img.meta["Manufacturer"] == "ACME" and img.meta["KVP"] == 120.0
    assert img.meta["ConvolutionKernel"] == "B30f" and img.meta["ContrastBolusAgent"] == "IOPAMIDOL"
    assert img.meta["transfer_syntax"] == "Explicit VR Little Endian"
    assert not set(img.meta) & set(IDENTIFYING_TAGS)
    text = repr(img.meta)
    for secret in (PATIENT_ID, "Doe", "19600101", "General Hospital", "ACC998877"):
        assert secret not in text


def test_patient_id_header_read(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "a.dcm", np.zeros((2, 2), np.uint16))
    assert read_dicom_patient_id(path) == PATIENT_ID
    assert read_dicom_patient_id(tmp_path) == PATIENT_ID
    (tmp_path / "b").mkdir()
    empty = write_dicom(tmp_path / "b" / "x.dcm", np.zeros((2, 2), np.uint16), patient_id="")
    assert read_dicom_patient_id(empty) is None
    write_dicom(tmp_path / "c.dcm", np.zeros((2, 2), np.uint16), patient_id="OTHER-1")
    with pytest.raises(UnreadableFileError, match="mixes 2 patients") as exc:
        read_dicom_patient_id(tmp_path)
    assert PATIENT_ID not in str(exc.value) and "OTHER-1" not in str(exc.value)


def test_float_pixel_data_with_nan_is_rejected(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "f.dcm", np.zeros((2, 2), np.uint16), slope=None, intercept=None)
    ds = pydicom.dcmread(path)
    del ds.PixelData, ds.PixelRepresentation
    ds.BitsAllocated = 32
    ds.FloatPixelData = np.array([[0, np.nan], [1, 2]], dtype=np.float32).tobytes()
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(UnreadableFileError, match="NaN/Inf in pixel data"):
        read_image(path)


def test_dicom_failures_have_specific_reasons(tmp_path: Path) -> None:
    with pytest.raises(UnreadableFileError, match="file not found"):
        read_image(tmp_path / "missing.dcm")
    (tmp_path / "notes.dcm").write_text("this is not DICOM " * 20)
    with pytest.raises(UnreadableFileError, match="not a DICOM file"):
        read_image(tmp_path / "notes.dcm")
    (tmp_path / "table.xlsx").write_bytes(b"PK")
    with pytest.raises(UnreadableFileError, match=r"unsupported file type '\.xlsx'.*\.nii\.gz"):
        read_image(tmp_path / "table.xlsx")
    good = write_dicom(tmp_path / "ct.dcm", np.arange(64 * 64, dtype=np.uint16).reshape(64, 64))
    raw = good.read_bytes()
    (tmp_path / "cut.dcm").write_bytes(raw[: len(raw) - 3000])
    with pytest.raises(UnreadableFileError, match="truncated"):
        read_image(tmp_path / "cut.dcm")
    ds = pydicom.dcmread(good)
    ds.Rows = 0
    ds.PixelData = b""
    ds.save_as(tmp_path / "empty.dcm", enforce_file_format=True)
    with pytest.raises(UnreadableFileError, match="empty image: Rows=0"):
        read_image(tmp_path / "empty.dcm")


def test_transfer_syntax_without_any_decoder(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "jxl.dcm", np.zeros((4, 4), np.uint16))
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = MPEG2MPML  # video: pydicom has no decoder for it
    ds.PixelData = pydicom.encaps.encapsulate([b"\xff\x0a" + b"\x00" * 30])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(UnreadableFileError, match="no decoder exists in pydicom for the transfer syntax MPEG2"):
        read_image(path)


def test_missing_decoder_names_the_package(shared_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    decoder = get_decoder(JPEG2000Lossless)
    monkeypatch.setattr(decoder, "_available", {})  # as if pylibjpeg-openjpeg were not installed
    with pytest.raises(UnreadableFileError, match="pylibjpeg-openjpeg") as exc:
        read_image(shared_data / "dicom-samples" / "MR_small_jp2klossless.dcm")
    assert "JPEG 2000" in exc.value.reason and "python-gdcm" in exc.value.reason


def test_unexpected_errors_are_wrapped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from medtl.data import _dicom

    path = write_dicom(tmp_path / "ct.dcm", np.zeros((2, 2), np.uint16))
    monkeypatch.setattr(_dicom, "decode_dataset", lambda ds, p, **kw: 1 / 0)
    with pytest.raises(UnreadableFileError, match="unexpected decoder error: ZeroDivisionError"):
        read_image(path)


# --------------------------------------------------------------------------- series folders
def _series(folder: Path, n: int = 5, *, series_uid: str | None = None, start: int = 0,
            shape: tuple[int, int] = (6, 5), step: float = 2.5) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    uid = series_uid or generate_uid()
    order = list(range(n))
    random.Random(1).shuffle(order)
    for rank, k in enumerate(order):
        z = k * step - 40.0
        pixels = np.full(shape, 1024 + 100 * k, dtype=np.uint16)
        # file names and InstanceNumbers both disagree with the spatial order
        write_dicom(folder / f"IM{start + rank:04d}", pixels, position=(-10.0, 20.0, z),
                    series_uid=uid, instance=n - rank)


def test_series_sorted_by_position_with_slice_spacing(tmp_path: Path) -> None:
    _series(tmp_path / "s")
    (tmp_path / "s" / "README.txt").write_text("not dicom")  # ignored
    img = read_image(tmp_path / "s")
    assert img.array.shape == (1, 5, 6, 5) and img.array.dtype == np.float32  # RAS: (x, y, z) = (col, row, slice)
    np.testing.assert_allclose(img.array[0, 0, 0, :], [0, 100, 200, 300, 400])
    assert img.spacing == pytest.approx((0.6, 0.7, 2.5))
    assert img.is_hu and img.meta["n_slices"] == 5 and img.meta["slice_order"] == "ImagePositionPatient"


def test_mixed_series_folder_is_rejected_with_counts_only(tmp_path: Path) -> None:
    uid_a, uid_b = generate_uid(), generate_uid()
    _series(tmp_path / "m", 3, series_uid=uid_a)
    _series(tmp_path / "m", 2, series_uid=uid_b, start=10)
    with pytest.raises(UnreadableFileError, match=r"holds 2 series.*#1 key \w{8}, [32] image\(s\)") as exc:
        read_image(tmp_path / "m")
    assert uid_a not in str(exc.value) and uid_b not in str(exc.value)
    assert "own folder" in exc.value.reason


def test_mixed_sizes_and_duplicate_positions_are_rejected(tmp_path: Path) -> None:
    uid = generate_uid()
    _series(tmp_path / "sz", 3, series_uid=uid)
    _series(tmp_path / "sz", 1, series_uid=uid, start=10, shape=(8, 8))
    with pytest.raises(UnreadableFileError, match=r"mixed image sizes.*6x5 \(3 files\), 8x8 \(1 file\)"):
        read_image(tmp_path / "sz")
    _series(tmp_path / "dup", 3, series_uid=uid)
    _series(tmp_path / "dup", 2, series_uid=uid, start=10)
    with pytest.raises(UnreadableFileError, match="share the same position"):
        read_image(tmp_path / "dup")
    (tmp_path / "none").mkdir()
    (tmp_path / "none" / "a.txt").write_text("x")
    with pytest.raises(UnreadableFileError, match="no DICOM image in the folder"):
        read_image(tmp_path / "none")


# --------------------------------------------------------------------------- NIfTI and PNG
def test_nifti_axes_spacing_and_orientation(tmp_path: Path) -> None:
    data = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)  # (x, y, z)
    nib.save(nib.Nifti1Image(data, np.diag([0.5, 0.8, 2.5, 1.0])), tmp_path / "ras.nii.gz")
    img = read_image(tmp_path / "ras.nii.gz")
    assert img.array.shape == (1, 4, 5, 6) and img.array.dtype == np.float32  # RAS: (x, y, z)
    assert img.spacing == pytest.approx((0.5, 0.8, 2.5))
    np.testing.assert_array_equal(img.array[0], data)
    # x axis stored right-to-left (LAS): reoriented to RAS, so x is flipped
    nib.save(nib.Nifti1Image(data, np.diag([-0.5, 0.8, 2.5, 1.0])), tmp_path / "las.nii")
    las = read_image(tmp_path / "las.nii")
    np.testing.assert_array_equal(las.array[0], data[::-1])
    nib.save(nib.Nifti1Image(data[:, :, :1], np.diag([0.5, 0.8, 2.5, 1.0])), tmp_path / "flat.nii")
    flat = read_image(tmp_path / "flat.nii")
    assert flat.array.shape == (1, 4, 5) and flat.spacing == pytest.approx((0.5, 0.8))


def test_nifti_failures(tmp_path: Path) -> None:
    data = np.ones((3, 3, 3, 2), dtype=np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "t.nii.gz")
    with pytest.raises(UnreadableFileError, match=r"4D volume \(shape \(3, 3, 3, 2\)\).*slicer\[\.\.\., 0\]"):
        read_image(tmp_path / "t.nii.gz")
    bad = np.ones((3, 3, 3), dtype=np.float32)
    bad[1, 1, 1] = np.nan
    nib.save(nib.Nifti1Image(bad, np.eye(4)), tmp_path / "nan.nii")
    with pytest.raises(UnreadableFileError, match=r"NaN/Inf in image data \(1 of 27 voxels\)"):
        read_image(tmp_path / "nan.nii")
    raw = (tmp_path / "nan.nii").read_bytes()
    (tmp_path / "cut.nii").write_bytes(raw[:-50])
    with pytest.raises(UnreadableFileError, match="truncated or corrupt NIfTI"):
        read_image(tmp_path / "cut.nii")


def test_png_grey_rgb_and_corrupt(tmp_path: Path) -> None:
    grey = (np.arange(20, dtype=np.uint8).reshape(4, 5) * 10)
    Image.fromarray(grey).save(tmp_path / "g.png")
    img = read_image(tmp_path / "g.png")
    assert img.array.shape == (1, 4, 5) and img.spacing == (1.0, 1.0) and img.modality is None
    np.testing.assert_array_equal(img.array[0], grey)
    rgb = np.zeros((4, 5, 3), dtype=np.uint8)
    rgb[..., 0], rgb[..., 2] = 200, 50
    Image.fromarray(rgb).save(tmp_path / "c.png")
    arr = read_image(tmp_path / "c.png").array
    assert arr.shape == (3, 4, 5) and arr[0].max() == 200 and arr[1].max() == 0 and arr[2].min() == 50
    deep = np.array([[0, 40000], [65535, 7]], dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "d.png")
    np.testing.assert_array_equal(read_image(tmp_path / "d.png").array[0], deep)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(UnreadableFileError, match="not a valid PNG image"):
        read_image(tmp_path / "bad.png")
    noise = np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "n.png")
    raw = (tmp_path / "n.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(UnreadableFileError, match="(truncated|corrupt) image file"):
        read_image(tmp_path / "cut.png")


def test_supported_suffixes_listed() -> None:
    assert {".dcm", ".nii", ".nii.gz", ".png", ".jpg", ".tif"} <= set(SUPPORTED_SUFFIXES)


# --------------------------------------------------------------------------- real corpora
# The whole dicom-samples / nifti-samples corpora, file by file: tests/reliability/test_corpus.py
def test_lossless_codecs_and_colour_match_references(shared_data: Path) -> None:
    d = shared_data / "dicom-samples"
    ref = read_image(d / "MR_small.dcm").array
    for name in ("MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_RLE.dcm",
                 "MR_small_bigendian.dcm", "MR_small_implicit.dcm"):
        np.testing.assert_array_equal(read_image(d / name).array, ref, err_msg=name)
    rgb = read_image(d / "SC_rgb_rle.dcm").array  # lossless RGB reference (3, 100, 100)
    for name in ("SC_ybr_full_422_uncompressed.dcm", "SC_rgb_dcmtk_+eb+cy+n2.dcm"):  # YBR → RGB
        ybr = read_image(d / name).array
        assert ybr.shape == rgb.shape and np.abs(ybr - rgb).mean() < 5, name
    multi = read_image(d / "examples_ybr_color.dcm")
    assert multi.array.shape == (3, 30, 240, 320) and len(multi.spacing) == 3


def test_real_nifti_samples(shared_data: Path) -> None:
    d = shared_data / "nifti-samples"
    anat = read_image(d / "anatomical.nii")
    assert anat.array.shape == (1, 33, 41, 25) and anat.spacing == pytest.approx((2.0, 2.0, 2.0))
    std = read_image(d / "standard.nii.gz")
    assert std.array.shape == (1, 4, 5, 7) and std.spacing == pytest.approx((1.0, 3.0, 2.0))  # RAS (x, y, z)
    for name in ("example4d.nii.gz", "functional.nii"):
        with pytest.raises(UnreadableFileError, match="4D volume"):
            read_image(d / name)
    with pytest.raises(UnreadableFileError, match="NaN/Inf"):
        read_image(d / "resampled_anat_moved.nii")


def test_ct_contrast_tcga_is_hounsfield(shared_data: Path) -> None:
    files = sorted((shared_data / "ct-contrast-tcga" / "dicom").glob("*.dcm"))
    assert len(files) == 100
    air = []
    for path in files:
        img = read_image(path)
        assert img.is_hu and img.modality == "CT" and img.array.shape == (1, 512, 512)
        assert -3100 <= img.array.min() and img.array.max() <= 4000
        air.append(float(((img.array > -1100) & (img.array < -900)).mean()))
    assert min(air) > 0.02 and np.median(air) > 0.2  # air around the body reads ≈ -1000 HU


def test_series_from_real_slices(tmp_path: Path, shared_data: Path) -> None:
    src = shared_data / "dicom-samples" / "CT_small.dcm"
    for i in range(3):
        ds = pydicom.dcmread(src)
        ds.ImagePositionPatient = [0.0, 0.0, 10.0 - 3.0 * i]
        ds.SOPInstanceUID = generate_uid()
        ds.save_as(tmp_path / f"{i}.dcm")
    shutil.copy(shared_data / "dicom-samples" / "test-SR.dcm", tmp_path / "report.dcm")  # skipped
    img = read_image(tmp_path)
    assert img.array.shape == (1, 128, 128, 3) and img.spacing[2] == pytest.approx(3.0)  # RAS: slices last


def test_lazy_parse_errors_get_specific_value_free_reasons() -> None:
    import struct
    import zlib

    from pydicom.errors import BytesLengthException

    from medtl.data._dicom import describe_exception

    r = describe_exception(BytesLengthException("Instead received b'Doe^Jane' with length 8"))
    assert r.startswith("invalid VR or value length") and "Doe" not in r
    r = describe_exception(NotImplementedError("Unknown Value Representation 'HS' in tag (0028,0103)"))
    assert r == "invalid VR: unknown Value Representation 'HS' in tag (0028,0103)"
    assert describe_exception(zlib.error("Error -3 while decompressing data")).startswith("corrupt deflate")
    assert describe_exception(struct.error("unpack requires a buffer of 4 bytes")).startswith("malformed DICOM header")
    assert describe_exception(ValueError("UID is not a transfer syntax.")).startswith("invalid Transfer Syntax UID")
    r = describe_exception(RuntimeError("Invalid value for VR DA: '19650412x'"))
    assert r.startswith("unexpected decoder error: RuntimeError") and "19650412" not in r


def test_empty_pixel_data_and_corrupt_deflate(tmp_path: Path, shared_data: Path) -> None:
    path = write_dicom(tmp_path / "e.dcm", np.zeros((4, 4), np.uint16))
    ds = pydicom.dcmread(path)
    ds.PixelData = b""
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(UnreadableFileError, match=r"empty Pixel Data element \(0 bytes\).*4x4 image"):
        read_image(path)
    raw = bytearray((shared_data / "dicom-samples" / "image_dfl.dcm").read_bytes())
    raw[len(raw) // 2: len(raw) // 2 + 64] = b"\xff" * 64  # inside the deflated data set
    (tmp_path / "dfl.dcm").write_bytes(bytes(raw))
    with pytest.raises(UnreadableFileError) as exc:
        read_image(tmp_path / "dfl.dcm")
    assert exc.value.reason.startswith(("corrupt or truncated deflate", "corrupt deflate")), exc.value.reason


# --------------------------------------------------------------------------- fast ingest path
def _pydicom_reference(path: Path) -> np.ndarray:
    """Raw pydicom: pixel_array, then the modality rescale in float64, cast to float32."""
    from pydicom.pixels import apply_modality_lut

    ds = pydicom.dcmread(path)
    return apply_modality_lut(ds.pixel_array, ds).astype(np.float32)


def test_fast_path_is_bit_identical_to_pydicom(shared_data: Path) -> None:
    ct = sorted((shared_data / "ct-contrast-tcga" / "dicom").glob("*.dcm"))
    samples = [shared_data / "dicom-samples" / n for n in ("CT_small.dcm", "MR_small.dcm", "693_J2KI.dcm")]
    for path in ct[:: 20] + samples:
        ref = _pydicom_reference(path)
        ref = ref[::-1, ::-1].T  # these slices are axial (IOP [1, 0, 0, 0, 1, 0]): (row, col) LPS -> (x, y) RAS
        arr = read_image(path).array
        assert arr.dtype == np.float32 and arr.shape == (1, *ref.shape), path.name
        np.testing.assert_array_equal(arr[0], ref, err_msg=path.name)
        if path in ct:  # the benchmark's "raw" formula (float32 arithmetic) agrees too
            ds = pydicom.dcmread(path)
            raw32 = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
            np.testing.assert_array_equal(arr[0], raw32[::-1, ::-1].T, err_msg=path.name)


def test_non_integral_rescale_keeps_float64_precision(tmp_path: Path) -> None:
    stored = np.array([[0, 1, 4095], [123, 2047, 3000]], dtype=np.uint16)
    path = write_dicom(tmp_path / "pet.dcm", stored, modality="PT", slope=0.0123, intercept=-0.5)
    expected = (stored.astype(np.float64) * 0.0123 - 0.5).astype(np.float32)
    np.testing.assert_array_equal(read_image(path).array[0], expected)


def test_fast_header_values_match_pydicom(shared_data: Path) -> None:
    from medtl.data._dicom import _META_KEYWORDS, _plain, header_value

    keywords = ("Rows", "Columns", "BitsAllocated", "BitsStored", "PixelRepresentation", "SamplesPerPixel",
                "PhotometricInterpretation", "NumberOfFrames", "RescaleSlope", "RescaleIntercept", "Modality",
                "SOPClassUID", "ImagerPixelSpacing", *_META_KEYWORDS)
    files = sorted((shared_data / "ct-contrast-tcga" / "dicom").glob("*.dcm"))[:10]
    files += [p for p in sorted((shared_data / "dicom-samples").glob("*.dcm"))
              if p.name not in ("MR_truncated.dcm", "badVR.dcm", "meta_missing_tsyntax.dcm")]
    checked = 0
    for path in files:
        try:
            fast, slow = pydicom.dcmread(path), pydicom.dcmread(path)
        except Exception:  # noqa: BLE001 - files pydicom itself cannot parse are covered elsewhere
            continue
        for kw in keywords:
            try:
                expected = _plain(slow.get(kw))
            except Exception:  # noqa: BLE001 - invalid values raise on both paths
                continue
            got = header_value(fast, kw)
            empty = (None, "", [])  # an empty element reads as None (fast) or "" (pydicom fallback)
            assert (got in empty and expected in empty) or got == expected, (path.name, kw)
            checked += 1
    assert checked > 500


def test_validations_still_fire_on_the_fast_path(tmp_path: Path) -> None:
    good = write_dicom(tmp_path / "ct.dcm", np.arange(16, dtype=np.uint16).reshape(4, 4))
    ds = pydicom.dcmread(good)
    ds.RescaleSlope = "9.75"  # patched to an invalid DS below: the fast parser hands over to pydicom's message
    ds.save_as(tmp_path / "bad_slope.dcm", enforce_file_format=True)
    blob = (tmp_path / "bad_slope.dcm").read_bytes()
    assert blob.count(b"9.75") == 1
    (tmp_path / "bad_slope.dcm").write_bytes(blob.replace(b"9.75", b"abcd"))
    with pytest.raises(UnreadableFileError, match="invalid header value: RescaleSlope.*not a number"):
        read_image(tmp_path / "bad_slope.dcm")
    ds = pydicom.dcmread(good)
    del ds.Rows
    ds.save_as(tmp_path / "no_rows.dcm", enforce_file_format=True)
    with pytest.raises(UnreadableFileError, match="elements that describe it are missing: Rows"):
        read_image(tmp_path / "no_rows.dcm")
    raw = good.read_bytes()
    (tmp_path / "cut.dcm").write_bytes(raw[:-10])
    with pytest.raises(UnreadableFileError, match="truncated"):
        read_image(tmp_path / "cut.dcm")
    ds = pydicom.dcmread(good)
    ds.NumberOfFrames = 0
    ds.save_as(tmp_path / "nf.dcm", enforce_file_format=True)
    with pytest.raises(UnreadableFileError, match="empty image: .*NumberOfFrames=0"):
        read_image(tmp_path / "nf.dcm")


# --------------------------------------------------------------------------- memory: declared size before decoding
def _claiming(path: Path, transfer_syntax: str | None = None, *, rows: int = 65535, frames: int = 60000) -> Path:
    """A DICOM file whose header claims ``frames`` frames of ``rows`` x ``rows`` (pixel data: one tiny fragment)."""
    from pydicom.encaps import encapsulate

    write_dicom(path, np.zeros((4, 4), np.uint16))
    ds = pydicom.dcmread(path)
    ds.Rows = ds.Columns = rows
    ds.NumberOfFrames = frames
    if transfer_syntax is not None:
        ds.file_meta.TransferSyntaxUID = transfer_syntax
        ds.PixelData = encapsulate([b"\0" * 64])
        ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2.5", JPEG2000Lossless, None], ids=["rle", "j2k", "native"])
def test_dicom_declaring_a_huge_image_is_refused_before_decoding(tmp_path: Path, syntax, monkeypatch) -> None:
    from medtl.data import _dicom

    path = _claiming(tmp_path / "huge.dcm", syntax)
    monkeypatch.setattr(_dicom, "get_decoder", lambda ts: pytest.fail("the decoder must not be reached"))
    with pytest.raises(UnreadableFileError) as exc:
        read_image(path, max_bytes=2**30)
    assert exc.value.path == str(path)
    assert exc.value.reason.startswith(
        "image too large to decode: its header declares 60000 frames of 65535 x 65535 pixels x 1 sample = 1.03 PB "
        "as float32, over the per-image memory limit of 1.07 GB"), exc.value.reason


def test_declared_size_within_the_limit_decodes(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "ok.dcm", np.zeros((64, 64), np.uint16))
    assert read_image(path, max_bytes=64 * 64 * 4).array.shape == (1, 64, 64)
    with pytest.raises(UnreadableFileError, match=r"declares 64 x 64 pixels x 1 sample = 16.4 KB as float32, over "
                                                  r"the per-image memory limit of 16.4 KB"):
        read_image(path, max_bytes=64 * 64 * 4 - 1)


def test_a_series_is_checked_as_a_whole(tmp_path: Path) -> None:
    _series(tmp_path / "s", n=5, shape=(6, 5))
    assert read_image(tmp_path / "s", max_bytes=5 * 6 * 5 * 4).array.shape == (1, 5, 6, 5)
    with pytest.raises(UnreadableFileError, match=r"declares 5 slices of 6 x 5 pixels x 1 sample = 600 B"):
        read_image(tmp_path / "s", max_bytes=599)


def test_a_file_larger_than_the_limit_is_checked_from_its_header_only(tmp_path: Path, monkeypatch) -> None:
    from medtl.data import _dicom

    path = write_dicom(tmp_path / "big.dcm", np.zeros((64, 64), np.uint16))
    seen = []
    real = _dicom.read_dataset
    monkeypatch.setattr(_dicom, "read_dataset", lambda p, **kw: seen.append(kw) or real(p, **kw))
    with pytest.raises(UnreadableFileError, match="declares 64 x 64 pixels x 1 sample = 16.4 KB as float32"):
        read_image(path, max_bytes=1000)
    assert seen == [{"stop_before_pixels": True}]  # pixel data never read


def test_nifti_header_claiming_a_huge_volume_is_refused_before_reading_voxels(tmp_path: Path) -> None:
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((32000, 32000, 32000))
    hdr.set_data_dtype(np.float32)
    hdr["vox_offset"] = 352
    (tmp_path / "huge.nii").write_bytes(hdr.binaryblock + b"\0" * 68)
    with pytest.raises(UnreadableFileError) as exc:
        read_image(tmp_path / "huge.nii", max_bytes=2**30)
    assert exc.value.reason.startswith("image too large to decode: its header declares a 3D image of 32000 x 32000 "
                                       "x 32000 voxels (float32 on disk) = 131 TB as float32"), exc.value.reason


def test_gzip_nifti_bomb_is_refused_from_its_header(tmp_path: Path) -> None:
    import gzip

    hdr = nib.Nifti1Header()
    hdr.set_data_shape((256, 256, 256))
    hdr.set_data_dtype(np.float32)
    hdr["vox_offset"] = 352
    member = gzip.compress(b"\0" * (1 << 20), 9)
    with open(tmp_path / "bomb.nii.gz", "wb") as fh:  # 64 MiB of voxels in ~70 KB
        fh.write(gzip.compress(hdr.binaryblock + b"\0" * 4) + member * 64)
    with pytest.raises(UnreadableFileError, match=r"3D image of 256 x 256 x 256 voxels .* = 67.1 MB as float32"):
        read_image(tmp_path / "bomb.nii.gz", max_bytes=32 << 20)
    assert read_image(tmp_path / "bomb.nii.gz", max_bytes=128 << 20).array.shape == (1, 256, 256, 256)


def test_pillow_image_over_the_limit_is_refused(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((40, 30), np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(UnreadableFileError, match=r"declares 1 page\(s\) of 30 x 40 pixels x 1 channel\(s\) = 4.8 KB"):
        read_image(tmp_path / "a.png", max_bytes=4000)
    assert read_image(tmp_path / "a.png", max_bytes=4800).array.shape == (1, 40, 30)


def test_memory_error_while_decoding_is_a_failure_of_that_file(tmp_path: Path, monkeypatch) -> None:
    from medtl.data import _dicom

    path = write_dicom(tmp_path / "ct.dcm", np.zeros((2, 2), np.uint16))

    def oom(ds, p, **kw):
        raise MemoryError

    monkeypatch.setattr(_dicom, "decode_dataset", oom)
    with pytest.raises(UnreadableFileError) as exc:
        read_image(path)
    assert exc.value.path == str(path)
    assert exc.value.reason.startswith("out of memory while decoding this file (MemoryError;"), exc.value.reason


def test_corrupt_element_length_is_named_when_parsing_runs_out_of_memory(tmp_path: Path, monkeypatch) -> None:
    import struct

    path = write_dicom(tmp_path / "ct.dcm", np.zeros((4, 4), np.uint16), patient_id="MRN-1")
    ds = pydicom.dcmread(path)
    tell = ds.get_item(0x7FE00010).value_tell  # Pixel Data: OW, a 4-byte length in Explicit VR
    raw = bytearray(path.read_bytes())
    raw[tell - 4:tell] = struct.pack("<I", 0xF0000000)
    path.write_bytes(bytes(raw))
    real = pydicom.dcmread

    def capped(*args, **kwargs):  # what a 4 GB address-space cap does to pydicom's 4 GB read
        if kwargs.get("defer_size") is None:
            raise MemoryError
        return real(*args, **kwargs)

    monkeypatch.setattr(pydicom, "dcmread", capped)
    with pytest.raises(UnreadableFileError) as exc:
        read_image(path)
    size = path.stat().st_size
    assert exc.value.reason == (
        f"truncated file or corrupt element length: data element (7FE0,0010) declares 4026531840 bytes (4.03 GB), "
        f"more than the whole file ({size} bytes); reading it would need more memory than this process may use "
        "(MemoryError)")
    monkeypatch.setattr(pydicom, "dcmread", real)  # uncapped: pydicom reads to the end, the check names it
    with pytest.raises(UnreadableFileError, match=r"truncated file: the Pixel Data declares 4026531840 bytes"):
        read_image(path)


def test_symlink_loop_and_broken_link_are_named(tmp_path: Path) -> None:
    (tmp_path / "x.dcm").symlink_to("x.dcm")
    with pytest.raises(UnreadableFileError) as exc:
        read_image(tmp_path / "x.dcm")
    assert exc.value.reason.startswith("symlink loop: the path is a symbolic link that leads back to itself")
    with pytest.raises(UnreadableFileError, match="symlink loop"):
        read_dicom_patient_id(tmp_path / "x.dcm")
    (tmp_path / "gone.dcm").symlink_to(tmp_path / "nowhere.dcm")
    with pytest.raises(UnreadableFileError, match=r"^.*: file not found: a broken symbolic link"):
        read_image(tmp_path / "gone.dcm")
