"""Batched torch augmentation: correct geometry, MONAI's probabilities, reproducible, any spatial rank."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medtl.config import AugmentConfig
from medtl.data.batch_augment import BatchAugment, _rotation

OFF = dict(flip=False, vertical_flip=False, affine=False, intensity=False)


def _theta(aug: BatchAugment, angles, scales, shift_px, size):
    """The matrices BatchAugment builds, with fixed parameters instead of random ones."""
    extent = torch.tensor(size[::-1], dtype=torch.float32)  # (W, H[, D])
    gen_values = iter([torch.tensor(angles, dtype=torch.float32),
                       torch.tensor(scales, dtype=torch.float32) - 1.0,  # drawn as 1 + u
                       torch.tensor(shift_px, dtype=torch.float32) / extent])  # drawn as u * translate * size
    aug._u = lambda n, lo, hi, k=1: next(gen_values)  # noqa: ARG005 - fixed draws
    cfg = aug.cfg
    aug.cfg = cfg.model_copy(update={"scale": 1.0, "translate": 1.0})
    theta = aug._affine_theta(1, size)
    aug.cfg = cfg
    return theta


def _warp(x, theta):
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def test_shapes_dtype_and_range_of_a_batch_2d_and_3d():
    for shape in [(16, 1, 32, 24), (4, 3, 40, 40), (6, 1, 12, 16, 20)]:
        aug = BatchAugment(AugmentConfig(vertical_flip=True), spatial_dims=len(shape) - 2, seed=0)
        x = torch.rand(shape)
        out = aug(x)
        assert out.shape == x.shape and out.dtype == torch.float32
        assert torch.isfinite(out).all()
        assert not torch.equal(out, x)


def test_same_seed_same_batch_different_seed_different_batch():
    x = torch.rand(8, 1, 32, 32)
    a = BatchAugment(AugmentConfig(), 2, seed=3)(x)
    b = BatchAugment(AugmentConfig(), 2, seed=3)(x)
    c = BatchAugment(AugmentConfig(), 2, seed=4)(x)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_everything_off_is_the_identity():
    x = torch.rand(5, 1, 16, 16)
    assert torch.equal(BatchAugment(AugmentConfig(**OFF), 2)(x), x)


def test_flip_flips_about_half_of_the_images_left_right():
    x = torch.arange(16.0).view(1, 1, 4, 4).repeat(2000, 1, 1, 1)
    out = BatchAugment(AugmentConfig(**{**OFF, "flip": True}), 2, seed=0)(x)
    flipped = (out == x.flip(-1)).flatten(1).all(1)
    same = (out == x).flatten(1).all(1)
    assert bool((flipped | same).all())  # every image is either untouched or exactly mirrored
    assert 0.45 < flipped.float().mean().item() < 0.55  # MONAI's p = 0.5


def test_affine_is_applied_to_about_80_percent_and_leaves_the_rest_bit_exact():
    x = torch.rand(1000, 1, 8, 8)
    out = BatchAugment(AugmentConfig(**{**OFF, "affine": True}), 2, seed=1)(x)
    untouched = (out == x).flatten(1).all(1).float().mean().item()
    assert 0.15 < untouched < 0.25  # MONAI's RandAffine prob 0.8


def test_a_90_degree_rotation_is_rot90_on_a_square_image():
    x = torch.rand(1, 1, 9, 9)
    aug = BatchAugment(AugmentConfig(), 2)
    out = _warp(x, _theta(aug, [[math.pi / 2]], [[1.0, 1.0]], [[0.0, 0.0]], (9, 9)))
    candidates = [torch.rot90(x, k, dims=(-2, -1)) for k in (1, -1)]
    assert min((out - c).abs().max().item() for c in candidates) < 1e-5


def test_a_rotation_on_a_non_square_image_keeps_distances_in_pixels():
    """The normalised-coordinate conversion must not shear: a centred disc stays a disc."""
    h, w = 33, 65
    yy, xx = torch.meshgrid(torch.arange(h) - h // 2, torch.arange(w) - w // 2, indexing="ij")
    disc = ((yy ** 2 + xx ** 2) <= 10 ** 2).float().view(1, 1, h, w)
    aug = BatchAugment(AugmentConfig(), 2)
    out = _warp(disc, _theta(aug, [[0.7]], [[1.0, 1.0]], [[0.0, 0.0]], (h, w)))
    assert (out - disc).abs().sum().item() / disc.sum().item() < 0.1


def test_translation_in_pixels_is_a_shift_along_width_and_height():
    x = torch.rand(1, 1, 20, 30)
    aug = BatchAugment(AugmentConfig(), 2)
    out = _warp(x, _theta(aug, [[0.0]], [[1.0, 1.0]], [[4.0, -3.0]], (20, 30)))  # (x, y) = (W, H) pixels
    shifted = [torch.roll(x, shifts=(sy * 3, sx * 4), dims=(-2, -1)) for sx in (1, -1) for sy in (1, -1)]
    interior = (slice(None), slice(None), slice(4, -4), slice(5, -5))
    assert min((out - s)[interior].abs().max().item() for s in shifted) < 1e-5


def test_scale_zooms_about_the_centre():
    h = w = 41
    yy, xx = torch.meshgrid(torch.arange(h) - 20, torch.arange(w) - 20, indexing="ij")
    square = ((yy.abs() <= 8) & (xx.abs() <= 8)).float().view(1, 1, h, w)
    aug = BatchAugment(AugmentConfig(), 2)
    out = _warp(square, _theta(aug, [[0.0]], [[0.5, 0.5]], [[0.0, 0.0]], (h, w)))
    ratio = out.sum().item() / square.sum().item()
    assert ratio == pytest.approx(4.0, rel=0.1) or ratio == pytest.approx(0.25, rel=0.1)
    assert out[0, 0, 20, 20] == pytest.approx(1.0)  # centre stays put


@pytest.mark.parametrize("axis,plane", [(0, (-3, -2)), (1, (-3, -1)), (2, (-2, -1))])
def test_3d_quarter_turns_about_each_axis_are_rot90_in_the_matching_plane(axis, plane):
    x = torch.rand(1, 1, 7, 7, 7)
    angles = [0.0, 0.0, 0.0]
    angles[axis] = math.pi / 2  # angles about x (W), y (H), z (D): planes (D, H), (D, W), (H, W)
    aug = BatchAugment(AugmentConfig(), 3)
    out = _warp(x, _theta(aug, [angles], [[1.0, 1.0, 1.0]], [[0.0, 0.0, 0.0]], (7, 7, 7)))
    assert min((out - torch.rot90(x, k, dims=plane)).abs().max().item() for k in (1, -1)) < 1e-5


def test_rotation_matrices_are_orthonormal():
    r = _rotation(torch.rand(10, 3), 3)
    assert torch.allclose(r @ r.transpose(1, 2), torch.eye(3).expand(10, 3, 3), atol=1e-6)
    assert torch.allclose(torch.linalg.det(r), torch.ones(10), atol=1e-6)


def test_intensity_changes_stay_within_monai_ranges():
    x = torch.full((4000, 1, 4, 4), 0.5)
    out = BatchAugment(AugmentConfig(**{**OFF, "intensity": True}), 2, seed=0)(x)
    means = out.flatten(1).mean(1)
    # scale 1 ± 0.1 then shift ± 0.05 (gamma is a no-op on a constant image; noise std <= 0.01)
    assert means.min().item() > 0.5 * 0.9 - 0.05 - 0.02 and means.max().item() < 0.5 * 1.1 + 0.05 + 0.02
    unchanged = (out == x).flatten(1).all(1).float().mean().item()
    assert 0.15 < unchanged < 0.25  # scale off (0.5) x shift off (0.5) x noise off (0.8) = 0.2


def test_a_batch_on_a_non_matching_rank_is_refused_with_the_shape():
    with pytest.raises(ValueError, match=r"Got shape \(2, 1, 8, 8, 8\)"):
        BatchAugment(AugmentConfig(), 2)(torch.rand(2, 1, 8, 8, 8))
    with pytest.raises(ValueError, match="must be 2 or 3"):
        BatchAugment(AugmentConfig(), 1)


def test_matches_the_monai_preset_in_distribution():
    """Same families, same probabilities: the mean absolute change per image is close to MONAI's."""
    from medtl.data.transforms import augment_transform

    rng = np.random.default_rng(0)
    x = rng.random((200, 1, 32, 32)).astype(np.float32)
    x[:, :, 8:24, 8:24] += 1.0
    x /= 2
    t = augment_transform(AugmentConfig(), (32, 32))
    t.set_random_state(0)
    monai = np.stack([np.asarray(t(xi)) for xi in x])
    ours = BatchAugment(AugmentConfig(), 2, seed=0)(torch.from_numpy(x)).numpy()
    d_monai = np.abs(monai - x).mean()
    d_ours = np.abs(ours - x).mean()
    assert d_ours == pytest.approx(d_monai, rel=0.25)
