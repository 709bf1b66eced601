"""Pictures the right way up: scans with geometry are drawn in radiological orientation.

A synthetic DICOM slice holds a bright marker in a known corner of the patient (e.g. right
anterior for an axial slice). Whatever the stored pixel layout (ImageOrientationPatient) and
the axis code the image is read in (``data.orientation``), the display helper must put the
marker at the top-left of the picture: anterior (axial) or superior (coronal, sagittal) at the
top, the patient's right (axial, coronal) or anterior (sagittal) on the viewer's left. Images
without geometry are drawn as stored. The checks are on arrays, plus one that the renderer
draws the displayed array.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread

from medtl.config import load_config
from medtl.data._geometry import axis_codes, cut_axis, display_view
from medtl.data.manifest import Case
from medtl.data.readers import read_image
from medtl.errors import DataError
from medtl.explain import overlay
from tests.data.test_dicom_series import write_slice

prep = importlib.import_module("medtl.data.prepare")  # the package attribute is the function

SIZE = (12, 16)  # stored rows x columns
# LPS unit vectors of the patient directions
_TOWARD = {"R": (-1, 0, 0), "L": (1, 0, 0), "A": (0, -1, 0), "P": (0, 1, 0), "S": (0, 0, 1), "I": (0, 0, -1)}
CASES = {  # ImageOrientationPatient (row direction, column direction) -> plane, the corner shown top-left
    "axial": ((1, 0, 0, 0, 1, 0), "RA"),
    "axial rotated 180": ((-1, 0, 0, 0, -1, 0), "RA"),
    "axial transposed": ((0, 1, 0, 1, 0, 0), "RA"),
    "coronal": ((1, 0, 0, 0, 0, -1), "RS"),
    "coronal flipped": ((-1, 0, 0, 0, 0, 1), "RS"),
    "sagittal": ((0, 1, 0, 0, 0, -1), "AS"),
    "sagittal flipped": ((0, -1, 0, 0, 0, 1), "AS"),
}


def _marked_slice(path: Path, iop: tuple[float, ...], corner: str) -> Path:
    """A slice whose marker lies in the patient's ``corner`` (e.g. ``"RA"``: right anterior)."""
    rows, cols = SIZE
    r, c = np.meshgrid(np.arange(rows) - (rows - 1) / 2, np.arange(cols) - (cols - 1) / 2, indexing="ij")
    world = r[..., None] * np.array(iop[3:]) + c[..., None] * np.array(iop[:3])  # LPS offset of each pixel
    inside = np.ones(SIZE, bool)
    for letter in corner:
        inside &= world @ np.array(_TOWARD[letter]) > 2.0
    return write_slice(path, np.where(inside, 2000, 1024), orientation=iop)


def _top_left(picture: np.ndarray) -> None:
    """The marker fills the top-left quadrant's corner and nothing of the other quadrants."""
    h, w = picture.shape
    hot = picture > picture.min() + 0.5 * np.ptp(picture)
    assert hot[: h // 2, : w // 2].any(), "the marker is not in the top-left quadrant"
    assert not hot[h // 2:].any() and not hot[:, w // 2:].any(), "part of the marker is outside the top-left"


@pytest.mark.parametrize("orientation", ["RAS", "LPS", "SPL"])
@pytest.mark.parametrize("name", list(CASES))
def test_marker_in_the_patients_corner_is_displayed_top_left(tmp_path: Path, name: str, orientation: str) -> None:
    iop, corner = CASES[name]
    img = read_image(_marked_slice(tmp_path / "slice.dcm", iop, corner), orientation=orientation)
    assert img.axcodes is not None and len(img.axcodes) == 2
    _top_left(display_view(img.array[0], img.axcodes))


def test_volume_planes_follow_the_axis_codes() -> None:
    vol = np.zeros((6, 7, 8), np.float32)  # RAS: x, y, z
    vol[4:, 5:, 6:] = 1.0  # right, anterior, superior corner
    for codes, data in (("RAS", vol), ("LPI", vol[::-1, ::-1, ::-1]), ("SPL", vol[::-1, ::-1, :].transpose(2, 1, 0))):
        cuts = {plane: np.take(data, data.shape[cut_axis(codes, plane)] - 1 if codes[cut_axis(codes, plane)] in "RAS"
                               else 0, axis=cut_axis(codes, plane)) for plane in ("axial", "coronal", "sagittal")}
        for plane, cut in cuts.items():
            axis = cut_axis(codes, plane)
            _top_left(display_view(cut, codes[:axis] + codes[axis + 1:]))
    assert axis_codes(np.diag([-1.0, 1.0, 1.0, 1.0])[:, [2, 0, 1, 3]], 3) == "SLA"


def test_images_without_geometry_are_drawn_as_stored(tmp_path: Path) -> None:
    pixels = np.zeros(SIZE, np.uint8)
    pixels[:3, :3] = 255
    Image.fromarray(pixels).save(tmp_path / "x.png")
    img = read_image(tmp_path / "x.png")
    assert img.axcodes is None
    np.testing.assert_array_equal(display_view(img.array[0], img.axcodes), img.array[0])
    with pytest.raises(DataError, match="Got 'RR' instead"):
        display_view(img.array[0], "RR")


def test_renderer_draws_the_displayed_array(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    iop, corner = CASES["axial"]
    img = read_image(_marked_slice(tmp_path / "slice.dcm", iop, corner))
    drawn = []
    monkeypatch.setattr(overlay, "_render", lambda image, maps, roi, *a: drawn.append((image, maps, roi)) or b"")
    scan = (img.array[0] - img.array.min()) / np.ptp(img.array)
    overlay.panel_png(scan, {"gradcam": scan}, mask=scan > 0.5, axcodes=img.axcodes)
    overlay.panel_png(scan[:, :, None].repeat(3, 2), {"ig": scan[:, :, None].repeat(3, 2)}, axcodes="RAS")
    for image, maps, roi in drawn:
        _top_left(image)
        _top_left(next(iter(maps.values())))
    _top_left(drawn[0][2].astype(float))
    overlay.panel_png(scan, {"gradcam": scan})  # no geometry: as stored (the marker is elsewhere)
    np.testing.assert_array_equal(drawn[-1][0], np.clip(scan, 0, 1))


def test_prepared_geometry_carries_the_axis_codes(tmp_path: Path) -> None:
    iop, corner = CASES["axial transposed"]
    _marked_slice(tmp_path / "a.dcm", iop, corner)
    Image.fromarray(np.zeros(SIZE, np.uint8)).save(tmp_path / "b.png")
    cfg = load_config({"data": {"path": "unused.csv", "image_size": [8, 8],
                                "intensity": {"mode": "range", "vmin": 0, "vmax": 1000}}})
    data = prep.prepare(cfg, [Case(case_id=f"row0000{i}", path=str(tmp_path / f), label="1", patient_id="P1")
                              for i, f in enumerate(["a.dcm", "b.png"])], progress=False, require_all_classes=False)
    assert [g.axcodes for g in data.geometry] == ["RA", None]
    _top_left(display_view(np.asarray(data.images[0, 0]), data.geometry[0].axcodes))


@pytest.mark.parametrize("orientation", ["RAS", "LPS"])
def test_npy_mask_follows_its_image_into_the_read_layout(tmp_path: Path, orientation: str) -> None:
    iop, corner = CASES["axial transposed"]
    path = _marked_slice(tmp_path / "slice.dcm", iop, corner)
    np.save(tmp_path / "mask.npy", (dcmread(path).pixel_array > 1500).astype(np.uint8))  # drawn on the stored pixels
    img = read_image(path, orientation=orientation)
    case = Case(case_id="row00002", path=str(path), label="1", patient_id="P1", mask=str(tmp_path / "mask.npy"))
    mask = prep.load_mask(case, img.array.shape[1:], orientation)
    np.testing.assert_array_equal(mask.astype(bool), img.array[0] > 1500 - 1024)
    np.save(tmp_path / "bad.npy", np.zeros((3, 3), np.uint8))
    with pytest.raises(DataError, match=r"has shape \(3, 3\) but the image stores \(12, 16\)"):
        prep.load_mask(Case("row00003", str(path), "1", "P1", mask=str(tmp_path / "bad.npy")), (8, 8))
