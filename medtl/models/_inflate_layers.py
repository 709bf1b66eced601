"""Private 3D layers and the module-by-module 2D -> 3D converter behind :mod:`medtl.models.inflate`.

Two ways to turn a 2D convolution into a 3D one:

* ``inflate`` (I3D, Carreira & Zisserman 2017): the 2D kernel ``(O, I, k, k)`` is repeated
  ``k`` times along depth and divided by ``k``. Depth padding *replicates* the border slice
  (height/width keep the 2D zero padding), so an input that is constant along depth gives
  exactly the 2D activations on every slice, border slices included.
* ``acs`` (Yang et al. 2021, "Reinforcing 2D pretraining with ACS convolutions"): output
  channels are split in three groups whose 2D kernels run on the axial ``(1, k, k)``,
  coronal ``(k, 1, k)`` and sagittal ``(k, k, 1)`` planes. The weight stays the 2D tensor,
  so the parameter count is the 2D one. Written here rather than taken from the ``ACSConv``
  package: it is ~40 lines, and ACSConv's converter knows neither timm's ``Conv2dSame``
  ("same" padding of the TF EfficientNets) nor ``BatchNormAct2d``.

Every other layer is mapped to its 3D twin (BatchNorm, pooling, timm's global pooling);
layers known to be dimension-agnostic stay; anything else raises :class:`ConfigError`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from medtl.errors import ConfigError

__all__: list[str] = []  # private module

# Modules whose forward never looks at the number of spatial dims (children are converted).
_AGNOSTIC_NAMES = {
    # torch leaves and containers
    "Identity", "ReLU", "ReLU6", "SiLU", "GELU", "Hardswish", "Hardsigmoid", "Sigmoid", "Tanh", "LeakyReLU",
    "ELU", "PReLU", "Mish", "Dropout", "Linear", "Flatten", "Sequential", "ModuleList", "ModuleDict",
    # timm blocks checked to use only their children and elementwise ops
    "DropPath", "EfficientNet", "DepthwiseSeparableConv", "InvertedResidual", "ConvBnAct", "ResNet",
    "BasicBlock", "Bottleneck", "DenseNet", "DenseBlock", "DenseLayer", "DenseTransition", "MobileNetV3",
}
_AGNOSTIC_MODULES = ("torch.nn.", "timm.")


def _same_pad(size: int, k: int, s: int, d: int) -> tuple[int, int]:
    """TF "same" padding ``(before, after)`` for one axis (as timm ``pad_same``)."""
    total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
    return total // 2, total - total // 2


def _pad_then(x: torch.Tensor, pads: list[tuple[int, int]], depth_replicate: bool) -> tuple[torch.Tensor, tuple]:
    """Apply ``pads`` (``(before, after)`` for D, H, W) to ``(B, C, D, H, W)``.

    Depth is padded by replicating border slices when ``depth_replicate``; H/W with zeros.
    Symmetric H/W padding is returned for the op itself (cheaper than a copy).
    """
    (d0, d1), (h0, h1), (w0, w1) = pads
    if depth_replicate and (d0 or d1):
        x = F.pad(x, (0, 0, 0, 0, d0, d1), mode="replicate")
        d0 = d1 = 0
    if d0 == d1 and h0 == h1 and w0 == w1:
        return x, (d0, h0, w0)
    return F.pad(x, (w0, w1, h0, h1, d0, d1)), (0, 0, 0)


class InflatedConv3d(nn.Conv3d):
    """I3D-inflated conv: ``(B, C, D, H, W)`` -> ``(B, O, D', H', W')``; depth padded by replication."""

    def __init__(self, conv: nn.Conv2d, same: bool) -> None:
        kh, kw = conv.kernel_size
        kd = 1 if (kh, kw) == (1, 1) else kh
        sh, sw = conv.stride
        dh, dw = conv.dilation
        super().__init__(conv.in_channels, conv.out_channels, (kd, kh, kw), stride=(sh, sh, sw), padding=0,
                         dilation=(dh, dh, dw), groups=conv.groups, bias=conv.bias is not None,
                         device=conv.weight.device, dtype=conv.weight.dtype)
        if isinstance(conv.padding, str):  # padding="same"/"valid" given to torch itself
            same = same or conv.padding == "same"
            ph = pw = 0
        else:
            ph, pw = conv.padding
        self.same = same
        self.pad2d = (ph, pw)
        with torch.no_grad():
            self.weight.copy_(conv.weight.unsqueeze(2).repeat(1, 1, kd, 1, 1) / kd)
            if conv.bias is not None:
                self.bias.copy_(conv.bias)

    def _pads(self, x: torch.Tensor) -> list[tuple[int, int]]:
        if self.same:
            return [_same_pad(n, k, s, d) for n, k, s, d in zip(x.shape[2:], self.kernel_size, self.stride,
                                                                 self.dilation)]
        ph, pw = self.pad2d
        return [(ph, ph), (ph, ph), (pw, pw)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, pad = _pad_then(x, self._pads(x), depth_replicate=True)
        return F.conv3d(x, self.weight, self.bias, self.stride, pad, self.dilation, self.groups)


class ACSConv(nn.Module):
    """ACS conv on ``(B, C, D, H, W)``: the 2D weight ``(O, I/g, k, k)`` applied on three planes.

    Output channels ``[0, a)`` use axial ``(1, k, k)``, ``[a, a+c)`` coronal ``(k, 1, k)`` and
    the rest sagittal ``(k, k, 1)`` kernels (split as evenly as groups allow).
    """

    def __init__(self, conv: nn.Conv2d, same: bool) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.groups = conv.in_channels, conv.out_channels, conv.groups
        self.kernel_size = tuple(conv.kernel_size)
        self.stride = (conv.stride[0],) + tuple(conv.stride)
        self.dilation = (conv.dilation[0],) + tuple(conv.dilation)
        self.same = same or conv.padding == "same"
        self.padding = (0, 0) if isinstance(conv.padding, str) else tuple(conv.padding)
        self.weight = nn.Parameter(conv.weight.detach().clone())
        self.bias = nn.Parameter(conv.bias.detach().clone()) if conv.bias is not None else None
        g = conv.groups
        base, extra = divmod(g if g > 1 else conv.out_channels, 3)
        units = [base + (1 if i < extra else 0) for i in range(3)]  # groups (g > 1) or channels (g = 1)
        per_out = conv.out_channels // g if g > 1 else 1
        self.split = [u * per_out for u in units]
        self.group_split = units if g > 1 else [1, 1, 1]
        self.in_split = [u * (conv.in_channels // g) for u in units] if g > 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs, o0, i0 = [], 0, 0
        kh, kw = self.kernel_size
        for plane, n_out in enumerate(self.split):
            if n_out == 0:
                continue
            w = self.weight[o0:o0 + n_out].unsqueeze(2 + plane)  # (n, I, 1, k, k) / (n, I, k, 1, k) / ...
            b = self.bias[o0:o0 + n_out] if self.bias is not None else None
            xin, groups = x, 1
            if self.in_split is not None:
                xin = x[:, i0:i0 + self.in_split[plane]]
                groups = self.group_split[plane]
                i0 += self.in_split[plane]
            k3 = w.shape[2:]
            if self.same:
                pads = [_same_pad(n, k, s, d) for n, k, s, d in zip(x.shape[2:], k3, self.stride, self.dilation)]
            else:
                p = (self.padding[0], self.padding[0], self.padding[1])
                pads = [(pi if ki > 1 else 0,) * 2 for pi, ki in zip(p, k3)]
            xin, pad = _pad_then(xin, pads, depth_replicate=False)
            outs.append(F.conv3d(xin, w, b, self.stride, pad, self.dilation, groups))
            o0 += n_out
        return torch.cat(outs, dim=1)


class BatchNormAct3d(nn.BatchNorm3d):
    """timm ``BatchNormAct2d`` for volumes: BatchNorm3d, then its ``drop`` and ``act`` (same state keys)."""

    def __init__(self, bn: nn.BatchNorm2d) -> None:
        super().__init__(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                         **_factory(bn))
        self.load_state_dict(bn.state_dict())
        self.drop = bn.drop
        self.act = bn.act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


class Pool3d(nn.Module):
    """Max/avg pooling with a cubic kernel; depth padded by replication (inflation-exact)."""

    def __init__(self, pool: nn.MaxPool2d | nn.AvgPool2d) -> None:
        super().__init__()
        two = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
        (kh, kw), (sh, sw), (ph, pw) = two(pool.kernel_size), two(pool.stride or pool.kernel_size), two(pool.padding)
        self.kind = "max" if isinstance(pool, nn.MaxPool2d) else "avg"
        self.kernel_size, self.stride, self.pad2d = (kh, kh, kw), (sh, sh, sw), (ph, pw)
        self.ceil_mode = pool.ceil_mode
        self.dilation = two(pool.dilation)[0] if self.kind == "max" else 1
        self.count_include_pad = getattr(pool, "count_include_pad", True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ph, pw = self.pad2d
        short = max(self.kernel_size[0] - (x.shape[2] + 2 * ph), 0)  # too few slices left: repeat the last
        if ph or short:
            x = F.pad(x, (0, 0, 0, 0, ph, ph + short), mode="replicate")
        if self.kind == "max":
            return F.max_pool3d(x, self.kernel_size, self.stride, (0, ph, pw), self.dilation, self.ceil_mode)
        return F.avg_pool3d(x, self.kernel_size, self.stride, (0, ph, pw), self.ceil_mode, self.count_include_pad)


class GlobalPool3d(nn.Module):
    """timm ``SelectAdaptivePool2d`` for volumes: ``(B, C, D, H, W)`` -> ``(B, C)`` (or ``(B, C, 1, 1, 1)``)."""

    def __init__(self, pool_type: str = "avg", flatten: bool = True) -> None:
        super().__init__()
        pool_type = (pool_type or "").lower().replace("fast", "") or ("avg" if pool_type else "")
        if pool_type not in ("", "avg", "max", "avgmax", "catavgmax"):
            raise ConfigError(f"Global pool type {pool_type!r} has no 3D version; use avg, max, avgmax or catavgmax.")
        self.pool_type, self.flatten = pool_type, flatten

    def is_identity(self) -> bool:
        return not self.pool_type

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool_type:
            dims = tuple(range(2, x.ndim))
            avg = x.mean(dims, keepdim=True)
            mx = x.amax(dims, keepdim=True) if "max" in self.pool_type else None
            x = {"avg": avg, "max": mx}.get(self.pool_type)
            if x is None:
                x = 0.5 * (avg + mx) if self.pool_type == "avgmax" else torch.cat([avg, mx], 1)
        return x.flatten(1) if self.flatten else x


def _factory(bn: nn.Module) -> dict:
    """``device``/``dtype`` of a BatchNorm's statistics, for its 3D twin."""
    t = bn.running_mean if bn.running_mean is not None else bn.weight
    return {"device": t.device, "dtype": t.dtype} if t is not None else {}


def _global_pool(m: nn.Module) -> GlobalPool3d:
    flatten = isinstance(getattr(m, "flatten", None), nn.Flatten) or getattr(getattr(m, "pool", None), "flatten", False)
    return GlobalPool3d(m.pool_type, flatten=bool(flatten))


def _convert_leaf(m: nn.Module, method: str) -> nn.Module | None:
    """3D replacement for one module, or ``None`` when it has none."""
    from timm.layers import BatchNormAct2d, SelectAdaptivePool2d

    if isinstance(m, SelectAdaptivePool2d):
        return _global_pool(m)
    if isinstance(m, nn.Conv2d):
        same = type(m).__name__ == "Conv2dSame"
        if type(m) is not nn.Conv2d and not same:
            return None
        if method == "acs" and m.kernel_size != (1, 1):
            return ACSConv(m, same)
        return InflatedConv3d(m, same)
    if isinstance(m, BatchNormAct2d):
        return BatchNormAct3d(m)
    if type(m) is nn.BatchNorm2d:
        bn = nn.BatchNorm3d(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats, **_factory(m))
        bn.load_state_dict(m.state_dict())
        return bn
    if type(m) in (nn.MaxPool2d, nn.AvgPool2d):
        return Pool3d(m)
    if type(m) is nn.AdaptiveAvgPool2d:
        return nn.AdaptiveAvgPool3d((1, *nn.modules.utils._pair(m.output_size)))  # same feature count as 2D
    if type(m) is nn.AdaptiveMaxPool2d:
        return nn.AdaptiveMaxPool3d((1, *nn.modules.utils._pair(m.output_size)))
    return None


def _is_agnostic(m: nn.Module) -> bool:
    return type(m).__name__ in _AGNOSTIC_NAMES and type(m).__module__.startswith(_AGNOSTIC_MODULES)


def convert_modules(net: nn.Module, method: str, prefix: str = "") -> None:
    """Replace every 2D layer of ``net`` in place by its 3D version (``method``: inflate or acs).

    Raises:
        ConfigError: naming the first module whose type has no known 3D behaviour.
    """
    for name, child in list(net.named_children()):
        path = f"{prefix}{name}"
        new = _convert_leaf(child, method)
        if new is not None:
            setattr(net, name, new)
        elif _is_agnostic(child):
            convert_modules(child, method, prefix=f"{path}.")
        elif not isinstance(child, (InflatedConv3d, ACSConv, BatchNormAct3d, Pool3d, GlobalPool3d, nn.BatchNorm3d,
                                    nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool3d)):
            raise ConfigError(
                f"Cannot convert module '{path}' of type {type(child).__module__}.{type(child).__name__} to 3D "
                f"(model.conversion_3d={method}): its 3D behaviour is unknown. Supported: timm ResNet, DenseNet, "
                "EfficientNet/MobileNetV2 (without squeeze-excite) built from Conv2d, BatchNorm2d and pooling. "
                "Use model.conversion_3d=slices or channels, which keep the 2D network as it is.")
