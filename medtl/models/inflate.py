"""2D -> 3D: use a pretrained 2D encoder on volumes ``(B, C, D, H, W)`` in [0, 1].

:func:`convert_to_3d` turns a :class:`~medtl.models.encoders.MedtlClassifier` into a model
with the same contract for volumes (``forward``, ``forward_features``, ``forward_head``,
``reset_classifier``, ``num_classes``, ``num_features``, ``feature_layer``,
``classifier_layer``, ``stem``, ``weights_record``, ``prepare``). Four methods:

``inflate``
    I3D (Carreira & Zisserman 2017): every conv kernel repeated along depth and divided by
    its depth, BatchNorm/pooling made 3D, depth padded by replicating border slices. A
    volume constant along depth gives exactly the 2D logits of its slice (eval mode).
    ``forward_features`` -> ``(B, F, d, h, w)``.
``acs``
    ACS convolutions (Yang et al. 2021; the MedMNIST v2 ResNet-18+ACS baseline): a third of
    each conv's 2D kernels run on axial, coronal and sagittal planes. Same parameters as 2D.
    ``forward_features`` -> ``(B, F, d, h, w)``.
``slices``
    The 2D network on every axial slice (batched as ``B*D``), then mean or gated-attention
    pooling over depth (Ilse et al. 2018). ``forward_features`` -> ``(B, F, D, h, w)`` (one
    2D feature map per slice); ``feature_layer`` is the per-slice encoder producing it.
``channels``
    2.5D: the ``D`` slices stacked as input channels (stem adapted with timm
    ``adapt_input_conv``), the rest 2D. Needs ``depth``. ``forward_features`` ->
    ``(B, F, 1, h, w)`` (a depth axis of 1, so Grad-CAM maps broadcast over slices).

Example:
    >>> m2d = create_encoder("tf_efficientnet_lite0", num_classes=2, in_chans=1)
    >>> m3d = convert_to_3d(m2d, "inflate")
    >>> m3d(torch.rand(2, 1, 32, 32, 32)).shape
    torch.Size([2, 2])
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
from torch import nn

from medtl.config import CONVERSIONS_3D
from medtl.errors import ConfigError
from medtl.models._contract import EncoderContract, MedtlClassifier
from medtl.models._inflate_layers import _is_agnostic as _is_agnostic_root
from medtl.models._inflate_layers import convert_modules

__all__ = ["CONVERSIONS_3D", "DEPTH_POOLINGS", "Medtl3DClassifier", "convert_to_3d"]

DEPTH_POOLINGS = ("mean", "attention")


class Medtl3DClassifier(EncoderContract, nn.Module):
    """Base of the 3D models: channel mapping + the weight record's normalisation on volumes.

    Attributes:
        net: the (converted) timm network.
        weights_record: the 2D weight record the model was built from (preprocessing source).
        conversion_3d: ``"inflate"``, ``"acs"``, ``"slices"`` or ``"channels"``.
        depth: fixed number of slices (``channels`` only), else ``None``.
    """

    spatial_dims = 3

    def __init__(self, model2d: MedtlClassifier, conversion: str, depth: int | None = None) -> None:
        super().__init__()
        self.weights_record = model2d.weights_record
        self.in_chans = model2d.in_chans
        self.channel_mapping = model2d.channel_mapping
        self.conversion_3d = conversion
        self.depth = depth
        self._net_chans = model2d._net_chans
        self.register_buffer("mean", model2d.mean.detach().reshape(1, -1, 1, 1, 1).clone(), persistent=False)
        self.register_buffer("std", model2d.std.detach().reshape(1, -1, 1, 1, 1).clone(), persistent=False)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, D, H, W)`` in [0, 1] -> channel-mapped, normalised ``(B, C', D, H, W)``."""
        if x.ndim != 5:
            raise ValueError(f"a 3D model expects volumes (B, C, D, H, W); got a tensor of shape {tuple(x.shape)}")
        return (self._map_channels(x) - self.mean) / self.std


class _VolumeNet(Medtl3DClassifier):
    """``inflate`` / ``acs``: the timm network with its layers made 3D."""

    def __init__(self, model2d: MedtlClassifier, net: nn.Module, conversion: str) -> None:
        super().__init__(model2d, conversion)
        self.net = net

    def reset_classifier(self, num_classes: int) -> None:
        self.net.reset_classifier(num_classes)
        convert_modules(self.net, self.conversion_3d)  # timm builds a fresh 2D global pool


class _PerSlice(nn.Module):
    """The 2D encoder on each axial slice: ``(B, C, D, H, W)`` -> ``(B, F, D, h, w)``."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, d, h, w = x.shape
        f = self.net.forward_features(x.transpose(1, 2).reshape(b * d, c, h, w))  # (B*D, F, h', w')
        return f.reshape(b, d, *f.shape[1:]).transpose(1, 2)


class _GatedAttention(nn.Module):
    """Gated attention over slices (Ilse et al. 2018): ``(B, D, F)`` -> weights ``(B, D)``."""

    def __init__(self, num_features: int, hidden: int = 128) -> None:
        super().__init__()
        self.v, self.u, self.w = nn.Linear(num_features, hidden), nn.Linear(num_features, hidden), nn.Linear(hidden, 1)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return self.w(torch.tanh(self.v(v)) * torch.sigmoid(self.u(v))).squeeze(-1).softmax(-1)


class _SliceNet(Medtl3DClassifier):
    """``slices``: per-slice 2D features, pooled over depth, then the 2D head."""

    def __init__(self, model2d: MedtlClassifier, net: nn.Module, depth_pooling: str) -> None:
        super().__init__(model2d, "slices")
        self.encoder = _PerSlice(net)  # holds the one copy of the 2D net (safetensors refuses shared tensors)
        self.depth_pooling = depth_pooling
        self.attention = _GatedAttention(int(net.num_features)) if depth_pooling == "attention" else None
        self.last_attention: torch.Tensor | None = None  # (B, D) weights of the last forward_head

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.prepare(x))

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """``(B, F, D, h, w)`` -> logits ``(B, K)`` or pooled features ``(B, F)``."""
        if self.attention is None:
            pooled = features.mean(2)  # (B, F, h, w); the 2D head's global average finishes the mean
        else:
            per_slice = features.mean((3, 4)).transpose(1, 2)  # (B, D, F)
            a = self.attention(per_slice)
            self.last_attention = a.detach()
            pooled = (a.unsqueeze(-1) * per_slice).sum(1)[..., None, None]  # (B, F, 1, 1)
        return self.net.forward_head(pooled, pre_logits=pre_logits)

    @property
    def net(self) -> nn.Module:
        return self.encoder.net

    @property
    def feature_layer(self) -> nn.Module:
        return self.encoder


class _StackedSlices(_PerSlice):
    """2.5D encoder: ``(B, C, D, H, W)`` -> slices as channels -> ``(B, F, 1, h, w)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, d, h, w = x.shape
        return self.net.forward_features(x.transpose(1, 2).reshape(b, d * c, h, w)).unsqueeze(2)


class _ChannelsNet(Medtl3DClassifier):
    """``channels``: ``D`` slices (x ``C`` channels) as the 2D network's input channels."""

    def __init__(self, model2d: MedtlClassifier, net: nn.Module, depth: int) -> None:
        super().__init__(model2d, "channels", depth=depth)
        from timm.models import adapt_input_conv

        rec = model2d.weights_record
        chans = model2d.in_chans
        self._net_chans = chans  # grey data is not repeated to RGB; the stem takes the slices
        if chans != len(rec.mean):  # one averaged mean/std for slices of grey data
            self.mean, self.std = self.mean.mean().reshape(1, 1, 1, 1, 1), self.std.mean().reshape(1, 1, 1, 1, 1)
        conv = net.get_submodule(rec.first_conv)
        if not isinstance(conv, nn.Conv2d):
            raise ConfigError(f"model.conversion_3d=channels needs a Conv2d stem; '{rec.first_conv}' is "
                              f"{type(conv).__name__}.")
        # adapt_input_conv: summed for 1 channel, RGB filters repeated and rescaled by 3 / n for n > 3
        weight = conv.weight.data
        if weight.shape[1] != 3:  # a stem already collapsed ("sum"): spread it back over 3 filters
            weight = weight.sum(1, keepdim=True).repeat(1, 3, 1, 1) / 3
        conv.weight = nn.Parameter(adapt_input_conv(chans * depth, weight))
        conv.in_channels = chans * depth
        self.encoder = _StackedSlices(net)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 5 and x.shape[2] != self.depth:
            raise ValueError(f"this 2.5D model stacks {self.depth} slices as channels; got a volume of shape "
                             f"{tuple(x.shape)}. Resize volumes to depth {self.depth} (data.image_size).")
        return self.encoder(self.prepare(x))

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """``(B, F, 1, h, w)`` -> logits ``(B, K)`` or pooled features ``(B, F)``."""
        return self.net.forward_head(features[:, :, 0], pre_logits=pre_logits)

    @property
    def net(self) -> nn.Module:
        return self.encoder.net

    @property
    def feature_layer(self) -> nn.Module:
        return self.encoder


def convert_to_3d(model2d: MedtlClassifier, method: Literal["inflate", "acs", "slices", "channels"] = "inflate",
                  *, depth: int | None = None,
                  depth_pooling: Literal["mean", "attention"] = "mean") -> Medtl3DClassifier:
    """A 3D model with the encoder contract, built from a 2D :class:`MedtlClassifier`.

    ``model2d`` is copied, never modified. Its weights (pretrained or not), classifier and
    preprocessing carry over.

    Args:
        model2d: from :func:`~medtl.models.create_encoder` with ``spatial_dims=2``.
        method: ``inflate`` (I3D), ``acs``, ``slices`` or ``channels`` (see module docstring).
        depth: number of slices ``D``; required for ``channels`` (the stem gets ``C * D`` inputs).
        depth_pooling: ``slices`` only: ``mean`` or gated ``attention`` over slices.

    Returns:
        A :class:`Medtl3DClassifier` taking ``(B, C, D, H, W)`` in [0, 1] and returning logits
        ``(B, K)``.

    Raises:
        ConfigError: unknown method, missing ``depth`` for ``channels``, or a layer type with no
            known 3D version (the message names the module).

    Example:
        >>> m3d = convert_to_3d(create_encoder("resnet18", pretrained=False), "acs")
        >>> m3d.forward_features(torch.rand(1, 1, 16, 32, 32)).shape
        torch.Size([1, 512, 1, 1, 1])
    """
    if method not in CONVERSIONS_3D:
        raise ConfigError(f"The 'method' parameter of convert_to_3d (model.conversion_3d) must be one of "
                          f"{CONVERSIONS_3D}. Got {method!r} instead.")
    if not isinstance(model2d, MedtlClassifier):
        raise ConfigError(f"convert_to_3d needs a 2D MedtlClassifier from create_encoder(..., spatial_dims=2). "
                          f"Got {type(model2d).__name__} instead.")
    net = copy.deepcopy(model2d.net)
    if method in ("inflate", "acs"):
        if not _is_agnostic_root(net):
            raise ConfigError(f"Cannot convert timm {type(net).__name__} ('{model2d.weights_record.architecture}') "
                              f"to 3D with {method}; supported: ResNet, DenseNet, EfficientNet/MobileNetV2. Use "
                              "model.conversion_3d=slices or channels for other architectures.")
        convert_modules(net, method)
        return _VolumeNet(model2d, net, method)
    if method == "slices":
        if depth_pooling not in DEPTH_POOLINGS:
            raise ConfigError(f"The 'depth_pooling' parameter of convert_to_3d must be one of {DEPTH_POOLINGS}. "
                              f"Got {depth_pooling!r} instead.")
        return _SliceNet(model2d, net, depth_pooling)
    if not isinstance(depth, int) or isinstance(depth, bool) or depth < 1:
        raise ConfigError(f"The 'depth' parameter of convert_to_3d must be an int >= 1 for method 'channels' "
                          f"(the number of slices, data.image_size[0]). Got {depth!r} instead.")
    return _ChannelsNet(model2d, net, depth)
