"""Batched augmentation in torch, on whatever device the batch lives on (GPU or CPU).

The MONAI presets in :mod:`medtl.data.transforms` transform one image at a time on the host,
which on a GPU means DataLoader workers feeding the device and, on a 2-core laptop, Python
overhead per image. :class:`BatchAugment` draws the same families of random transforms
(:class:`~medtl.config.AugmentConfig`: flips, rotation/scale/translation, intensity scale,
shift, gamma and Gaussian noise, with MONAI's probabilities and ranges) for a whole batch
``(B, C, H, W)`` or ``(B, C, D, H, W)`` at once: one ``affine_grid`` + ``grid_sample`` for
the geometry and a few broadcast ops for intensity.

Why not MONAI or kornia: MONAI's ``RandAffine`` samples one parameter set per call (per image),
and kornia's 3D augmentations would add a dependency for four small functions; the geometry
here is ``torch.nn.functional.affine_grid``/``grid_sample``, the same kernels MONAI's
``Resample`` uses with its torch backend.

Random parameters come from a CPU ``torch.Generator`` seeded by the config (a few numbers
per image; the same on every device), the noise field from a generator on the batch's device,
so a run is reproducible on the same device and the host never waits for the device.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from medtl.config import AugmentConfig

__all__ = ["BatchAugment"]

# probabilities and ranges of medtl.data.transforms.augment_transform (the MONAI per-image preset)
P_FLIP, P_AFFINE = 0.5, 0.8
P_SCALE, SCALE = 0.5, 0.1
P_SHIFT, SHIFT = 0.5, 0.05
P_GAMMA, GAMMA = 0.3, (0.8, 1.25)
P_NOISE, NOISE_STD = 0.2, 0.01


class BatchAugment:
    """Random flips, affine and intensity changes for a batch of images in [0, 1].

    Args:
        cfg: the ``train.augment`` section.
        spatial_dims: 2 for ``(B, C, H, W)``, 3 for ``(B, C, D, H, W)``.
        seed: seeds the parameter stream (and the device noise stream).

    Each image draws its own parameters: a left-right flip (``vertical_flip``: up-down too)
    with p 0.5; with p 0.8 an affine map with rotation up to ``rotate_deg`` about each axis
    (one axis in 2D), independent per-axis scale in ``1 ± scale`` and a shift of up to
    ``translate`` x the image size, resampled bilinearly with zero padding; with
    ``intensity`` a scale ``1 ± 0.1`` (p 0.5), a shift ``± 0.05`` (p 0.5), a gamma in
    [0.8, 1.25] on the image's own range (p 0.3) and Gaussian noise with std up to 0.01 (p 0.2).

    Example:
        >>> aug = BatchAugment(AugmentConfig(), spatial_dims=2, seed=0)
        >>> aug(torch.rand(8, 1, 64, 64)).shape
        torch.Size([8, 1, 64, 64])
    """

    def __init__(self, cfg: AugmentConfig, spatial_dims: int, seed: int = 0) -> None:
        if spatial_dims not in (2, 3):
            raise ValueError(f"The 'spatial_dims' parameter of BatchAugment must be 2 or 3. Got {spatial_dims!r} "
                             "instead.")
        self.cfg = cfg
        self.spatial_dims = spatial_dims
        self.seed = seed
        self._gen = torch.Generator().manual_seed(seed)
        self._noise_gens: dict[torch.device, torch.Generator] = {}

    def _u(self, n: int, lo: float, hi: float, k: int = 1) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, k, generator=self._gen)

    def _p(self, n: int, p: float) -> torch.Tensor:
        return torch.rand(n, generator=self._gen) < p

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Augment ``x`` ``(B, C, *S)`` (float, any device); returns a new tensor of the same shape."""
        if x.ndim != self.spatial_dims + 2:
            raise ValueError(f"BatchAugment(spatial_dims={self.spatial_dims}) needs (B, C, *S) batches with "
                             f"{self.spatial_dims} spatial axes. Got shape {tuple(x.shape)} instead.")
        n, dev = x.shape[0], x.device
        cfg = self.cfg
        if cfg.flip:
            x = _flip_where(x, self._p(n, P_FLIP), -1)
        if cfg.vertical_flip:
            x = _flip_where(x, self._p(n, P_FLIP), -2)
        if cfg.affine:
            use = self._p(n, P_AFFINE)
            theta = self._affine_theta(n, tuple(x.shape[2:]))
            theta[~use] = torch.eye(self.spatial_dims, self.spatial_dims + 1)
            if bool(use.any()):  # decided on the host: no device sync
                grid = F.affine_grid(theta.to(dev, x.dtype, non_blocking=True), list(x.shape), align_corners=False)
                warped = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
                keep = use.to(dev, non_blocking=True).view(-1, *([1] * (x.ndim - 1)))
                x = torch.where(keep, warped, x)  # untouched images stay bit-exact
        if cfg.intensity:
            x = self._intensity(x, n, dev)
        return x

    def _affine_theta(self, n: int, size: tuple[int, ...]) -> torch.Tensor:
        """``(n, d, d+1)`` affine_grid matrices (output -> input, normalised coordinates)."""
        d, cfg = self.spatial_dims, self.cfg
        rot = math.radians(cfg.rotate_deg)
        angles = self._u(n, -rot, rot, 1 if d == 2 else 3)
        scales = 1.0 + self._u(n, -cfg.scale, cfg.scale, d)
        # pixels, in affine_grid's (x, y[, z]) = (W, H[, D]) order
        extent = torch.tensor(size[::-1], dtype=torch.float32)
        shift_px = self._u(n, -1.0, 1.0, d) * (cfg.translate * extent)
        r = _rotation(angles, d)  # (n, d, d) in pixel space, about the centre
        a_px = r @ torch.diag_embed(scales)
        # normalised coords u = 2 p / size (centred): A_norm = N A_px N^-1, t_norm = 2 t_px / size
        norm = 2.0 / extent
        a = a_px * norm.view(1, d, 1) / norm.view(1, 1, d)
        t = shift_px * norm
        return torch.cat([a, t.unsqueeze(-1)], dim=-1)

    def _intensity(self, x: torch.Tensor, n: int, dev: torch.device) -> torch.Tensor:
        shape = (n, *([1] * (x.ndim - 1)))

        def per_image(values: torch.Tensor, active: torch.Tensor, neutral: float) -> torch.Tensor:
            v = torch.where(active, values.view(-1), torch.full((n,), neutral))
            return v.to(dev, x.dtype, non_blocking=True).view(shape)

        x = x * per_image(1.0 + self._u(n, -SCALE, SCALE), self._p(n, P_SCALE), 1.0)
        x = x + per_image(self._u(n, -SHIFT, SHIFT), self._p(n, P_SHIFT), 0.0)
        gamma_on = self._p(n, P_GAMMA)
        gamma = per_image(self._u(n, *GAMMA), gamma_on, 1.0)
        if bool(gamma_on.any()):
            dims = tuple(range(1, x.ndim))
            lo, hi = x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True)
            rng = hi - lo
            adj = ((x - lo) / (rng + 1e-7)).clamp_min(0).pow(gamma) * rng + lo
            x = torch.where(gamma != 1.0, adj, x)
        noise_on = self._p(n, P_NOISE)
        if bool(noise_on.any()):
            std = per_image(self._u(n, 0.0, NOISE_STD), noise_on, 0.0)
            x = x + std * torch.randn(x.shape, generator=self._noise_gen(dev), device=dev, dtype=x.dtype)
        return x

    def _noise_gen(self, dev: torch.device) -> torch.Generator:
        if dev not in self._noise_gens:
            self._noise_gens[dev] = torch.Generator(device=dev).manual_seed(self.seed + 1)
        return self._noise_gens[dev]


def _flip_where(x: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    if not bool(mask.any()):
        return x
    m = mask.to(x.device, non_blocking=True).view(-1, *([1] * (x.ndim - 1)))
    return torch.where(m, x.flip(dim), x)


def _rotation(angles: torch.Tensor, d: int) -> torch.Tensor:
    """Rotation matrices ``(n, d, d)`` from ``(n, 1)`` (2D) or ``(n, 3)`` angles about x, y, z (3D)."""
    c, s = torch.cos(angles), torch.sin(angles)
    if d == 2:
        return torch.stack([torch.cat([c, -s], 1), torch.cat([s, c], 1)], dim=1)
    n = len(angles)
    one, zero = torch.ones(n), torch.zeros(n)
    cx, cy, cz, sx, sy, sz = c[:, 0], c[:, 1], c[:, 2], s[:, 0], s[:, 1], s[:, 2]
    rx = torch.stack([one, zero, zero, zero, cx, -sx, zero, sx, cx], 1).view(n, 3, 3)
    ry = torch.stack([cy, zero, sy, zero, one, zero, -sy, zero, cy], 1).view(n, 3, 3)
    rz = torch.stack([cz, -sz, zero, sz, cz, zero, zero, zero, one], 1).view(n, 3, 3)
    return rz @ ry @ rx
