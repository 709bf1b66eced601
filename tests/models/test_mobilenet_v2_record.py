"""torchvision MobileNetV2 IMAGENET1K_V1 as a weight record, loaded into timm's mobilenetv2_100.

The real published file sits in ``../shared/weights`` (a stand-in for a user's download
cache); the tests point ``MEDTL_WEIGHTS_DIR`` there, as a user's machine would.
"""

from __future__ import annotations

import pytest
import torch
import torchvision

from medtl.config import load_config
from medtl.errors import WeightsError
from medtl.models import create_encoder, get_record, resolve_record
from medtl.models._keymaps import detect_layout, torchvision_mobilenet_v2_to_timm
from medtl.models._sources import read_state_dict
from medtl.training import ModelSpec
from tests.conftest import MOBILENET_V2_FILE as FILE
from tests.conftest import REPO_ROOT


@pytest.fixture
def weights_cache(shared_weights, monkeypatch, tmp_path):
    """The shared weights folder as ``MEDTL_WEIGHTS_DIR``; an empty torch hub cache."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return shared_weights


def test_record_describes_torchvision_weights():
    rec = resolve_record("mobilenet_v2")  # torchvision's name is an alias
    assert rec is get_record("mobilenetv2_100.tv_in1k")
    assert rec.location == f"https://download.pytorch.org/models/{FILE}"
    assert rec.sha256 == "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"
    assert rec.license == "BSD-3-Clause" and rec.source == "url" and rec.layout == "torchvision"
    weights = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1
    assert weights.url == rec.location
    norm = weights.transforms()
    assert rec.mean == tuple(norm.mean) and rec.std == tuple(norm.std)
    assert resolve_record("mobilenet_v2", pretrained=False).name == "mobilenetv2_100.scratch"


def test_loads_strictly_and_computes_torchvision_logits(weights_cache):
    """The loaded timm network equals torchvision's mobilenet_v2 with the same file, on ImageNet-normalised input."""
    model = create_encoder("mobilenet_v2", num_classes=1000, in_chans=3).eval()
    rec = model.weights_record
    tv = torchvision.models.mobilenet_v2()
    tv.load_state_dict(read_state_dict(weights_cache / FILE))
    tv.eval()
    x = torch.rand(2, 3, 48, 48)
    mean, std = torch.tensor(rec.mean).view(1, 3, 1, 1), torch.tensor(rec.std).view(1, 3, 1, 1)
    with torch.no_grad():
        ours, theirs = model(x), tv((x - mean) / std)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    assert torch.equal(ours.argmax(1), theirs.argmax(1))
    # every tensor of the file went somewhere: the renamed file fits timm's module tree exactly
    sd = torchvision_mobilenet_v2_to_timm(read_state_dict(weights_cache / FILE), rec)
    assert set(sd) == set(model.net.state_dict())
    assert detect_layout(read_state_dict(weights_cache / FILE)) == "torchvision"


def test_grey_stem_contract_and_backward(weights_cache):
    """1-channel stem (summed filters), the encoder contract, and gradients through it."""
    model = create_encoder("mobilenet_v2", num_classes=2, in_chans=1, channel_mapping="sum")
    raw = read_state_dict(weights_cache / FILE)
    torch.testing.assert_close(model.stem.weight, raw["features.0.0.weight"].sum(1, keepdim=True))
    assert model.feature_layer is model.net.bn2 and model.classifier_layer is model.net.classifier
    x = torch.rand(2, 1, 32, 32)
    f = model.forward_features(x)
    assert f.shape == (2, 1280, 1, 1)
    assert model.forward_head(f, pre_logits=True).shape == (2, 1280)
    loss = torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1]))
    loss.backward()
    assert model.stem.weight.grad is not None and model.stem.weight.grad.abs().sum() > 0
    model.reset_classifier(4)
    assert model(x).shape == (2, 4)


def test_wrong_file_in_the_cache_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("MEDTL_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    torch.save(torchvision.models.mobilenet_v2().state_dict(), tmp_path / FILE)  # right name, other tensors
    with pytest.raises(WeightsError, match="Checksum mismatch for 'mobilenetv2_100.tv_in1k'") as err:
        create_encoder("mobilenet_v2", num_classes=2)
    assert str(tmp_path / FILE) in str(err.value) and "b03531047ffacf1e" in str(err.value)


def test_offline_miss_names_where_to_put_the_file(monkeypatch, tmp_path):
    monkeypatch.setenv("MEDTL_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(url, dst, progress=True):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(WeightsError, match="Offline") as err:
        create_encoder("mobilenet_v2")
    assert FILE in str(err.value) and str(tmp_path) in str(err.value)


def test_model_name_in_a_config(weights_cache):
    cfg = load_config(REPO_ROOT / "configs" / "breastmnist.yaml")
    model = ModelSpec.from_config(cfg, 2).build(pretrained=True).eval()
    assert model.weights_record.name == "mobilenetv2_100.tv_in1k"
    assert model(torch.rand(1, 1, 32, 32)).shape == (1, 2)
