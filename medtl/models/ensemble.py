"""Several trained classifiers as one: the mean of their class probabilities, flip TTA inside.

:class:`EnsembleClassifier` is what ``medtl train`` with ``train.ensemble_folds > 1`` stores
and what ``medtl predict`` and ``medtl export`` load: one ``nn.Module`` over the member
networks. Its output is the *logarithm* of the averaged probabilities, so it is a drop-in
classifier: ``softmax(ensemble(x))`` is the averaged probability itself, a temperature divides
it as it would a single model's logits, and TorchScript / ONNX export it as one graph.

Example:
    >>> import torch
    >>> from torch import nn
    >>> members = [nn.Sequential(nn.Flatten(), nn.Linear(16, 2)) for _ in range(3)]
    >>> ens = EnsembleClassifier(members, tta=True).eval()
    >>> x = torch.rand(4, 1, 4, 4)
    >>> ens(x).softmax(-1).shape
    torch.Size([4, 2])
    >>> torch.allclose(ens(x), ens(torch.flip(x, dims=(-1,))), atol=1e-6)  # TTA inside: flip-invariant
    True
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from medtl.errors import ConfigError

__all__ = ["EnsembleClassifier"]

# the smallest probability kept before the logarithm: the clip of temperature scaling
# (medtl.evaluate.calibration), so softmax(log(p) / T) of an exported graph is exactly the
# temperature-scaled probability the run reports; without a temperature, softmax(log p) gives p
# back within 1e-7
_FLOOR = 1e-7


class EnsembleClassifier(nn.Module):
    """The mean class probability of ``members``: ``(B, C, *S)`` -> ``(B, K)`` log-probabilities.

    Args:
        members: trained classifiers with the same input and classes, each returning logits
            ``(B, K)``.
        tta: average each member's probabilities with those of the left-right flipped input
            (flip along the last axis), as ``medtl.training.predict_proba(..., tta=True)`` does
            for one model. The attribute can be changed after loading (``medtl predict --no-tta``).

    The encoder metadata that readers of a checkpoint look for (``weights_record``,
    ``in_chans``, ``num_classes``, ``channel_mapping``) is the first member's.
    """

    def __init__(self, members: Sequence[nn.Module], *, tta: bool = False) -> None:
        super().__init__()
        members = list(members)
        if not members:
            raise ConfigError("The 'members' parameter of EnsembleClassifier must hold at least one model. Got 0 "
                              "instead.")
        self.members = nn.ModuleList(members)
        self.tta = bool(tta)
        first = members[0]
        for name in ("weights_record", "in_chans", "num_classes", "channel_mapping"):
            if hasattr(first, name):
                setattr(self, name, getattr(first, name))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = None
        for m in self.members:
            p = m(x).float().softmax(-1)
            if self.tta:
                p = 0.5 * (p + m(torch.flip(x, dims=(-1,))).float().softmax(-1))
            total = p if total is None else total + p
        return torch.log((total / len(self.members)).clamp_min(_FLOOR))
