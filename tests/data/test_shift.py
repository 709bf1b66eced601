"""Scanner shifts: deterministic given a seed, each parameter does what it says, bad input is refused."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from medtl.data.shift import SCANNER_PRESETS, ScannerShift, apply_shift, scanner_shift
from medtl.errors import ConfigError, DataError


def _images(n=6, size=32, seed=0):
    rng = np.random.default_rng(seed)
    x = ndimage.gaussian_filter(rng.random((n, 1, size, size)), sigma=(0, 0, 1, 1)) * 0.6 + 0.2
    x[:, :, 10:20, 10:20] += 0.2 * rng.random((n, 1, 10, 10))  # fine texture
    return x.clip(0, 1).astype(np.float32)


def _detail(x):
    return float(np.abs(ndimage.laplace(x[:, 0].astype(np.float64), mode="nearest")).mean())


def test_deterministic_given_the_seed_and_independent_of_the_stack():
    x = _images()
    shift = SCANNER_PRESETS["ultrasound_b"]
    a, b = shift(x, seed=7), apply_shift(x, shift, seed=7)
    assert a.dtype == np.float32 and a.shape == x.shape and np.array_equal(a, b)
    assert not np.array_equal(a, shift(x, seed=8))
    np.testing.assert_array_equal(shift(x[:3], seed=7), a[:3])  # image i's noise depends on (seed, i) only
    assert 0.0 <= a.min() and a.max() <= 1.0


def test_identity_shift_changes_nothing_and_3d_stacks_work():
    x = _images()
    np.testing.assert_allclose(ScannerShift()(x), x, atol=1e-7)
    assert ScannerShift(gain=1.1)(x[:, 0]).shape == x[:, 0].shape


def test_each_parameter_moves_the_image_the_documented_way():
    x = _images()
    mean = float(x.mean())
    assert ScannerShift(gain=1.3)(x).mean() > mean * 1.2
    assert ScannerShift(gamma=0.6)(x).mean() > mean and ScannerShift(gamma=1.6)(x).mean() < mean
    assert ScannerShift(contrast=0.5)(x).std() < 0.6 * x.std()
    assert _detail(ScannerShift(blur_sigma=1.5)(x)) < 0.6 * _detail(x)
    assert _detail(ScannerShift(resolution=0.5)(x)) < 0.8 * _detail(x)
    sp = ScannerShift(speckle=0.3)(x) - x
    bright, dark = x > np.percentile(x, 75), x < np.percentile(x, 25)
    assert sp[bright].std() > 1.3 * sp[dark].std()  # multiplicative: stronger where brighter
    assert abs(float(sp.mean())) < 0.02
    no = ScannerShift(noise=0.05)(x) - x
    assert 0.03 < no.std() < 0.06


def test_invalid_parameters_and_inputs_are_refused_with_clear_messages():
    with pytest.raises(ConfigError, match=r"The 'gain' parameter of ScannerShift must be a float > 0.0\. Got -1"):
        ScannerShift(gain=-1.0)
    with pytest.raises(ConfigError, match="'resolution'"):
        ScannerShift(resolution=1.5)
    with pytest.raises(ConfigError, match="Did you mean 'ultrasound_b'"):
        scanner_shift("ultrasound-b")
    assert scanner_shift("ultrasound_b", speckle=0.1).speckle == 0.1
    with pytest.raises(DataError, match="values in \\[0, 1\\]"):
        apply_shift(np.full((2, 1, 4, 4), 255.0), ScannerShift())
    with pytest.raises(DataError, match="Got shape"):
        apply_shift(np.zeros((4, 4)), ScannerShift())


def test_breastmnist_test_split_as_a_new_hospital(shared_data):
    with np.load(shared_data / "medmnist" / "breastmnist.npz") as f:
        x = f["test_images"][:, None].astype(np.float32) / 255.0
    y = SCANNER_PRESETS["ultrasound_b"](x, seed=0)
    assert y.shape == x.shape == (156, 1, 28, 28)
    assert y.mean() > x.mean() + 0.05  # brighter probe
    assert _detail(ScannerShift(blur_sigma=1.2)(x)) < _detail(x)
