"""Multi-task heads: one encoder, several named heads (binary, multi-class, multi-label, regression).

A :class:`MultiTaskHead` lays named heads side by side on the encoder's one final linear
layer: head ``t`` owns the output rows ``slice(t)``. A linear head per task on shared pooled
features is exactly a block of rows of one linear layer, so the multi-task network is an
ordinary encoder with ``num_classes = head.n_outputs``: checkpoints, EMA, LoRA merging,
Grad-CAM layers and ``load_checkpoint`` need nothing new. The layout travels in the
checkpoint's ``meta.json["tasks"]`` (:meth:`MultiTaskHead.to_dict`).

Outputs per head (``(B, n)`` rows of the logits ``(B, n_outputs)``):

* ``binary`` (2) / ``multiclass`` (K): logits, softmax over the head's rows;
* ``multilabel`` (L): logits, one sigmoid per label;
* ``regression`` (1): the training-fold standardised value (``(value - mean) / std``);
  :meth:`MultiTaskHead.activate` undoes the standardisation with the stored ``mean``/``std``.
  Its training loss is ``loss``: ``mse`` or ``huber`` (:data:`REGRESSION_LOSSES`).

:class:`TaskView` is the network seen through one head (``(B, C, *S) -> (B, n)``), so
attribution methods explain one task at a time.

Example:
    >>> head = MultiTaskHead([HeadSpec("contrast", "binary", ["no", "yes"]), HeadSpec("age", "regression")])
    >>> head.n_outputs, head.slice("age")
    (3, slice(2, 3, None))
    >>> out = head.activate(torch.tensor([[0.0, 0.0, 1.0]]))
    >>> out["contrast"].tolist(), out["age"].tolist()
    ([[0.5, 0.5]], [[1.0]])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

from medtl.config import REGRESSION_LOSSES  # a regression head's training losses (tasks[].loss)
from medtl.errors import ConfigError

__all__ = ["HEAD_KINDS", "REGRESSION_LOSSES", "HeadSpec", "MultiTaskHead", "TaskView"]

HEAD_KINDS = ("binary", "multiclass", "multilabel", "regression")


@dataclass(frozen=True)
class HeadSpec:
    """One named head.

    Attributes:
        name: the task's name.
        kind: binary, multiclass, multilabel or regression.
        class_names: classes (binary, multiclass) or labels (multilabel); ``[]`` for regression.
        weight: fixed loss weight.
        mean, std: regression: the training-fold statistics the target was standardised with.
        loss: regression: ``mse`` (squared error of the standardised target) or ``huber`` (squared
            within one training SD, linear beyond: twice PyTorch's ``huber_loss`` with ``delta=1``, so
            small errors cost what they cost under ``mse``); ``None`` (classification heads, and
            regression heads of checkpoints that predate the field) means cross-entropy or ``mse``.
    """

    name: str
    kind: str
    class_names: list[str] = field(default_factory=list)
    weight: float = 1.0
    mean: float = 0.0
    std: float = 1.0
    loss: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in HEAD_KINDS:
            raise ConfigError(f"Head '{self.name}' has kind '{self.kind}'; valid kinds are {', '.join(HEAD_KINDS)}.")
        if self.loss is not None and (self.kind != "regression" or self.loss not in REGRESSION_LOSSES):
            raise ConfigError(f"Head '{self.name}' ({self.kind}) has loss {self.loss!r}; a regression head takes one "
                              f"of {', '.join(REGRESSION_LOSSES)} and a classification head none (cross-entropy).")
        if self.kind != "regression" and len(self.class_names) < (1 if self.kind == "multilabel" else 2):
            raise ConfigError(f"Head '{self.name}' ({self.kind}) needs class names (got {self.class_names}).")

    @property
    def n_outputs(self) -> int:
        return 1 if self.kind == "regression" else len(self.class_names)


class MultiTaskHead:
    """Named heads as row blocks of one linear output layer (see the module docstring).

    Args:
        heads: the heads, primary first.
    """

    def __init__(self, heads: Sequence[HeadSpec]) -> None:
        if not heads:
            raise ConfigError("A MultiTaskHead needs at least one head.")
        names = [h.name for h in heads]
        if len(set(names)) != len(names):
            raise ConfigError(f"Head names must be distinct; got {names}.")
        self.heads = list(heads)
        self._slices, lo = {}, 0
        for h in self.heads:
            self._slices[h.name] = slice(lo, lo + h.n_outputs)
            lo += h.n_outputs
        self.n_outputs = lo

    def __repr__(self) -> str:
        return "MultiTaskHead(" + ", ".join(f"{h.name}:{h.kind}[{h.n_outputs}]" for h in self.heads) + ")"

    def __getitem__(self, name: str) -> HeadSpec:
        for h in self.heads:
            if h.name == name:
                return h
        raise KeyError(f"No head '{name}'; heads are {[h.name for h in self.heads]}.")

    @property
    def primary(self) -> HeadSpec:
        return self.heads[0]

    def slice(self, name: str) -> slice:
        """The output rows of head ``name``."""
        return self._slices[name]

    def with_stats(self, stats: dict[str, tuple[float, float]]) -> MultiTaskHead:
        """A copy with regression heads' ``(mean, std)`` set."""
        return MultiTaskHead([replace(h, mean=float(stats[h.name][0]), std=float(stats[h.name][1]))
                              if h.name in stats else h for h in self.heads])

    def split(self, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        """``(B, n_outputs)`` -> ``{name: (B, n)}`` raw head outputs."""
        return {h.name: logits[:, self._slices[h.name]] for h in self.heads}

    def activate(self, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        """``(B, n_outputs)`` logits -> ``{name: (B, n)}``: class probabilities (softmax), label
        probabilities (sigmoid) or the regression value in the target's own units."""
        out = {}
        for h in self.heads:
            z = logits[:, self._slices[h.name]].float()
            if h.kind in ("binary", "multiclass"):
                out[h.name] = z.softmax(-1)
            elif h.kind == "multilabel":
                out[h.name] = z.sigmoid()
            else:
                out[h.name] = z * h.std + h.mean
        return out

    def to_dict(self) -> list[dict]:
        return [asdict(h) for h in self.heads]

    @classmethod
    def from_dict(cls, d: Sequence[dict]) -> MultiTaskHead:
        return cls([HeadSpec(**{k: v for k, v in h.items() if k in HeadSpec.__dataclass_fields__}) for h in d])

    @classmethod
    def from_targets(cls, targets) -> MultiTaskHead:
        """From :class:`medtl.data.tasks.TaskTargets` (the prepared data's ``tasks``)."""
        return cls([HeadSpec(t.name, t.kind, list(t.class_names), float(t.weight), loss=getattr(t, "loss", None))
                    for t in targets])


class TaskView(nn.Module):
    """The network seen through one head: ``(B, C, *S) -> (B, n)`` logits (or the standardised
    regression value), for explaining one task at a time.

    Encoder-contract attributes (``feature_layer``, ``classifier_layer``, ``weights_record``, ...)
    are the wrapped network's, so layer-based methods (Grad-CAM) find the same layers.
    """

    def __init__(self, model: nn.Module, head: MultiTaskHead, name: str) -> None:
        super().__init__()
        self.model = model
        self.rows = head.slice(name)
        self.head = head[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[:, self.rows]

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("model"), name)
