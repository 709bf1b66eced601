"""MONAI transform presets: intensity (CT windows, percentiles), geometry, augmentation.

Deterministic preprocessing (:func:`preprocess_transform`) runs once per file per run;
random augmentation (:func:`augment_transform`) runs per epoch on the cached arrays.
Array shapes are channel-first: ``(C, H, W)`` or ``(C, D, H, W)``.
"""

from __future__ import annotations

import numpy as np
from monai.transforms import (
    Compose,
    Lambda,
    RandAdjustContrast,
    RandAffine,
    RandFlip,
    RandGaussianNoise,
    RandScaleIntensity,
    RandShiftIntensity,
    Resize,
    ResizeWithPadOrCrop,
    ScaleIntensity,
    ScaleIntensityRange,
    ScaleIntensityRangePercentiles,
    Zoom,
)

from medtl.config import CT_WINDOWS, AugmentConfig, IntensityConfig
from medtl.errors import ConfigError

__all__ = ["CT_WINDOWS", "MultiWindow", "window_bounds", "window_list", "intensity_transform", "preprocess_transform",
           "augment_transform"]

# CT_WINDOWS ((center, width) in HU per preset) is defined once, beside the config's preset names.


def window_bounds(cfg: IntensityConfig) -> tuple[float, float]:
    """``(low, high)`` HU bounds of the configured CT window."""
    if cfg.preset is not None:
        center, width = CT_WINDOWS[cfg.preset]
    elif cfg.center is not None and cfg.width is not None:
        center, width = cfg.center, cfg.width
    else:
        raise ConfigError("data.intensity.mode=window needs a preset (lung, mediastinum, bone, brain, "
                          "abdomen) or both center and width. Got neither.")
    if width <= 0:
        raise ConfigError(f"The CT window width must be > 0. Got {width} instead.")
    return center - width / 2, center + width / 2


def window_list(cfg: IntensityConfig) -> list[tuple[float, float]]:
    """``[(low, high), ...]`` HU bounds of the ``multiwindow`` windows, one per output channel.

    Example:
        >>> window_list(IntensityConfig(mode="multiwindow", windows=["lung", {"center": 40, "width": 400}]))
        [(-1350.0, 150.0), (-160.0, 240.0)]
    """
    if not cfg.windows:
        raise ConfigError("data.intensity.mode=multiwindow needs at least one window in data.intensity.windows "
                          "(presets lung, mediastinum, bone, brain, abdomen or {center, width}). Got an empty list.")
    bounds = []
    for w in cfg.windows:
        center, width = CT_WINDOWS[w] if isinstance(w, str) else (w.center, w.width)
        bounds.append((center - width / 2, center + width / 2))
    return bounds


class MultiWindow:
    """Several CT windows of one grey image, one window per channel: ``(1, *S)`` -> ``(K, *S)`` in [0, 1].

    With three windows (e.g. lung, mediastinum, bone) a CT slice becomes a 3-channel image
    that meets RGB weights channel for channel instead of a repeated grey channel.

    Args:
        windows: ``[(low, high), ...]`` HU bounds (see :func:`window_list`).

    Example:
        >>> MultiWindow([(-1000, 0), (0, 1000)])(np.array([[[-500.0, 500.0]]])).tolist()
        [[[0.5, 1.0]], [[0.0, 0.5]]]
    """

    def __init__(self, windows: list[tuple[float, float]]) -> None:
        self.windows = [(float(lo), float(hi)) for lo, hi in windows]

    def __call__(self, x) -> np.ndarray:
        x = np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x, dtype=np.float32)
        if x.shape[0] != 1:
            raise ValueError(f"MultiWindow needs one grey channel (1, *S); got shape {x.shape}")
        return np.concatenate([np.clip((x - lo) / (hi - lo), 0.0, 1.0) for lo, hi in self.windows]).astype(np.float32)


def intensity_transform(cfg: IntensityConfig):
    """Raw values -> [0, 1] (clipped) as configured: ``(1, *S)`` -> ``(1, *S)``, or ``(K, *S)``
    for ``multiwindow`` with ``K`` windows."""
    if cfg.mode == "multiwindow":
        return MultiWindow(window_list(cfg))
    if cfg.mode == "window":
        lo, hi = window_bounds(cfg)
        return ScaleIntensityRange(a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True)
    if cfg.mode == "percentile":
        return ScaleIntensityRangePercentiles(lower=cfg.lower, upper=cfg.upper, b_min=0.0, b_max=1.0, clip=True)
    if cfg.mode == "range":
        return ScaleIntensityRange(a_min=cfg.vmin, a_max=cfg.vmax, b_min=0.0, b_max=1.0, clip=True)
    return ScaleIntensity(minv=0.0, maxv=1.0)


def _to_grey(x):
    x = np.asarray(x, dtype=np.float32)
    if x.shape[0] == 3:  # ITU-R BT.601 luma
        x = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2])[None]
    return x


def preprocess_transform(intensity: IntensityConfig, image_size: list[int] | tuple[int, ...], *,
                         spacing: list[float] | None = None):
    """Deterministic pipeline applied once per file: grey -> [0, 1] -> geometry.

    Geometry: without ``spacing`` the image is resized to ``image_size`` (aspect ratio not
    kept, the usual choice for pretrained 2D encoders). With ``spacing`` (mm per axis) it is
    first resampled to that pixel size, keeping physical proportions, then centre-cropped or
    zero-padded to ``image_size`` (MONAI ``Zoom`` + ``ResizeWithPadOrCrop``).

    Returns ``run(x, spacing_in=None)``: input ``(C, *S)`` raw values, output float32 NumPy
    ``(K, *image_size)`` in [0, 1]; ``K`` is 1, or the number of windows for ``multiwindow``.
    ``image_size`` of length 3 (``D, H, W``) gives volumes, resized trilinearly.

    Example:
        >>> run = preprocess_transform(IntensityConfig(mode="range"), [16, 32, 32])
        >>> run(np.zeros((1, 28, 28, 28), np.float32)).shape
        (1, 16, 32, 32)
    """
    mode = "bilinear" if len(image_size) == 2 else "trilinear"
    head = Compose([Lambda(_to_grey), intensity_transform(intensity)])
    resize = Resize(spatial_size=tuple(image_size), mode=mode, anti_aliasing=True)
    fit = ResizeWithPadOrCrop(spatial_size=tuple(image_size))

    def run(x: np.ndarray, spacing_in: tuple[float, ...] | None = None) -> np.ndarray:
        out = head(x)
        if spacing is None:
            out = resize(out)
        else:
            if spacing_in is None:
                raise ValueError("resampling to data.spacing needs the image's own spacing")
            zoom = [float(a) / float(b) for a, b in zip(spacing_in, spacing)]
            out = fit(Zoom(zoom=zoom, mode=mode, keep_size=False)(out))
        return np.asarray(out.detach().cpu().numpy() if hasattr(out, "detach") else out, dtype=np.float32)

    return run


def augment_transform(cfg: AugmentConfig, image_size: list[int] | tuple[int, ...]) -> Compose:
    """Random flips, affine and intensity changes for training, on ``(C, *S)`` in [0, 1].

    ``image_size`` of length 3 gives the 3D versions: left-right flip on W (``vertical_flip``
    on H), rotations up to ``rotate_deg`` about each of the three axes, scaling and
    translation on D, H and W.

    Parameters are sampled from the Compose's random state, so ``set_random_state(seed)``
    replays the same augmentations.
    """
    spatial_dims = len(image_size)
    ts = []
    if cfg.flip:
        ts.append(RandFlip(prob=0.5, spatial_axis=spatial_dims - 1))  # left-right
    if cfg.vertical_flip:
        ts.append(RandFlip(prob=0.5, spatial_axis=spatial_dims - 2))
    if cfg.affine:
        rot = float(np.deg2rad(cfg.rotate_deg))
        ts.append(RandAffine(
            prob=0.8,
            rotate_range=(rot,) if spatial_dims == 2 else (rot, rot, rot),
            scale_range=(cfg.scale,) * spatial_dims,
            translate_range=tuple(cfg.translate * s for s in image_size),  # fraction -> pixels
            padding_mode="zeros",
        ))
    if cfg.intensity:
        ts += [
            RandScaleIntensity(factors=0.1, prob=0.5),
            RandShiftIntensity(offsets=0.05, prob=0.5),
            RandAdjustContrast(gamma=(0.8, 1.25), prob=0.3),
            RandGaussianNoise(std=0.01, prob=0.2),
        ]
    return Compose(ts)
