"""Where a prepared image lies in its scan: the model grid in the scan's coordinates (private).

:func:`medtl.data.prepare.prepare` resizes every image to ``data.image_size`` (or resamples it
to ``data.spacing`` and crops or pads it), so the model sees a grid other than the scan's.
:class:`Geometry` keeps both: the scan's affine and shape, and the affine of the model's grid,
which follows from the resize exactly as MONAI computes it (``Resize``: ``align_corners=False``;
``Zoom(keep_size=False)`` then ``ResizeWithPadOrCrop``: centred). A map computed on the model's
grid is brought back to the scan's grid with :meth:`Geometry.to_scan` and written with the
scan's affine (:func:`medtl.explain.export.save_nifti`), so it lies over the scan voxel for
voxel in any viewer.

Affines follow :class:`medtl.data.readers.ScanImage`: ``(4, 4)`` float64, mm, RAS+;
``affine @ [i, j, k, 1]`` for array index ``(i, j, k)`` of the spatial axes in array order
(for a 2D image the third column is the plane normal).

Example:
    >>> g = Geometry.of_resize(np.diag([2.0, 1.0, 1.0, 1.0]), (40, 64, 64), (20, 32, 32))
    >>> g.model_affine[:3, :3].diagonal().tolist()
    [4.0, 2.0, 2.0]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Geometry", "match_dims"]


@dataclass(frozen=True)
class Geometry:
    """A scan's grid and the model-input grid made from it.

    Attributes:
        affine: ``(4, 4)`` the scan's affine (array index -> RAS+ mm).
        shape: the scan's spatial shape in array order, ``(H, W)`` or ``(D, H, W)``.
        scale, shift: per spatial axis, scan index = ``scale * model index + shift``.
        axcodes: the letters the spatial axes run toward (``"RAS"``; ``"RA"`` for an axial
            slice), the same on both grids; ``None`` for a scan without patient geometry
            (PNG/JPEG/TIFF, a radiograph), whose affine is its pixel grid. Overlays use it to
            draw the scan in radiological orientation.
    """

    affine: np.ndarray
    shape: tuple[int, ...]
    scale: tuple[float, ...]
    shift: tuple[float, ...]
    axcodes: str | None = None

    @property
    def index_map(self) -> np.ndarray:
        """``(4, 4)``: model-grid index -> scan index (homogeneous, spatial axes in array order)."""
        t = np.eye(4)
        for a, (s, b) in enumerate(zip(self.scale, self.shift)):
            t[a, a], t[a, 3] = s, b
        return t

    @property
    def model_affine(self) -> np.ndarray:
        """``(4, 4)`` affine of the model-input grid (``data.image_size``): model index -> RAS+ mm."""
        return self.affine @ self.index_map

    @classmethod
    def of_resize(cls, affine: np.ndarray, shape: Sequence[int], size: Sequence[int]) -> Geometry:
        """The grid of MONAI ``Resize(size)`` (``align_corners=False``) of a scan of ``shape``."""
        scale = [n / m for n, m in zip(shape, size)]
        return cls(_affine(affine), _ints(shape), tuple(scale), tuple(0.5 * s - 0.5 for s in scale))

    @classmethod
    def of_spacing(cls, affine: np.ndarray, shape: Sequence[int], size: Sequence[int],
                   spacing_in: Sequence[float], spacing: Sequence[float]) -> Geometry:
        """The grid of MONAI ``Zoom(spacing_in / spacing, keep_size=False)`` then ``ResizeWithPadOrCrop(size)``."""
        scale, shift = [], []
        for n, m, a, b in zip(shape, size, spacing_in, spacing):
            out = max(1, math.floor(n * (float(a) / float(b))))  # torch's output size for a scale factor
            s = n / out
            start = max(out // 2 - m // 2, 0) if out > m else -((m - out) // 2)  # centre crop / symmetric pad
            scale.append(s)
            shift.append(s * start + 0.5 * s - 0.5)
        return cls(_affine(affine), _ints(shape), tuple(scale), tuple(shift))

    def to_scan(self, values: np.ndarray) -> np.ndarray:
        """Resample ``values`` on the model grid (spatial shape only) to the scan's grid, linearly.

        Scan voxels outside the model grid (cropped away by ``data.spacing``) get 0.

        Example:
            >>> g = Geometry.of_resize(np.eye(4), (8, 8), (4, 4))
            >>> g.to_scan(np.ones((4, 4), np.float32)).shape
            (8, 8)
        """
        from scipy import ndimage

        v = np.asarray(values, dtype=np.float32)
        if v.ndim != len(self.shape):
            raise ValueError(f"a map of shape {v.shape} does not match the {len(self.shape)}D scan grid {self.shape}")
        inv_scale = np.array([1.0 / s for s in self.scale])
        offset = np.array([-b / s for s, b in zip(self.scale, self.shift)])
        out = ndimage.affine_transform(v, inv_scale, offset=offset, output_shape=self.shape, order=1,
                                       mode="nearest")
        for a, (n_model, inv, off) in enumerate(zip(v.shape, inv_scale, offset)):
            pos = inv * np.arange(self.shape[a]) + off  # model coordinate of each scan index on this axis
            outside = (pos < -0.5) | (pos > n_model - 0.5)
            if outside.any():
                index = [slice(None)] * v.ndim
                index[a] = outside
                out[tuple(index)] = 0.0
        return out

    def as_dict(self) -> dict:
        return {"affine": np.asarray(self.affine).tolist(), "shape": list(self.shape), "scale": list(self.scale),
                "shift": list(self.shift), "axcodes": self.axcodes}

    @classmethod
    def from_dict(cls, d: dict) -> Geometry:
        return cls(_affine(d["affine"]), _ints(d["shape"]), tuple(float(s) for s in d["scale"]),
                   tuple(float(s) for s in d["shift"]), d.get("axcodes"))


def _affine(a) -> np.ndarray:
    a = np.array(a, dtype=np.float64)
    if a.shape != (4, 4):
        raise ValueError(f"an affine must be 4 x 4; got shape {a.shape}")
    a.setflags(write=False)
    return a


def _ints(shape: Sequence[int]) -> tuple[int, ...]:
    return tuple(int(s) for s in shape)


def match_dims(affine: np.ndarray, spatial: int, want: int) -> np.ndarray:
    """The affine after :func:`medtl.data.prepare` matches a scan's dimensions to ``data.image_size``.

    A 2D image used as a one-slice volume gains a leading axis (the plane normal, the affine's
    third column); a one-slice volume used as a 2D image loses its leading axis (whose column
    becomes the third).
    """
    if spatial == want:
        return affine
    if spatial == 2 and want == 3:
        return affine[:, [2, 0, 1, 3]]
    if spatial == 3 and want == 2:
        return affine[:, [1, 2, 0, 3]]
    raise ValueError(f"cannot match a {spatial}D affine to {want}D")
