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
from medtl.models.heads import MultiTaskHead

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

        heads: multi-task members: each member's :class:`~medtl.models.heads.MultiTaskHead` (its
            regression heads may carry their own mean and std). The ensemble then averages every
            head's *activated* output over the members (class and label probabilities, regression
            values in the target's units) and returns the raw outputs of ``head`` that give those
            means back: ``head.activate(ensemble(x))`` is the members' mean.
        head: with ``heads``, the ensemble's head (same tasks; its regression std must be > 0).

    The encoder metadata that readers of a checkpoint look for (``weights_record``,
    ``in_chans``, ``num_classes``, ``channel_mapping``) is the first member's.
    """

    def __init__(self, members: Sequence[nn.Module], *, tta: bool = False,
                 heads: Sequence[MultiTaskHead] | None = None, head: MultiTaskHead | None = None) -> None:
        super().__init__()
        members = list(members)
        if not members:
            raise ConfigError("The 'members' parameter of EnsembleClassifier must hold at least one model. Got 0 "
                              "instead.")
        self.members = nn.ModuleList(members)
        self.tta = bool(tta)
        self.heads, self.head = (list(heads), head) if heads is not None else (None, None)
        if self.heads is not None:
            layout = [(h.name, h.kind, h.n_outputs) for h in (head.heads if head is not None else [])]
            bad = [i for i, h in enumerate(self.heads) if [(x.name, x.kind, x.n_outputs) for x in h.heads] != layout]
            if len(self.heads) != len(members) or bad or any(
                    h.kind == "regression" and not h.std > 0 for h in head.heads):
                raise ConfigError(f"A multi-task EnsembleClassifier needs one head per member ({len(members)} members, "
                                  f"{len(self.heads)} heads), each with the tasks of 'head' {layout} "
                                  f"(members {bad} differ), and regression std > 0 in 'head'.")
        first = members[0]
        for name in ("weights_record", "in_chans", "num_classes", "channel_mapping"):
            if hasattr(first, name):
                setattr(self, name, getattr(first, name))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.heads is not None:
            return self._tasks(x)
        total = None
        for m in self.members:
            p = m(x).float().softmax(-1)
            if self.tta:
                p = 0.5 * (p + m(torch.flip(x, dims=(-1,))).float().softmax(-1))
            total = p if total is None else total + p
        return torch.log((total / len(self.members)).clamp_min(_FLOOR))

    def _tasks(self, x: torch.Tensor) -> torch.Tensor:
        total = None
        for m, h in zip(self.members, self.heads):
            a = torch.cat(list(h.activate(m(x)).values()), 1)
            if self.tta:
                a = 0.5 * (a + torch.cat(list(h.activate(m(torch.flip(x, dims=(-1,)))).values()), 1))
            total = a if total is None else total + a
        mean = total / len(self.members)
        raw = []
        for spec in self.head.heads:
            v = mean[:, self.head.slice(spec.name)]
            if spec.kind in ("binary", "multiclass"):
                raw.append(torch.log(v.clamp_min(_FLOOR)))
            elif spec.kind == "multilabel":
                v = v.clamp(_FLOOR, 1 - _FLOOR)
                raw.append(torch.log(v) - torch.log1p(-v))
            else:
                raw.append((v - spec.mean) / spec.std)
        return torch.cat(raw, 1)
