"""The encoder-contract head shared by medtl's own (non-timm) networks."""

from __future__ import annotations

import torch
from torch import nn


class PooledLinearHead:
    """``forward_head`` / ``forward`` / ``get_classifier`` / ``reset_classifier`` for a network
    that defines ``forward_features``, ``head_pool`` (global average pool), ``drop_rate``,
    ``num_features``, ``num_classes`` and ``fc`` (timm's head contract, cf. ``timm.models.resnet``)."""

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Feature map ``(B, F, *S)`` -> pooled features ``(B, F)`` or logits ``(B, K)``."""
        x = self.head_pool(x).flatten(1)
        if self.drop_rate:
            x = nn.functional.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()
