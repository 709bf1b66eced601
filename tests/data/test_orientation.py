"""One canonical orientation: medtl's reorientation is MONAI's, and DICOM and NIfTI of one scan agree."""

from __future__ import annotations

import itertools
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Orientation

from medtl.config import Config
from medtl.data import ScanImage, read_image
from medtl.data._geometry import reorient
from medtl.errors import ConfigError
from tests.data.test_dicom_series import CORONAL, write_series, write_slice


@pytest.mark.parametrize("axcodes", ["RAS", "LPS", "SPL"])
def test_reorient_equals_monai_orientation(axcodes: str) -> None:
    rng = np.random.default_rng(0)
    data = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)
    for perm, signs in itertools.islice(zip(itertools.cycle(itertools.permutations(range(3))),
                                            itertools.product([-1, 1], repeat=3)), 8):
        affine = np.eye(4)
        affine[:3, :3] = np.eye(3)[:, perm] * np.array(signs) * np.array([0.5, 2.0, 3.0])
        affine[:3, 3] = rng.normal(size=3) * 50
        ours, our_affine = reorient(data, affine, axcodes)
        theirs = Orientation(axcodes=axcodes, labels=(("L", "R"), ("P", "A"), ("I", "S")))(
            MetaTensor(torch.from_numpy(data), affine=torch.from_numpy(affine)))
        np.testing.assert_array_equal(ours, theirs.numpy())
        np.testing.assert_allclose(our_affine, theirs.affine.numpy(), atol=1e-9)


def test_dicom_series_and_its_nifti_give_the_same_array_and_affine(tmp_path: Path) -> None:
    write_series(tmp_path / "s", [4.0, 6.5, 9.0, 11.5], shape=(5, 6))
    dicom = read_image(tmp_path / "s")
    # the NIfTI a converter writes: the stored pixels in another layout (rows flipped, LAS) with its affine
    las_data, las_affine = reorient(dicom.array, dicom.affine, "LAS")
    nib.save(nib.Nifti1Image(np.ascontiguousarray(las_data[0]).astype(np.int16), las_affine), tmp_path / "s.nii.gz")
    nifti = read_image(tmp_path / "s.nii.gz")
    assert isinstance(dicom, ScanImage) and nifti.array.shape == dicom.array.shape == (1, 6, 5, 4)
    np.testing.assert_array_equal(nifti.array, dicom.array)
    np.testing.assert_allclose(nifti.affine, dicom.affine, atol=1e-4)
    assert nifti.spacing == pytest.approx(dicom.spacing)
    lps = read_image(tmp_path / "s", orientation="lps")  # another axis code: flipped x and y
    np.testing.assert_array_equal(lps.array, dicom.array[:, ::-1, ::-1, :])
    world = lps.affine @ np.array([0, 0, 0, 1.0])
    np.testing.assert_allclose(world, dicom.affine @ np.array([5, 4, 0, 1.0]))  # the same voxel


def test_2d_slices_follow_their_image_orientation(tmp_path: Path) -> None:
    pixels = np.arange(12).reshape(4, 3) + 1024  # 4 rows (head to feet), 3 columns (right to left)
    img = read_image(write_slice(tmp_path / "cor.dcm", pixels, orientation=CORONAL, position=(10.0, 20.0, 30.0)))
    # coronal plane in RAS: (x, z); columns run right -> left so x is reversed, rows run down so z is reversed
    assert img.array.shape == (1, 3, 4)
    np.testing.assert_array_equal(img.array[0], (pixels - 1024)[::-1, ::-1].T)
    np.testing.assert_allclose(img.affine @ [0, 0, 0, 1], [-10.0 - 0.6 * 2, -20.0, 30.0 - 0.7 * 3, 1])
    assert img.spacing == pytest.approx((0.6, 0.7)) and abs(img.affine[1, 2]) == pytest.approx(2.0)  # normal: A


def test_orientation_setting_is_validated() -> None:
    assert Config.model_validate({"data": {"path": "x", "orientation": "lps"}}).data.orientation == "LPS"
    with pytest.raises(ValueError, match="one letter from each of L/R, P/A and I/S.*Got 'RAA'"):
        Config.model_validate({"data": {"path": "x", "orientation": "RAA"}})
    with pytest.raises(ConfigError, match="Got 'XYZ' instead"):
        read_image("anything.nii", orientation="XYZ")
