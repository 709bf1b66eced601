"""Weight sources and key layouts: torchvision hub cache, layout detection, safe loading."""

from __future__ import annotations

import dataclasses
import re

import pytest
import timm
import torch
import torchvision

from medtl.errors import WeightsError
from medtl.models import create_encoder, get_record, resolve_record
from medtl.models._keymaps import detect_layout, torchvision_to_timm
from medtl.models._sources import read_state_dict, sha256_file
from medtl.models._weights import load_weights


def _old_densenet_keys(sd):
    """torchvision's published densenet files use 'norm.1'-style names (pre-0.3 layout)."""
    pat = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))([12])\.(weight|bias|running_mean|running_var)$")
    return {pat.sub(r"\1.\2.\3", k): v for k, v in sd.items()}


def test_torchvision_cache_miss_names_the_exact_path(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(WeightsError) as err:
        create_encoder("resnet18.tv_in1k")
    assert str(tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in str(err.value)


def test_torchvision_densenet_file_from_cache_loads_into_timm(tmp_path, monkeypatch):
    """Structure, not pretrained quality: torchvision's file layout (old DenseNet keys) fits timm densenet121."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    rec = get_record("densenet121.tv_in1k")
    tv = torchvision.models.densenet121(weights=None)
    sd = _old_densenet_keys(tv.state_dict())
    assert any(".norm.1." in k for k in sd)
    folder = tmp_path / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    torch.save(sd, folder / rec.location)
    rec = dataclasses.replace(rec, hash_prefix=sha256_file(folder / rec.location)[:8])
    net = timm.create_model("densenet121", num_classes=1000)
    load_weights(net, rec)
    torch.testing.assert_close(net.features.denseblock4.denselayer16.conv2.weight,
                               tv.features.denseblock4.denselayer16.conv2.weight)


def test_torchvision_hash_prefix_is_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    folder = tmp_path / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    torch.save({"w": torch.zeros(1)}, folder / "resnet18-f37072fd.pth")
    with pytest.raises(WeightsError, match="Checksum mismatch"):
        create_encoder("resnet18.tv_in1k")


def test_timm_and_torchvision_resnet_names_agree():
    """Why torchvision files load into timm's resnet50 without renaming."""
    with torch.device("meta"):
        a = torchvision.models.resnet50(weights=None).state_dict()
        b = timm.create_model("resnet50").state_dict()
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    assert torchvision_to_timm({"features.denseblock1.denselayer1.norm.1.weight": torch.zeros(1)}) == {
        "features.denseblock1.denselayer1.norm1.weight": torch.zeros(1)}


@pytest.mark.parametrize("keys, layout", [
    ({"_blocks.0._depthwise_conv.weight": (1, 1, 3, 3)}, "efficientnet_pytorch"),
    ({"backbone.0.weight": (64, 3, 7, 7)}, "radimagenet_torch"),
    ({"module.conv1.weight": (64, 1, 7, 7, 7)}, "medicalnet"),
    ({"conv1.weight": (64, 3, 7, 7), "conv1.bias": (64,), "layer1.0.conv1.bias": (64,)}, "radimagenet_keras"),
    ({"conv1.weight": (64, 3, 7, 7), "layer1.0.conv1.weight": (64, 64, 1, 1)}, "timm"),
])
def test_detect_layout(keys, layout):
    assert detect_layout({k: torch.zeros(s) for k, s in keys.items()}) == layout


def test_pickled_code_is_refused(tmp_path):
    """Only safetensors or torch.load(weights_only=True): a pickled object never runs."""
    path = tmp_path / "evil.pth"
    import argparse

    torch.save({"state_dict": {"w": torch.zeros(1)}, "args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(WeightsError, match="weights_only"):
        read_state_dict(path)


def test_user_file_in_timm_layout_for_a_pypi_record(tmp_path):
    """A timm-named copy of lite0 (another layout than the published one) loads via layout='auto'."""
    ref = create_encoder("tf_efficientnet_lite0", num_classes=1000, in_chans=3)
    path = tmp_path / "lite0_timm.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in ref.net.state_dict().items()}, str(path))
    m = create_encoder("tf_efficientnet_lite0", weights_path=path, num_classes=1000, in_chans=3)
    assert m.weights_record.layout == "timm"
    torch.testing.assert_close(m.stem.weight, ref.stem.weight)


def test_scratch_record_of_a_bgr_set_has_rgb_order():
    rec = resolve_record("radimagenet_resnet50", pretrained=False)
    assert rec.source == "none" and rec.channel_order == "RGB" and rec.mean == (0.5, 0.5, 0.5)
