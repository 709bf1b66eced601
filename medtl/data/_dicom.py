"""DICOM decoding behind :func:`medtl.data.readers.read_image` (private).

Every failure becomes :class:`~medtl.errors.UnreadableFileError` with a specific reason.
Exceptions are caught narrowly around each step (open, header, pixel description,
decoder, rescale), because pydicom reports very different problems with the same
exception types (``AttributeError`` for "no Pixel Data" and for "missing Bits Allocated",
``RuntimeError`` for "no decoder installed" and for "corrupt JPEG stream").

Memory: the image size the header declares is checked against the per-image limit before
the decoder runs (:func:`check_declared_size`, from the values :func:`decode_dataset` reads
anyway), and a ``MemoryError`` while parsing (a corrupt element length asking for gigabytes)
becomes a reason naming the element.
"""

from __future__ import annotations

import logging
import math
import os
import re
import struct
import warnings
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pydicom
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut, get_decoder
from pydicom.tag import Tag
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from medtl.config import format_bytes
from medtl.data._geometry import is_dense
from medtl.data._memory import FLOAT32, check_declared
from medtl.data.privacy import IDENTIFYING_TAGS
from medtl.errors import UnreadableFileError

__all__ = [
    "DicomPixels",
    "check_declared_size",
    "decode_dataset",
    "describe_exception",
    "dicom_meta",
    "format_bytes",
    "frame_positions",
    "frame_spacing",
    "has_dicom_magic",
    "header_value",
    "normal_of",
    "orientation_of",
    "position_of",
    "quiet",
    "raw_key",
    "read_dataset",
    "row_col_spacing",
    "short",
    "transfer_syntax",
]

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# Technical, non-identifying header fields copied into ScanImage.meta (never a keyword
# from IDENTIFYING_TAGS; _copy_meta re-checks that).
_META_KEYWORDS = (
    "Manufacturer", "ManufacturerModelName", "ConvolutionKernel", "SliceThickness", "KVP",
    "ContrastBolusAgent", "BodyPartExamined", "PixelSpacing", "WindowCenter", "WindowWidth",
    "RescaleType",
)
# pip packages that provide pydicom decoders, by transfer syntax UID prefix.
_LIBJPEG = "pylibjpeg + pylibjpeg-libjpeg (pip install pylibjpeg pylibjpeg-libjpeg) or python-gdcm"
_OPENJPEG = "pylibjpeg + pylibjpeg-openjpeg (pip install pylibjpeg pylibjpeg-openjpeg) or python-gdcm"
_DECODER_PACKAGES = {
    "1.2.840.10008.1.2.4.50": _LIBJPEG, "1.2.840.10008.1.2.4.51": _LIBJPEG,
    "1.2.840.10008.1.2.4.57": _LIBJPEG, "1.2.840.10008.1.2.4.70": _LIBJPEG,
    "1.2.840.10008.1.2.4.80": _LIBJPEG, "1.2.840.10008.1.2.4.81": _LIBJPEG,
    "1.2.840.10008.1.2.4.90": _OPENJPEG, "1.2.840.10008.1.2.4.91": _OPENJPEG,
    "1.2.840.10008.1.2.4.201": _OPENJPEG, "1.2.840.10008.1.2.4.202": _OPENJPEG,
    "1.2.840.10008.1.2.4.203": _OPENJPEG,
    "1.2.840.10008.1.2.5": "pylibjpeg-rle (pip install pylibjpeg pylibjpeg-rle) or python-gdcm",
}
_VR_MISMATCH = ("Expected explicit VR, but found implicit VR", "Expected implicit VR, but found explicit VR")


class DicomPixels(NamedTuple):
    """One decoded DICOM instance, before MONOCHROME1 inversion.

    ``array`` is float32 channel-first: ``(C, H, W)`` for one frame, ``(C, F, H, W)`` for
    ``F > 1`` frames. ``rescaled`` is True when a modality rescale or LUT was applied.
    """

    array: np.ndarray
    photometric: str
    rescaled: bool


@contextmanager
def quiet() -> Iterator[list[str]]:
    """Silence pydicom's warnings and log records, yielding their messages.

    pydicom quotes invalid element values in its warnings ("Invalid value for VR DA:
    '19650412x'"), which may be identifying (a birth date), so they must not reach the
    user's logs. The messages are still returned to pick specific failure reasons.
    Nested uses (a file read inside a series read) share the outer silencing and return
    only the messages caught while they were open.
    """
    if _QUIET:  # already silenced by an outer quiet(): hand out its messages since now
        outer = _QUIET[-1]
        start = len(outer)
        messages: list[str] = []
        try:
            yield messages
        finally:
            messages.extend(str(w.message) for w in outer[start:])
        return
    logger = logging.getLogger("pydicom")
    was_disabled, logger.disabled = logger.disabled, True
    # records of child loggers (pydicom.pixels...) bypass the parent's `disabled` flag but stop
    # at a parent that does not propagate
    was_propagating, logger.propagate = logger.propagate, False
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _QUIET.append(caught)
            messages = []
            try:
                yield messages
            finally:
                _QUIET.pop()
                messages.extend(str(w.message) for w in caught)
    finally:
        logger.disabled = was_disabled
        logger.propagate = was_propagating


_QUIET: list[list] = []  # the warning lists of the quiet() blocks open in this thread (see quiet)


def has_dicom_magic(path: Path) -> bool:
    """True when bytes 128-131 of ``path`` are ``b"DICM"`` (the DICOM file preamble)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def read_dataset(path: Path, *, stop_before_pixels: bool = False,
                 specific_tags: list[str] | None = None) -> Dataset:
    """Parse a DICOM file's header (and pixels unless ``stop_before_pixels``).

    Files without the 128-byte preamble (old ACR-NEMA style) are read when their content
    parses as a DICOM dataset; their transfer syntax is set from the detected encoding.
    """
    kwargs: dict[str, Any] = {"stop_before_pixels": stop_before_pixels, "specific_tags": specific_tags}
    with quiet() as messages:
        try:
            ds = pydicom.dcmread(path, **kwargs)
        except InvalidDicomError:
            try:
                ds = _read_without_preamble(path, kwargs)
            except MemoryError:
                raise UnreadableFileError(path, _oversized_element_reason(path, kwargs)) from None
        except MemoryError:
            raise UnreadableFileError(path, _oversized_element_reason(path, kwargs)) from None
        except FileNotFoundError:
            raise UnreadableFileError(path, "file not found") from None
        except EOFError as exc:
            raise UnreadableFileError(path, f"truncated file: the DICOM header ends early ({exc})") from None
        except OSError as exc:
            raise UnreadableFileError(path, f"cannot open the file: {exc.strerror or exc}") from None
        except (zlib.error, struct.error, BytesLengthException) as exc:
            raise UnreadableFileError(path, describe_exception(exc)) from None
        except (ValueError, KeyError, TypeError, NotImplementedError, UnicodeError) as exc:
            raise UnreadableFileError(path, describe_exception(exc, "unparsable DICOM header")) from None
    if any("End of file reached" in m for m in messages):
        raise UnreadableFileError(path, "truncated file: it ends inside a data element "
                                        "(for images usually inside the Pixel Data)")
    ts = transfer_syntax(ds)
    short = _truncated_last_element(ds)
    if short and ts == DeflatedExplicitVRLittleEndian:
        short = "corrupt or truncated deflate-compressed data set: " + short.removeprefix("truncated file: ")
    if short:
        raise UnreadableFileError(path, short)
    if ts is not None and _uid(str(ts)).is_compressed and any(m.startswith(_VR_MISMATCH) for m in messages):
        enc = "Implicit" if any(m.startswith(_VR_MISMATCH[0]) for m in messages) else "Explicit"
        raise UnreadableFileError(path, (
            f"non-conformant file: its transfer syntax {UID(ts).name} requires Explicit VR but the "
            f"data set is encoded as {enc} VR, so the compressed Pixel Data cannot be trusted; "
            "re-export the file (e.g. with dcmtk dcmconv or gdcmconv)"))
    return ds


def _truncated_last_element(ds: Dataset) -> str | None:
    """pydicom keeps a value cut short by the end of the file; detect it on the last element."""
    try:
        # keys keep file order, so the last key is the last element read (O(1), no sort)
        last_tag = next(reversed(ds.keys()), None)
        last = ds.get_item(last_tag) if last_tag is not None else None
    except Exception:  # noqa: BLE001 - the check is best effort; decoding reports other problems
        return None
    length, value = getattr(last, "length", None), getattr(last, "value", None)
    if isinstance(value, bytes) and length not in (None, 0xFFFFFFFF) and len(value) < length:
        what = "Pixel Data" if last.tag == 0x7FE00010 else f"data element {last.tag}"
        if last.tag != 0x7FE00010:  # a header element longer than the whole file: its length field is corrupt
            try:
                file_size = os.path.getsize(ds.filename) if isinstance(ds.filename, str) else None
            except OSError:
                file_size = None
            if file_size is not None and length > file_size:
                return (f"truncated file or corrupt element length: {what} declares {length} bytes "
                        f"({format_bytes(length)}), more than the whole file ({file_size} bytes)")
        return f"truncated file: the {what} declares {length} bytes but only {len(value)} remain"
    return None


def _oversized_element_reason(path: Path, kwargs: dict[str, Any]) -> str:
    """Why parsing ``path`` raised ``MemoryError``: find the element whose length is impossible.

    pydicom allocates an element's declared length before reading it, so one corrupt length
    field asks for up to 4 GB. Re-parse with every value longer than the file deferred (nothing
    is allocated for them) and name the last element, where parsing stopped.
    """
    generic = ("corrupt header: a data element declares a length that needs more memory than this process may "
               "use (MemoryError while reading the header); the file is probably corrupt")
    try:
        size = os.path.getsize(path)
        with quiet():
            ds = pydicom.dcmread(path, defer_size=size, force=True, **kwargs)
        last_tag = next(reversed(ds.keys()), None)
        raw = ds.get_item(last_tag, keep_deferred=True) if last_tag is not None else None
        length, tell = getattr(raw, "length", None), getattr(raw, "value_tell", None)
        if raw is None or length in (None, 0xFFFFFFFF) or length <= size or tell is None:
            return generic
        return (f"truncated file or corrupt element length: data element {raw.tag} declares {length} bytes "
                f"({format_bytes(length)}), more than the whole file ({size} bytes); reading it would need more "
                "memory than this process may use (MemoryError)")
    except Exception:  # noqa: BLE001 - best effort (MemoryError included); the generic reason is still specific
        return generic


def _read_without_preamble(path: Path, kwargs: dict[str, Any]) -> Dataset:
    not_dicom = ("not a DICOM file: bytes 128-131 are not 'DICM' (no DICOM preamble) and the "
                 "content does not parse as a DICOM data set")
    try:
        ds = pydicom.dcmread(path, force=True, **kwargs)
    except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, NotImplementedError,
            UnicodeError, OSError):
        raise UnreadableFileError(path, not_dicom) from None
    known = ("SOPClassUID", "Modality", "Rows", "PixelData", "SpecificCharacterSet", "ImageType",
             "StudyInstanceUID", "SeriesInstanceUID", "PatientID")
    try:
        looks_like_dicom = any(k in ds for k in known)
    except Exception:  # noqa: BLE001 - garbage read with force=True can fail in any way
        looks_like_dicom = False
    if not looks_like_dicom:
        raise UnreadableFileError(path, not_dicom)
    if "TransferSyntaxUID" not in ds.file_meta:
        implicit, little = ds.original_encoding
        ds.file_meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    return ds


def check_declared_size(ds: Dataset, path: Path, limit: int, *, n_slices: int | None = None) -> None:
    """Refuse ``path`` when the image its header declares (rows x columns x frames x samples, or
    ``n_slices`` such instances of a series) is over ``limit`` bytes as float32.

    Unreadable or absent size elements are left to :func:`decode_dataset` to report.
    """
    values = []
    for kw, default in (("Rows", 0), ("Columns", 0), ("NumberOfFrames", 1), ("SamplesPerPixel", 1)):
        try:
            value = header_value(ds, kw)
            values.append(default if value in (None, "") else int(value))
        except Exception:  # noqa: BLE001 - a corrupt value is reported by decode_dataset with its reason
            return
    rows, cols, frames, spp = values
    photometric = str(header_value(ds, "PhotometricInterpretation") or "").strip()
    _check_size(path, rows, cols, frames * (n_slices or 1), spp, photometric, limit,
                unit="slices" if n_slices else "frames")


def _check_size(path: Path, rows: int, cols: int, frames: int, spp: int, photometric: str, limit: int,
                unit: str = "frames") -> None:
    samples = 3 if photometric == "PALETTE COLOR" else max(spp, 1)
    if frames * rows * cols * samples * FLOAT32 <= limit:  # the common case: no message to build
        return
    many = f"{frames} {unit} of " if frames != 1 else ""
    what = f"{many}{rows} x {cols} pixels x {samples} sample{'s' if samples != 1 else ''}"
    check_declared(path, (frames, rows, cols, samples), FLOAT32, limit=limit, what=what)


def decode_dataset(ds: Dataset, path: Path, *, max_bytes: int | None = None,
                   spatial_view: Callable[[np.ndarray], np.ndarray] | None = None) -> DicomPixels:
    """Decode the pixels of one instance, apply the modality rescale/LUT and palette.

    ``max_bytes``: the largest image (float32 bytes) the header may declare; checked before the
    decoder runs (``None``: no check). ``spatial_view``: maps the channel-first array to a view
    of it (flips and a transpose of the spatial axes, see :mod:`medtl.data._geometry`) before the
    rescale, so the returned array is already in that layout.

    Returns float32 ``(C, H, W)`` or ``(C, F, H, W)`` (``C`` = 1 grey, 3 colour); see
    :class:`DicomPixels`. Raises UnreadableFileError with a specific reason.
    """
    if len(ds) == 0:
        raise UnreadableFileError(path, "truncated or empty DICOM file: no data elements after the file meta header")
    if not any(k in ds for k in _PIXEL_KEYWORDS):
        raise UnreadableFileError(path, _no_pixel_reason(ds))
    ts = transfer_syntax(ds)
    if ts is None:
        raise UnreadableFileError(path, (
            "the file meta header has no Transfer Syntax UID (0002,0010), so the pixel encoding "
            "is unknown; re-export the file with a complete file meta header"))
    ts = _uid(str(ts))
    required = ["Rows", "Columns", "BitsAllocated", "SamplesPerPixel", "PhotometricInterpretation"]
    if "PixelData" in ds:
        required.append("PixelRepresentation")
    missing = [k for k in required if header_value(ds, k) in (None, "")]
    if missing:
        raise UnreadableFileError(path, (
            "Pixel Data is present but the elements that describe it are missing: "
            f"{', '.join(missing)}; the file is not a usable image"))
    rows, cols = _int(ds, "Rows", path), _int(ds, "Columns", path)
    n_frames = _int(ds, "NumberOfFrames", path, default=1)
    spp = 1
    for kw in ("BitsAllocated", "SamplesPerPixel", "BitsStored", "PixelRepresentation"):
        value = _int(ds, kw, path, default=0)
        if kw == "SamplesPerPixel":
            spp = value
    if rows == 0 or cols == 0 or n_frames == 0:
        raise UnreadableFileError(path, f"empty image: Rows={rows}, Columns={cols}, NumberOfFrames={n_frames}")
    if rows < 0 or cols < 0 or n_frames < 0:
        raise UnreadableFileError(path, f"invalid image size: Rows={rows}, Columns={cols}, NumberOfFrames={n_frames}")
    if max_bytes is not None:
        _check_size(path, rows, cols, n_frames, spp, str(header_value(ds, "PhotometricInterpretation")).strip(),
                    max_bytes)
    if all(ds[kw].value in (None, b"", []) for kw in _PIXEL_KEYWORDS if kw in ds):
        raise UnreadableFileError(path, (
            f"empty Pixel Data element (0 bytes) although the header describes a {rows}x{cols} image: "
            "the file was cut short or stripped"))
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        raise UnreadableFileError(path, (
            f"no decoder exists in pydicom for the transfer syntax {ts.name} ({ts}); convert the "
            "file to an uncompressed syntax (e.g. dcmtk dcmdjpeg/dcmdjpls or gdcmconv --raw)")) from None
    if not decoder.is_available:
        pkg = _DECODER_PACKAGES.get(str(ts), "python-gdcm (pip install python-gdcm)")
        raise UnreadableFileError(path, (
            f"compressed transfer syntax {ts.name} and no decoder for it is installed; "
            f"install {pkg}"))
    with quiet():  # e.g. "excess padding removed": harmless
        try:
            arr, info = _decode(decoder, ds, spp)
        except RuntimeError as exc:
            raise UnreadableFileError(path, _decoder_failure(ts, exc)) from None
        except ValueError as exc:
            raise UnreadableFileError(path, _value_error_reason(ts, exc)) from None
        except AttributeError as exc:
            if "Missing required element" in str(exc):
                missing = str(exc).split("'")[-2] if str(exc).count("'") >= 2 else "a pixel description element"
                raise UnreadableFileError(path, (
                    f"Pixel Data is present but the elements that describe it are missing: {missing}; "
                    "the file is not a usable image")) from None
            raise UnreadableFileError(path, f"cannot decode the {ts.name} Pixel Data: {_short(exc)}") from None
        except (KeyError, TypeError, NotImplementedError, IndexError) as exc:
            raise UnreadableFileError(path, f"cannot decode the {ts.name} Pixel Data: {_short(exc)}") from None
    photometric = str(info.get("photometric_interpretation", ds.PhotometricInterpretation)).strip()
    colour_last = int(info.get("samples_per_pixel", 1)) > 1
    rescaled = False
    if photometric == "PALETTE COLOR":
        try:
            arr = apply_color_lut(arr, ds)
        except (ValueError, AttributeError, KeyError, IndexError) as exc:
            raise UnreadableFileError(path, f"invalid palette colour lookup table: {_short(exc)}") from None
        colour_last = True
    # integers of <= 16 bits stay finite through an exact float32 rescale: no NaN/Inf scan needed
    small_ints = arr.dtype.kind in "iu" and arr.dtype.itemsize <= 2
    arr = _channel_first(arr, colour_last, n_frames)
    if not colour_last and n_frames > 1:
        per_frame = _per_frame_rescale(ds, path, n_frames)
        if per_frame is not None:
            slopes, intercepts = per_frame
            arr = arr.astype(np.float64) * slopes[None, :, None, None] + intercepts[None, :, None, None]
            rescaled, small_ints = True, False
    if spatial_view is not None:  # a view: the rescale below writes the reoriented array in one pass
        arr = spatial_view(arr)
    if not colour_last and not rescaled:
        arr, rescaled = _modality_rescale(arr, ds, path, n_frames)
        small_ints &= arr.dtype == np.float32  # the exact one-pass rescale (or none)
    if arr.dtype != np.float32 or not is_dense(arr):
        arr = np.array(arr, dtype=np.float32, order="K")
    if not small_ints and not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).sum())
        raise UnreadableFileError(path, f"NaN/Inf in pixel data ({bad} of {arr.size} values)")
    return DicomPixels(arr, photometric, rescaled)


def _decode(decoder: Any, ds: Dataset, samples_per_pixel: int) -> tuple[np.ndarray, dict]:
    """``decoder.as_array(ds, as_rgb=True)``, without a copy for uncompressed greyscale integers.

    For native (uncompressed) grey pixels, pydicom copies the Pixel Data and then masks or
    sign-extends the bits above Bits Stored (two more passes), even though scanners almost always
    store those bits already clean. As pydicom's own warning suggests, this asks for a read-only
    view without the correction (``view_only=True, correct_unused_bits=False``) and checks with
    one min/max pass that the correction would change nothing: every value within the range of
    Bits Stored. Otherwise it decodes again with pydicom's correction. The caller always writes
    a new float32 array from the view (the rescale or the dtype conversion), never the view.
    """
    if not decoder.is_native or samples_per_pixel != 1:
        return decoder.as_array(ds, as_rgb=True)
    arr, info = decoder.as_array(ds, as_rgb=True, view_only=True, correct_unused_bits=False)
    stored, allocated = info.get("bits_stored"), info.get("bits_allocated")
    if arr.dtype.kind not in "iu" or not stored or not allocated or stored >= allocated or arr.size == 0:
        return arr, info
    if arr.dtype.kind == "u":
        clean = int(arr.max()) < (1 << stored)
    else:
        low, high = -(1 << (stored - 1)), (1 << (stored - 1)) - 1
        clean = low <= int(arr.min()) and int(arr.max()) <= high
    return (arr, info) if clean else decoder.as_array(ds, as_rgb=True)


def _channel_first(arr: np.ndarray, colour_last: bool, n_frames: int) -> np.ndarray:
    """A decoder array (``(H, W)``, ``(F, H, W)``, ``(H, W, 3)``, ``(F, H, W, 3)``) as a channel-first view."""
    if arr.ndim == 2:
        return arr[None]
    if arr.ndim == 3 and colour_last and n_frames == 1:
        return arr.transpose(2, 0, 1)
    if arr.ndim == 3:
        return arr[None]
    return arr.transpose(3, 0, 1, 2)  # (F, H, W, C)


def _per_frame_rescale(ds: Dataset, path: Path, n_frames: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-frame RescaleSlope/Intercept of an enhanced multi-frame instance, when they differ by frame."""
    if any(k in ds for k in ("RescaleSlope", "RescaleIntercept", "ModalityLUTSequence")):
        return None
    if _functional_group(ds, "PixelValueTransformationSequence") is not None:
        return None
    try:
        frames = ds.PerFrameFunctionalGroupsSequence
        groups = [f.PixelValueTransformationSequence[0] for f in frames]
    except (AttributeError, IndexError, KeyError, TypeError):
        return None
    if len(groups) != n_frames:
        return None
    slopes = np.array([_float(g, "RescaleSlope", path) or 1.0 for g in groups])
    intercepts = np.array([_float(g, "RescaleIntercept", path) or 0.0 for g in groups])
    return slopes, intercepts


def _modality_rescale(arr: np.ndarray, ds: Dataset, path: Path, n_frames: int) -> tuple[np.ndarray, bool]:
    """Apply Modality LUT / RescaleSlope+Intercept (or the functional-group equivalent)."""
    if "ModalityLUTSequence" in ds:
        try:
            return apply_modality_lut(arr, ds).astype(np.float64), True
        except (ValueError, AttributeError, KeyError, IndexError, TypeError) as exc:
            raise UnreadableFileError(path, f"invalid Modality LUT Sequence: {_short(exc)}") from None
    slope, intercept = _float(ds, "RescaleSlope", path), _float(ds, "RescaleIntercept", path)
    if slope is None and intercept is None:
        group = _functional_group(ds, "PixelValueTransformationSequence")
        if group is not None:
            slope, intercept = _float(group, "RescaleSlope", path), _float(group, "RescaleIntercept", path)
    if slope is None and ds.get("Modality") == "RTDOSE":
        slope = _float(ds, "DoseGridScaling", path)
    if slope is None and intercept is None:
        return arr, False
    slope, intercept = 1.0 if slope is None else slope, intercept or 0.0
    if _exact_in_float32(arr, slope, intercept):
        # One pass straight into float32: integer pixels of <= 16 bits plus an integral
        # intercept (slope 1) are exact in float32, so this equals the float64 result bit for bit.
        out = np.empty_like(arr, dtype=np.float32)  # in the source's memory order (see is_dense)
        np.add(arr, np.float32(intercept), out=out, dtype=np.float32, casting="unsafe")
        return out, True
    out = np.array(arr, dtype=np.float64, order="K")
    if slope != 1.0:
        np.multiply(out, slope, out=out)
    if intercept:
        np.add(out, intercept, out=out)
    return out, True


def _exact_in_float32(arr: np.ndarray, slope: float, intercept: float) -> bool:
    """True when ``arr * slope + intercept`` is exact in float32 (so no float64 pass is needed)."""
    return (slope == 1.0 and arr.dtype.kind in "iu" and arr.dtype.itemsize <= 2
            and float(intercept).is_integer() and abs(intercept) <= 2 ** 23)


def _functional_group(ds: Dataset, keyword: str) -> Dataset | None:
    """First item of ``keyword`` in the shared functional groups (enhanced multi-frame)."""
    try:
        shared = ds.SharedFunctionalGroupsSequence[0]
        return shared[keyword][0] if keyword in shared else None
    except (AttributeError, IndexError, KeyError, TypeError):
        return None


# ---- fast reads of simple top-level elements (the ingest hot path)
# pydicom converts an element on first access through hooks, validation and MultiValue
# wrappers (~35 us per element on the CT set); the header fields medtl needs are plain
# numbers and ASCII codes, parsed here straight from the raw bytes. Anything unusual
# (other VR than the dictionary's, deferred or non-ASCII value, ISO 2022 escapes, a
# character set that is not ASCII-compatible, a parse failure) falls back to pydicom, so the
# values and the errors are the same as ``_plain(ds.get(keyword))``.
_BINARY = {"US": "H", "SS": "h", "UL": "I", "SL": "i", "FL": "f", "FD": "d"}
_BINARY_SIZE = {vr: struct.calcsize(fmt) for vr, fmt in _BINARY.items()}
_DEFAULT_REPERTOIRE = ("CS", "UI", "AE", "DS", "IS")  # never affected by Specific Character Set
_CHARSET_TEXT = ("LO", "SH")
_ASCII_CHARSETS = {b"", b"ISO_IR 6", b"ISO_IR 100", b"ISO_IR 101", b"ISO_IR 109", b"ISO_IR 110",
                   b"ISO_IR 144", b"ISO_IR 127", b"ISO_IR 126", b"ISO_IR 138", b"ISO_IR 148",
                   b"ISO_IR 166", b"ISO_IR 192", b"GB18030", b"GBK"}
_TAG_VR: dict[str, tuple[int, str]] = {}
_CHARSET_TAG = Tag(0x00080005)  # Specific Character Set
_MISSING = object()


def header_value(ds: Dataset, keyword: str) -> Any:
    """``_plain(ds.get(keyword))`` for a top-level element, without pydicom's conversion cost.

    Returns ``None`` for an absent or empty element, an ``int``/``float``/``str`` for one
    value and a list for several. Example: ``header_value(ds, "PixelSpacing") -> [0.7, 0.6]``.
    """
    value = _fast_value(ds, keyword)
    return _plain(ds.get(keyword)) if value is _MISSING else value


def _fast_value(ds: Dataset, keyword: str) -> Any:
    tag_vr = _TAG_VR.get(keyword)
    if tag_vr is None:
        tag = tag_for_keyword(keyword)
        if tag is None:
            return _MISSING
        tag_vr = _TAG_VR[keyword] = (Tag(tag), dictionary_VR(tag))
    tag, vr = tag_vr
    elements = getattr(ds, "_dict", None)  # the element store: a lookup without Tag() conversion
    raw = elements.get(tag) if isinstance(elements, dict) else ds.get_item(tag, keep_deferred=True)
    if raw is None:
        return None
    if type(raw) is not RawDataElement or raw.VR not in (None, vr):
        return _MISSING
    data = raw.value
    if data is None:  # empty, or a deferred value: pydicom reads it
        return None if raw.length == 0 else _MISSING
    if not data:
        return None
    fmt = _BINARY.get(vr)
    if fmt is not None:
        n, rest = divmod(len(data), _BINARY_SIZE[vr])
        if rest:
            return _MISSING
        values = struct.unpack(("<" if raw.is_little_endian else ">") + fmt * n, data)
        return values[0] if n == 1 else list(values)
    if vr not in _DEFAULT_REPERTOIRE and not (vr in _CHARSET_TEXT and _ascii_charset(ds)):
        return _MISSING
    if not data.isascii() or b"\x1b" in data:
        return _MISSING
    text = data.decode("ascii")
    try:
        if "\\" not in text:  # one value: the common case
            part = text.strip(" \x00")
            if vr == "DS":
                value = float(part)
                return value if math.isfinite(value) else _MISSING
            if vr == "IS":
                return int(part)
            return part or None
        parts = [p.strip(" \x00") for p in text.split("\\")]
        if vr == "DS":
            values = [float(p) for p in parts]
            if not all(map(math.isfinite, values)):
                return _MISSING
        elif vr == "IS":
            values = [int(p) for p in parts]
        else:
            values = parts
    except ValueError:
        return _MISSING
    return values


def _ascii_charset(ds: Dataset) -> bool:
    elements = getattr(ds, "_dict", None)
    raw = elements.get(_CHARSET_TAG) if isinstance(elements, dict) else ds.get_item(_CHARSET_TAG, keep_deferred=True)
    if raw is None:
        return True
    value = raw.value
    if isinstance(raw, RawDataElement):
        return value is not None and value.strip(b" \x00") in _ASCII_CHARSETS
    # dcmread converts Specific Character Set while reading: one plain value, or several (ISO 2022: not ASCII)
    if isinstance(value, str) or value is None:
        return (value or "").strip(" \x00").encode("ascii", "replace") in _ASCII_CHARSETS
    return False


def raw_key(ds: Dataset, keywords: tuple[str, ...]) -> tuple | None:
    """A hashable key of how the top-level elements ``keywords`` are encoded in ``ds`` (VR, bytes,
    byte order; ``None`` for an absent one), or ``None`` when one of them is no longer in its raw
    form (already converted, deferred): values parsed from equal keys are equal, so the slices of
    one series share what is derived from their common header fields."""
    elements = getattr(ds, "_dict", None)
    if not isinstance(elements, dict):
        return None
    key = []
    for keyword in keywords:
        tag_vr = _TAG_VR.get(keyword)
        if tag_vr is None:
            _fast_value(ds, keyword)  # fills _TAG_VR
            tag_vr = _TAG_VR[keyword]
        raw = elements.get(tag_vr[0])
        if raw is None:
            key.append(None)
        elif type(raw) is RawDataElement:
            if raw.value is None and raw.length != 0:  # deferred
                return None
            key.append((raw.VR, raw.value, raw.is_little_endian))
        else:  # converted by pydicom (e.g. Specific Character Set while reading): key on its value
            value = raw.value
            if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
                value = tuple(value)
            try:
                hash(value)
            except TypeError:
                return None
            key.append((raw.VR, "value", value))
    return tuple(key)


def transfer_syntax(ds: Dataset) -> str | None:
    """The Transfer Syntax UID of the file meta header, or ``None``."""
    file_meta = getattr(ds, "file_meta", None)
    elements = getattr(file_meta, "_dict", None)
    if isinstance(elements, dict):
        elem = elements.get(_TS_TAG)
        value = getattr(elem, "value", None) if elem is not None else None
        if isinstance(value, str):
            return value
    return file_meta.get("TransferSyntaxUID") if isinstance(file_meta, Dataset) else None


_TS_TAG = Tag(0x00020010)
_META_FIELDS = ("photometric", "PhotometricInterpretation"), ("rows", "Rows"), ("columns", "Columns"), \
    ("bits_stored", "BitsStored")
# every header field dicom_meta reads (the character set decides how LO/SH text decodes)
_META_KEY = ("SpecificCharacterSet", "SOPClassUID", *(kw for _, kw in _META_FIELDS), *_META_KEYWORDS)
_META_CACHE: dict[tuple, dict[str, Any]] = {}


@lru_cache(maxsize=256)
def _uid(uid: str) -> UID:
    """``UID(uid)``, kept: building one validates the string each time."""
    return UID(uid)


def _uid_name(uid: str) -> str:
    return _uid(uid).name


def dicom_meta(ds: Dataset) -> dict[str, Any]:
    """Technical, non-identifying header fields as JSON-friendly values.

    Slices of one series encode these fields alike: the result is kept per encoding
    (:func:`raw_key`) and copied, so each slice only compares raw bytes.
    """
    ts = transfer_syntax(ds)
    key = raw_key(ds, _META_KEY)
    if key is not None:
        key = (ts, *key)
        cached = _META_CACHE.get(key)
        if cached is not None:
            return {k: list(v) if isinstance(v, list) else v for k, v in cached.items()}
    meta: dict[str, Any] = {}
    if ts is not None:
        meta["transfer_syntax"] = _uid_name(str(ts))
    sop = header_value(ds, "SOPClassUID")
    if sop and _uid_name(str(sop)) != str(sop):
        meta["sop_class"] = _uid_name(str(sop))
    for name, kw in _META_FIELDS:
        value = header_value(ds, kw)
        if value is not None:
            meta[name] = value
    for kw in _META_KEYWORDS:
        if kw in IDENTIFYING_TAGS:  # defensive: the list above must never leak identifiers
            continue
        try:
            value = header_value(ds, kw)
        except Exception:  # noqa: BLE001 - an invalid optional field is just left out
            value = None
        if value not in (None, "", []):
            meta[kw] = value
    if key is not None:
        if len(_META_CACHE) >= 64:
            _META_CACHE.clear()
        _META_CACHE[key] = {k: list(v) if isinstance(v, list) else v for k, v in meta.items()}
    return meta


def row_col_spacing(ds: Dataset) -> tuple[float, float]:
    """(row, col) spacing in mm from PixelSpacing, ImagerPixelSpacing or functional groups."""
    for kw in ("PixelSpacing", "ImagerPixelSpacing", None):
        if kw is None:  # enhanced objects: the shared functional group (looked up only when needed)
            group = _functional_group(ds, "PixelMeasuresSequence")
            value = group.get("PixelSpacing") if group is not None else None
        else:
            value = header_value(ds, kw)
        try:
            r, c = (float(v) for v in value)
        except (TypeError, ValueError):
            continue
        if r > 0 and c > 0 and math.isfinite(r) and math.isfinite(c):
            return r, c
    return 1.0, 1.0


def orientation_of(ds: Dataset) -> tuple[float, ...] | None:
    """ImageOrientationPatient (6 direction cosines, unit length) from the header or the
    shared/first per-frame functional group; ``None`` when absent or invalid."""
    value = header_value(ds, "ImageOrientationPatient")
    if value is None:
        group = _functional_group(ds, "PlaneOrientationSequence") or _frame_group(ds, 0, "PlaneOrientationSequence")
        value = _plain(group.get("ImageOrientationPatient")) if group is not None else None
    try:  # plain floats: six numbers do not pay for NumPy's per-call overhead
        iop = [float(v) for v in value]
    except (TypeError, ValueError):
        return None
    if len(iop) != 6 or not all(map(math.isfinite, iop)):
        return None
    row, col = iop[:3], iop[3:]
    n_row, n_col = math.hypot(*row), math.hypot(*col)
    if not (0.9 < n_row < 1.1 and 0.9 < n_col < 1.1) or abs(sum(a * b for a, b in zip(row, col))) > 0.01:
        return None  # not two orthogonal unit vectors: corrupt
    return tuple(v / n_row for v in row) + tuple(v / n_col for v in col)


def normal_of(iop: tuple[float, ...]) -> tuple[float, float, float]:
    """The slice normal ``row x column`` of an ImageOrientationPatient (LPS)."""
    (a1, a2, a3), (b1, b2, b3) = iop[:3], iop[3:]
    return a2 * b3 - a3 * b2, a3 * b1 - a1 * b3, a1 * b2 - a2 * b1


def position_of(ds: Dataset) -> np.ndarray | None:
    """ImagePositionPatient (mm, LPS) of the first voxel, or ``None`` when absent or invalid."""
    return _vector3(header_value(ds, "ImagePositionPatient"))


def frame_positions(ds: Dataset, n_frames: int) -> tuple[list[np.ndarray | None], str] | None:
    """Per-frame positions (LPS mm) of a multi-frame instance and where they came from.

    Enhanced objects: PerFrameFunctionalGroupsSequence > PlanePositionSequence; RT dose and
    NM-style objects: ImagePositionPatient plus GridFrameOffsetVector along the normal.
    ``None`` when the instance carries no frame geometry at all.
    """
    try:
        frames = ds.get("PerFrameFunctionalGroupsSequence")
    except Exception:  # noqa: BLE001 - a corrupt sequence counts as absent
        frames = None
    if frames:
        shared = _functional_group(ds, "PlanePositionSequence")
        positions = []
        for i in range(n_frames):
            group = _frame_group(ds, i, "PlanePositionSequence") or shared
            positions.append(_vector3(_plain(group.get("ImagePositionPatient"))) if group is not None else None)
        if any(p is not None for p in positions):
            return positions, "PerFrameFunctionalGroupsSequence"
    origin, iop = position_of(ds), orientation_of(ds)
    offsets = ds.get("GridFrameOffsetVector")
    if origin is not None and iop is not None and offsets is not None:
        try:
            values = [float(v) for v in offsets]
        except (TypeError, ValueError):
            values = []
        if len(values) == n_frames:
            normal = np.array(normal_of(iop))
            return [origin + v * normal for v in values], "GridFrameOffsetVector"
    return None


def _frame_group(ds: Dataset, index: int, keyword: str) -> Dataset | None:
    try:
        item = ds.PerFrameFunctionalGroupsSequence[index]
        return item[keyword][0] if keyword in item else None
    except (AttributeError, IndexError, KeyError, TypeError):
        return None


def _vector3(value: Any) -> np.ndarray | None:
    try:
        vec = [float(v) for v in value]
    except (TypeError, ValueError):
        return None
    return np.array(vec) if len(vec) == 3 and all(map(math.isfinite, vec)) else None


def frame_spacing(ds: Dataset) -> float:
    """Spacing between frames of a multi-frame instance (mm), 1.0 when unknown."""
    offsets = ds.get("GridFrameOffsetVector")
    try:
        if offsets is not None and len(offsets) > 1:
            step = float(np.median(np.abs(np.diff([float(v) for v in offsets]))))
            if step > 0:
                return step
    except (TypeError, ValueError):
        pass
    group = _functional_group(ds, "PixelMeasuresSequence")
    for src in (ds, group):
        for kw in ("SpacingBetweenSlices", "SliceThickness"):
            try:
                value = float(src.get(kw)) if src is not None and src.get(kw) not in (None, "") else None
            except (TypeError, ValueError):
                value = None
            if value and value > 0:
                return value
    return 1.0


def _no_pixel_reason(ds: Dataset) -> str:
    sop = ds.get("SOPClassUID") or (ds.file_meta.get("MediaStorageSOPClassUID") if hasattr(ds, "file_meta") else None)
    name = UID(sop).name if sop else None
    name = name if name and name != str(sop) else None
    modality = ds.get("Modality")
    parts = [p for p in (name, f"Modality {modality}" if modality else None) if p]
    what = " / ".join(parts) if parts else "non-image (no SOP Class UID or Modality)"
    if ds.get("Rows") and ds.get("Columns"):
        return (f"no Pixel Data element although the header describes a {ds.Rows}x{ds.Columns} "
                f"image ({what}): the file is probably truncated")
    if name and "Image Storage" in name:
        return (f"no Pixel Data element: the file claims to be a {what} object but holds no image "
                "(no Rows, Columns or Pixel Data; a header-only or stripped file)")
    return f"no Pixel Data element: this is a {what} object, not an image"


def _decoder_failure(ts: UID, exc: RuntimeError) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    if len(lines) > 1 and "plugins" in lines[0]:
        detail = "; ".join(_short(ln, 140) for ln in lines[1:])
    else:
        detail = _short(exc, 200)
    if "missing dependencies" in str(exc):
        pkg = _DECODER_PACKAGES.get(str(ts), "python-gdcm")
        return f"compressed transfer syntax {ts.name} and no working decoder is installed; install {pkg} ({detail})"
    return f"corrupt {ts.name} pixel stream: every decoder failed ({detail})"


def _value_error_reason(ts: UID, exc: ValueError) -> str:
    msg = str(exc)
    if "less than expected" in msg:
        got_expected = msg.split("(", 1)[1].split(")", 1)[0] if "(" in msg else ""
        return (f"truncated pixel data ({got_expected}): the file was cut short or its Rows/Columns/"
                "BitsAllocated/NumberOfFrames values are wrong")
    if "offset" in msg.lower() or "tag" in msg.lower() or "fragment" in msg.lower():
        return f"malformed encapsulated {ts.name} Pixel Data: {_short(exc)}"
    return f"invalid pixel description for {ts.name} data: {_short(exc)}"


def _int(ds: Dataset, kw: str, path: Path, default: int | None = None) -> int:
    value = _fast_value(ds, kw)
    if type(value) is int:
        return value
    # slow path (absent, multi-valued or unusual element): pydicom's value and error messages
    value = ds.get(kw)
    if value in (None, ""):
        if default is None:
            raise UnreadableFileError(path, f"missing required element {kw}")
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        elem = ds[kw]
        raise UnreadableFileError(path, (
            f"invalid header value: {kw} {elem.tag} (VR {elem.VR}) is {str(value)[:40]!r}, "
            "not an integer")) from None


def _float(ds: Dataset, kw: str, path: Path) -> float | None:
    value = _fast_value(ds, kw)
    if type(value) is float:
        return value  # the fast parser only returns finite floats
    value = ds.get(kw)
    if value in (None, ""):
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        elem = ds[kw]
        raise UnreadableFileError(path, (
            f"invalid header value: {kw} {elem.tag} (VR {elem.VR}) is {str(value)[:40]!r}, "
            "not a number")) from None
    if not np.isfinite(out):
        raise UnreadableFileError(path, f"invalid header value: {kw} is {out}")
    return out


def _plain(value: Any) -> Any:
    """pydicom values → JSON-friendly Python values (multi-values → lists)."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return [_plain(v) for v in value]
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    return str(value).strip()


_QUOTED = re.compile(r"b?'[^']*'|b?\"[^\"]*\"")


def describe_exception(exc: BaseException, fallback: str = "unexpected decoder error") -> str:
    """A specific, value-free reason for an exception escaping pydicom's lazy parsing.

    pydicom converts element values when they are first accessed, so a corrupt header can
    raise almost anywhere. Messages that may quote element values (a name, a date) are
    reduced to the tag and the kind of problem; unknown exceptions keep their type and
    their message with quoted parts removed.
    """
    msg = str(exc)
    tag = re.search(r"\(([0-9A-Fa-f]{4}),\s*([0-9A-Fa-f]{4})\)", msg)
    where = f" in tag ({tag.group(1)},{tag.group(2)})" if tag else ""
    if isinstance(exc, zlib.error):
        return f"corrupt deflate-compressed data set (Deflated Explicit VR Little Endian): zlib {_short(exc, 120)}"
    if isinstance(exc, BytesLengthException):
        return ("invalid VR or value length: an element's byte length is not a multiple of the size of "
                "its Value Representation (corrupt header)")
    if isinstance(exc, NotImplementedError) and "Value Representation" in msg:
        vr = re.search(r"Value Representation '([^']{0,12})'", msg)
        return f"invalid VR: unknown Value Representation {vr.group(1)!r}{where}" if vr else f"invalid VR{where}"
    if isinstance(exc, struct.error):
        return "malformed DICOM header: a data element is shorter than its declared structure (corrupt or truncated file)"
    if isinstance(exc, (ValueError, TypeError)) and "UID" in msg:
        return ("invalid Transfer Syntax UID in the file meta header (0002,0010): not a known transfer "
                "syntax; re-export the file with a complete file meta header")
    if isinstance(exc, (ValueError, TypeError, OverflowError)) and tag:
        return f"invalid header value{where}: {type(exc).__name__} while converting it (wrong VR or corrupt value)"
    return f"{fallback}: {type(exc).__name__}: {_short(_QUOTED.sub('…', msg))}"


def _short(exc: object, limit: int = 200) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


short = _short
