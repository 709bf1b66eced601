"""Read one scan (DICOM file or series folder, NIfTI, PNG/JPEG/TIFF) into a :class:`ScanImage`.

Arrays are float32 and channel-first: ``(C, H, W)`` for 2D images, ``(C, D, H, W)`` for
3D volumes, with ``C = 1`` for grey and ``C = 3`` for colour. Every failure raises
:class:`~medtl.errors.UnreadableFileError` with a specific reason (truncated file, no
decoder installed, non-image DICOM object, 4D volume, NaN values, symlink loop, ...).

Memory is checked before decoding: the image size a header declares (DICOM rows x columns
x frames x samples, the NIfTI shape, a Pillow image's size) is compared with a per-image
limit (``max_bytes``, by default :func:`medtl.data._memory.image_limit`), so an oversized
or corrupt header is refused by name. A ``MemoryError`` while decoding is a failure of that
file too, never of the run.

Example:
    >>> img = read_image("scans/ct_0001.dcm")           # doctest: +SKIP
    >>> img.array.shape, img.modality, img.is_hu        # doctest: +SKIP
    ((1, 512, 512), 'CT', True)
"""

from __future__ import annotations

import errno
import hashlib
import logging
import math
import os
import stat
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medtl.data import _dicom
from medtl.data._geometry import (
    Reorientation,
    axis_codes,
    check_axcodes,
    dicom_affine,
    is_dense,
    pixel_grid,
    plane_name,
    spacing_of,
)
from medtl.data._memory import FLOAT32, check_declared, image_limit, out_of_memory_reason
from medtl.errors import DataError, UnreadableFileError

__all__ = ["SUPPORTED_SUFFIXES", "ScanImage", "orient_mask", "read_dicom_patient_id", "read_image", "series_key"]

_log = logging.getLogger("medtl.data")

_DICOM_SUFFIXES = (".dcm", ".dicom")
_NIFTI_SUFFIXES = (".nii", ".nii.gz")
_PILLOW_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
SUPPORTED_SUFFIXES: tuple[str, ...] = _DICOM_SUFFIXES + _NIFTI_SUFFIXES + _PILLOW_SUFFIXES


@dataclass
class ScanImage:
    """A decoded scan with its geometry.

    Attributes:
        array: float32 channel-first pixels, ``(C, H, W)`` or ``(C, D, H, W)``; the spatial
            axes follow the reader's axis code (``orientation``, RAS by default) when the
            source carries geometry.
        spacing: mm per spatial axis in array order (the column norms of ``affine`` for those
            axes): ``(s0, s1)`` for 2D, ``(s0, s1, s2)`` for 3D; 1.0 where the source has none
            (PNG/JPEG/TIFF).
        modality: DICOM Modality (``"CT"``, ``"MR"``, ``"CR"``, ...) or ``None``.
        is_hu: True when CT values were rescaled to Hounsfield units.
        meta: technical, non-identifying metadata (transfer syntax, scanner model, ...).
        affine: ``(4, 4)`` float64, mm. ``affine @ [i, j, k, 1]`` is the world position
            (RAS+, the NIfTI/MONAI convention) of the voxel at array index ``(i, j, k)`` of the
            spatial axes in array order. For a 2D image ``(C, H, W)`` it is the 3D affine of
            the plane: the voxel ``(i, j)`` is at ``affine @ [i, j, 0, 1]`` and the third
            column is the plane normal scaled by the slice thickness (or 1 mm). Sources without
            geometry (PNG/JPEG/TIFF) get ``diag(1, 1, 1, 1)``.
    """

    array: np.ndarray
    spacing: tuple[float, ...]
    modality: str | None = None
    is_hu: bool = False
    meta: dict[str, Any] = field(default_factory=dict)
    affine: np.ndarray = field(default_factory=lambda: np.eye(4))

    @property
    def axcodes(self) -> str | None:
        """The letters the spatial axes run toward, from :attr:`affine` (``"RAS"``; ``"RA"`` for an
        axial slice read in RAS); ``None`` for an image without patient geometry (PNG/JPEG/TIFF,
        radiographs, frames without positions), whose affine is only its pixel grid."""
        if "orientation" not in self.meta:
            return None
        return axis_codes(self.affine, self.array.ndim - 1)


def read_image(path: str | Path, *, max_bytes: int | None = None, orientation: str = "RAS",
               series: str | int | None = None) -> ScanImage:
    """Decode one image file or DICOM series folder, with its affine, in one axis code.

    Dispatch: a folder → DICOM series (sorted along the slice normal); ``.nii``/``.nii.gz`` →
    NIfTI; ``.png/.jpg/.jpeg/.tif/.tiff/.bmp`` → Pillow; ``.dcm``, ``.dicom``, no suffix or a
    ``DICM`` marker at byte 128 → DICOM.

    DICOM (ImagePositionPatient, ImageOrientationPatient, PixelSpacing, slice positions; LPS
    converted to RAS) and NIfTI (nibabel's affine, sform or qform) are flipped and transposed to
    ``orientation`` exactly as MONAI's ``Orientation(axcodes=orientation)`` would, so the same
    scan as a DICOM series and as a NIfTI file gives the same array and affine. Images without
    patient geometry (PNG/JPEG/TIFF, radiographs without ImageOrientationPatient) keep their
    pixel layout and get a pixel-grid affine.

    Args:
        max_bytes: the largest decoded image (float32 bytes) the header may declare; ``None``:
            :func:`~medtl.data._memory.image_limit` (half the available memory).
        orientation: 3-letter axis code of the array's spatial axes (``"RAS"``: axis 0 points to
            the patient's Right, axis 1 Anterior, axis 2 Superior); ``data.orientation`` in a config.
        series: for a folder holding several series, the one to read: its index or key as the
            error listing them shows (``1``, ``"3fa81c02"``), or its SeriesInstanceUID.

    Returns:
        :class:`ScanImage` with a float32 ``(C, H, W)`` or ``(C, X, Y, Z)`` array (spatial axes
        in ``orientation``), its ``affine`` and ``spacing``.

    Raises:
        UnreadableFileError: with a specific reason (also for an image over ``max_bytes`` and
            for a ``MemoryError`` while decoding).
        ConfigError: ``orientation`` is not a valid axis code.

    Example:
        >>> img = read_image("series_folder/")            # doctest: +SKIP
        >>> img.array.shape, img.spacing                  # doctest: +SKIP
        ((1, 512, 512, 120), (0.7, 0.7, 2.5))
    """
    path = Path(path)
    axcodes = check_axcodes(orientation)
    limit = image_limit() if max_bytes is None else int(max_bytes)
    try:
        return _dispatch(path, limit, axcodes, series)
    except UnreadableFileError:
        raise
    except MemoryError:
        raise UnreadableFileError(path, out_of_memory_reason()) from None
    except RecursionError:
        raise UnreadableFileError(path, "corrupt file: its structure is nested too deeply to read "
                                        "(RecursionError)") from None
    except Exception as exc:
        raise UnreadableFileError(path, _dicom.describe_exception(exc)) from exc


def _stat(path: Path) -> os.stat_result:
    """``os.stat(path)`` with a specific reason for a missing file, a broken link or a symlink loop."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise UnreadableFileError(path, "file not found: a broken symbolic link (its target does not exist)") from None
        raise UnreadableFileError(path, "file not found") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnreadableFileError(path, (
                "symlink loop: the path is a symbolic link that leads back to itself (directly or through "
                "other links); point it at the real file")) from None
        if exc.errno == errno.ENOTDIR:
            raise UnreadableFileError(path, "file not found") from None
        raise UnreadableFileError(path, f"cannot open the file: {exc.strerror or exc}") from None


def _dispatch(path: Path, limit: int, axcodes: str, series: str | int | None) -> ScanImage:
    st = _stat(path)
    if stat.S_ISDIR(st.st_mode):
        with _dicom.quiet():
            return _read_dicom_series(path, limit, axcodes, series)
    if st.st_size == 0:
        raise UnreadableFileError(path, "empty file (0 bytes): the export or copy did not finish")
    name = path.name.lower()
    if name.endswith(_NIFTI_SUFFIXES):
        return _read_nifti(path, limit, axcodes)
    if name.endswith(_PILLOW_SUFFIXES):
        return _read_pillow(path, limit)
    if _looks_like_dicom_name(path) or _dicom.has_dicom_magic(path):
        with _dicom.quiet():
            return _read_dicom_file(path, limit, axcodes, st.st_size)
    raise UnreadableFileError(path, (
        f"unsupported file type {path.suffix!r}; medtl reads {', '.join(SUPPORTED_SUFFIXES)}, "
        "DICOM files without a suffix and DICOM series folders"))


def orient_mask(mask: np.ndarray, image: str | Path, *, orientation: str = "RAS") -> np.ndarray:
    """A mask drawn on an image's stored pixels, in the layout :func:`read_image` gives that image.

    A ``.npy`` region mask is an array without geometry: it follows the image as stored (the
    rows and columns of a DICOM file, the voxel array of a NIfTI file). This flips and
    transposes it exactly as the image is (from the header alone; no pixel is decoded).

    Args:
        mask: ``(H, W)`` for a 2D DICOM image, or the NIfTI image's shape.
        image: the image file the mask belongs to.
        orientation: the axis code the image is read in (``data.orientation``).

    Returns:
        The mask in the image's array layout (unchanged for images without patient geometry:
        PNG/JPEG/TIFF, radiographs).

    Raises:
        DataError: the mask's shape does not match the image, or the image is a DICOM series
            folder (save such a mask as NIfTI with the series' affine instead).

    Example:
        >>> m = orient_mask(np.load("masks/pat07_slice01.npy"), "dicom/pat07/IM0001.dcm")  # doctest: +SKIP
    """
    path, axcodes, mask = Path(image), check_axcodes(orientation), np.asarray(mask)
    if path.is_dir():
        raise DataError(f"A .npy mask cannot be placed on the DICOM series folder '{path}': its slice order is not "
                        "stored in the array. Save the mask as NIfTI with the series' affine (or as DICOM).")
    name = path.name.lower()
    if name.endswith(_NIFTI_SUFFIXES):
        import nibabel as nib

        img = nib.load(str(path))
        shape = tuple(int(s) for s in img.shape)
        while len(shape) > 2 and shape[-1] == 1:
            shape = shape[:-1]
        affine = np.asarray(img.affine, dtype=np.float64)
    elif name.endswith(_PILLOW_SUFFIXES):
        return mask
    else:
        with _dicom.quiet():
            ds = _dicom.read_dataset(path, stop_before_pixels=True)
        if _safe_int(_dicom.header_value(ds, "NumberOfFrames"), 1) > 1:
            raise DataError(f"A .npy mask cannot be placed on the multi-frame DICOM '{path.name}': its frame order "
                            "is not stored in the array. Save the mask as NIfTI with the image's affine instead.")
        affine, shape = _plane_directions(ds), (_safe_int(ds.get("Rows"), 0), _safe_int(ds.get("Columns"), 0))
        if affine is None:
            return mask
    if mask.shape != shape:
        raise DataError(f"The mask of '{path.name}' has shape {mask.shape} but the image stores {shape} pixels; "
                        "a .npy mask must match the image's stored rows and columns.")
    return np.ascontiguousarray(Reorientation(affine, shape, axcodes).apply(mask[None])[0])


def _plane_directions(ds: Any) -> np.ndarray | None:
    """The RAS directions of a DICOM image's raw axes (row, column, normal), or ``None`` without geometry."""
    iop = _dicom.orientation_of(ds)
    if iop is None:
        return None
    dirs = np.asarray(iop, float)
    return dicom_affine([dirs[3:], dirs[:3], np.cross(dirs[:3], dirs[3:])], np.zeros(3))


def read_dicom_patient_id(path: str | Path) -> str | None:
    """PatientID from a DICOM file's header (pixels are not read); ``None`` when empty.

    For a series folder, the id shared by its DICOM files. The result is identifying:
    pseudonymise it before it reaches any output.

    Raises:
        UnreadableFileError: unreadable header, or a folder mixing several patients.

    Example:
        >>> pid = read_dicom_patient_id("export/ct_0001.dcm")   # doctest: +SKIP
        >>> Pseudonymizer()(pid)                                 # doctest: +SKIP
        'P-3fa81c02de'
    """
    path = Path(path)
    files = _series_files(path) if stat.S_ISDIR(_stat(path).st_mode) else [path]
    ids: list[str] = []
    for file in files:
        try:
            ds = _dicom.read_dataset(file, stop_before_pixels=True, specific_tags=["PatientID"])
        except UnreadableFileError as exc:
            if path.is_dir() and exc.reason.startswith("not a DICOM file"):
                continue
            raise UnreadableFileError(path, exc.reason if file == path else f"{file.name}: {exc.reason}") from None
        try:
            value = str(ds.get("PatientID") or "").strip()
        except Exception as exc:  # noqa: BLE001 - lazy value conversion of a corrupt header
            raise UnreadableFileError(path, _dicom.describe_exception(exc)) from None
        if value:
            ids.append(value)
    distinct = Counter(ids)
    if len(distinct) > 1:
        counts = " and ".join(str(c) for c in sorted(distinct.values(), reverse=True))
        raise UnreadableFileError(path, f"the folder mixes {len(distinct)} patients ({counts} files); "
                                        "put each patient's series in its own folder")
    return ids[0] if ids else None


# --------------------------------------------------------------------------- DICOM
def _looks_like_dicom_name(path: Path) -> bool:
    suffix = path.suffix.lower()
    # UID-style names ("1.2.840.113619.2.55.3.6") have an all-digit "suffix".
    return suffix in _DICOM_SUFFIXES or suffix == "" or suffix[1:].isdigit()


def _read_dicom_file(path: Path, limit: int, axcodes: str, size: int | None = None) -> ScanImage:
    if size is not None and size > limit:
        # a file larger than an image may be: check what its header declares before reading the pixels
        head = _dicom.read_dataset(path, stop_before_pixels=True)
        _dicom.check_declared_size(head, path, limit)
        if size > 2 * limit:  # a small image in a file that alone would fill the available memory
            raise UnreadableFileError(path, (
                f"file too large: {_dicom.format_bytes(size)} on disk, more than twice the per-image memory limit "
                f"of {_dicom.format_bytes(limit)} (the smaller of data.memory_budget and half the available memory)"))
    return _dicom_instance(path, _dicom.read_dataset(path), limit, axcodes)


def _dicom_instance(path: Path, ds: Any, limit: int, axcodes: str) -> ScanImage:
    """One DICOM instance: a 2D image, or a multi-frame volume with per-frame geometry."""
    n_frames = _safe_int(_dicom.header_value(ds, "NumberOfFrames"), 1)
    if n_frames > 1:
        return _dicom_multiframe(path, ds, limit, axcodes, n_frames)
    meta = _dicom.dicom_meta(ds)
    found = _plane_plan(ds, axcodes)
    if found is None:  # projection radiographs, secondary captures: no patient geometry
        grid = pixel_grid(_dicom.row_col_spacing(ds))
        pixels = _dicom.decode_dataset(ds, path, max_bytes=limit)
        meta["geometry"] = "pixel grid (no ImageOrientationPatient)"
        return _dicom_image(ds, pixels, grid, meta)
    plane, spacing = found
    origin = _dicom.position_of(ds)
    affine = plane.affine.copy()  # the cached template's affine is shared
    if origin is None:
        meta["geometry"] = "no ImagePositionPatient: origin at 0"
    else:  # the plan's affine is that of a slice at the origin: add this slice's position (LPS -> RAS)
        affine[0, 3] -= origin[0]
        affine[1, 3] -= origin[1]
        affine[2, 3] += origin[2]
    pixels = _dicom.decode_dataset(ds, path, max_bytes=limit, spatial_view=plane.apply)
    meta["orientation"] = axcodes
    return _dicom_image(ds, pixels, affine, meta, spacing)


# the orientation plan of a 2D slice depends on its direction cosines, size and the axis code only
_PLANE_CACHE: dict[tuple, Reorientation] = {}


def _plane_plan(ds: Any, axcodes: str) -> tuple[Reorientation, tuple[float, ...]] | None:
    """The reorientation of a 2D slice placed at the origin (``None`` without ImageOrientationPatient).

    The flips and transpose depend only on the slice's direction cosines and size, which all
    slices of a series (and most series of a modality) share, so that plan is kept per
    (orientation, size, axis code); each slice only computes its own affine from its pixel
    spacing and thickness. Returns the plan and the spacing in array order.
    """
    iop = _dicom.orientation_of(ds)
    if iop is None:
        return None
    row, col = _dicom.row_col_spacing(ds)
    thick = _thickness(ds)
    normal = _dicom.normal_of(iop)
    # raw axes: (row, column, normal); the LPS -> RAS sign flip of dicom_affine, on plain floats
    raw = np.array([[-iop[3] * row, -iop[0] * col, -normal[0] * thick, 0.0],
                    [-iop[4] * row, -iop[1] * col, -normal[1] * thick, 0.0],
                    [iop[5] * row, iop[2] * col, normal[2] * thick, 0.0],
                    [0.0, 0.0, 0.0, 1.0]])
    rows, cols = _safe_int(_dicom.header_value(ds, "Rows"), 0), _safe_int(_dicom.header_value(ds, "Columns"), 0)
    key = (axcodes, iop, rows, cols)
    template = _PLANE_CACHE.get(key)
    if template is None:
        template = Reorientation(raw, (rows, cols), axcodes)
        if len(_PLANE_CACHE) >= 64:
            _PLANE_CACHE.clear()
        _PLANE_CACHE[key] = template
        plan = template
    else:
        plan = template.moved(raw)
    return plan, spacing_of(plan.affine, 2)


def _thickness(ds: Any) -> float:
    for kw in ("SliceThickness", "SpacingBetweenSlices"):
        try:
            value = float(_dicom.header_value(ds, kw) or 0)
        except (TypeError, ValueError):
            continue
        if value > 0 and np.isfinite(value):
            return value
    return 1.0


def _dicom_multiframe(path: Path, ds: Any, limit: int, axcodes: str, n_frames: int) -> ScanImage:
    """A multi-frame instance as a volume ordered along its normal, with per-frame positions."""
    row, col = _dicom.row_col_spacing(ds)
    meta = _dicom.dicom_meta(ds)
    meta["n_frames"] = n_frames
    found = _dicom.frame_positions(ds, n_frames)
    if found is None:  # cine loops, multi-page secondary captures: frames without geometry
        pixels = _dicom.decode_dataset(ds, path, max_bytes=limit)
        meta["geometry"] = "pixel grid (frames without positions)"
        return _dicom_image(ds, pixels, pixel_grid((1.0, row, col)), meta)
    positions, source = found
    missing = [i + 1 for i, p in enumerate(positions) if p is None]
    if missing:
        raise UnreadableFileError(path, (
            f"multi-frame image with incomplete geometry: frame(s) {_list(missing)} of {n_frames} have no "
            f"ImagePositionPatient in {source}; re-export the object or convert it to single-frame slices"))
    iop = _dicom.orientation_of(ds)
    if iop is None:
        raise UnreadableFileError(path, (
            "multi-frame image with frame positions but no valid ImageOrientationPatient (top level or "
            "PlaneOrientationSequence); the slice axis cannot be placed"))
    odd = _frame_orientations_differ(ds, iop, n_frames)
    if odd:
        raise UnreadableFileError(path, (
            f"mixed orientations in a multi-frame image: frame(s) {_list(odd)} do not share the first frame's "
            f"ImageOrientationPatient ({plane_name(iop)}); split the object by orientation"))
    order, slice_vec = _order_along_normal(path, np.array(positions), iop, what="frame")
    pixels = _dicom.decode_dataset(ds, path, max_bytes=limit)
    array = pixels.array if np.array_equal(order, np.arange(n_frames)) else pixels.array[:, order]
    dirs = np.asarray(iop, float)
    raw = dicom_affine([slice_vec, dirs[3:] * row, dirs[:3] * col], positions[order[0]])  # (frame, row, column)
    plan = Reorientation(raw, tuple(array.shape[1:]), axcodes)
    meta.update(orientation=axcodes, slice_order=source)
    volume = np.ascontiguousarray(plan.apply(array))
    return _dicom_image(ds, pixels._replace(array=volume), plan.affine, meta)


def _frame_orientations_differ(ds: Any, iop: tuple[float, ...], n_frames: int) -> list[int]:
    try:
        frames = ds.get("PerFrameFunctionalGroupsSequence") or []
    except Exception:  # noqa: BLE001 - a corrupt sequence: frame_positions already failed on it
        return []
    odd = []
    for i, item in enumerate(frames[:n_frames]):
        try:
            value = item.PlaneOrientationSequence[0].ImageOrientationPatient
            other = np.array([float(v) for v in value])
        except (AttributeError, IndexError, KeyError, TypeError, ValueError):
            continue
        if other.shape == (6,) and np.abs(other - np.asarray(iop)).max() > _IOP_TOLERANCE:
            odd.append(i + 1)
    return odd


def _dicom_image(ds: Any, pixels: Any, affine: np.ndarray, meta: dict[str, Any],
                 spacing: tuple[float, ...] | None = None) -> ScanImage:
    array = _invert_if_monochrome1(pixels.array, pixels.photometric)
    modality = str(_dicom.header_value(ds, "Modality") or "").strip() or None
    rescale_type = str(_dicom.header_value(ds, "RescaleType") or "HU").strip().upper()
    is_hu = modality == "CT" and pixels.rescaled and rescale_type in ("HU", "")
    spacing = spacing_of(affine, array.ndim - 1) if spacing is None else spacing
    return ScanImage(array, spacing, modality, is_hu, meta, affine)


def _invert_if_monochrome1(array: np.ndarray, photometric: str) -> np.ndarray:
    """MONOCHROME1 stores low values as white: flip so that higher = brighter."""
    if photometric != "MONOCHROME1":
        return array
    return (array.max() + array.min() - array).astype(np.float32)


def _series_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


# Direction cosines of one series may differ by this much (rounding in exported headers).
_IOP_TOLERANCE = 1e-3
_SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"  # and its multi-frame variants .7.1 ... .7.4


def _set_aside_reason(ds: Any) -> str | None:
    """Why an image does not belong to the volume of its series folder (``None``: it does)."""
    image_type = _dicom.header_value(ds, "ImageType")
    values = image_type if isinstance(image_type, list) else [image_type or ""]
    if any(str(v).upper() == "LOCALIZER" for v in values):
        return "localiser (ImageType LOCALIZER)"
    sop = str(_dicom.header_value(ds, "SOPClassUID") or "")
    if sop == _SECONDARY_CAPTURE or sop.startswith(_SECONDARY_CAPTURE + "."):
        return "secondary capture (SOP Class Secondary Capture Image Storage)"
    return None


def series_key(uid: str) -> str:
    """A short, non-identifying key of a SeriesInstanceUID (8 hex digits of its SHA-256)."""
    return hashlib.sha256(uid.encode()).hexdigest()[:8]


def _read_dicom_series(folder: Path, limit: int, axcodes: str, series: str | int | None) -> ScanImage:
    files = _series_files(folder)
    if not files:
        raise UnreadableFileError(folder, "empty folder: no files to read as a DICOM series")
    instances, not_dicom, non_image = [], 0, 0
    for file in files:
        try:
            ds = _dicom.read_dataset(file)
        except UnreadableFileError as exc:
            if exc.reason.startswith("not a DICOM file"):
                not_dicom += 1
                continue
            raise UnreadableFileError(folder, f"{file.name}: {exc.reason}") from None
        if any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
            instances.append((file, ds))
        else:
            non_image += 1
    if not instances:
        raise UnreadableFileError(folder, (
            f"no DICOM image in the folder ({len(files)} files: {not_dicom} not DICOM, "
            f"{non_image} DICOM objects without Pixel Data)"))
    instances = _pick_series(folder, instances, series)
    kept, aside = [], []
    for file, ds in instances:
        why = _set_aside_reason(ds)
        (aside if why else kept).append((file, ds) if not why else {"file": file.name, "reason": why})
    if not kept:
        reasons = Counter(a["reason"] for a in aside)
        raise UnreadableFileError(folder, (
            "no image left for a volume: every image is set aside ("
            + ", ".join(f"{n} {r}" for r, n in reasons.items())
            + "); pass one file on its own to read it as a 2D image"))
    if aside:
        _log.warning("set aside %d image(s) of a DICOM series folder: %s", len(aside),
                     ", ".join(f"{n} {r}" for r, n in Counter(a["reason"] for a in aside).items()))
    _check_single_series(folder, [ds for _, ds in kept])
    if len(kept) == 1:
        file, ds = kept[0]
        try:
            img = _dicom_instance(file, ds, limit, axcodes)
        except UnreadableFileError as exc:
            raise UnreadableFileError(folder, f"{file.name}: {exc.reason}") from None
        if aside:
            img.meta["set_aside"] = aside
        return img
    _dicom.check_declared_size(kept[0][1], folder, limit, n_slices=len(kept))
    iop = _series_orientation(folder, kept)
    positions = [_dicom.position_of(ds) for _, ds in kept]
    missing = [file.name for (file, _), p in zip(kept, positions) if p is None]
    if missing:
        raise UnreadableFileError(folder, (
            f"missing or invalid ImagePositionPatient in {len(missing)} of {len(kept)} slices ({_list(missing)}); "
            "without slice positions the slice order and spacing are unknown. Re-export the series with its "
            "position tags (an anonymiser may have removed them) or pass the slices as 2D images"))
    order, slice_vec = _order_along_normal(folder, np.array(positions), iop, what="slice")
    ordered = [kept[i] for i in order]
    first = ordered[0][1]
    rows, cols = (_safe_int(_dicom.header_value(first, k), 0) for k in ("Rows", "Columns"))
    row, col = _dicom.row_col_spacing(first)
    dirs = np.asarray(iop, float)
    raw = dicom_affine([slice_vec, dirs[3:] * row, dirs[:3] * col], positions[order[0]])  # (slice, row, column)
    plan = Reorientation(raw, (len(ordered), rows, cols), axcodes)
    volume, rescaled, photometric = None, True, ""
    for k, (file, ds) in enumerate(ordered):
        try:
            pixels = _dicom.decode_dataset(ds, file, max_bytes=limit)
        except UnreadableFileError as exc:
            raise UnreadableFileError(folder, f"{file.name}: {exc.reason}") from None
        if volume is None:
            volume = np.empty((pixels.array.shape[0], len(ordered), *pixels.array.shape[1:]), np.float32)
        volume[:, k] = pixels.array
        rescaled &= pixels.rescaled
        photometric = pixels.photometric
    meta = _dicom.dicom_meta(first)
    meta.update(n_slices=len(ordered), slice_order="ImagePositionPatient", orientation=axcodes)
    if aside:
        meta["set_aside"] = aside
    out = _dicom.DicomPixels(np.ascontiguousarray(plan.apply(volume)), photometric, rescaled)
    return _dicom_image(first, out, plan.affine, meta)


def _pick_series(folder: Path, instances: list[tuple[Path, Any]], series: str | int | None) -> list[tuple[Path, Any]]:
    """The instances of one SeriesInstanceUID: the only one, or the one ``series`` names."""
    groups: dict[str, list[tuple[Path, Any]]] = {}
    for file, ds in instances:
        groups.setdefault(str(_dicom.header_value(ds, "SeriesInstanceUID") or ""), []).append((file, ds))
    if len(groups) == 1 and series is None:
        return instances

    def number(uid: str) -> int:
        return _safe_int(_dicom.header_value(groups[uid][0][1], "SeriesNumber"), 1 << 30)

    uids = sorted(groups, key=lambda u: (number(u), series_key(u)))
    if series is not None:
        wanted = str(series).strip()
        for i, uid in enumerate(uids, 1):
            if wanted in (str(i), series_key(uid), uid):
                return groups[uid]
    listing = "; ".join(_describe_series(i, uid, groups[uid]) for i, uid in enumerate(uids, 1))
    got = f"series={series!r} matches none of them" if series is not None else "pick one"
    raise UnreadableFileError(folder, (
        f"the folder holds {len(uids)} series (SeriesInstanceUIDs): {listing}. {got}: pass series=<index or key> "
        "to read_image (or the manifest's series column), or put each series in its own folder"))


def _describe_series(index: int, uid: str, members: list[tuple[Path, Any]]) -> str:
    ds = members[0][1]
    number = _dicom.header_value(ds, "SeriesNumber")
    desc = str(_dicom.header_value(ds, "SeriesDescription") or "").strip()
    parts = [f"#{index} key {series_key(uid)}", f"{len(members)} image(s)"]
    if number is not None:
        parts.append(f"series number {number}")
    if desc:
        parts.append(repr(desc[:40]))
    return ", ".join(parts)


def _check_single_series(folder: Path, datasets: list[Any]) -> None:
    """Refuse folders that mix image sizes or multi-frame files (counts only)."""
    hint = "put each series in its own folder"
    sizes = Counter((ds.get("Rows"), ds.get("Columns"), ds.get("SamplesPerPixel", 1)) for ds in datasets)
    if len(sizes) > 1:
        desc = ", ".join(f"{r}x{c}{'' if s == 1 else f'x{s}'} ({k} file{'s' if k != 1 else ''})"
                         for (r, c, s), k in sizes.most_common())
        raise UnreadableFileError(folder, f"mixed image sizes in one folder: {desc}; {hint}")
    multi = sum(1 for ds in datasets if _safe_int(ds.get("NumberOfFrames"), 1) > 1)
    if multi and len(datasets) > 1:
        raise UnreadableFileError(folder, (
            f"the folder holds {len(datasets)} image files of which {multi} are multi-frame; "
            "pass each multi-frame file to medtl on its own"))


def _series_orientation(folder: Path, kept: list[tuple[Path, Any]]) -> tuple[float, ...]:
    """The ImageOrientationPatient every slice shares; refuses missing or mixed orientations by file."""
    iops = [_dicom.orientation_of(ds) for _, ds in kept]
    missing = [file.name for (file, _), v in zip(kept, iops) if v is None]
    if missing:
        raise UnreadableFileError(folder, (
            f"missing or invalid ImageOrientationPatient in {len(missing)} of {len(kept)} slices ({_list(missing)}); "
            "a series needs it to place its slices. Re-export the series with its geometry tags"))
    groups: list[tuple[tuple[float, ...], list[str]]] = []
    for (file, _), iop in zip(kept, iops):
        for ref, names in groups:
            if max(abs(a - b) for a, b in zip(ref, iop)) <= _IOP_TOLERANCE:
                names.append(file.name)
                break
        else:
            groups.append((iop, [file.name]))
    if len(groups) == 1:
        return groups[0][0]
    groups.sort(key=lambda g: -len(g[1]))
    main, odd = groups[0], groups[1:]
    ds = kept[0][1]
    number = _dicom.header_value(ds, "SeriesNumber")
    desc = str(_dicom.header_value(ds, "SeriesDescription") or "").strip()
    name = " ".join(p for p in (f"series {number}" if number is not None else "", repr(desc[:40]) if desc else "") if p)
    odd_text = "; ".join(f"{len(n)} {plane_name(iop)} ({_iop_text(iop)}): {_list(n)}" for iop, n in odd)
    raise UnreadableFileError(folder, (
        f"mixed orientations in {name or 'the series'}: {len(main[1])} slices are {plane_name(main[0])} "
        f"(ImageOrientationPatient {_iop_text(main[0])}) but {odd_text}. The slices of one volume must share one "
        "orientation; move the odd file(s) (a reference or localiser image?) out of the folder"))


def _iop_text(iop: tuple[float, ...]) -> str:
    return "[" + ", ".join(f"{v:.3g}" for v in iop) + "]"


def _list(items: list[Any], limit: int = 5) -> str:
    shown = ", ".join(str(i) for i in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _safe_int(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _order_along_normal(where: Path, positions: np.ndarray, iop: tuple[float, ...],
                        what: str) -> tuple[np.ndarray, np.ndarray]:
    """Sort slices (or frames) along the slice normal; returns the order and the LPS step vector (mm).

    The spacing comes from the positions (gapped or overlapping slices are fine when evenly
    spaced); duplicate positions and uneven steps are refused with a reason.
    """
    normal = np.cross(np.asarray(iop[:3]), np.asarray(iop[3:]))
    proj = positions @ normal
    order = np.argsort(proj, kind="stable")
    steps = np.diff(proj[order])
    if (steps < 1e-3).any():
        n_dup = int((steps < 1e-3).sum())
        raise UnreadableFileError(where, (
            f"{n_dup + 1} or more {what}s share the same position (several acquisitions, echoes "
            f"or time points in one series?); put each acquisition in its own folder"))
    _check_even_steps(where, steps, what)
    slice_vec = (positions[order[-1]] - positions[order[0]]) / (len(order) - 1)
    return order, slice_vec


# Slice steps may jitter by this much (rounding in exported positions) and still count as even.
_STEP_TOLERANCE_MM, _STEP_TOLERANCE_REL = 0.01, 0.02


def _check_even_steps(folder: Path, steps: np.ndarray, what: str = "slice") -> None:
    """Refuse a series whose slices are not evenly spaced along the normal.

    ``steps`` are the sorted slice-to-slice distances (mm). A step that is a whole multiple
    (>= 2) of the usual one means missing slices; any other spread means an inconsistent
    spacing that would distort the volume when stacked on a regular grid.
    """
    if len(steps) < 2:
        return
    usual = float(steps.min())  # with missing slices the smallest step is the true spacing
    tol = max(_STEP_TOLERANCE_MM, _STEP_TOLERANCE_REL * usual)
    odd = np.abs(steps - usual) > tol
    if not odd.any():
        return
    ratios = steps[odd] / usual
    gaps = np.abs(ratios - np.round(ratios)) * usual <= tol
    if (gaps & (np.round(ratios) >= 2)).all():
        n_missing = int(np.round(ratios).sum() - len(ratios))
        where = ", ".join(str(int(i) + 1) for i in np.flatnonzero(odd)[:5])
        raise UnreadableFileError(folder, (
            f"missing {what}s: {n_missing} {what}(s) absent from a series spaced {usual:.3g} mm (gap after "
            f"sorted {what} {where}); export the complete series or pass its slices as 2D images"))
    raise UnreadableFileError(folder, (
        f"inconsistent {what} spacing: steps between {what}s range from {steps.min():.3g} to "
        f"{steps.max():.3g} mm (usual {usual:.3g} mm, {int(odd.sum())} of {len(steps)} steps differ); "
        "resample the series to even spacing or put each part in its own folder"))


# --------------------------------------------------------------------------- NIfTI
def _read_nifti(path: Path, limit: int, axcodes: str) -> ScanImage:
    import nibabel as nib  # local: nibabel is only needed for NIfTI input

    try:
        img = nib.load(str(path))  # the header only: the voxels are read by get_fdata below
    except nib.filebasedimages.ImageFileError:
        raise UnreadableFileError(path, "not a valid NIfTI file: nibabel cannot read its header") from None
    except nib.spatialimages.HeaderDataError as exc:
        raise UnreadableFileError(path, f"not a valid NIfTI file: invalid header ({_dicom.short(exc)})") from None
    except (EOFError, OSError) as exc:
        raise UnreadableFileError(path, f"truncated or corrupt NIfTI file: {exc}") from None
    shape = tuple(int(s) for s in img.shape)
    if any(s < 0 for s in shape):
        raise UnreadableFileError(path, f"not a valid NIfTI file: negative extent in its header shape {shape}")
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) > 3:
        raise UnreadableFileError(path, (
            f"{len(shape)}D volume (shape {shape}); medtl reads 2D images and 3D volumes: select "
            "one time point, e.g. with nibabel `img.slicer[..., 0]`"))
    if len(shape) < 2 or 0 in shape:
        raise UnreadableFileError(path, f"empty or 1D image (shape {shape})")
    check_declared(path, shape, FLOAT32, limit=limit, what=f"a {len(shape)}D image of {' x '.join(map(str, shape))} "
                   f"voxels ({img.get_data_dtype()} on disk)")
    affine = np.asarray(img.affine, dtype=np.float64)  # sform or qform, as nibabel chooses
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise UnreadableFileError(path, "invalid NIfTI geometry: its affine (sform/qform) is singular or not finite")
    plane = len(shape) == 2 or shape[2] == 1
    spatial = shape[:2] if plane else shape
    plan = Reorientation(affine, spatial, axcodes)
    try:
        data = np.asarray(img.get_fdata(dtype=np.float32)).reshape(spatial)
    except (EOFError, OSError, ValueError) as exc:
        raise UnreadableFileError(path, f"truncated or corrupt NIfTI data: {' '.join(str(exc).split())}") from None
    if not _finite_by_type(img) and not np.isfinite(data).all():
        bad = int((~np.isfinite(data)).sum())
        raise UnreadableFileError(path, f"NaN/Inf in image data ({bad} of {data.size} voxels)")
    meta: dict[str, Any] = {"format": type(img).__name__, "orientation": axcodes, "original_shape": list(shape),
                            "original_orientation": "".join(nib.aff2axcodes(affine))}
    if not plane:
        meta["n_slices"] = shape[2]
    array = plan.apply(data[None])
    if not is_dense(array):  # flipped axes: copy; a transpose alone (nibabel's F order) stays as it is
        array = np.array(array, dtype=np.float32, order="K")
    return ScanImage(array, spacing_of(plan.affine, len(spatial)), None, False, meta, plan.affine)


def _finite_by_type(img: Any) -> bool:
    """True when a NIfTI's voxels cannot be NaN/Inf: integers on disk with a scaling that keeps
    every value of the type within float32 (so the NaN/Inf scan can be skipped)."""
    dtype = np.dtype(img.get_data_dtype())
    if dtype.kind not in "iub":
        return False
    slope, inter = getattr(img.dataobj, "slope", None), getattr(img.dataobj, "inter", None)
    try:
        slope, inter = float(1.0 if slope is None else slope), float(0.0 if inter is None else inter)
    except (TypeError, ValueError):
        return False
    if not (math.isfinite(slope) and math.isfinite(inter)):
        return False
    info = np.iinfo(dtype) if dtype.kind != "b" else np.iinfo(np.uint8)
    return abs(slope) * max(abs(int(info.min)), int(info.max)) + abs(inter) < 1e38


# --------------------------------------------------------------------------- Pillow
def _read_pillow(path: Path, limit: int) -> ScanImage:
    from PIL import Image, ImageSequence, UnidentifiedImageError

    try:
        with Image.open(path) as img:  # the header only: pixels are decoded per frame below
            fmt = img.format
            frames, declared = [], 0
            for frame in ImageSequence.Iterator(img):
                channels = 1 if len(frame.getbands()) == 1 else 3
                declared += frame.width * frame.height * channels
                check_declared(path, (declared,), FLOAT32, limit=limit, what=(
                    f"{len(frames) + 1} page(s) of {frame.width} x {frame.height} pixels x {channels} channel(s)"))
                frames.append(_pil_to_array(frame))
    except UnidentifiedImageError:
        raise UnreadableFileError(path, f"not a valid {path.suffix.lstrip('.').upper()} image: Pillow "
                                        "cannot identify the file format") from None
    except Image.DecompressionBombError as exc:
        raise UnreadableFileError(path, f"image too large: {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        text = str(exc)
        kind = "truncated image file" if "truncated" in text.lower() else "corrupt image file"
        raise UnreadableFileError(path, f"{kind}: {text}") from None
    if not frames or frames[0].size == 0:
        raise UnreadableFileError(path, "empty image (0 pixels)")
    if len({f.shape for f in frames}) > 1:
        raise UnreadableFileError(path, f"multi-page image with pages of different sizes ({len(frames)} pages)")
    array = frames[0] if len(frames) == 1 else np.stack(frames, axis=1)  # (C, D, H, W) for stacks
    if not np.isfinite(array).all():
        raise UnreadableFileError(path, "NaN/Inf in pixel data")
    meta = {"format": fmt, "rows": int(array.shape[-2]), "columns": int(array.shape[-1])}
    if len(frames) > 1:
        meta["n_slices"] = len(frames)
    spacing = (1.0,) * (array.ndim - 1)
    return ScanImage(array, spacing, None, False, meta, pixel_grid(spacing))


def _pil_to_array(img: Any) -> np.ndarray:
    """One Pillow frame → float32 ``(1, H, W)`` grey or ``(3, H, W)`` RGB (alpha dropped)."""
    mode = img.mode
    if mode in ("1", "L", "LA", "I", "F") or mode.startswith("I;"):
        if mode == "LA":
            img = img.convert("L")
        arr = np.asarray(img, dtype=np.float32)
        return arr[None] if arr.ndim == 2 else arr[..., 0][None]
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    arr = np.asarray(img.convert("RGB"), dtype=np.float32)
    return arr.transpose(2, 0, 1)
