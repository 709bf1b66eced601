"""The encoder contract: one set of methods every medtl encoder offers (2D and 3D).

``forward_features(x)`` -> feature map, ``forward_head(f, pre_logits=...)``, ``reset_classifier(n)``,
``feature_layer`` / ``classifier_layer`` as module objects, and ``weights_record``. See
:mod:`medtl.models.encoders` for how encoders are built.
"""

from __future__ import annotations

import torch
from torch import nn

from medtl.errors import WeightsError
from medtl.models.records import WeightRecord

__all__ = ["EncoderContract", "MedtlClassifier", "zscore_nonzero"]


class EncoderContract:
    """The contract's methods, shared by the 2D :class:`MedtlClassifier` and the 3D models of
    :mod:`medtl.models.inflate`. A subclass provides ``net`` (offering timm's
    ``forward_features``/``forward_head``/``reset_classifier``/``get_classifier``), ``prepare``
    and ``weights_record``."""

    def _map_channels(self, x: torch.Tensor) -> torch.Tensor:
        """A grey channel repeated to the network's ``_net_chans``; any other mismatch is an error."""
        if x.shape[1] != self._net_chans:
            if x.shape[1] != 1:
                raise ValueError(f"model expects {self.in_chans} input channel(s), got a tensor of shape "
                                 f"{tuple(x.shape)}")
            x = x.expand(-1, self._net_chans, *x.shape[2:])
        return x

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


class MedtlClassifier(EncoderContract, nn.Module):
    """A network behind medtl's encoder contract (see module docstring).

    Args:
        net: a timm model, :class:`~medtl.models._keras_resnet.KerasResNet50` or
            :class:`~medtl.models.medicalnet.MedicalNetResNet` (all offer
            ``forward_features``/``forward_head``/``reset_classifier``/``get_classifier``).
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
        x = self._map_channels(x)
        if self.weights_record.normalization == "zscore_nonzero":
            return zscore_nonzero(x)
        return (x - self.mean) / self.std


def zscore_nonzero(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """MedicalNet's normalisation: per sample, z-score with mean/std of the non-zero values;
    zero (background) values become 0. ``(B, C, *S)`` -> same shape."""
    mask = (x > 0).to(x.dtype)
    dims = tuple(range(1, x.ndim))
    n = mask.sum(dims, keepdim=True).clamp_min(1.0)
    mean = (x * mask).sum(dims, keepdim=True) / n
    std = (((x - mean) ** 2 * mask).sum(dims, keepdim=True) / n).sqrt().clamp_min(eps)
    return (x - mean) / std * mask
