"""The device-resident fast path: data held once, exact batches, fit/predict wired to it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medtl.config import TrainConfig
from medtl.training import fit, predict_proba
from medtl._fastpath import Resident, _uint8_if_exact, batches, resident

from test_loop import Tiny, _blobs  # tests/train is on sys.path (rootdir import mode)


def test_on_cpu_the_resident_tensor_is_the_numpy_array_not_a_copy():
    x = np.random.default_rng(0).random((10, 1, 8, 8)).astype(np.float32)
    r = resident(x, "cpu")
    assert isinstance(r, Resident) and r.on_device
    assert np.shares_memory(r.data.numpy(), x)
    assert resident(r, "cpu") is r


def test_take_and_slice_return_exact_float32_batches():
    x = np.random.default_rng(1).random((10, 2, 5, 6)).astype(np.float32)
    r = resident(x, "cpu")
    np.testing.assert_array_equal(r.take(np.array([7, 0, 3])).numpy(), x[[7, 0, 3]])
    np.testing.assert_array_equal(r.slice(8, 20).numpy(), x[8:])
    assert r.take(np.array([1])).dtype == torch.float32


def test_float64_input_becomes_float32():
    r = resident(np.zeros((3, 1, 4, 4)), "cpu")
    assert r.data.dtype == torch.float32


def test_batches_are_channels_last_in_2d_and_cover_every_image_in_order():
    x = np.random.default_rng(2).random((7, 3, 8, 8)).astype(np.float32)
    got = list(batches(x, 3, "cpu"))
    assert [len(b) for b in got] == [3, 3, 1]
    assert all(b.is_contiguous(memory_format=torch.channels_last) for b in got)
    np.testing.assert_array_equal(torch.cat(got).numpy(), x)
    vols = list(batches(np.zeros((2, 1, 4, 4, 4), np.float32), 1, "cpu"))
    assert vols[0].shape == (1, 1, 4, 4, 4)


def test_uint8_storage_is_chosen_only_when_lossless():
    k = np.random.default_rng(3).integers(0, 256, (4, 1, 8, 8))
    np.testing.assert_array_equal(_uint8_if_exact((k / 255).astype(np.float32)), k)
    assert _uint8_if_exact((k / 255 + 1e-3).astype(np.float32)) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_data_are_compact_on_the_device_or_pinned_on_the_host():
    k = np.random.default_rng(4).integers(0, 256, (16, 1, 8, 8))
    r = resident((k / 255).astype(np.float32), "cuda")
    assert r.on_device and r.data.dtype == torch.uint8 and r.data.is_cuda
    np.testing.assert_allclose(r.take(np.array([2, 5])).cpu().numpy(), (k[[2, 5]] / 255), atol=1e-6)
    f = resident(np.random.rand(16, 1, 8, 8).astype(np.float32), "cuda", budget=0.0)
    assert not f.on_device and f.data.is_pinned() and f.data.dtype == torch.float16
    assert f.take(np.array([0])).is_cuda


def test_fit_reports_training_throughput_per_epoch():
    x, y = _blobs()
    res = fit(Tiny(), x, y, x[:16], y[:16], TrainConfig(epochs=2, batch_size=8, warmup_epochs=0),
              num_classes=2)
    for h in res.history:
        assert h["train_seconds"] > 0
        assert h["train_images_per_s"] == pytest.approx(len(x) // 8 * 8 / h["train_seconds"])
        assert np.isfinite(h["train_loss"])


@pytest.mark.parametrize("backend", ["torch", "monai"])
def test_both_augmentation_backends_learn_and_are_deterministic(backend):
    x, y = _blobs()
    xv, yv = _blobs(24, seed=1)
    cfg = TrainConfig(epochs=5, batch_size=8, lr=0.02, warmup_epochs=0, augment={"backend": backend})
    torch.manual_seed(0)
    m1 = Tiny()
    torch.manual_seed(0)
    m2 = Tiny()
    p1 = predict_proba(fit(m1, x, y, xv, yv, cfg, num_classes=2).model, xv)
    p2 = predict_proba(fit(m2, x, y, xv, yv, cfg, num_classes=2).model, xv)
    np.testing.assert_array_equal(p1, p2)
    assert ((p1[:, 1] > 0.5) == yv).mean() >= 0.8


def test_predict_proba_accepts_a_resident_and_matches_the_array_path():
    x, _ = _blobs(20)
    model = Tiny().eval()
    np.testing.assert_array_equal(predict_proba(model, resident(x, "cpu"), batch_size=6),
                                  predict_proba(model, x, batch_size=6))


@pytest.mark.slow
def test_compiled_training_forward_gives_the_same_kind_of_result():
    """``train.compile`` runs the step through torch.compile (inductor needs a C++ compiler on CPU)."""
    pytest.importorskip("torch._inductor")
    x, y = _blobs(32)
    cfg = TrainConfig(epochs=2, batch_size=8, warmup_epochs=0, compile="default")
    try:
        res = fit(Tiny(), x, y, x[:8], y[:8], cfg, num_classes=2)
    except Exception as err:  # no compiler on this machine: the feature, not medtl, is unavailable
        if "compiler" in str(err).lower() or "cc" in str(err).lower():
            pytest.skip(f"torch.compile unavailable here: {err}")
        raise
    assert len(res.history) == 2 and np.isfinite(res.history[-1]["train_loss"])
