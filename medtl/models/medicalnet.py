"""MedicalNet / Med3D 3D ResNets (Chen, Ma & Zheng 2019) through MONAI's ResNet.

Weights: the published ``resnet_{10,18,34,50,101,152,200}.pth`` (and ``*_23dataset.pth``)
files from github.com/Tencent/MedicalNet, also on huggingface.co/TencentMedicalNet/
MedicalNet-Resnet{depth}. They are user-supplied files (``model.weights_path``): a
``{"state_dict": ...}`` checkpoint whose keys carry the ``module.`` prefix of
``nn.DataParallel`` (stripped on load, see :func:`medtl.models._keymaps.medicalnet_to_monai`).

Architecture: ``monai.networks.nets.resnet.ResNet`` with MedicalNet's settings from MONAI's
``get_medicalnet_pretrained_resnet_args``: shortcut type ``A`` (parameter-free zero-padded
identity) for depths 18 and 34, ``B`` (1x1 conv + BN, conv without bias) for 10, 50, 101,
152 and 200; one input channel; 7x7x7 stem conv with stride 2 in all three axes, as in
MedicalNet's ``models/resnet.py``.

Stride vs dilation: MedicalNet's ResNet runs ``layer3`` with stride 1 and dilation 2 and
``layer4`` with stride 1 and dilation 4 (a segmentation backbone, output stride 8). MONAI's
ResNet uses stride 2 in both instead (output stride 32, as a classifier). The tensors have
the same shapes, so the weights load strictly, but the network computes something
different from what was pretrained: layer3/layer4 kernels see every second voxel of a 2x
(4x) smaller grid instead of a dilated grid, the final feature map is 4x smaller per axis
(``(B, F, D/32, H/32, W/32)`` instead of ``D/8``), and the receptive field per output voxel
grows. Fine-tuning adapts to this; frozen-feature use (linear probing) is the most affected.

Preprocessing (MedicalNet ``datasets/brains18.py``, ``__itensity_normalize_one_volume__``):
z-score per volume with mean/std over the **non-zero** voxels; MedicalNet then filled the
zero (background) voxels with N(0, 1) noise during training. medtl normalises inside the
model (record ``normalization="zscore_nonzero"``) and sets background voxels to 0, the
noise's mean, so evaluation is deterministic. Input: ``(B, 1, D, H, W)`` in [0, 1].

Example:
    >>> m = create_encoder("medicalnet_resnet10", spatial_dims=3, pretrained=False, num_classes=2)
    >>> m(torch.rand(1, 1, 16, 32, 32)).shape
    torch.Size([1, 2])
"""

from __future__ import annotations


from medtl.models._monai_resnet import MonaiResNetEncoder
from medtl.models._registry import WeightRecord, register

__all__ = ["DEPTHS", "MedicalNetResNet", "build_medicalnet"]

# depth: (block, layers) as in MedicalNet models/resnet.py
DEPTHS = {10: ("basic", [1, 1, 1, 1]), 18: ("basic", [2, 2, 2, 2]), 34: ("basic", [3, 4, 6, 3]),
          50: ("bottleneck", [3, 4, 6, 3]), 101: ("bottleneck", [3, 4, 23, 3]),
          152: ("bottleneck", [3, 8, 36, 3]), 200: ("bottleneck", [3, 24, 36, 3])}


def _monai_resnet():
    from monai.networks.nets.resnet import ResNet

    return ResNet


class MedicalNetResNet(MonaiResNetEncoder):
    """MONAI's 3D ResNet with MedicalNet's settings behind medtl's encoder contract.

    Tensor names are MONAI's (``conv1``, ``bn1``, ``layer1.0.conv1``, ``downsample.0``,
    ``fc``), identical to MedicalNet's without ``module.``.

    Shapes: ``forward_features`` ``(B, C, D, H, W)`` -> ``(B, F, D/32, H/32, W/32)``;
    ``forward_head`` -> ``(B, num_classes)`` or pooled ``(B, F)`` with ``pre_logits=True``.
    """

    def __init__(self, depth: int, num_classes: int = 2, in_chans: int = 1, drop_rate: float = 0.0) -> None:
        super().__init__()
        from monai.networks.nets.resnet import get_medicalnet_pretrained_resnet_args

        block, layers = DEPTHS[depth]
        bias_downsample, shortcut = get_medicalnet_pretrained_resnet_args(depth)
        body = _monai_resnet()(block, layers, [64, 128, 256, 512], spatial_dims=3, n_input_channels=in_chans,
                               conv1_t_size=7, conv1_t_stride=2, shortcut_type=shortcut,
                               bias_downsample=bias_downsample, feed_forward=False)
        self.depth, self.shortcut_type = depth, shortcut
        self._adopt(body, num_features=512 * (4 if block == "bottleneck" else 1), num_classes=num_classes,
                    drop_rate=drop_rate)


def build_medicalnet(record: WeightRecord, *, num_classes: int, in_chans: int, drop_rate: float) -> MedicalNetResNet:
    """The :class:`MedicalNetResNet` for ``record.architecture`` (``"medicalnet_resnet<depth>"``)."""
    depth = int(record.architecture.rsplit("resnet", 1)[1])
    return MedicalNetResNet(depth, num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate)


for _depth in DEPTHS:
    _files = f"resnet_{_depth}.pth" + (f" or resnet_{_depth}_23dataset.pth" if _depth <= 50 else "")
    register(WeightRecord(
        name=f"medicalnet_resnet{_depth}.med3d",
        architecture=f"medicalnet_resnet{_depth}",
        source="local",
        license="MIT (Tencent/MedicalNet)",
        mean=(0.0,), std=(1.0,),
        normalization="zscore_nonzero",
        input_size=(1, 56, 448, 448),
        channel_order="RGB",
        value_scaling="per-volume z-score over non-zero voxels; background voxels -> 0 "
                      "(MedicalNet filled them with N(0, 1) noise in training)",
        preprocessing_source="github.com/Tencent/MedicalNet datasets/brains18.py "
                             "__itensity_normalize_one_volume__; input_D/H/W defaults in setting.py",
        in_chans=1, spatial_dims=3, num_classes=0,
        first_conv="conv1", classifier="fc", feature_layer="layer4",
        layout="medicalnet", builder="medicalnet",
        description=f"MedicalNet 3D ResNet-{_depth} via MONAI; pass model.weights_path={_files} "
                    f"(github.com/Tencent/MedicalNet or huggingface.co/TencentMedicalNet/MedicalNet-Resnet{_depth})",
        tags=("default", "medicalnet", "medical", "3d"),
    ))
