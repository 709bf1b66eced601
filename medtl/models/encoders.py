"""Encoders with one contract, built from weight records.

Every model returned by :func:`create_encoder` is a :class:`MedtlClassifier` (or, for 2D
weights used on volumes, the 3D model of :func:`medtl.models.inflate.convert_to_3d`):

* input: windowed images scaled to ``[0, 1]``, ``(B, C, H, W)`` or ``(B, C, D, H, W)``;
  ``C`` is the data's channel count (1 for grey scans, 3 for multi-window CT), RGB order.
  Channel mapping and the record's normalisation (mean/std, or MedicalNet's per-volume
  z-score) happen inside the model, so every caller (training, evaluation, saliency) uses
  the record's preprocessing without retyping it;
* ``forward_features(x)`` -> feature map ``(B, F, h, w)`` / ``(B, F, d, h, w)``;
* ``forward_head(f, pre_logits=False)`` -> logits ``(B, K)`` or pooled features ``(B, F)``;
* ``reset_classifier(num_classes)``;
* ``feature_layer`` (module producing the last feature map, the Grad-CAM default) and
  ``classifier_layer`` (the final linear layer) as module objects;
* ``weights_record``: the :class:`~medtl.models.records.WeightRecord` it was built from.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from torch import nn

from medtl.config import CHANNEL_MAPPINGS, CONVERSIONS_3D
from medtl.errors import ConfigError
from medtl.models._contract import EncoderContract, MedtlClassifier
from medtl.models._weights import build_network, load_weights, select_layout
from medtl.models.inflate import convert_to_3d
from medtl.models.records import LAYOUTS, resolve_record

__all__ = ["EncoderContract", "MedtlClassifier", "create_encoder", "build_network", "CHANNEL_MAPPINGS", "CONVERSIONS_3D"]

log = logging.getLogger("medtl.models")



def create_encoder(
    name: str = "tf_efficientnet_lite0",
    *,
    pretrained: bool = True,
    num_classes: int = 2,
    in_chans: int = 1,
    spatial_dims: int = 2,
    channel_mapping: Literal["auto", "repeat", "sum"] = "auto",
    drop_rate: float = 0.2,
    weights_path: str | Path | None = None,
    layout: str = "auto",
    conversion_3d: Literal["inflate", "acs", "slices", "channels"] = "inflate",
    depth: int | None = None,
) -> nn.Module:
    """Build a classifier from a weight record, alias or timm name, with its pretrained weights.

    Args:
        name: a weight record (``"tf_efficientnet_lite0.in1k"``), an alias
            (``"radimagenet_resnet50"``), an architecture with a registered default
            (``"tf_efficientnet_lite0"``, ``"medicalnet_resnet18"``) or any timm model name.
        pretrained: load the record's weights (strictly, checksum-verified where a digest is
            known); ``False`` gives random initialisation with the same preprocessing.
        num_classes: classes of the new head; a pretrained head of another size is dropped.
        in_chans: channels of the input data (1 for grey scans, 3 for multi-window CT).
        spatial_dims: 2 for images; 3 for volumes: native 3D records (MedicalNet) are built
            directly, 2D records are converted with ``conversion_3d``.
        channel_mapping: how grey input meets an RGB stem: ``"repeat"`` the channel,
            ``"sum"`` the stem filters, ``"auto"`` = the record's default.
        drop_rate: dropout before the classifier.
        depth: slices per volume ``D``; needed by ``conversion_3d="channels"`` (2.5D).
        weights_path: a local file overriding the record's source (``model.weights_path``).
        layout: key layout of ``weights_path`` (one of ``LAYOUTS``) or ``"auto"`` to detect it.
        conversion_3d: ``"inflate"``, ``"acs"``, ``"slices"`` or ``"channels"`` (2D weights
            on 3D data only; see :mod:`medtl.models.inflate`).

    Returns:
        A model taking ``(B, in_chans, H, W)`` (or ``(B, in_chans, D, H, W)``) in [0, 1].

    Raises:
        ConfigError: invalid or conflicting arguments (e.g. 2D use of 3D weights).
        WeightsError: weights missing, corrupt or not fitting the architecture.

    Example:
        >>> m = create_encoder("tf_efficientnet_lite0", num_classes=2, in_chans=1)
        >>> m(torch.rand(2, 1, 128, 128)).shape
        torch.Size([2, 2])
    """
    _validate(num_classes, in_chans, spatial_dims, channel_mapping, layout, conversion_3d)
    record = resolve_record(name, pretrained=pretrained)
    raw = None
    if pretrained:
        record, raw = select_layout(record, layout, weights_path)
    elif layout != "auto" or weights_path is not None:
        log.warning("pretrained=False: weights_path/layout are ignored for '%s'", name)
    if record.spatial_dims == 3 and spatial_dims != 3:
        raise ConfigError(f"The 'spatial_dims' parameter of create_encoder must be 3 for '{record.name}', whose "
                          f"weights are 3D (input {record.input_size}). Got {spatial_dims} instead.")
    mapping = record.channel_mapping if channel_mapping == "auto" else channel_mapping
    if in_chans == record.in_chans:
        mapping = "repeat"  # nothing to map: data channels feed the stem directly
    elif in_chans != 1 and mapping == "repeat":
        raise ConfigError(f"Cannot repeat {in_chans} data channels into the {record.in_chans} channel(s) of "
                          f"'{record.name}'; set model.channel_mapping=sum (the stem filters are then summed "
                          "or split over the channels).")
    net_chans = record.in_chans if mapping == "repeat" else in_chans
    net = build_network(record, num_classes=num_classes, in_chans=record.in_chans, drop_rate=drop_rate)
    if record.pretrained:
        load_weights(net, record, weights_path, raw)
    if not (record.pretrained and num_classes == record.num_classes):
        _init_new_head(net)
    if net_chans != record.in_chans:
        _adapt_stem(net.get_submodule(record.first_conv), net_chans)
    model = MedtlClassifier(net, record, in_chans=in_chans, channel_mapping=mapping)
    if spatial_dims == 3 and record.spatial_dims == 2:

        return convert_to_3d(model, method=conversion_3d, depth=depth)
    if spatial_dims == 3 and conversion_3d != "inflate":
        log.info("conversion_3d=%s ignored: '%s' is natively 3D", conversion_3d, record.name)
    return model


def _init_new_head(net: nn.Module) -> None:
    """A new classifier starts near zero: weights N(0, 0.01), bias 0 (the pretrained head is kept).

    timm's EfficientNet/MobileNet init draws a new head uniform in ±1/sqrt(num_classes): ±0.71 for 2
    classes instead of ±0.03 for ImageNet's 1000. Behind BatchNorm'd 1280-d features that gave
    first-step logits with std ~10 and a cross-entropy of 5-7 on a 2-class task, which AdamW then spent
    the first epochs undoing (AdrenalMNIST3D epoch-1 loss 5.0 -> 0.60 with this init). A small head is
    the usual fine-tuning start (e.g. MAE/DeiT heads at std 0.01-0.02).
    """
    head = net.get_classifier() if hasattr(net, "get_classifier") else None
    if isinstance(head, nn.Linear):
        nn.init.normal_(head.weight, std=0.01)
        if head.bias is not None:
            nn.init.zeros_(head.bias)


def _validate(num_classes, in_chans, spatial_dims, channel_mapping, layout, conversion_3d) -> None:
    def bad(param: str, valid: str, got) -> ConfigError:
        return ConfigError(f"The '{param}' parameter of create_encoder must be {valid}. Got {got!r} instead.")

    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 0:
        raise bad("num_classes", "an int >= 0", num_classes)
    if not isinstance(in_chans, int) or isinstance(in_chans, bool) or in_chans < 1:
        raise bad("in_chans", "an int >= 1", in_chans)
    if spatial_dims not in (2, 3):
        raise bad("spatial_dims", "2 or 3", spatial_dims)
    if channel_mapping not in CHANNEL_MAPPINGS:
        raise bad("channel_mapping", f"one of {CHANNEL_MAPPINGS}", channel_mapping)
    if layout != "auto" and layout not in LAYOUTS:
        raise bad("layout", f"'auto' or one of {LAYOUTS}", layout)
    if conversion_3d not in CONVERSIONS_3D:
        raise bad("conversion_3d", f"one of {CONVERSIONS_3D}", conversion_3d)


def _adapt_stem(conv: nn.Module, chans: int) -> None:
    """Give the stem conv ``chans`` input channels (2D or 3D kernels), as timm's
    ``adapt_input_conv``: 1 channel = sum of the filters; N channels = filters repeated
    cyclically and rescaled by ``old / N`` so the activation scale is kept."""
    w = conv.weight.data
    old = w.shape[1]
    if chans == 1:
        new = w.sum(1, keepdim=True)
    else:
        reps = -(-chans // old)
        new = w.repeat(1, reps, *([1] * (w.ndim - 2)))[:, :chans] * (old / chans)
    conv.weight = nn.Parameter(new)
    conv.in_channels = chans
