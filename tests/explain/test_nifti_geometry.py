"""Geometry travels to the outputs: a saliency map exported as NIfTI lies over its scan.

A synthetic scan holds a bright blob at a known place: a NIfTI volume with flipped and oblique
axes, and a DICOM series with an oblique orientation. It is prepared exactly as a run
prepares it (resized to the model's grid, or resampled to ``data.spacing`` and cropped or
padded); the "map" is the prepared image itself, so its hot spot is the blob as the model
saw it. The exported map, reloaded with nibabel, must have the scan's affine and shape, and
its hottest voxel must be the blob's voxel of the scan, at the blob's world position.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from medtl.config import load_config
from medtl.data._grid import Geometry
from medtl.data.manifest import Case
from medtl.data.readers import read_image
from medtl.errors import DataError
from medtl.explain.export import save_nifti

prep = importlib.import_module("medtl.data.prepare")  # the package attribute is the function

SHAPE = (30, 26, 22)  # the scan's voxels (i, j, k) as stored in the file
BLOB = (19, 8, 13)    # the blob's centre voxel in the file


def _rotation(deg: float) -> np.ndarray:
    t = np.deg2rad(deg)
    return np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1.0]])


def _blob(shape=SHAPE, centre=BLOB, sigma=1.6) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    d2 = ((grid - np.array(centre)) ** 2).sum(-1)
    return (1000 * np.exp(-d2 / (2 * sigma**2))).astype(np.float32)


def _config(*extra: str):
    return load_config({"data": {"path": "unused.csv", "spatial_dims": 3, "image_size": [16, 20, 24],
                                 "intensity": {"mode": "range", "vmin": 0, "vmax": 1000}}}, list(extra))


def _export_prepared(cfg, path: Path, out: Path) -> tuple[nib.Nifti1Image, Geometry, np.ndarray]:
    data = prep.prepare(cfg, [Case(case_id="row00002", path=str(path), label="1", patient_id="P1")],
                        progress=False, require_all_classes=False)
    geo = data.geometry[0]
    assert geo is not None
    model_map = np.asarray(data.images[0, 0])  # the map: the image as the model saw it
    return nib.load(save_nifti(model_map, out, geometry=geo)), geo, model_map


def _peak(img: nib.Nifti1Image) -> tuple[int, ...]:
    return tuple(int(v) for v in np.unravel_index(np.argmax(np.asarray(img.dataobj)), img.shape))


@pytest.mark.parametrize("settings", [[], ["data.spacing=[2.0, 1.5, 1.5]"]], ids=["resize", "spacing"])
def test_nifti_map_has_the_scans_affine_and_its_peak_on_the_blob(tmp_path: Path, settings: list[str]) -> None:
    # flipped axes (x to the left, y posterior), 12 degrees oblique in-plane, anisotropic voxels
    affine = np.eye(4)
    affine[:3, :3] = _rotation(12) @ np.diag([-0.9, -1.1, 2.0])
    affine[:3, 3] = [40.0, 60.0, -35.0]
    nib.save(nib.Nifti1Image(_blob().astype(np.int16), affine), tmp_path / "scan.nii.gz")
    img, geo, model_map = _export_prepared(_config(*settings), tmp_path / "scan.nii.gz", tmp_path / "map.nii.gz")

    scan = nib.load(tmp_path / "scan.nii.gz")
    canonical = nib.as_closest_canonical(scan)  # the voxel order medtl reads (RAS), same world geometry
    assert img.shape == canonical.shape
    np.testing.assert_allclose(img.affine, canonical.affine, atol=1e-4)
    np.testing.assert_allclose(geo.affine, canonical.affine, atol=1e-4)
    assert _peak(img) == _peak(canonical)
    world = img.affine @ [*_peak(img), 1]
    np.testing.assert_allclose(world, scan.affine @ [*BLOB, 1], atol=1e-3)
    # on the model's grid, the hot spot is where the model grid's affine puts the blob (within a voxel)
    blob_on_model_grid = (np.linalg.inv(geo.model_affine) @ scan.affine @ [*BLOB, 1])[:3]
    model_peak = np.unravel_index(np.argmax(model_map), model_map.shape)
    assert np.abs(np.array(model_peak) - blob_on_model_grid).max() <= 1.0


def _write_series(folder: Path, volume: np.ndarray, row_dir, col_dir, spacing, origin, step) -> None:
    """``volume`` ``(slices, rows, cols)`` as a CT series: slice k at ``origin + k * step`` (LPS mm)."""
    folder.mkdir()
    series, study, frame = generate_uid(), generate_uid(), generate_uid()
    for k, plane in enumerate(volume):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality, ds.ImageType, ds.InstanceNumber = "CT", ["ORIGINAL", "PRIMARY", "AXIAL"], k + 1
        ds.ImagePositionPatient = [f"{v:.4f}" for v in np.asarray(origin) + k * np.asarray(step)]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*row_dir, *col_dir)]
        ds.PixelSpacing = [f"{spacing[0]:g}", f"{spacing[1]:g}"]
        ds.SliceThickness = f"{np.linalg.norm(step):g}"
        ds.RescaleIntercept, ds.RescaleSlope = "0", "1"
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = plane.shape
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = np.round(plane).astype("<u2").tobytes()
        ds.save_as(folder / f"slice{k:03d}.dcm", enforce_file_format=True)


def test_dicom_series_map_lands_on_the_blob_in_world_space(tmp_path: Path) -> None:
    rot = _rotation(-20)
    row_dir, col_dir = rot[:, 0], rot[:, 1]        # oblique axial: rows and columns turned 20 degrees
    normal = np.cross(row_dir, col_dir)
    spacing, step = (0.8, 0.7), 2.5 * normal         # (row spacing, column spacing), slice step in mm
    origin = np.array([-12.0, 30.0, 100.0])
    vol = _blob(shape=(12, 28, 24), centre=(7, 9, 15))  # (slice, row, column)
    _write_series(tmp_path / "series", vol, row_dir, col_dir, spacing, origin, step)
    img, _, _ = _export_prepared(_config(), tmp_path / "series", tmp_path / "map.nii.gz")

    scan = read_image(tmp_path / "series")
    assert img.shape == scan.array.shape[1:]
    np.testing.assert_allclose(img.affine, scan.affine, atol=1e-4)
    # the blob's world position from the DICOM tags alone: IPP + column * dc * row_dir + row * dr * col_dir
    s, r, c = 7, 9, 15
    blob_lps = origin + s * step + c * spacing[1] * row_dir + r * spacing[0] * col_dir
    blob_ras = np.array([-blob_lps[0], -blob_lps[1], blob_lps[2]])
    world = (img.affine @ [*_peak(img), 1])[:3]
    np.testing.assert_allclose(world, blob_ras, atol=1e-3)
    assert _peak(img) == tuple(int(v) for v in np.unravel_index(np.argmax(scan.array[0]), scan.array.shape[1:]))


def test_geometry_follows_monai_and_maps_outside_the_crop_to_zero() -> None:
    from monai.transforms import ResizeWithPadOrCrop, Zoom

    geo = Geometry.of_spacing(np.eye(4), (10, 40, 40), (10, 16, 16), (1.0, 1.0, 1.0), (1.0, 1.0, 1.0))
    # a 40 x 40 plane centre-cropped to 16 x 16: model index 0 is scan index 12
    assert geo.scale == (1.0, 1.0, 1.0) and geo.shift == (0.0, 12.0, 12.0)
    back = geo.to_scan(np.ones((10, 16, 16), np.float32))
    assert back[:, 12:28, 12:28].min() == 1.0 and back[:, :12].max() == 0.0 and back[:, :, 28:].max() == 0.0
    ramp = np.broadcast_to(np.arange(40, dtype=np.float32)[None, None, :], (1, 10, 40, 40))
    model = np.asarray(ResizeWithPadOrCrop((10, 16, 16))(Zoom(1.0, keep_size=False)(ramp)))[0]
    np.testing.assert_allclose(geo.to_scan(model)[0, 20, 12:28], np.arange(12, 28))


def test_save_nifti_refuses_what_it_cannot_write(tmp_path: Path) -> None:
    att = np.zeros((5, 15, 20), np.float32)
    plain = nib.load(save_nifti(att, tmp_path / "plain.nii", spacing=(2.5, 0.8, 0.8)))
    assert plain.shape == (5, 15, 20) and np.allclose(np.diag(plain.affine)[:3], [2.5, 0.8, 0.8])
    with pytest.raises(DataError, match="3D map"):
        save_nifti(att[0], tmp_path / "x.nii.gz")
    with pytest.raises(DataError, match=".nii or .nii.gz"):
        save_nifti(att, tmp_path / "x.png")
    flat = Geometry.of_resize(np.eye(4), (30, 40), (15, 20))
    with pytest.raises(DataError, match="needs a 3D scan"):
        save_nifti(att, tmp_path / "y.nii.gz", geometry=flat)
