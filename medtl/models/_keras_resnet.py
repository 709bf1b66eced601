"""Keras' ResNet50 in PyTorch, for RadImageNet weights converted from the Keras ``.h5`` files.

Keras ``applications.ResNet50`` (keras/applications/resnet.py) is ResNet v1, not
torchvision's v1.5, so its weights do not fit torchvision/timm ``resnet50``:

* every convolution has a bias (``use_bias=True``), followed by BatchNorm;
* a downsampling block puts its stride in the **first 1x1** convolution (and the shortcut
  1x1), not in the 3x3 one;
* BatchNorm ``epsilon=1.001e-5`` (PyTorch default 1e-5); Keras ``momentum=0.99`` is
  PyTorch ``momentum=0.01``;
* the stem ``ZeroPadding2D(3)`` + 7x7/2 conv and ``ZeroPadding2D(1)`` + 3x3/2 max-pool
  equal PyTorch ``padding=3`` / ``padding=1`` (the pool follows a ReLU, so zero padding and
  PyTorch's -inf padding give the same maximum).

Tensor names follow torchvision (``conv1``, ``bn1``, ``layer1.0.conv1``, ``downsample.0``)
exactly as in the public conversions (github.com/Warvito/radimagenet-models
``radimagenet_models/models/resnet.py``; Project-MONAI/perceptual-models
``radimagenet/resnet.py``, weights on huggingface.co/MONAI/checkpoints), plus ``fc``.

Example:
    >>> net = KerasResNet50(num_classes=2)
    >>> net(torch.rand(1, 3, 64, 64)).shape
    torch.Size([1, 2])
"""

from __future__ import annotations

import torch
from torch import nn

from medtl.models._head import PooledLinearHead

__all__ = ["KerasResNet50"]

_EPS, _MOMENTUM = 1.001e-5, 0.01


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=_EPS, momentum=_MOMENTUM)


class _Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, stride=stride, bias=True)  # Keras: stride here
        self.bn1 = _bn(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=True)
        self.bn2 = _bn(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=True)
        self.bn3 = _bn(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != out:  # Keras block1 always has a conv shortcut
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride=stride, bias=True), _bn(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class KerasResNet50(PooledLinearHead, nn.Module):
    """Keras-faithful ResNet50 with medtl's encoder contract.

    Args:
        num_classes: classes of the linear head (0 = no head, ``forward`` returns features).
        in_chans: input channels of the stem.
        drop_rate: dropout before the head.

    Shapes: ``forward_features`` ``(B, C, H, W)`` -> ``(B, 2048, H/32, W/32)``;
    ``forward_head`` -> ``(B, num_classes)`` or pooled ``(B, 2048)`` with ``pre_logits=True``.
    """

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, 64, 7, stride=2, padding=3, bias=True)
        self.bn1 = _bn(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        layers, inplanes = [], 64
        for planes, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            seq = [_Bottleneck(inplanes, planes, stride)]
            inplanes = planes * 4
            seq += [_Bottleneck(inplanes, planes) for _ in range(blocks - 1)]
            layers.append(nn.Sequential(*seq))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.num_features = 2048
        self.drop_rate = drop_rate
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.num_classes = num_classes
        self.fc: nn.Module = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    @property
    def head_pool(self) -> nn.Module:
        return self.global_pool
