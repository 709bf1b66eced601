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
import os
import stat
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medtl.data import _dicom
from medtl.data._memory import FLOAT32, check_declared, image_limit, out_of_memory_reason
from medtl.errors import UnreadableFileError

__all__ = ["ScanImage", "read_image", "read_dicom_patient_id", "SUPPORTED_SUFFIXES"]

_DICOM_SUFFIXES = (".dcm", ".dicom")
_NIFTI_SUFFIXES = (".nii", ".nii.gz")
_PILLOW_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
SUPPORTED_SUFFIXES: tuple[str, ...] = _DICOM_SUFFIXES + _NIFTI_SUFFIXES + _PILLOW_SUFFIXES


@dataclass
class ScanImage:
    """A decoded scan.

    Attributes:
        array: float32 channel-first pixels, ``(C, H, W)`` or ``(C, D, H, W)``.
        spacing: mm per spatial axis in array order: ``(row, col)`` or ``(slice, row, col)``;
            1.0 where unknown.
        modality: DICOM Modality (``"CT"``, ``"MR"``, ``"CR"``, ...) or ``None``.
        is_hu: True when CT values were rescaled to Hounsfield units.
        meta: technical, non-identifying metadata (transfer syntax, scanner model, ...).
    """

    array: np.ndarray
    spacing: tuple[float, ...]
    modality: str | None = None
    is_hu: bool = False
    meta: dict[str, Any] = field(default_factory=dict)


def read_image(path: str | Path, *, max_bytes: int | None = None) -> ScanImage:
    """Decode one image file or DICOM series folder.

    Dispatch: a folder → DICOM series (sorted along the slice normal); ``.nii``/``.nii.gz`` →
    NIfTI; ``.png/.jpg/.jpeg/.tif/.tiff/.bmp`` → Pillow; ``.dcm``, ``.dicom``, no suffix or a
    ``DICM`` marker at byte 128 → DICOM.

    Args:
        max_bytes: the largest decoded image (float32 bytes) the header may declare; ``None``:
            :func:`~medtl.data._memory.image_limit` (half the available memory).

    Returns:
        :class:`ScanImage` with a float32 ``(C, H, W)`` or ``(C, D, H, W)`` array.

    Raises:
        UnreadableFileError: with a specific reason (also for an image over ``max_bytes`` and
            for a ``MemoryError`` while decoding).

    Example:
        >>> read_image("series_folder/").array.shape     # doctest: +SKIP
        (1, 120, 512, 512)
    """
    path = Path(path)
    limit = image_limit() if max_bytes is None else int(max_bytes)
    try:
        return _dispatch(path, limit)
    except UnreadableFileError:
        raise
    except MemoryError:
        raise UnreadableFileError(path, out_of_memory_reason()) from None
    except RecursionError:
        raise UnreadableFileError(path, "corrupt file: its structure is nested too deeply to read "
                                        "(RecursionError)") from None
    except Exception as exc:  # noqa: BLE001 - last resort: pydicom parses lazily, so errors surface anywhere
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


def _dispatch(path: Path, limit: int) -> ScanImage:
    st = _stat(path)
    if stat.S_ISDIR(st.st_mode):
        with _dicom.quiet():
            return _read_dicom_series(path, limit)
    if st.st_size == 0:
        raise UnreadableFileError(path, "empty file (0 bytes): the export or copy did not finish")
    name = path.name.lower()
    if name.endswith(_NIFTI_SUFFIXES):
        return _read_nifti(path, limit)
    if name.endswith(_PILLOW_SUFFIXES):
        return _read_pillow(path, limit)
    if _looks_like_dicom_name(path) or _dicom.has_dicom_magic(path):
        with _dicom.quiet():
            return _read_dicom_file(path, limit, st.st_size)
    raise UnreadableFileError(path, (
        f"unsupported file type {path.suffix!r}; medtl reads {', '.join(SUPPORTED_SUFFIXES)}, "
        "DICOM files without a suffix and DICOM series folders"))


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


def _read_dicom_file(path: Path, limit: int, size: int | None = None) -> ScanImage:
    if size is not None and size > limit:
        # a file larger than an image may be: check what its header declares before reading the pixels
        head = _dicom.read_dataset(path, stop_before_pixels=True)
        _dicom.check_declared_size(head, path, limit)
        if size > 2 * limit:  # a small image in a file that alone would fill the available memory
            raise UnreadableFileError(path, (
                f"file too large: {_dicom.format_bytes(size)} on disk, more than twice the per-image memory limit "
                f"of {_dicom.format_bytes(limit)} (the smaller of data.memory_budget and half the available memory)"))
    ds = _dicom.read_dataset(path)
    pixels = _dicom.decode_dataset(ds, path, max_bytes=limit)
    array = _invert_if_monochrome1(pixels.array, pixels.photometric)
    row, col = _dicom.row_col_spacing(ds)
    meta = _dicom.dicom_meta(ds)
    if array.ndim == 4:
        spacing: tuple[float, ...] = (_dicom.frame_spacing(ds), row, col)
        meta["n_frames"] = int(array.shape[1])
    else:
        spacing = (row, col)
    return _dicom_image(ds, array, spacing, pixels.rescaled, meta)


def _dicom_image(ds: Any, array: np.ndarray, spacing: tuple[float, ...], rescaled: bool,
                 meta: dict[str, Any]) -> ScanImage:
    modality = str(_dicom.header_value(ds, "Modality") or "").strip() or None
    rescale_type = str(_dicom.header_value(ds, "RescaleType") or "HU").strip().upper()
    is_hu = modality == "CT" and rescaled and rescale_type in ("HU", "")
    return ScanImage(array, tuple(float(s) for s in spacing), modality, is_hu, meta)


def _invert_if_monochrome1(array: np.ndarray, photometric: str) -> np.ndarray:
    """MONOCHROME1 stores low values as white: flip so that higher = brighter."""
    if photometric != "MONOCHROME1":
        return array
    return (array.max() + array.min() - array).astype(np.float32)


def _series_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def _read_dicom_series(folder: Path, limit: int) -> ScanImage:
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
    _check_single_series(folder, [ds for _, ds in instances])
    if len(instances) == 1:
        return _read_dicom_file(instances[0][0], limit)
    _dicom.check_declared_size(instances[0][1], folder, limit, n_slices=len(instances))
    ordered, slice_spacing, how = _sort_slices(folder, instances)
    slices, rescaled, photometric = [], True, ""
    for file, ds in ordered:
        try:
            pixels = _dicom.decode_dataset(ds, file, max_bytes=limit)
        except UnreadableFileError as exc:
            raise UnreadableFileError(folder, f"{file.name}: {exc.reason}") from None
        slices.append(pixels.array)
        rescaled &= pixels.rescaled
        photometric = pixels.photometric
    volume = _invert_if_monochrome1(np.stack(slices, axis=1), photometric)  # (C, D, H, W)
    first = ordered[0][1]
    meta = _dicom.dicom_meta(first)
    meta.update(n_slices=len(ordered), slice_order=how)
    row, col = _dicom.row_col_spacing(first)
    return _dicom_image(first, volume, (slice_spacing, row, col), rescaled, meta)


def _check_single_series(folder: Path, datasets: list[Any]) -> None:
    """Refuse folders that mix series, sizes, orientations or multi-frame files (counts only)."""
    def counts(values: list[Any]) -> Counter:
        return Counter(values)

    hint = "put each series in its own folder"
    series = counts([str(ds.get("SeriesInstanceUID") or "") for ds in datasets])
    if len(series) > 1:
        n = " and ".join(str(c) for c in sorted(series.values(), reverse=True))
        raise UnreadableFileError(folder, f"mixed series: {len(series)} SeriesInstanceUIDs ({n} files); {hint}")
    sizes = counts([(ds.get("Rows"), ds.get("Columns"), ds.get("SamplesPerPixel", 1)) for ds in datasets])
    if len(sizes) > 1:
        desc = ", ".join(f"{r}x{c}{'' if s == 1 else f'x{s}'} ({k} file{'s' if k != 1 else ''})"
                         for (r, c, s), k in sizes.most_common())
        raise UnreadableFileError(folder, f"mixed image sizes in one folder: {desc}; {hint}")
    orient = counts([_orientation(ds) for ds in datasets])
    if len(orient) > 1:
        n = " and ".join(str(c) for c in sorted(orient.values(), reverse=True))
        raise UnreadableFileError(folder, (
            f"mixed orientations: {len(orient)} different ImageOrientationPatient values ({n} files); {hint}"))
    multi = sum(1 for ds in datasets if _safe_int(ds.get("NumberOfFrames"), 1) > 1)
    if multi and len(datasets) > 1:
        raise UnreadableFileError(folder, (
            f"the folder holds {len(datasets)} image files of which {multi} are multi-frame; "
            "pass each multi-frame file to medtl on its own"))


def _orientation(ds: Any) -> tuple[float, ...] | None:
    try:
        iop = tuple(round(float(v), 3) for v in ds.ImageOrientationPatient)
        return iop if len(iop) == 6 else None
    except (AttributeError, TypeError, ValueError):
        return None


def _position(ds: Any) -> np.ndarray | None:
    try:
        ipp = np.array([float(v) for v in ds.ImagePositionPatient], dtype=float)
        return ipp if ipp.shape == (3,) and np.isfinite(ipp).all() else None
    except (AttributeError, TypeError, ValueError):
        return None


def _safe_int(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _sort_slices(folder: Path, instances: list[tuple[Path, Any]]) -> tuple[list[tuple[Path, Any]], float, str]:
    """Order slices along the slice normal (fallback InstanceNumber, then file name)."""
    iop = _orientation(instances[0][1])
    positions = [_position(ds) for _, ds in instances]
    if iop is not None and all(p is not None for p in positions):
        normal = np.cross(np.array(iop[:3]), np.array(iop[3:]))
        proj = np.array([float(p @ normal) for p in positions])  # type: ignore[operator]
        order = np.argsort(proj, kind="stable")
        steps = np.diff(proj[order])
        if (steps < 1e-3).any():
            n_dup = int((steps < 1e-3).sum())
            raise UnreadableFileError(folder, (
                f"{n_dup + 1} or more slices share the same position (several acquisitions, echoes "
                "or time points in one series?); put each acquisition in its own folder"))
        _check_even_steps(folder, steps)
        return [instances[i] for i in order], float(np.median(steps)), "ImagePositionPatient"
    fallback = _dicom.frame_spacing(instances[0][1])
    numbers = [_safe_int(ds.get("InstanceNumber"), -1) for _, ds in instances]
    if all(n >= 0 for n in numbers) and len(set(numbers)) == len(numbers):
        order = np.argsort(numbers, kind="stable")
        return [instances[i] for i in order], fallback, "InstanceNumber"
    return list(instances), fallback, "file name"


# Slice steps may jitter by this much (rounding in exported positions) and still count as even.
_STEP_TOLERANCE_MM, _STEP_TOLERANCE_REL = 0.01, 0.02


def _check_even_steps(folder: Path, steps: np.ndarray) -> None:
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
            f"missing slices: {n_missing} slice(s) absent from a series spaced {usual:.3g} mm (gap after "
            f"sorted slice {where}); export the complete series or pass its slices as 2D images"))
    raise UnreadableFileError(folder, (
        f"inconsistent slice spacing: steps between slices range from {steps.min():.3g} to "
        f"{steps.max():.3g} mm (usual {usual:.3g} mm, {int(odd.sum())} of {len(steps)} steps differ); "
        "resample the series to even spacing or put each part in its own folder"))


# --------------------------------------------------------------------------- NIfTI
def _read_nifti(path: Path, limit: int) -> ScanImage:
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
    try:
        img = nib.as_closest_canonical(img)  # RAS+: the same anatomy lands on the same axes
        data = np.asarray(img.get_fdata(dtype=np.float32)).reshape(img.shape[:len(shape)])
    except (EOFError, OSError, ValueError) as exc:
        raise UnreadableFileError(path, f"truncated or corrupt NIfTI data: {' '.join(str(exc).split())}") from None
    if not np.isfinite(data).all():
        bad = int((~np.isfinite(data)).sum())
        raise UnreadableFileError(path, f"NaN/Inf in image data ({bad} of {data.size} voxels)")
    zooms = [float(z) if z and np.isfinite(z) and z > 0 else 1.0 for z in img.header.get_zooms()[:3]]
    zooms += [1.0] * (3 - len(zooms))
    meta: dict[str, Any] = {"format": type(img).__name__, "orientation": "RAS (reoriented)",
                            "original_shape": list(shape)}
    if len(shape) == 3 and shape[2] > 1:
        array = data.transpose(2, 1, 0)[None]  # (x, y, z) → (1, z, y, x) = (C, D, H, W)
        spacing: tuple[float, ...] = (zooms[2], zooms[1], zooms[0])
        meta["n_slices"] = shape[2]
    else:
        array = data.reshape(shape[0], shape[1]).T[None]  # (x, y) → (1, y, x)
        spacing = (zooms[1], zooms[0])
    return ScanImage(np.ascontiguousarray(array, dtype=np.float32), spacing, None, False, meta)


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
    return ScanImage(array, (1.0,) * (array.ndim - 1), None, False, meta)


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
