"""Scan geometry behind :func:`medtl.data.readers.read_image` (private).

An affine maps array indices of the spatial axes (in array order) to world millimetres in
RAS+ (x to the patient's Right, y Anterior, z Superior), the NIfTI/MONAI convention. DICOM
positions are LPS+ and are converted with ``diag(-1, -1, 1)``.

Reorientation follows MONAI's ``Orientation(axcodes=...)`` exactly (the same nibabel
``io_orientation`` / ``ornt_transform`` computation, checked against it in the tests) but is
applied as a NumPy view (flips and a transpose, no copy), so that the decode that follows
writes the reoriented array in one pass. That keeps DICOM ingest at raw-decoder speed, where
building a ``MetaTensor`` per 2D slice would cost several times the decode itself.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from nibabel import orientations as nio

from medtl.errors import ConfigError, DataError

__all__ = ["DISPLAY", "LPS_TO_RAS", "Reorientation", "axis_codes", "check_axcodes", "check_codes", "cut_axis", "dicom_affine",
           "display_view", "is_dense", "pixel_grid", "plane_name", "reorient", "spacing_of"]

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_PAIRS = (("L", "R"), ("P", "A"), ("I", "S"))


def check_axcodes(code: str) -> str:
    """``code`` upper-cased when it is a valid 3-letter axis code (one of L/R, P/A, I/S each).

    Raises:
        ConfigError: naming the code received and what is valid.
    """
    text = str(code).strip().upper()
    ok = len(text) == 3 and all(sum(ch in pair for ch in text) == 1 for pair in _PAIRS)
    if not ok:
        raise ConfigError(f"The orientation must be a 3-letter axis code with one letter from each of L/R, P/A "
                          f"and I/S (e.g. 'RAS', 'LPS', 'SPL'). Got {code!r} instead.")
    return text


def dicom_affine(columns_lps: list[np.ndarray], origin_lps: np.ndarray) -> np.ndarray:
    """RAS affine from DICOM (LPS) column vectors, one per raw array axis, and the first voxel's position."""
    aff = np.eye(4)
    for j, col in enumerate(columns_lps):
        aff[:3, j] = col
    aff[:3, 3] = origin_lps
    return LPS_TO_RAS @ aff


def pixel_grid(spacing: tuple[float, ...]) -> np.ndarray:
    """The affine of an image without world geometry: the pixel grid scaled by ``spacing``."""
    diag = list(spacing) + [1.0] * (3 - len(spacing)) + [1.0]
    return np.diag(np.asarray(diag, dtype=float))


@lru_cache(maxsize=256)
def _transform(directions: bytes, axcodes: str) -> tuple[tuple[int, int], ...]:
    rot = np.frombuffer(directions, dtype=np.float64).reshape(3, 3)
    aff = np.eye(4)
    aff[:3, :3] = rot
    src = nio.io_orientation(aff)
    tr = nio.ornt_transform(src, nio.axcodes2ornt(axcodes, labels=_PAIRS))
    return tuple((int(a), int(f)) for a, f in tr)


@lru_cache(maxsize=256)
def _plan(directions: bytes, shape: tuple[int, ...], axcodes: str) -> tuple[tuple, tuple, np.ndarray, int]:
    tr = np.array(_transform(directions, axcodes), dtype=float)
    flips = (slice(None),) + tuple(slice(None, None, -1) if f < 0 else slice(None) for f in tr[:, 1])
    order = (0, *(int(a) for a in 1 + np.argsort(tr[:, 0])))
    inv = nio.inv_ornt_aff(tr, shape)
    inv.setflags(write=False)
    return flips, order, inv, int(tr[2, 0])


class Reorientation:
    """Flips and a transpose that bring spatial axes to an axis code, and the resulting affine.

    Built from the affine and the spatial shape alone (before any pixel is decoded);
    :meth:`apply` returns a view of a channel-first array.
    """

    def __init__(self, affine: np.ndarray, spatial_shape: tuple[int, ...], axcodes: str) -> None:
        self.plane = len(spatial_shape) == 2
        shape = tuple(int(s) for s in spatial_shape) + ((1,) if self.plane else ())
        rot = affine[:3, :3] / np.maximum(np.sqrt((affine[:3, :3] ** 2).sum(axis=0)), 1e-12)
        self.flips, self.order, self._inv, normal_at = _plan(np.round(rot, 6).tobytes(), shape, axcodes)
        self.normal_at = normal_at if self.plane else None
        self.affine = self._reoriented(affine)

    def _reoriented(self, affine: np.ndarray) -> np.ndarray:
        new = affine @ self._inv
        if self.normal_at is not None:
            cols = [a for a in range(3) if a != self.normal_at] + [self.normal_at]
            new[:, :3] = new[:, cols]
        return new

    def moved(self, affine: np.ndarray) -> Reorientation:
        """The same flips and transpose for another affine with the same axis directions.

        Slices that share an orientation and a size share the plan; only their spacing and
        position differ. ``affine``'s columns must point along this plan's source axes (any
        positive length): the plan is not recomputed, only the new affine.
        """
        other = object.__new__(Reorientation)
        other.__dict__.update(self.__dict__)
        other.affine = self._reoriented(affine)
        return other

    def apply(self, array: np.ndarray) -> np.ndarray:
        """``(C, a, b)`` or ``(C, a, b, c)`` -> the same layout reoriented (a view)."""
        vol = array[..., None] if self.plane else array
        out = vol[self.flips].transpose(self.order)
        return out.squeeze(axis=1 + self.normal_at) if self.normal_at is not None else out


def reorient(array: np.ndarray, affine: np.ndarray, axcodes: str) -> tuple[np.ndarray, np.ndarray]:
    """Flip and transpose the spatial axes of ``array`` to ``axcodes``; returns a view and its affine.

    The same result as MONAI's ``Orientation(axcodes)`` on a ``MetaTensor`` with this affine.

    Args:
        array: channel-first ``(C, a, b)`` (a plane) or ``(C, a, b, c)``.
        affine: ``(4, 4)`` RAS affine of those spatial axes; for a plane its third column is the
            normal (the plane is treated as one slice of a volume).
        axcodes: target code, e.g. ``"RAS"``: array axis 0 then points to R, axis 1 to A, axis 2 to S.

    Returns:
        ``(view, affine)``. For a plane the axis along the normal is dropped again and its
        affine column moved to the third place, so the view stays ``(C, H, W)``.
    """
    plan = Reorientation(affine, tuple(array.shape[1:]), axcodes)
    return plan.apply(array), plan.affine


def is_dense(arr: np.ndarray) -> bool:
    """True for an array in one block of memory with positive strides, in any axis order.

    Such an array is C-contiguous up to a permutation of its axes (a transposed slice, the
    F-ordered arrays nibabel returns). NumPy, torch and MONAI take it as it is; copying it into
    C order would add a strided pass over every image that no consumer needs.
    """
    order = np.argsort(arr.strides, kind="stable")[::-1]
    return arr.transpose(order).flags.c_contiguous


def spacing_of(affine: np.ndarray, spatial: int) -> tuple[float, ...]:
    """mm per spatial axis in array order: the norms of the affine's first ``spatial`` columns."""
    return tuple(math.hypot(*col) for col in affine[:3, :spatial].T.tolist())


def plane_name(iop: tuple[float, ...]) -> str:
    """``axial``, ``coronal``, ``sagittal`` or ``oblique`` for a DICOM ImageOrientationPatient."""
    normal = np.cross(np.asarray(iop[:3], float), np.asarray(iop[3:], float))
    k = int(np.argmax(np.abs(normal)))
    if abs(normal[k]) < 0.8:
        return "oblique"
    return ("sagittal", "coronal", "axial")[k]


# --------------------------------------------------------------------------- display
#: Radiological display of each plane: the letters the rows (top to bottom) and the columns
#: (left to right) run toward. Axial: anterior at the top, the patient's right on the viewer's
#: left; coronal: superior at the top, right on the left; sagittal: superior at the top,
#: anterior on the left (the layout of a standard DICOM image of that plane).
DISPLAY: dict[str, tuple[str, str]] = {"axial": ("P", "L"), "coronal": ("I", "L"), "sagittal": ("I", "P")}
_CUT_PLANE = ("sagittal", "coronal", "axial")  # the plane of a cut across the L/R, P/A, I/S axis


def _pair(letter: str) -> int:
    return next(i for i, p in enumerate(_PAIRS) if letter in p)


def check_codes(axcodes: str, spatial: int) -> str:
    """``axcodes`` upper-cased when it gives one letter of a different L/R, P/A, I/S pair per spatial axis.

    Raises:
        DataError: naming the codes received and what is valid.
    """
    codes = str(axcodes).strip().upper()
    pairs = {_pair(c) for c in codes if len(c) == 1 and c in "LRPAIS"}
    if len(codes) != spatial or len(pairs) != spatial:
        raise DataError(f"Axis codes must give one letter of L/R, P/A or I/S (each pair at most once) for each of "
                        f"the {spatial} spatial axes, e.g. {'RAS' if spatial == 3 else 'RA'!r}. Got {axcodes!r} "
                        "instead; pass None for an image without patient geometry.")
    return codes


def axis_codes(affine: np.ndarray, spatial: int) -> str:
    """The letters the first ``spatial`` array axes of ``affine`` run toward (nearest world axis).

    Example:
        >>> axis_codes(np.diag([-0.7, 0.7, 2.5, 1.0]), 3)
        'LAS'
    """
    return "".join(nio.aff2axcodes(np.asarray(affine, dtype=np.float64), labels=_PAIRS))[:spatial]


def cut_axis(axcodes: str, plane: str) -> int:
    """The array axis to cut across for ``plane`` (``axial``, ``coronal``, ``sagittal``) of a volume in ``axcodes``.

    Example:
        >>> cut_axis("RAS", "axial"), cut_axis("SPL", "axial")
        (2, 0)
    """
    want = _CUT_PLANE.index(plane)
    return next(a for a, c in enumerate(check_codes(axcodes, 3)) if _pair(c) == want)


def display_view(image: np.ndarray, axcodes: str | None) -> np.ndarray:
    """A 2D slice in radiological display order (see :data:`DISPLAY`): a transposed and flipped view.

    Args:
        image: ``(..., a, b)``; the last two axes are the slice's.
        axcodes: the letters those two axes run toward, e.g. ``"RA"`` for an axial slice of a
            RAS volume (:func:`axis_codes`); ``None`` for an image without patient geometry
            (PNG, MedMNIST, a radiograph), which is returned as it is.

    Returns:
        ``(..., rows, columns)`` with row 0 at the top and column 0 on the viewer's left.

    Example:
        >>> display_view(np.arange(4).reshape(2, 2), "RA").tolist()  # axis 0 -> Right, axis 1 -> Anterior
        [[3, 1], [2, 0]]
    """
    if axcodes is None:
        return image
    codes = check_codes(axcodes, 2)
    pairs = [_pair(c) for c in codes]
    plane = _CUT_PLANE[3 - sum(pairs)]
    order = [pairs.index(_pair(want)) for want in DISPLAY[plane]]
    view = image if order == [0, 1] else np.swapaxes(image, -1, -2)
    flips = [codes[a] != want for a, want in zip(order, DISPLAY[plane])]
    index = (Ellipsis, slice(None, None, -1) if flips[0] else slice(None), slice(None, None, -1) if flips[1] else slice(None))
    return view[index]
