"""RadImageNet layouts: structure only.

The real RadImageNet files cannot be downloaded here (Google Drive by request / Hugging
Face), so every test builds a randomly initialised network, saves its tensors under the
published key layout and file type, and loads it strictly through ``create_encoder``.
These tests check key layouts, renaming, preprocessing wiring and errors, not pretrained
quality.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torchvision
from torch import nn

from medtl.errors import ConfigError, WeightsError
from medtl.models import create_encoder, get_record
from medtl.models._keras_resnet import KerasResNet50


class _Backbone(nn.Module):
    """The authors' demo wrapper: ``self.backbone = nn.Sequential(*children)``."""

    def __init__(self, children):
        super().__init__()
        self.backbone = nn.Sequential(*children)


def _authors_file(tmp_path, arch: str, *, drop_aux: bool = False, suffix: str = ".pt"):
    kwargs = {"aux_logits": True, "init_weights": False} if arch == "inception_v3" else {}
    tv = getattr(torchvision.models, arch)(weights=None, **kwargs)
    children = list(tv.children())
    if arch == "resnet50":
        children = children[:9]  # pytorch_example.ipynb
    else:
        children = children[:-1]  # issue #16: list(base_model.children())[:-1]
        if drop_aux:
            children = [c for c in children if not isinstance(c, torchvision.models.inception.InceptionAux)]
    sd = _Backbone(children).state_dict()
    path = tmp_path / f"{arch}_torch{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save(sd, path)
    return path, sd


def test_authors_resnet50_file_loads_strictly_and_runs(tmp_path):
    """Structure, not pretrained quality: backbone.0/1/4-7 keys map onto timm resnet50."""
    path, sd = _authors_file(tmp_path, "resnet50")
    assert {k.split(".")[1] for k in sd} == {"0", "1", "4", "5", "6", "7"}
    m = create_encoder("radimagenet_resnet50", weights_path=path, layout="radimagenet_torch", num_classes=2).eval()
    assert m.weights_record.name == "resnet50.radimagenet_torch"
    torch.testing.assert_close(m.net.layer4[2].conv3.weight, sd["backbone.7.2.conv3.weight"])
    # BGR-trained stem: input channels reversed so the model takes RGB
    torch.testing.assert_close(m.stem.weight, sd["backbone.0.weight"].flip(1))
    assert m(torch.rand(2, 1, 64, 64)).shape == (2, 2)


def test_layout_is_detected_from_keys(tmp_path):
    """Structure, not pretrained quality: layout='auto' picks the authors' layout from backbone.N keys."""
    path, _ = _authors_file(tmp_path, "resnet50", suffix=".safetensors")
    m = create_encoder("radimagenet_resnet50", weights_path=path, num_classes=3)
    assert m.weights_record.layout == "radimagenet_torch" and m.num_classes == 3


@pytest.mark.parametrize("arch, drop_aux", [("densenet121", False), ("inception_v3", False), ("inception_v3", True)])
def test_authors_densenet_and_inception_files_load(tmp_path, arch, drop_aux):
    """Structure, not pretrained quality: DenseNet121 (one 'features' child) and InceptionV3
    (with or without the auxiliary head in the Sequential) map onto timm by tensor names and shapes."""
    path, sd = _authors_file(tmp_path, arch, drop_aux=drop_aux)
    m = create_encoder(f"radimagenet_{arch}", weights_path=path, num_classes=2).eval()
    first = next(k for k in sd if k.endswith("weight"))
    torch.testing.assert_close(m.stem.weight, sd[first].flip(1))
    with torch.no_grad():
        assert m(torch.rand(1, 1, 96, 96)).shape == (1, 2)


def _keras_file(tmp_path, name="RadImageNet-ResNet50_notop.pth"):
    net = KerasResNet50(num_classes=0)
    path = tmp_path / name
    torch.save(net.state_dict(), path)
    return path, net


@pytest.mark.parametrize("layout", ["radimagenet_keras", "radimagenet_hf", "auto"])
def test_keras_faithful_resnet50_loads(tmp_path, layout):
    """Structure, not pretrained quality: conv biases, stride in the first 1x1 conv, Keras BN eps."""
    path, ref = _keras_file(tmp_path)
    m = create_encoder("radimagenet_resnet50", weights_path=path, layout=layout, num_classes=2).eval()
    net = m.net
    assert isinstance(net, KerasResNet50) and net.conv1.bias is not None
    assert net.layer2[0].conv1.stride == (2, 2) and net.layer2[0].conv2.stride == (1, 1)
    assert net.bn1.eps == pytest.approx(1.001e-5)
    torch.testing.assert_close(net.layer3[0].conv1.bias, ref.layer3[0].conv1.bias)
    f = m.forward_features(torch.rand(1, 1, 64, 64))
    assert f.shape == (1, 2048, 2, 2) and m.forward_head(f, pre_logits=True).shape == (1, 2048)


def test_keras_record_preprocessing_matches_the_authors_keras_pipeline(tmp_path):
    """Structure, not pretrained quality: the medtl model on RGB [0, 1] input equals the raw Keras-style
    network fed what Keras fed it: BGR, x/255 - Caffe mean/255 (preprocess_input then rescale)."""
    path, ref = _keras_file(tmp_path)
    m = create_encoder("radimagenet_resnet50", weights_path=path, layout="radimagenet_keras", num_classes=0).eval()
    ref.eval()
    rgb = torch.rand(1, 3, 64, 64)
    caffe_bgr = torch.tensor([103.939, 116.779, 123.68]).view(1, 3, 1, 1) / 255
    with torch.no_grad():
        torch.testing.assert_close(m(rgb), ref(rgb.flip(1) - caffe_bgr), atol=1e-4, rtol=1e-4)
    rec = m.weights_record
    assert rec.channel_order == "BGR" and rec.std == (1.0, 1.0, 1.0) and "acl_train.py" in rec.preprocessing_source


def test_torch_record_preprocessing_is_the_demo_minus1_to_1(tmp_path):
    """Structure, not pretrained quality: demo = cv2 BGR, (x - 127.5) * 2 / 255."""
    rec = get_record("resnet50.radimagenet_torch")
    assert rec.mean == rec.std == (0.5, 0.5, 0.5) and rec.channel_order == "BGR"
    assert "pytorch_example.ipynb" in rec.preprocessing_source


def test_hf_mirror_offline_error_names_the_cache_path(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDTL_WEIGHTS_DIR", str(tmp_path))

    def offline(*a, **k):
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(WeightsError) as err:
        create_encoder("radimagenet_resnet50", layout="radimagenet_hf")
    assert str(tmp_path / "keras_resnet50.radimagenet_hf" / "RadImageNet-ResNet50_notop.pth") in str(err.value)


def test_local_record_without_a_file_says_to_pass_weights_path():
    with pytest.raises(WeightsError, match="weights_path"):
        create_encoder("radimagenet_densenet121")


def test_layout_conflicts_raise_config_errors(tmp_path):
    path, _ = _keras_file(tmp_path)
    with pytest.raises(ConfigError, match="'layout' parameter"):
        create_encoder("radimagenet_densenet121", weights_path=path, layout="radimagenet_keras")
    with pytest.raises(ConfigError, match="layout 'medicalnet'"):
        create_encoder("tf_efficientnet_lite0", weights_path=path, layout="medicalnet")


def test_file_of_another_architecture_fails_strictly(tmp_path):
    path, _ = _authors_file(tmp_path, "densenet121")
    rec = dataclasses.replace(get_record("resnet50.radimagenet_torch"))
    with pytest.raises(WeightsError, match="do not fit"):
        create_encoder(rec.name, weights_path=path, layout="radimagenet_torch")
