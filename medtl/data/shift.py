"""Scanner shifts: simulate a new hospital's device on images in [0, 1] (MedMNIST-C style).

Di Salvo et al.'s MedMNIST-C corrupts each modality with the artefacts its devices produce;
for ultrasound and radiographs those are gain, contrast/gamma (the device's grey-level
mapping), speckle (multiplicative noise), Gaussian noise, blur (a wider point spread) and a
coarser resolution. CT images that a site exports already windowed differ by their display
window: ``window_low``/``window_high`` re-window an image, stretching that part of [0, 1] to [0, 1]. :class:`ScannerShift` holds one device's parameters and applies them in a
fixed order; every random part (the noise) is drawn from ``seed`` and the image index, so a
shift is replayable: the same images, parameters and seed give the same output.

Order: window -> resolution -> blur -> gain -> gamma -> contrast -> speckle -> noise -> clip to [0, 1].

Example:
    >>> x = np.random.default_rng(0).random((4, 1, 64, 64)).astype(np.float32)
    >>> shift = ScannerShift(gain=1.3, gamma=0.7, speckle=0.25, blur_sigma=1.0)
    >>> y = shift(x, seed=3); y.shape, y.dtype, bool(np.array_equal(y, shift(x, seed=3)))
    ((4, 1, 64, 64), dtype('float32'), True)
"""

from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass

import numpy as np
# SciPy (a scikit-learn dependency) for blur and zoom: plain array filters, no torch round trip.
from scipy import ndimage

from medtl.errors import ConfigError, DataError, did_you_mean

__all__ = ["ScannerShift", "SCANNER_PRESETS", "scanner_shift", "apply_shift"]


@dataclass(frozen=True)
class ScannerShift:
    """One scanner's departure from the training site's images.

    Attributes:
        gain: multiplicative brightness (1 = none; > 1 brighter).
        gamma: grey-level curve ``x ** gamma`` (1 = none; < 1 lifts dark tissue).
        contrast: scale around the image mean (1 = none; < 1 flatter).
        speckle: standard deviation of multiplicative Gaussian noise ``x * (1 + s * n)``.
        noise: standard deviation of additive Gaussian noise.
        blur_sigma: Gaussian blur sigma in pixels (0 = none).
        resolution: fraction of the pixels kept before upsampling back (1 = none).
        window_low, window_high: the part of [0, 1] stretched to [0, 1], values outside clipped
            (0 and 1 = none): a narrower display window on images that were windowed already.
    """

    gain: float = 1.0
    gamma: float = 1.0
    contrast: float = 1.0
    speckle: float = 0.0
    noise: float = 0.0
    blur_sigma: float = 0.0
    resolution: float = 1.0
    window_low: float = 0.0
    window_high: float = 1.0

    def __post_init__(self) -> None:
        for name, lo, hi, lo_open in (("gain", 0.0, None, True), ("gamma", 0.0, None, True),
                                      ("contrast", 0.0, None, True), ("speckle", 0.0, None, False),
                                      ("noise", 0.0, None, False), ("blur_sigma", 0.0, None, False),
                                      ("resolution", 0.0, 1.0, True), ("window_low", 0.0, 1.0, False),
                                      ("window_high", 0.0, 1.0, True)):
            v = getattr(self, name)
            bad = not isinstance(v, numbers.Real) or isinstance(v, bool) or not np.isfinite(v)
            bad = bad or (v <= lo if lo_open else v < lo) or (hi is not None and v > hi)
            if bad:
                rng = f"{'>' if lo_open else '>='} {lo}" + (f" and <= {hi}" if hi is not None else "")
                raise ConfigError(f"The '{name}' parameter of ScannerShift must be a float {rng}. Got {v!r} instead.")
        if self.window_low >= self.window_high:
            raise ConfigError(f"ScannerShift needs window_low < window_high. Got window_low={self.window_low!r} and "
                              f"window_high={self.window_high!r}; (0, 1) leaves the window as it is.")

    def apply_one(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Shift one image ``(C, H, W)`` or ``(H, W)`` in [0, 1]; noise from ``rng``."""
        x = image.astype(np.float32, copy=True)
        spatial = (0,) * (x.ndim - 2) + (1, 1)  # filter the last two axes only
        if (self.window_low, self.window_high) != (0.0, 1.0):
            x = np.clip((x - self.window_low) / (self.window_high - self.window_low), 0.0, 1.0)
        if self.resolution < 1.0:
            small = ndimage.zoom(x, [1] * (x.ndim - 2) + [self.resolution] * 2, order=1)
            x = ndimage.zoom(small, [a / b for a, b in zip(x.shape, small.shape)], order=1)[..., :image.shape[-2],
                                                                                        :image.shape[-1]]
        if self.blur_sigma > 0:
            x = ndimage.gaussian_filter(x, sigma=[s * self.blur_sigma for s in spatial], mode="nearest")
        x = np.clip(x * self.gain, 0.0, 1.0)
        if self.gamma != 1.0:
            x = x ** self.gamma
        if self.contrast != 1.0:
            m = x.mean()
            x = (x - m) * self.contrast + m
        if self.speckle > 0:
            x = x * (1.0 + self.speckle * rng.standard_normal(x.shape, dtype=np.float32))
        if self.noise > 0:
            x = x + self.noise * rng.standard_normal(x.shape, dtype=np.float32)
        return np.clip(x, 0.0, 1.0).astype(np.float32)

    def __call__(self, images: np.ndarray, *, seed: int = 0) -> np.ndarray:
        """Shift a stack ``(N, C, H, W)`` (or ``(N, H, W)``) in [0, 1]; returns float32, same shape.

        Image ``i``'s noise comes from ``numpy.random.default_rng([seed, i])``, so an image's
        result does not depend on which other images are in the stack.
        """
        return apply_shift(images, self, seed=seed)

    def to_dict(self) -> dict:
        return asdict(self)


#: Named devices. ``ultrasound_b``: a brighter, lower-contrast, speckled, blurrier probe;
#: ``ultrasound_mild``: the same kind of shift at roughly half the strength; ``xray_b``: a darker,
#: lower-contrast, noisier, blurred radiograph at half the resolution; ``ct_soft_tissue``: CT
#: exported in a soft-tissue (mediastinal) window instead of the lung window, on images windowed
#: with the lung preset (W 1500, L -600 HU): it keeps -160..150 HU, so the aerated lung turns black
#: and a solid nodule mid-grey, darker than the vessels, where the lung window shows it bright.
SCANNER_PRESETS: dict[str, ScannerShift] = {
    "ultrasound_b": ScannerShift(gain=1.4, gamma=0.6, speckle=0.35, blur_sigma=1.2),
    "ultrasound_mild": ScannerShift(gain=1.2, gamma=0.8, speckle=0.15, blur_sigma=0.6),
    "xray_b": ScannerShift(gain=0.8, gamma=1.4, contrast=0.8, noise=0.04, blur_sigma=0.8, resolution=0.5),
    "ct_soft_tissue": ScannerShift(window_low=(-160 + 1350) / 1500, window_high=(150 + 1350) / 1500),
}


def scanner_shift(name: str, **overrides: float) -> ScannerShift:
    """A preset from :data:`SCANNER_PRESETS`, optionally with some parameters replaced.

    Example:
        >>> scanner_shift("ultrasound_b", speckle=0.1).speckle
        0.1
    """
    if name not in SCANNER_PRESETS:
        raise ConfigError(f"Unknown scanner shift preset '{name}'.{did_you_mean(name, list(SCANNER_PRESETS))} "
                          f"Valid presets: {', '.join(SCANNER_PRESETS)}; or build a ScannerShift(...) directly.")
    return ScannerShift(**{**asdict(SCANNER_PRESETS[name]), **overrides})


def apply_shift(images: np.ndarray, shift: ScannerShift, *, seed: int = 0) -> np.ndarray:
    """Apply ``shift`` to ``images`` ``(N, C, H, W)`` or ``(N, H, W)`` with values in [0, 1].

    Deterministic given ``seed``: image ``i`` uses ``numpy.random.default_rng([seed, i])``.

    Example:
        >>> round(float(apply_shift(np.full((2, 1, 8, 8), 0.5, np.float32), ScannerShift(gain=1.2)).max()), 3)
        0.6
    """
    x = np.asarray(images)
    if x.ndim not in (3, 4):
        raise DataError(f"apply_shift expects images (N, C, H, W) or (N, H, W). Got shape {x.shape}.")
    if x.size and (np.nanmin(x) < -1e-6 or np.nanmax(x) > 1 + 1e-6):
        raise DataError(f"apply_shift expects values in [0, 1]; got [{np.nanmin(x):.3g}, {np.nanmax(x):.3g}]. "
                        "Scale the images first (e.g. divide uint8 images by 255).")
    if not isinstance(seed, numbers.Integral) or seed < 0:
        raise ConfigError(f"The 'seed' parameter of apply_shift must be an int >= 0. Got {seed!r} instead.")
    return np.stack([shift.apply_one(img, np.random.default_rng([int(seed), i])) for i, img in enumerate(x)]) \
        if len(x) else x.astype(np.float32)
