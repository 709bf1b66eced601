"""Saliency (Captum Grad-CAM / Integrated Gradients) and the trust checks on tiny CNNs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from medtl.errors import ConfigError, DataError
from medtl.explain.attribution import METHODS, explain
from medtl.explain.sanity import mask_agreement, randomization_check


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy shared CPU the spinning
    OpenMP workers make them ~50x slower; use one thread here and restore the setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class TinyCNN(nn.Module):
    """``(B, 1, *spatial) -> (B, n_classes)``; 2D or 3D; exposes feature/classifier layers.

    ``left_only`` zeroes the right half of the input first, so the logits depend on the
    left half alone (bias-free convolutions keep the right-half features at zero).
    """

    def __init__(self, dims: int = 2, n_classes: int = 2, width: int = 8,
                 left_only: bool = False, feature_channels: int | None = None) -> None:
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        norm = nn.BatchNorm2d if dims == 2 else nn.BatchNorm3d
        pool = nn.AdaptiveAvgPool2d if dims == 2 else nn.AdaptiveAvgPool3d
        out = feature_channels or 2 * width
        bias = not left_only
        self.left_only = left_only
        self.stem = nn.Sequential(conv(1, width, 3, padding=1, bias=bias), norm(width), nn.ReLU())
        self.feature_layer = nn.Sequential(conv(width, out, 3, padding=1, bias=bias), nn.ReLU())
        self.pool = pool(1)
        self.classifier_layer = nn.Linear(out, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.left_only:
            keep = torch.zeros_like(x)
            keep[..., : x.shape[-1] // 2] = 1.0
            x = x * keep
        feats = self.feature_layer(self.stem(x))
        return self.classifier_layer(self.pool(feats).flatten(1))


def _blobs(n: int, size: int = 24, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise images ``(n, 1, size, size)``; label 1 = a bright 5x5 square somewhere."""
    g = torch.Generator().manual_seed(seed)
    x = 0.3 * torch.rand(n, 1, size, size, generator=g)
    y = torch.arange(n) % 2
    for i in range(n):
        if y[i]:
            r, c = torch.randint(0, size - 5, (2,), generator=g).tolist()
            x[i, 0, r:r + 5, c:c + 5] = 1.0
    return x, y


def _trained_blob_model() -> tuple[TinyCNN, torch.Tensor, torch.Tensor]:
    model = TinyCNN()
    x, y = _blobs(64)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    assert acc > 0.9, f"the test model did not learn the blob task (accuracy {acc:.2f})"
    model.zero_grad(set_to_none=True)
    return model, x, y


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", [(3, 1, 20, 24), (2, 1, 8, 12, 10)], ids=["2d", "3d"])
def test_shapes_and_dtype(method: str, shape: tuple[int, ...]) -> None:
    model = TinyCNN(dims=len(shape) - 2)
    x = torch.rand(shape)
    attr = explain(model, x, method=method, ig_steps=8)
    assert attr.shape == (shape[0], 1, *shape[2:])
    assert attr.dtype == torch.float32 and not attr.requires_grad
    assert torch.isfinite(attr).all()


@pytest.mark.parametrize("dims", [2, 3])
def test_gradcam_is_non_negative_and_not_trivial(dims: int) -> None:
    model = TinyCNN(dims=dims)
    with torch.no_grad():
        model.classifier_layer.weight.abs_()  # positive evidence: the ReLU'd map is not all 0
    x = torch.rand((2, 1, *([12] * dims)))
    attr = explain(model, x, method="layergradcam", target=0)
    assert (attr >= 0).all()
    assert attr.sum() > 0


def test_ig_completeness() -> None:
    """Sum of IG attributions ~= f(x) - f(baseline) for the target logit."""
    model = TinyCNN().eval()
    x = torch.rand(3, 1, 16, 16)
    target = torch.tensor([0, 1, 1])
    attr = explain(model, x, method="integrated_gradients", target=target, ig_steps=64,
                   baseline=0.0)
    with torch.no_grad():
        gap = (model(x) - model(torch.zeros_like(x)))[torch.arange(3), target]
    total = attr.flatten(1).sum(1)
    assert torch.allclose(total, gap, rtol=0.05, atol=1e-3), (total, gap)
    # a tensor baseline works the same way
    base = torch.full((1, 1, 1, 1), 0.5)
    attr_half = explain(model, x, method="ig", target=target, ig_steps=64, baseline=base)
    with torch.no_grad():
        gap_half = (model(x) - model(torch.full_like(x, 0.5)))[torch.arange(3), target]
    assert torch.allclose(attr_half.flatten(1).sum(1), gap_half, rtol=0.05, atol=1e-3)


@pytest.mark.parametrize("method", ["gradcam", "ig"])
def test_attribution_follows_the_evidence(method: str) -> None:
    """A model that only looks at the left half gets its attribution on the left half."""
    model = TinyCNN(left_only=True)
    with torch.no_grad():
        model.classifier_layer.weight.abs_()
    x = torch.rand(4, 1, 16, 16)
    attr = explain(model, x, method=method, target=1, ig_steps=16).abs()
    left, right = attr[..., :8].sum().item(), attr[..., 8:].sum().item()
    assert left > 0
    assert left > 4 * right, (left, right)
    if method == "ig":  # no gradient reaches the right half at all
        assert right == 0.0


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
        explain(model, x, method=method, ig_steps=4)
        assert {name: m.training for name, m in model.named_modules()} == modes
        assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
        assert all(p.grad is None for p in model.parameters())
    assert x.grad is None and not x.requires_grad


def test_unknown_method_names_valid_options() -> None:
    with pytest.raises(ConfigError) as err:
        explain(TinyCNN(), torch.rand(1, 1, 8, 8), method="gradcma")
    msg = str(err.value)
    assert "'gradcam'" in msg and "'ig'" in msg and "'gradcma'" in msg
    assert "Did you mean 'gradcam'?" in msg


def test_invalid_inputs_raise_config_errors() -> None:
    model = TinyCNN()
    with pytest.raises(ConfigError, match=r"\(B, C, H, W\).*Got shape \(8, 8\)"):
        explain(model, torch.rand(8, 8))
    with pytest.raises(ConfigError, match=r"class index in \[0, 1\]"):
        explain(model, torch.rand(1, 1, 8, 8), target=5)
    with pytest.raises(ConfigError, match="'ig_steps' parameter of explain must be an int >= 1"):
        explain(model, torch.rand(1, 1, 8, 8), method="ig", ig_steps=0)
    plain = nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(ConfigError, match="no 'feature_layer'"):
        explain(plain, torch.rand(1, 1, 8, 8))
    assert explain(plain, torch.rand(1, 1, 8, 8), method="ig", ig_steps=4).shape == (1, 1, 8, 8)
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
    ig = explain(model, x, method="ig", ig_steps=4, internal_batch_size=4)
    assert cam.shape == ig.shape == (2, 1, 64, 64)
    assert (cam >= 0).all() and cam.sum() > 0
    assert model.training  # timm returns a model in train mode; it is restored
    result = randomization_check(model, x, method="gradcam")
    assert len(result["spearman"]) == 2


def test_randomization_check_passes_on_a_trained_model() -> None:
    model, x, y = _trained_blob_model()
    positives = x[y == 1][:4]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for layers in ("head+last_block", "all"):
        result = randomization_check(model, positives, target=1, method="gradcam", layers=layers)
        assert result["passed"] is True, result
        assert all(r is not None and abs(r) < result["threshold"] for r in result["spearman"])
        assert result["layers"] == layers and len(result["passed_per_sample"]) == 4
    # IG multiplies gradients by the input, so on bright blobs it stays input-driven (the
    # effect Adebayo et al. report for Gradient x Input): only check the result's form here.
    ig = randomization_check(model, positives, target=1, method="integrated_gradients",
                             ig_steps=8)
    assert ig["method"] == "ig" and len(ig["spearman"]) == 4
    assert ig["passed"] == all(ig["passed_per_sample"])
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # original left untouched


def test_randomization_check_flags_weight_independent_maps() -> None:
    """With one feature channel and a positive head, Grad-CAM is relu(A) whatever the weights."""

    class PositiveHead(nn.Linear):
        def reset_parameters(self) -> None:
            nn.init.uniform_(self.weight, 0.5, 1.0)
            nn.init.zeros_(self.bias)

    model = TinyCNN(feature_channels=1)
    model.classifier_layer = PositiveHead(1, 2)
    result = randomization_check(model, torch.rand(3, 1, 16, 16), target=0, layers="head")
    assert result["passed"] is False
    assert all(r > 0.99 for r in result["spearman"])


def test_randomization_check_layer_arguments() -> None:
    model, x = TinyCNN(), torch.rand(2, 1, 8, 8)
    with pytest.raises(ConfigError, match="'head', 'head\\+last_block', 'all'"):
        randomization_check(model, x, layers="everything")
    with pytest.raises(ConfigError, match="must be a submodule of the model"):
        randomization_check(model, x, layer=nn.Conv2d(1, 1, 3))
    # an explicit Grad-CAM layer is mapped onto the randomised copy
    result = randomization_check(model, x, layer=model.feature_layer[0], target=0)
    assert len(result["spearman"]) == 2


def test_mask_agreement_2d() -> None:
    attr = np.zeros((10, 10))
    attr[2, 2] = 3.0  # inside the mask
    attr[8, 8] = 1.0  # outside
    attr[5, 5] = -4.0  # negative evidence does not count
    mask = np.zeros((10, 10), dtype=np.uint8)
    mask[1:4, 1:4] = 1
    res = mask_agreement(attr, mask)
    assert res["energy_in_mask"] == pytest.approx(0.75)
    assert res["mask_fraction"] == pytest.approx(0.09)
    assert res["lift"] == pytest.approx(0.75 / 0.09)
    assert res["pointing_hit"] is True

    attr[8, 8] = 5.0  # the peak moves next to, then away from, the mask
    assert mask_agreement(attr, mask)["pointing_hit"] is False
    near = np.zeros((10, 10))
    near[4, 4] = 1.0  # one pixel diagonally off the mask
    assert mask_agreement(near, mask, tolerance=0)["pointing_hit"] is False
    assert mask_agreement(near, mask, tolerance=1)["pointing_hit"] is True


def test_mask_agreement_3d_and_edge_cases() -> None:
    attr = np.zeros((4, 6, 6))
    attr[1, 2:4, 2:4] = 1.0
    mask = np.zeros((4, 6, 6), dtype=bool)
    mask[1, 2:4, 2:3] = True
    res = mask_agreement(attr, mask)
    assert res["energy_in_mask"] == pytest.approx(0.5)
    assert res["pointing_hit"] is True
    empty = mask_agreement(attr, np.zeros_like(mask))
    assert empty["energy_in_mask"] is None and empty["pointing_hit"] is None
    assert empty["mask_fraction"] == 0.0
    assert mask_agreement(np.zeros_like(attr), mask)["energy_in_mask"] is None
    with pytest.raises(DataError, match=r"Got attribution \(4, 6, 6\) and mask \(6, 6\)"):
        mask_agreement(attr, mask[0])
