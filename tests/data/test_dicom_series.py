"""Series you can trust: synthetic DICOM series written with pydicom, one per failure case."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from medtl.data.readers import read_image, series_key
from medtl.errors import UnreadableFileError

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)


def write_slice(path: Path, pixels: np.ndarray, *, position: tuple[float, ...] | None = (0.0, 0.0, 0.0),
                orientation: tuple[float, ...] | None = AXIAL, series_uid: str = "1.2.3.4",
                spacing: tuple[float, float] = (0.7, 0.6), sop_class: str = CTImageStorage,
                **extra: object) -> Path:
    """A small CT slice (Explicit VR LE, int16, intercept -1024) with optional geometry tags."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.PatientID, ds.SeriesInstanceUID, ds.Modality = "MRN-4711", series_uid, "CT"
    ds.PixelSpacing, ds.SliceThickness = list(spacing), 2.0
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    if position is not None:
        ds.ImagePositionPatient = list(position)
    if orientation is not None:
        ds.ImageOrientationPatient = list(orientation)
    for key, value in extra.items():
        setattr(ds, key, value)
    ds.set_pixel_data(pixels.astype(np.uint16), "MONOCHROME2", 16)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_series(folder: Path, zs: list[float], *, shape: tuple[int, int] = (4, 3), **kw: object) -> list[Path]:
    """One axial slice per z (files named in reverse spatial order); slice k holds 1024 + 10 k + pixel index."""
    folder.mkdir(parents=True, exist_ok=True)
    base = np.arange(shape[0] * shape[1]).reshape(shape)
    return [write_slice(folder / f"IM{len(zs) - k:03d}.dcm", 1024 + 10 * k + base * 100,
                        position=(-5.0, 7.0, z), **kw) for k, z in enumerate(zs)]


def test_axial_series_is_ras_with_affine_from_positions(tmp_path: Path) -> None:
    write_series(tmp_path / "s", [10.0, 12.5, 15.0])
    img = read_image(tmp_path / "s")
    assert img.array.shape == (1, 3, 4, 3)  # (x, y, z) = (column, row, slice)
    # LPS -> RAS: columns (+x = left) and rows (+y = posterior) are reversed; slices stay inferior -> superior
    np.testing.assert_allclose(img.array[0, :, :, 0], (np.arange(12).reshape(4, 3) * 100)[::-1, ::-1].T)
    np.testing.assert_allclose(img.array[0, 0, 0], [1100, 1110, 1120])  # x=0: last column, y=0: last row
    expected = np.array([[0.6, 0, 0, 5.0 - 0.6 * 2], [0, 0.7, 0, -7.0 - 0.7 * 3], [0, 0, 2.5, 10.0], [0, 0, 0, 1]])
    np.testing.assert_allclose(img.affine, expected, atol=1e-9)
    assert img.spacing == pytest.approx((0.6, 0.7, 2.5))


def test_mixed_orientation_is_refused_naming_the_odd_file(tmp_path: Path) -> None:
    write_series(tmp_path / "s", [0.0, 3.0, 6.0, 9.0], SeriesNumber=7, SeriesDescription="CHEST")
    write_slice(tmp_path / "s" / "ref.dcm", np.zeros((4, 3)), orientation=CORONAL)
    with pytest.raises(UnreadableFileError, match=r"mixed orientations in series 7 'CHEST': 4 slices are axial .* "
                                                  r"but 1 coronal .*: ref\.dcm") as exc:
        read_image(tmp_path / "s")
    assert "MRN-4711" not in str(exc.value)


def test_localisers_and_secondary_captures_are_set_aside(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_series(tmp_path / "s", [0.0, 3.0, 6.0])
    write_slice(tmp_path / "s" / "loc.dcm", np.zeros((4, 3)), orientation=CORONAL,
                ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    write_slice(tmp_path / "s" / "sc.dcm", np.zeros((4, 3)), position=None, orientation=None,
                sop_class=SecondaryCaptureImageStorage)
    with caplog.at_level(logging.WARNING, logger="medtl.data"):
        img = read_image(tmp_path / "s")
    assert img.array.shape == (1, 3, 4, 3)
    reasons = {a["file"]: a["reason"] for a in img.meta["set_aside"]}
    assert reasons["loc.dcm"].startswith("localiser") and reasons["sc.dcm"].startswith("secondary capture")
    assert "set aside 2 image(s)" in caplog.text and "MRN-4711" not in caplog.text and "loc.dcm" not in caplog.text


def test_several_series_are_listed_and_one_can_be_picked(tmp_path: Path) -> None:
    write_series(tmp_path / "s", [0.0, 3.0, 6.0], series_uid="1.2.3.10", SeriesNumber=2, SeriesDescription="ART")
    for i, z in enumerate([0.0, 5.0]):
        write_slice(tmp_path / "s" / f"B{i}.dcm", np.zeros((4, 3)), position=(0.0, 0.0, z), series_uid="1.2.3.20",
                    SeriesNumber=3, SeriesDescription="VEN")
    with pytest.raises(UnreadableFileError) as exc:
        read_image(tmp_path / "s")
    reason = exc.value.reason
    assert f"#1 key {series_key('1.2.3.10')}, 3 image(s), series number 2, 'ART'" in reason
    assert f"#2 key {series_key('1.2.3.20')}, 2 image(s), series number 3, 'VEN'" in reason
    assert "1.2.3.10" not in reason and "series=" in reason
    assert read_image(tmp_path / "s", series=2).array.shape == (1, 3, 4, 2)
    assert read_image(tmp_path / "s", series=series_key("1.2.3.10")).spacing[2] == pytest.approx(3.0)
    with pytest.raises(UnreadableFileError, match="series='nope' matches none of them"):
        read_image(tmp_path / "s", series="nope")


def test_missing_positions_are_an_error_naming_the_file(tmp_path: Path) -> None:
    files = write_series(tmp_path / "s", [0.0, 3.0, 6.0])
    write_slice(files[1], np.zeros((4, 3)), position=None)
    with pytest.raises(UnreadableFileError, match=rf"missing or invalid ImagePositionPatient in 1 of 3 slices "
                                                  rf"\({files[1].name}\); without slice positions"):
        read_image(tmp_path / "s")
    write_slice(files[1], np.zeros((4, 3)), orientation=None)
    with pytest.raises(UnreadableFileError, match=rf"ImageOrientationPatient in 1 of 3 slices \({files[1].name}\)"):
        read_image(tmp_path / "s")


def test_spacing_comes_from_positions_gaps_and_overlaps_alike(tmp_path: Path) -> None:
    write_series(tmp_path / "gap", [0.0, 12.0, 24.0])  # 2 mm slices every 12 mm
    assert read_image(tmp_path / "gap").spacing[2] == pytest.approx(12.0)
    write_series(tmp_path / "overlap", [0.0, 1.25, 2.5, 3.75])  # 2 mm slices every 1.25 mm
    assert read_image(tmp_path / "overlap").spacing[2] == pytest.approx(1.25)
    write_series(tmp_path / "uneven", [0.0, 2.0, 5.0, 7.0])
    with pytest.raises(UnreadableFileError, match=r"inconsistent slice spacing: steps between slices range from 2 "
                                                  r"to 3 mm"):
        read_image(tmp_path / "uneven")


def _enhanced(path: Path, zs: list[float], orientations: list[tuple[float, ...]] | None = None) -> Path:
    """An enhanced multi-frame CT whose frames are stored in the order of ``zs`` (positions per frame)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"  # Enhanced CT Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = meta.MediaStorageSOPClassUID, generate_uid(), "CT"
    shared = Dataset()
    measures, orient = Dataset(), Dataset()
    measures.PixelSpacing, measures.SliceThickness = [0.5, 0.5], 1.0
    orient.ImageOrientationPatient = list(AXIAL)
    shared.PixelMeasuresSequence = Sequence([measures])
    if orientations is None:
        shared.PlaneOrientationSequence = Sequence([orient])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    frames = []
    for i, z in enumerate(zs):
        item, pos, pvt = Dataset(), Dataset(), Dataset()
        pos.ImagePositionPatient = [0.0, 0.0, z]
        item.PlanePositionSequence = Sequence([pos])
        pvt.RescaleSlope, pvt.RescaleIntercept = 1, -1000 + 10 * i  # per-frame rescale
        item.PixelValueTransformationSequence = Sequence([pvt])
        if orientations is not None:
            o = Dataset()
            o.ImageOrientationPatient = list(orientations[i])
            item.PlaneOrientationSequence = Sequence([o])
        frames.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    pixels = np.stack([np.full((4, 3), 1000 + 100 * round(z)) for z in zs]).astype(np.uint16)
    ds.set_pixel_data(pixels, "MONOCHROME2", 16)
    ds.save_as(path, enforce_file_format=True)
    return path


def test_enhanced_multiframe_becomes_a_volume_with_per_frame_geometry(tmp_path: Path) -> None:
    img = read_image(_enhanced(tmp_path / "mf.dcm", [2.0, 0.0, 1.0]))  # frames stored out of order
    assert img.array.shape == (1, 3, 4, 3) and img.meta["slice_order"] == "PerFrameFunctionalGroupsSequence"
    # frame i carries z and its own intercept (-1000 + 10 i): sorted along z, the values are 100 z + 10 i
    np.testing.assert_allclose(img.array[0, 0, 0], [0 + 10 * 1, 100 + 10 * 2, 200 + 10 * 0])
    assert img.spacing == pytest.approx((0.5, 0.5, 1.0))
    np.testing.assert_allclose(img.affine[:3, 3], [-1.0, -1.5, 0.0])
    with pytest.raises(UnreadableFileError, match=r"mixed orientations in a multi-frame image: frame\(s\) 2"):
        read_image(_enhanced(tmp_path / "mixed.dcm", [0.0, 1.0], [AXIAL, CORONAL]))
