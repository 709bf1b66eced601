"""MedicalNet 3D ResNets through MONAI: structure only.

The published MedicalNet ``.pth`` files are not downloadable here, so each test builds a
randomly initialised network, saves it as MedicalNet did (``{"state_dict": ...}`` with the
DataParallel ``module.`` prefix, ``.pth``) and loads it strictly through ``create_encoder``.
These tests check key layout, shortcut/bias settings and preprocessing, not pretrained quality.
"""

from __future__ import annotations

import pytest
import torch

from medtl.errors import ConfigError
from medtl.models import create_encoder, get_record
from medtl.models._contract import zscore_nonzero
from medtl.models.medicalnet import MedicalNetResNet


def _medicalnet_file(tmp_path, depth: int, extra: dict | None = None):
    net = MedicalNetResNet(depth, num_classes=0)
    sd = {f"module.{k}": v for k, v in net.state_dict().items()}
    sd.update(extra or {})
    path = tmp_path / f"resnet_{depth}.pth"
    torch.save({"state_dict": sd, "epoch": 10}, path)
    return path, net


def _check_depth(tmp_path, depth):
    path, ref = _medicalnet_file(tmp_path, depth)
    keys = ref.state_dict()
    shortcut_a = depth in (18, 34)
    assert shortcut_a == (not any("downsample" in k for k in keys))  # type A: parameter-free shortcut
    assert not any(k.startswith("layer") and "downsample.0.bias" in k for k in keys)  # B: conv without bias
    m = create_encoder(f"medicalnet_resnet{depth}", spatial_dims=3, weights_path=path, num_classes=2).eval()
    torch.testing.assert_close(m.net.layer4[0].conv1.weight, ref.layer4[0].conv1.weight)
    with torch.no_grad():
        f = m.forward_features(torch.rand(1, 1, 32, 32, 32))
        assert f.shape == (1, m.num_features, 1, 1, 1)  # MONAI strides: output stride 32
        assert m.forward_head(f).shape == (1, 2)


@pytest.mark.parametrize("depth", [10, 18, 34, 50])
def test_medicalnet_file_loads_strictly(tmp_path, depth):
    """Structure, not pretrained quality: module.-prefixed state_dict loads into MONAI's ResNet."""
    _check_depth(tmp_path, depth)


@pytest.mark.slow
@pytest.mark.parametrize("depth", [101, 152, 200])
def test_deep_medicalnet_files_load_strictly(tmp_path, depth):
    """Structure, not pretrained quality (deep variants; large random files)."""
    _check_depth(tmp_path, depth)


def test_segmentation_head_in_a_file_is_dropped(tmp_path):
    """Structure, not pretrained quality: conv_seg.* (MedicalNet's decoder) is not part of the encoder."""
    path, _ = _medicalnet_file(tmp_path, 10, {"module.conv_seg.0.weight": torch.zeros(32, 512, 2, 2, 2)})
    m = create_encoder("medicalnet_resnet10", spatial_dims=3, weights_path=path, num_classes=2)
    assert not any(k.startswith("conv_seg") for k in m.state_dict())


def test_record_metadata():
    rec = get_record("medicalnet_resnet18.med3d")
    assert rec.spatial_dims == 3 and rec.in_chans == 1 and rec.normalization == "zscore_nonzero"
    assert "brains18.py" in rec.preprocessing_source and rec.layout == "medicalnet"


def test_zscore_over_nonzero_voxels_keeps_background_zero():
    x = torch.zeros(2, 1, 8, 8, 8)
    x[:, :, 2:6, 2:6, 2:6] = torch.rand(2, 1, 4, 4, 4) * 0.5 + 0.25
    out = zscore_nonzero(x)
    fg = x > 0
    assert torch.all(out[~fg] == 0)
    for b in range(2):
        v = out[b][fg[b]]
        assert abs(v.mean().item()) < 1e-5 and abs(v.std(unbiased=False).item() - 1) < 1e-4


def test_model_normalises_inside_and_is_scale_invariant():
    """(B, 1, D, H, W) in [0, 1]: the z-score makes a global intensity scale irrelevant."""
    m = create_encoder("medicalnet_resnet10", spatial_dims=3, pretrained=False, num_classes=2).eval()
    x = torch.rand(1, 1, 16, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(m(x), m(x * 0.5), atol=1e-4, rtol=1e-4)


def test_multichannel_data_needs_sum_mapping():
    with pytest.raises(ConfigError, match="channel_mapping=sum"):
        create_encoder("medicalnet_resnet10", spatial_dims=3, pretrained=False, in_chans=3)
    m = create_encoder("medicalnet_resnet10", spatial_dims=3, pretrained=False, in_chans=3,
                       channel_mapping="sum").eval()
    with torch.no_grad():
        assert m.stem.weight.shape[1] == 3 and m(torch.rand(1, 3, 16, 16, 16)).shape == (1, 2)
