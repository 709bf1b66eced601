"""Key-renaming functions from published checkpoint layouts to timm module names."""

from __future__ import annotations

import re

import torch

__all__ = ["efficientnet_pytorch_to_timm"]

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
    import timm

    ref = timm.create_model(record.architecture, pretrained=False, num_classes=record.num_classes)
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
