"""MONAI's 3D ``ResNet`` behind medtl's encoder contract (private): the part MedicalNet's and
Astra's I3ResNet encoders share.

The subclass builds a MONAI ``ResNet`` with its own settings and hands it to :meth:`_adopt`,
which takes its modules over directly, so tensor names stay ``conv1``, ``bn1``,
``layer1.0.conv1``, ``downsample.0``, ``fc`` (no prefix) as the published files name them.

Shapes: ``forward_features`` ``(B, C, D, H, W)`` -> ``(B, F, D', H', W')``; ``forward_head``
-> ``(B, num_classes)`` or pooled ``(B, F)`` with ``pre_logits=True``.
"""

from __future__ import annotations

import torch
from torch import nn

from medtl.models._head import PooledLinearHead

__all__ = ["MonaiResNetEncoder"]

_MODULES = ("conv1", "bn1", "act", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool")


class MonaiResNetEncoder(PooledLinearHead, nn.Module):
    """Base of the 3D ResNet encoders built from MONAI's ``ResNet`` (``feed_forward=False``)."""

    def _adopt(self, body: nn.Module, *, num_features: int, num_classes: int, drop_rate: float) -> None:
        for name in _MODULES:
            setattr(self, name, getattr(body, name))
        self.num_features = num_features
        self.drop_rate = drop_rate
        self.num_classes = num_classes
        self.fc: nn.Module = nn.Linear(num_features, num_classes) if num_classes else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.act(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    @property
    def head_pool(self) -> nn.Module:
        return self.avgpool
