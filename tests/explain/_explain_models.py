"""Tiny 2D/3D CNNs implementing the encoder contract (``feature_layer``, ``classifier_layer``)
and a blob task they learn in a second; shared by the explain tests."""

from __future__ import annotations

import torch
from torch import nn


class TinyCNN(nn.Module):
    """``(B, 1, *spatial) -> (B, n_classes)``; 2D or 3D; exposes feature/classifier layers.

    ``left_only`` zeroes the right half of the input first, so the logits depend on the
    left half alone (bias-free convolutions keep the right-half features at zero).
    """

    def __init__(self, dims: int = 2, n_classes: int = 2, width: int = 8,
                 left_only: bool = False, feature_channels: int | None = None) -> None:
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        norm = nn.BatchNorm2d if dims == 2 else nn.BatchNorm3d
        pool = nn.AdaptiveAvgPool2d if dims == 2 else nn.AdaptiveAvgPool3d
        out = feature_channels or 2 * width
        bias = not left_only
        self.left_only = left_only
        self.stem = nn.Sequential(conv(1, width, 3, padding=1, bias=bias), norm(width), nn.ReLU())
        self.feature_layer = nn.Sequential(conv(width, out, 3, padding=1, bias=bias), nn.ReLU())
        self.pool = pool(1)
        self.classifier_layer = nn.Linear(out, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.left_only:
            keep = torch.zeros_like(x)
            keep[..., : x.shape[-1] // 2] = 1.0
            x = x * keep
        feats = self.feature_layer(self.stem(x))
        return self.classifier_layer(self.pool(feats).flatten(1))


def blobs(n: int, size: int = 24, seed: int = 0, dims: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Noise images ``(n, 1, *[size] * dims)``, labels ``(n,)`` (1 = a bright cube of side 5
    somewhere) and the cubes' masks ``(n, *spatial)``."""
    g = torch.Generator().manual_seed(seed)
    x = 0.3 * torch.rand(n, 1, *([size] * dims), generator=g)
    y = torch.arange(n) % 2
    masks = torch.zeros(n, *([size] * dims), dtype=torch.bool)
    for i in range(n):
        if y[i]:
            corner = torch.randint(0, size - 5, (dims,), generator=g).tolist()
            box = tuple(slice(c, c + 5) for c in corner)
            x[(i, 0, *box)] = 1.0
            masks[(i, *box)] = True
    return x, y, masks


def trained_blob_model(dims: int = 2, size: int = 24, n: int = 64, epochs: int = 60
                       ) -> tuple[TinyCNN, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A TinyCNN trained on :func:`blobs` (accuracy > 0.9 checked)."""
    torch.manual_seed(0)
    model = TinyCNN(dims=dims)
    x, y, masks = blobs(n, size, dims=dims)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(epochs):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    assert acc > 0.9, f"the test model did not learn the blob task (accuracy {acc:.2f})"
    model.zero_grad(set_to_none=True)
    return model, x, y, masks
