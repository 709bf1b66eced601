"""Saliency through one verb (Captum methods) on tiny 2D/3D CNNs that implement the contract."""

from __future__ import annotations

import warnings

import pytest
import torch
from _explain_models import TinyCNN, trained_blob_model
from torch import nn

from medtl.errors import ConfigError
from medtl.explain.attribution import METHODS, SIGNED_METHODS, ConvergenceWarning, explain
from medtl.explain.sanity import mask_agreement


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy shared CPU the spinning
    OpenMP workers make them ~50x slower; use one thread here and restore the setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def blob_model():
    return trained_blob_model()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", [(3, 1, 20, 24), (2, 1, 8, 12, 10)], ids=["2d", "3d"])
def test_every_method_gives_input_shaped_maps_in_2d_and_3d(method: str, shape: tuple[int, ...]) -> None:
    model = TinyCNN(dims=len(shape) - 2)
    x = torch.rand(shape)
    maps = explain(model, x, method=method, n_steps=8, n_samples=4)
    assert maps.shape == (shape[0], *shape[2:])
    assert maps.dtype == torch.float32 and not maps.requires_grad
    assert torch.isfinite(maps).all()
    if method not in SIGNED_METHODS:
        assert (maps >= 0).all()


@pytest.mark.parametrize("method", METHODS)
def test_batched_maps_equal_per_image_maps(method: str) -> None:
    """The batch goes through Captum at once; the result matches a per-image loop."""
    model = TinyCNN().eval()
    x = torch.rand(3, 1, 16, 16)
    target = torch.tensor([0, 1, 0])
    if method in ("gradient_shap", "smoothgrad"):  # random: compare with fixed seeds per call
        return
    batched = explain(model, x, target, method, n_steps=8)
    single = torch.cat([explain(model, x[i:i + 1], int(target[i]), method, n_steps=8) for i in range(3)])
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-6)


def test_ig_completeness_and_delta() -> None:
    """Sum of IG attributions ~= f(x) - f(baseline); the returned delta is Captum's error."""
    model = TinyCNN().eval()
    x = torch.rand(3, 1, 16, 16)
    target = torch.tensor([0, 1, 1])
    maps, delta = explain(model, x, target, "integrated_gradients", n_steps=64, return_delta=True)
    with torch.no_grad():
        gap = (model(x) - model(torch.zeros_like(x)))[torch.arange(3), target]
    total = maps.flatten(1).sum(1)
    assert torch.allclose(total, gap, rtol=0.05, atol=1e-3), (total, gap)
    torch.testing.assert_close(total - delta, gap, rtol=1e-3, atol=1e-4)
    half = explain(model, x, target, "ig", n_steps=64, baseline=torch.full((1, 1, 1, 1), 0.5),
                   internal_batch_size=7)  # internal batches of 7 give the same maps
    with torch.no_grad():
        gap_half = (model(x) - model(torch.full_like(x, 0.5)))[torch.arange(3), target]
    assert torch.allclose(half.flatten(1).sum(1), gap_half, rtol=0.05, atol=1e-3)
    assert explain(model, x, method="gradcam", return_delta=True)[1] is None


def test_ig_warns_when_it_does_not_converge() -> None:
    model = TinyCNN(width=4).eval()
    x = torch.rand(2, 1, 16, 16)
    with pytest.warns(ConvergenceWarning, match="raise n_steps|Raise n_steps"):
        explain(model, x, 0, "ig", n_steps=1, delta_threshold=1e-9)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        explain(model, x, 0, "ig", n_steps=64, delta_threshold=10.0)


@pytest.mark.parametrize("method", ["gradcam", "ig", "occlusion", "smoothgrad", "gradient_shap"])
def test_attribution_follows_the_evidence(method: str) -> None:
    """A model that only looks at the left half gets its attribution on the left half."""
    model = TinyCNN(left_only=True)
    with torch.no_grad():
        model.classifier_layer.weight.abs_()
    x = torch.rand(4, 1, 16, 16)
    maps = explain(model, x, 1, method, n_steps=16, n_samples=8, window=4, stride=2).abs()
    left, right = maps[..., :8].sum().item(), maps[..., 8:].sum().item()
    assert left > 0
    assert left > 4 * right, (left, right)
    if method in ("ig", "smoothgrad"):  # no gradient reaches the right half at all
        assert right == 0.0


@pytest.mark.parametrize("method", ["gradcam", "occlusion", "smoothgrad"])
def test_maps_point_at_the_learned_blob(blob_model, method: str) -> None:
    model, x, y, masks = blob_model
    pos = y == 1
    maps = explain(model, x[pos][:8], 1, method, window=5, stride=2)
    hits = [mask_agreement(m.numpy(), k.numpy())["pointing_hit"] for m, k in zip(maps, masks[pos][:8])]
    assert sum(hits) >= 6, hits


def test_default_target_is_predicted_class() -> None:
    model = TinyCNN(n_classes=3)
    x = torch.rand(4, 1, 12, 12)
    with torch.no_grad():
        pred = model.eval()(x).argmax(1)
    torch.testing.assert_close(explain(model, x), explain(model, x, target=pred))


def test_model_mode_and_parameters_restored() -> None:
    model = TinyCNN()
    model.train()
    model.stem[1].eval()  # a frozen BatchNorm inside a training model: mixed modes survive
    model.stem[0].weight.requires_grad_(False)
    modes = {name: m.training for name, m in model.named_modules()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    x = torch.rand(2, 1, 12, 12)
    for method in METHODS:
        explain(model, x, method=method, n_steps=4, n_samples=2)
        assert {name: m.training for name, m in model.named_modules()} == modes
        assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
        assert all(p.grad is None for p in model.parameters())
    assert x.grad is None and not x.requires_grad


def test_unknown_method_names_valid_options() -> None:
    with pytest.raises(ConfigError) as err:
        explain(TinyCNN(), torch.rand(1, 1, 8, 8), method="gradcma")
    msg = str(err.value)
    assert "'gradcam'" in msg and "'smoothgrad'" in msg and "'gradcma'" in msg
    assert "Did you mean 'gradcam'?" in msg


def test_invalid_inputs_raise_config_errors() -> None:
    model = TinyCNN()
    with pytest.raises(ConfigError, match=r"\(B, C, H, W\).*Got shape \(8, 8\)"):
        explain(model, torch.rand(8, 8))
    with pytest.raises(ConfigError, match=r"class index in \[0, 1\]"):
        explain(model, torch.rand(1, 1, 8, 8), target=5)
    with pytest.raises(ConfigError, match="'n_steps' parameter of explain must be an int >= 1. Got 0"):
        explain(model, torch.rand(1, 1, 8, 8), method="ig", n_steps=0)
    with pytest.raises(ConfigError, match="'window' parameter of explain"):
        explain(model, torch.rand(1, 1, 8, 8), method="occlusion", window=(2, 2, 2))
    with pytest.raises(ConfigError, match="'noise' parameter of explain must be a float >= 0"):
        explain(model, torch.rand(1, 1, 8, 8), method="smoothgrad", noise=-1)
    plain = nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(ConfigError, match="no 'feature_layer'"):
        explain(plain, torch.rand(1, 1, 8, 8))
    assert explain(plain, torch.rand(1, 1, 8, 8), method="ig", n_steps=4).shape == (1, 8, 8)
    with pytest.raises(ConfigError, match="same number of spatial dimensions"):
        explain(plain, torch.rand(1, 1, 8, 8), layer=plain[3])
    with pytest.raises(ConfigError, match="must be a submodule of the model"):
        explain(model, torch.rand(1, 1, 8, 8), layer=plain[0])


def test_real_timm_model() -> None:
    timm = pytest.importorskip("timm")
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=2, in_chans=1)
    model.feature_layer, model.classifier_layer = model.bn2, model.classifier
    x = torch.rand(2, 1, 64, 64)
    cam = explain(model, x, method="gradcam")
    ig = explain(model, x, method="ig", n_steps=4, internal_batch_size=4)
    assert cam.shape == ig.shape == (2, 64, 64)
    assert (cam >= 0).all() and cam.sum() > 0
    assert model.training  # timm returns a model in train mode; it is restored
