"""3D saliency as NIfTI in the scan's own space, to open over the scan in 3D Slicer or ITK-SNAP.

A map is computed on the model's grid (``data.image_size``). The scan's geometry travelled
with the image from the reader through :func:`medtl.data.prepare.prepare`
(:class:`~medtl.data._grid.Geometry`: the scan's affine and shape, and where the model's grid
lies in it), so :func:`save_nifti` resamples the map (linearly) back to the scan's grid and
writes it with the scan's affine: reloaded with nibabel, the map has the scan's affine and
shape, and its hot spot is on the same voxels as the structure it points at. Nothing is
re-read from the scan's file. Without geometry (e.g. MedMNIST arrays), the map keeps its own
grid with a diagonal affine from ``spacing`` (correct voxel size, no position or orientation).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medtl.data._grid import Geometry
from medtl.errors import DataError

__all__ = ["save_nifti"]


def save_nifti(
    attribution: np.ndarray,
    path: str | Path,
    *,
    geometry: Geometry | None = None,
    spacing: Sequence[float] | None = None,
) -> Path:
    """Write a 3D attribution map ``(D, H, W)`` as a float32 NIfTI file.

    Args:
        attribution: the map on the model's grid, ``(D, H, W)`` in the array order of the
            prepared image (a leading size-1 axis is dropped).
        path: output file (``.nii`` or ``.nii.gz``); parent folders are created.
        geometry: the prepared case's geometry (``PreparedData.geometry[i]``): the map is
            resampled to the scan's grid and written with the scan's affine.
        spacing: voxel size in mm per array axis of the map's grid, used when there is no
            geometry (default 1 mm).

    Returns:
        The written path.

    Example:
        >>> save_nifti(maps[0].numpy(), "case7_gradcam.nii.gz", geometry=data.geometry[7])  # doctest: +SKIP
        PosixPath('case7_gradcam.nii.gz')
    """
    import nibabel as nib

    a = np.asarray(attribution, dtype=np.float32)
    while a.ndim > 3 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 3:
        raise DataError(f"save_nifti needs a 3D map (D, H, W). Got shape {np.shape(attribution)} instead; "
                        "2D maps are shown as PNG overlays in the report.")
    out = Path(path)
    if not out.name.endswith((".nii", ".nii.gz")):
        raise DataError(f"save_nifti writes .nii or .nii.gz files. Got '{out.name}' instead.")
    if geometry is not None:
        if len(geometry.shape) != 3:
            raise DataError(f"The scan of this map is {len(geometry.shape)}D (shape {geometry.shape}); a 3D map "
                            "needs a 3D scan. Prepare the case with spatial_dims: 3.")
        a = geometry.to_scan(a)
        affine = np.asarray(geometry.affine, dtype=np.float64)
    else:
        sp = tuple(float(s) for s in (spacing or (1.0, 1.0, 1.0)))
        if len(sp) != 3 or min(sp) <= 0:
            raise DataError(f"The 'spacing' parameter of save_nifti must be 3 positive numbers in mm, one per "
                            f"array axis. Got {spacing!r} instead.")
        affine = np.diag([*sp, 1.0])
    img = nib.Nifti1Image(np.ascontiguousarray(a), affine)
    img.header.set_xyzt_units("mm")
    img.header["descrip"] = b"medtl saliency"
    out.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(out))
    return out
