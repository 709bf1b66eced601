"""Attribution overlays as PNG bytes (matplotlib, Agg canvas; no pyplot global state).

Maps are shown by magnitude ``|attribution|`` (see :mod:`medtl.explain.attribution`),
normalised per map to ``[0, 1]`` with the top 0.5 % clipped so that a few extreme pixels
(common with Integrated Gradients) do not wash out the rest (for volumes: on the slice
shown). Values below 5 % of the scale
are left transparent so the scan stays readable. For a volume ``(D, H, W)`` one slice is
shown: the one holding the most attribution, named in the title.

Scans with patient geometry are drawn the way a radiologist reads them, from the axis codes
that travel with the image (``axcodes``, e.g. ``"RAS"`` of the prepared grid): axial slices
with anterior at the top and the patient's right on the viewer's left, coronal and sagittal
slices with superior at the top (:func:`medtl.data._geometry.display_view`). Images without
geometry (``axcodes=None``: PNG, MedMNIST) are drawn as stored.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from functools import partial

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from medtl.data._geometry import check_codes, cut_axis, display_view
from medtl.errors import DataError

__all__ = ["overlay_png", "panel_png", "montage_png", "display_map", "METHOD_TITLES"]

#: Panel titles for the method names of :func:`medtl.explain.attribution.explain`.
METHOD_TITLES: dict[str, str] = {
    "gradcam": "Grad-CAM", "layergradcam": "Grad-CAM",
    "ig": "Integrated Gradients", "integrated_gradients": "Integrated Gradients",
    "guided_gradcam": "Guided Grad-CAM", "gradient_shap": "GradientSHAP",
    "occlusion": "Occlusion", "smoothgrad": "SmoothGrad",
}
_PLANES = (("axial", 0), ("coronal", 1), ("sagittal", 2))
_OUTLIER_PERC = 0.5      # top percentage clipped when normalising a map for display
_HIDE_BELOW = 0.05       # normalised values below this are drawn transparent
_PANEL_INCHES = 3.0
_DPI = 100


def display_map(attribution: np.ndarray) -> np.ndarray:
    """``|attribution|`` scaled to ``[0, 1]`` (99.5th percentile, or the maximum, -> 1).

    Args:
        attribution: any shape, e.g. ``(H, W)`` or ``(D, H, W)``; signed values allowed.

    Returns:
        float32 array of the same shape in ``[0, 1]``; all zeros for an all-zero map.

    Example:
        >>> float(display_map(np.array([[0.0, -2.0], [1.0, 2.0]])).max())
        1.0
    """
    m = np.abs(np.nan_to_num(np.asarray(attribution, dtype=np.float64)))
    scale = float(np.percentile(m, 100.0 - _OUTLIER_PERC)) if m.size else 0.0
    if scale <= 0.0:
        scale = float(m.max()) if m.size else 0.0
    if scale <= 0.0:
        return np.zeros(m.shape, dtype=np.float32)
    return np.clip(m / scale, 0.0, 1.0).astype(np.float32)


def overlay_png(
    image: np.ndarray,
    attribution: np.ndarray,
    *,
    title: str = "",
    mask: np.ndarray | None = None,
    alpha: float = 0.45,
    cmap: str = "jet",
    axcodes: str | None = None,
) -> bytes:
    """One attribution map over the scan, as PNG bytes.

    Args:
        image: the windowed scan in ``[0, 1]`` as the clinician sees it, ``(H, W)`` or
            ``(D, H, W)``; a leading channel axis of size 1 is dropped.
        attribution: same spatial shape; signed maps are shown by magnitude.
        title: figure title (use the case id, never a patient identifier).
        mask: optional region of interest, same shape, drawn as a contour.
        alpha: opacity of the heat map.
        cmap: matplotlib colormap name for the heat map.
        axcodes: the letters the spatial axes run toward (``"RA"`` for a 2D axial slice in RAS,
            ``"RAS"`` for a volume), to draw the scan in radiological orientation; ``None``:
            as stored.

    Returns:
        PNG bytes.

    Example:
        >>> png = overlay_png(np.random.rand(64, 64), np.random.rand(64, 64), title="case-1")
        >>> png[:4]
        b'\\x89PNG'
    """
    return panel_png(image, {"": attribution}, title=title, mask=mask, alpha=alpha, cmap=cmap,
                     show_image=False, axcodes=axcodes)


def panel_png(
    image: np.ndarray,
    maps: Mapping[str, np.ndarray],
    *,
    title: str = "",
    mask: np.ndarray | None = None,
    alpha: float = 0.45,
    cmap: str = "jet",
    show_image: bool = True,
    axcodes: str | None = None,
) -> bytes:
    """Side-by-side panel ``image | map 1 | map 2 ...`` as PNG bytes.

    Args:
        image: ``(H, W)`` or ``(D, H, W)`` in ``[0, 1]`` (leading size-1 channel dropped).
        maps: method name -> attribution of the same spatial shape, e.g.
            ``{"gradcam": cam, "ig": ig}`` (titles "Grad-CAM", "Integrated Gradients").
        title: figure title.
        mask: optional region of interest, drawn as a contour on every map.
        alpha: heat-map opacity; cmap: heat-map colormap.
        show_image: whether to lead with the plain scan.
        axcodes: the letters the spatial axes run toward (``"RA"``, ``"RAS"``): the scan is
            drawn in radiological orientation; ``None`` (no patient geometry): as stored.

    For volumes every panel shows the same slice (axial when ``axcodes`` is known, else along
    the first axis): the one with the largest summed
    attribution, each map normalised over the whole volume before summing so that every
    method weighs equally; the shown slice is then normalised on its own for display.

    Example:
        >>> png = panel_png(img, {"gradcam": cam, "ig": ig}, title="case-7")  # doctest: +SKIP
    """
    if not maps:
        raise DataError("panel_png needs at least one attribution map; got an empty dict.")
    img = _squeeze(image, "image")
    shown = {name: _squeeze(m, f"map {name!r}") for name, m in maps.items()}
    roi = None if mask is None else _squeeze(mask, "mask") != 0
    for name, arr in [*((f"map {k!r}", v) for k, v in shown.items()), ("mask", roi)]:
        if arr is not None and arr.shape != img.shape:
            raise DataError(
                f"panel_png needs the image and every map/mask on the same grid. The image is "
                f"{img.shape} but the {name} is {arr.shape}; resample it to the image grid."
            )
    full_title, codes = title, _check_codes(axcodes, img.ndim)
    if img.ndim == 3:
        axis = 0 if codes is None else cut_axis(codes, "axial")
        rest = tuple(a for a in range(3) if a != axis)
        energy = sum(display_map(m).sum(axis=rest) for m in shown.values())
        k = int(np.argmax(energy))
        img = _cut(img, axis, k)
        shown = {name: _cut(m, axis, k) for name, m in shown.items()}
        roi = None if roi is None else _cut(roi, axis, k)
        codes = None if codes is None else codes[:axis] + codes[axis + 1:]
        note = f"{'axial ' if axcodes else ''}slice {k + 1} of {len(energy)} (most attribution)"
        full_title = f"{title} — {note}" if title else note
    img = display_view(img, codes)
    roi = None if roi is None else display_view(roi, codes)
    shown = {name: display_map(display_view(m, codes)) for name, m in shown.items()}  # scaled on the shown slice
    return _render(np.clip(np.nan_to_num(img), 0.0, 1.0), shown, roi, full_title, alpha, cmap,
                   show_image)


def montage_png(
    volume: np.ndarray,
    attribution: np.ndarray,
    *,
    title: str = "",
    mask: np.ndarray | None = None,
    n_slices: int = 5,
    alpha: float = 0.45,
    cmap: str = "jet",
    axcodes: str | None = None,
) -> bytes:
    """3D overlay: slice montages in the three planes plus a maximum-intensity projection.

    Rows are the axial, coronal and sagittal planes (with ``axcodes``: cut across the S/I,
    A/P and R/L axes and drawn in radiological orientation; without: along D, H and W as
    stored); each row
    shows ``n_slices`` evenly spaced slices through the part of the volume that holds
    attribution, then the MIP of the map along that axis over the scan's MIP. The map is
    scaled once for the whole volume (see :func:`display_map`), so colours compare across
    slices and planes.

    Args:
        volume: the windowed scan ``(D, H, W)`` in ``[0, 1]`` (a leading size-1 axis is dropped).
        attribution: same shape; signed maps are shown by magnitude.
        title: figure title (a case id, never a patient identifier).
        mask: optional region of interest ``(D, H, W)``, drawn as a contour.
        n_slices: slices per plane (>= 1).
        axcodes: the letters the three axes run toward (e.g. ``"RAS"``); ``None``: no patient
            geometry, the volume is taken as ``(D, H, W)`` = axial, coronal, sagittal cuts as stored.

    Returns:
        PNG bytes.

    Example:
        >>> png = montage_png(np.random.rand(16, 32, 32), np.random.rand(16, 32, 32), title="V-1")
        >>> png[:4]
        b'\\x89PNG'
    """
    vol = _squeeze(volume, "volume")
    att = _squeeze(attribution, "attribution")
    roi = None if mask is None else _squeeze(mask, "mask") != 0
    if vol.ndim != 3 or att.shape != vol.shape or (roi is not None and roi.shape != vol.shape):
        raise DataError(
            f"montage_png needs a (D, H, W) volume with a map (and mask) of the same shape. Got "
            f"volume {vol.shape}, map {att.shape}"
            f"{'' if roi is None else f', mask {roi.shape}'}; resample them to one grid."
        )
    if not isinstance(n_slices, int) or isinstance(n_slices, bool) or n_slices < 1:
        raise DataError(f"The 'n_slices' parameter of montage_png must be an int >= 1. Got {n_slices!r} instead.")
    codes = _check_codes(axcodes, 3)
    vol = np.clip(np.nan_to_num(vol), 0.0, 1.0)
    heat = display_map(att)
    fig = Figure(figsize=(1.9 * (n_slices + 1) + 0.8, 1.9 * 3 + 0.6), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(3, n_slices + 1, squeeze=False)
    for row, (plane, stored_axis) in enumerate(_PLANES):
        axis = stored_axis if codes is None else cut_axis(codes, plane)
        shown = partial(display_view, axcodes=None if codes is None else codes[:axis] + codes[axis + 1:])
        for col, k in enumerate(_slice_positions(heat, axis, n_slices)):
            ax = axes[row, col]
            ax.imshow(shown(_cut(vol, axis, k)), cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest",
                      aspect="auto")
            ax.imshow(np.ma.masked_less(shown(_cut(heat, axis, k)), _HIDE_BELOW), cmap=cmap, vmin=0.0,
                      vmax=1.0, alpha=alpha, interpolation="nearest", aspect="auto")
            _draw_mask(ax, None if roi is None else shown(_cut(roi, axis, k)))
            ax.set_title(f"{plane} {k + 1}/{vol.shape[axis]}", fontsize=10)
        ax = axes[row, n_slices]
        ax.imshow(shown(vol.max(axis=axis)), cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest",
                  aspect="auto")
        mip = ax.imshow(np.ma.masked_less(shown(heat.max(axis=axis)), _HIDE_BELOW), cmap=cmap, vmin=0.0,
                        vmax=1.0, alpha=alpha, interpolation="nearest", aspect="auto")
        _draw_mask(ax, None if roi is None else shown(roi.any(axis=axis)))
        ax.set_title(f"{plane} MIP", fontsize=10, fontweight="bold")
    for ax in axes.ravel():
        ax.set_axis_off()
    bar = fig.colorbar(mip, ax=axes[:, -1], fraction=0.08, pad=0.02, ticks=[0.0, 0.5, 1.0])
    bar.solids.set_alpha(1.0)
    bar.ax.tick_params(labelsize=9)
    bar.set_label("relative |attribution|", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=12)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, metadata={"Software": None})
    return buf.getvalue()


def _slice_positions(heat: np.ndarray, axis: int, n: int) -> list[int]:
    """``n`` evenly spaced slice indices along ``axis`` spanning the slices with attribution."""
    profile = heat.max(axis=tuple(a for a in range(3) if a != axis))
    inside = np.flatnonzero(profile >= _HIDE_BELOW)
    lo, hi = (int(inside[0]), int(inside[-1])) if inside.size else (0, heat.shape[axis] - 1)
    return sorted({int(round(v)) for v in np.linspace(lo, hi, n + 2)[1:-1]} or {lo})


def _cut(arr: np.ndarray, axis: int, k: int) -> np.ndarray:
    return np.take(arr, k, axis=axis)


def _check_codes(axcodes: str | None, spatial: int) -> str | None:
    return None if axcodes is None else check_codes(axcodes, spatial)


def _render(img: np.ndarray, maps: dict[str, np.ndarray], roi: np.ndarray | None, title: str,
            alpha: float, cmap: str, show_image: bool) -> bytes:
    """Draw the panels on an Agg canvas and return PNG bytes."""
    n = len(maps) + int(show_image)
    aspect = img.shape[0] / max(img.shape[1], 1)
    fig = Figure(figsize=(_PANEL_INCHES * n + 0.6 * len(maps), _PANEL_INCHES * aspect + 0.6),
                 dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, n, squeeze=False)[0]
    if show_image:
        axes[0].imshow(img, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        axes[0].set_title("image", fontsize=12)
        _draw_mask(axes[0], roi)
    for ax, (name, m) in zip(axes[int(show_image):], maps.items()):
        ax.imshow(img, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        heat = ax.imshow(np.ma.masked_less(m, _HIDE_BELOW), cmap=cmap, vmin=0.0, vmax=1.0,
                         alpha=alpha, interpolation="nearest")
        if name:
            ax.set_title(METHOD_TITLES.get(name.lower(), name), fontsize=12)
        _draw_mask(ax, roi)
        bar = fig.colorbar(heat, ax=ax, fraction=0.046, pad=0.02, ticks=[0.0, 0.5, 1.0])
        bar.solids.set_alpha(1.0)
        bar.ax.tick_params(labelsize=9)
        bar.set_label("relative |attribution|", fontsize=9)
    for ax in axes:
        ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=12)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, metadata={"Software": None})
    return buf.getvalue()


def _draw_mask(ax: object, roi: np.ndarray | None) -> None:
    """Contour of the region of interest (nothing for an absent or empty mask slice)."""
    if roi is not None and roi.any() and not roi.all():
        ax.contour(roi.astype(np.float32), levels=[0.5], colors=["lime"], linewidths=1.2)


def _squeeze(arr: np.ndarray, what: str) -> np.ndarray:
    """As float ``(H, W)`` or ``(D, H, W)``: drop leading size-1 axes (batch, channel)."""
    a = np.asarray(arr.detach().cpu().numpy() if hasattr(arr, "detach") else arr)
    while a.ndim > 2 and a.shape[0] == 1:
        a = a[0]
    if a.ndim not in (2, 3) or min(a.shape, default=0) == 0:
        raise DataError(
            f"The {what} must be a non-empty (H, W) image or (D, H, W) volume (a leading "
            f"channel axis of size 1 is allowed). Got shape {np.shape(arr)} instead."
        )
    return a.astype(np.float32, copy=False)
