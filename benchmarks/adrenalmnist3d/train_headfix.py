"""`medtl train` with the new classifier head re-initialised (normal, std 0.01; bias 0).

Stand-in for a fix that belongs in ``create_encoder`` (medtl/models/encoders.py): timm's
EfficientNet init draws the fresh head uniform in +-1/sqrt(num_classes), i.e. +-0.71 for 2
classes (weight std 0.41 instead of ~0.016 for ImageNet's 1000 classes). With train-mode
BatchNorm features of unit scale the first logits have std ~10 and the first batches a
cross-entropy of 5-7 (measured; see README.md). Usage: same arguments as `medtl train`:

    python benchmarks/adrenalmnist3d/train_headfix.py configs/adrenalmnist3d.yaml --out DIR -q
"""

from __future__ import annotations

import sys

from torch import nn

import medtl.evaluate.runs as runs
from medtl.cli import app

__all__: list[str] = []

_make_model = runs.make_model


def _make_model_small_head(cfg, n_classes: int):
    model = _make_model(cfg, n_classes)
    head = model.classifier_layer  # nn.Linear (B, F) -> (B, K)
    nn.init.normal_(head.weight, std=0.01)
    nn.init.zeros_(head.bias)
    return model


runs.make_model = _make_model_small_head

if __name__ == "__main__":
    sys.argv = ["medtl", "train", *sys.argv[1:]]
    app()
