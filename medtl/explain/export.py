"""3D saliency as NIfTI in the scan's own space, to open over the scan in 3D Slicer or ITK-SNAP.

medtl reads a NIfTI volume in RAS+ orientation (``nibabel.as_closest_canonical``) as
``(D, H, W) = (z, y, x)`` and resizes it to ``data.image_size``. :func:`save_nifti` undoes
both: it resamples the map (trilinear) back to the scan's own grid, reorders it to
nibabel's ``(x, y, z)`` and writes it with the scan's canonical affine, so it overlays the
scan voxel for voxel. Without a reference scan, a diagonal affine from ``spacing`` is used
(correct voxel size, no position or orientation).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from medtl.errors import DataError, UnreadableFileError

__all__ = ["save_nifti"]


def save_nifti(
    attribution: np.ndarray,
    path: str | Path,
    *,
    reference: str | Path | None = None,
    spacing: Sequence[float] | None = None,
) -> Path:
    """Write a 3D attribution map ``(D, H, W)`` as a float32 NIfTI file.

    Args:
        attribution: the map on the model's grid, ``(D, H, W)`` (a leading size-1 axis is
            dropped).
        path: output file (``.nii`` or ``.nii.gz``); parent folders are created.
        reference: the scan the map explains (a NIfTI file): the map is resampled to its
            grid and written with its (RAS+ canonical) affine.
        spacing: ``(slice, row, col)`` voxel size in mm of the map's grid, used when there
            is no reference.

    Returns:
        The written path.

    Example:
        >>> save_nifti(maps[0].numpy(), "case7_gradcam.nii.gz", reference="case7.nii.gz")  # doctest: +SKIP
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
    if reference is not None:
        try:
            ref = nib.as_closest_canonical(nib.load(str(reference)))
        except (OSError, nib.filebasedimages.ImageFileError) as err:
            raise UnreadableFileError(reference, f"reference scan for the NIfTI export: {err}") from None
        shape_xyz = tuple(int(s) for s in ref.shape[:3])
        if len(shape_xyz) != 3:
            raise DataError(f"The reference scan must be a 3D volume; it has shape {ref.shape}.")
        grid = (shape_xyz[2], shape_xyz[1], shape_xyz[0])  # (D, H, W) = (z, y, x)
        if a.shape != grid:
            a = torch.nn.functional.interpolate(torch.from_numpy(a)[None, None], size=grid,
                                                mode="trilinear", align_corners=False)[0, 0].numpy()
        affine = ref.affine
    else:
        sp = tuple(float(s) for s in (spacing or (1.0, 1.0, 1.0)))
        if len(sp) != 3 or min(sp) <= 0:
            raise DataError(f"The 'spacing' parameter of save_nifti must be 3 positive numbers "
                            f"(slice, row, col) in mm. Got {spacing!r} instead.")
        affine = np.diag([sp[2], sp[1], sp[0], 1.0])
    img = nib.Nifti1Image(np.ascontiguousarray(a.transpose(2, 1, 0)), affine)
    img.header.set_xyzt_units("mm")
    img.header["descrip"] = b"medtl saliency"
    out.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(out))
    return out
