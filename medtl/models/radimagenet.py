"""RadImageNet weights (Mei et al., Radiology: AI 2022) from a file you supply.

The weights cannot be fetched automatically (Google Drive, by request), so every record
has source ``local``: pass the file as ``model.weights_path`` and, optionally, its key
layout as ``model.layout`` (``auto`` detects it from the tensor names):

``radimagenet_torch`` — the authors' own PyTorch files (ResNet50, DenseNet121, InceptionV3).
    Saved from ``Backbone.backbone = nn.Sequential(*list(torchvision_model.children())[:k])``
    (BMEII-AI/RadImageNet ``pytorch_example.ipynb``), keys ``backbone.0.*``, ``backbone.1.*``,
    ``backbone.4.*``-``backbone.7.*`` for ResNet50; renamed onto timm's ``resnet50``,
    ``densenet121`` and ``inception_v3`` (torchvision-compatible names) by
    :func:`medtl.models._keymaps.radimagenet_torch_to_timm`.
``radimagenet_keras`` — the Keras-faithful ResNet50 conversion of
    ``RadImageNet-ResNet50_notop.h5`` (github.com/Warvito/radimagenet-models): conv biases,
    stride in the first 1x1 conv, BN eps 1.001e-5; built by
    :class:`medtl.models._keras_resnet.KerasResNet50`.
``radimagenet_hf`` — the Hugging Face mirror of that conversion used by MONAI's perceptual
    loss: huggingface.co/MONAI/checkpoints, file ``RadImageNet-ResNet50_notop.pth``, loaded by
    github.com/Project-MONAI/perceptual-models ``radimagenet/resnet.py`` into the same
    Keras-style ResNet50 (plain state dict, same tensor names as ``radimagenet_keras``).

Preprocessing (the upstream sources disagree; each record follows how its weights were
used by their authors, and says where that comes from):

* Keras weights: the authors' Keras scripts (e.g. ``acl/acl_train.py``) use
  ``ImageDataGenerator(rescale=1./255, preprocessing_function=imagenet_utils.preprocess_input)``.
  ``preprocess_input`` defaults to Caffe mode (RGB->BGR, subtract the ImageNet mean in
  0-255 units, no std) and Keras runs ``preprocessing_function`` before ``rescale``, so the
  network saw BGR ``x/255 - (0.406, 0.458, 0.485)``. MONAI's
  ``RadImageNetPerceptualSimilarity`` does the same (RGB->BGR, subtract
  ``[0.406, 0.456, 0.485]`` from [0, 1] input). Record: BGR, mean = ImageNet mean (RGB
  order), std = 1.
* The authors' PyTorch demo reads images with ``cv2.imread`` (BGR) and feeds
  ``(image - 127.5) * 2 / 255``, i.e. [-1, 1], without mean subtraction. No PyTorch training
  code is published, so the demo is the only evidence. Record: BGR, mean = std = 0.5.

Grey scans are repeated to three channels (order is then irrelevant); 3-channel data is
taken as RGB and, for BGR weights, the stem's input channels are reversed on load.

Inception-ResNet-v2 ("IRV2") is published only as a Keras ``.h5`` file; no PyTorch
conversion with a known layout exists, so it has no record here.

Example:
    >>> model = create_encoder("radimagenet_resnet50", weights_path="resnet50_torch.pt",
    ...                        layout="auto", num_classes=2)        # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses

from medtl.errors import ConfigError
from medtl.models._registry import WeightRecord, get_record, register, register_alias

__all__ = ["FAMILIES", "record_for_layout"]

_NB = "github.com/BMEII-AI/RadImageNet/blob/main/pytorch_example.ipynb (createDataset: cv2.imread, (x-127.5)*2/255)"
_KERAS = ("github.com/BMEII-AI/RadImageNet/blob/main/acl/acl_train.py (ImageDataGenerator(rescale=1./255, "
          "preprocessing_function=imagenet_utils.preprocess_input), Caffe mode); MONAI "
          "losses/perceptual.py RadImageNetPerceptualSimilarity (RGB->BGR, subtract [0.406, 0.456, 0.485])")
_LICENSE = "MIT (BMEII-AI/RadImageNet repository); RSNA AI atlas card lists CC-BY-4.0"
_CAFFE_MEAN = (123.68 / 255, 116.779 / 255, 103.939 / 255)  # RGB order, [0, 1] units

_COMMON = dict(source="local", license=_LICENSE, channel_order="BGR", num_classes=0,
               tags=("radimagenet", "medical"))

_TORCH = {  # architecture: (first conv, classifier, feature layer)
    "resnet50": ("conv1", "fc", "layer4"),
    "densenet121": ("features.conv0", "classifier", "features.norm5"),
    "inception_v3": ("Conv2d_1a_3x3.conv", "fc", "Mixed_7c"),
}
for _arch, (_conv, _cls, _feat) in _TORCH.items():
    register(WeightRecord(
        name=f"{_arch}.radimagenet_torch", architecture=_arch, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
        input_size=(3, 224, 224), value_scaling="BGR, (x - 127.5) * 2 / 255 on 0-255 pixels, i.e. [-1, 1]",
        preprocessing_source=_NB, first_conv=_conv, classifier=_cls, feature_layer=_feat,
        layout="radimagenet_torch",
        description=f"RadImageNet {_arch} (authors' PyTorch file, keys backbone.N.*); pass model.weights_path",
        **_COMMON))

_KERAS_COMMON = dict(architecture="keras_resnet50", builder="keras_resnet50", mean=_CAFFE_MEAN,
                     std=(1.0, 1.0, 1.0), input_size=(3, 256, 256),
                     value_scaling="BGR, Caffe mean subtracted on 0-255 pixels, then / 255 (no std)",
                     preprocessing_source=_KERAS, first_conv="conv1", classifier="fc", feature_layer="layer4")
register(WeightRecord(
    name="keras_resnet50.radimagenet_keras", layout="radimagenet_keras",
    description="RadImageNet ResNet50, Keras-faithful conversion of RadImageNet-ResNet50_notop.h5 "
                "(Warvito/radimagenet-models); pass model.weights_path",
    **_KERAS_COMMON, **_COMMON))
register(WeightRecord(
    name="keras_resnet50.radimagenet_hf", layout="radimagenet_hf",
    **_KERAS_COMMON, **{**_COMMON, "source": "url"},
    location="https://huggingface.co/MONAI/checkpoints/resolve/main/RadImageNet-ResNet50_notop.pth",
    description="RadImageNet ResNet50 (Keras-style) from the Hugging Face mirror MONAI/checkpoints; "
                "downloaded into MEDTL_WEIGHTS_DIR, or pass model.weights_path"))

FAMILIES: dict[str, dict[str, str]] = {
    "radimagenet_resnet50": {"radimagenet_torch": "resnet50.radimagenet_torch",
                             "radimagenet_keras": "keras_resnet50.radimagenet_keras",
                             "radimagenet_hf": "keras_resnet50.radimagenet_hf"},
    "radimagenet_densenet121": {"radimagenet_torch": "densenet121.radimagenet_torch"},
    "radimagenet_inception_v3": {"radimagenet_torch": "inception_v3.radimagenet_torch"},
}
for _alias, _layouts in FAMILIES.items():
    register_alias(_alias, _layouts["radimagenet_torch"])


def record_for_layout(record: WeightRecord, layout: str) -> WeightRecord:
    """The record of the same RadImageNet network published in ``layout``.

    Raises:
        ConfigError: that network is not published in that layout.
    """
    for family, layouts in FAMILIES.items():
        if record.name in layouts.values():
            if layout in layouts:
                return get_record(layouts[layout])
            raise ConfigError(f"The 'layout' parameter of create_encoder (model.layout) must be one of "
                              f"{sorted(layouts)} for '{family}'. Got {layout!r} instead.")
    return dataclasses.replace(record)
