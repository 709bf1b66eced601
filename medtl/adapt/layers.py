"""Parameter-efficient layers: LoRA and parallel residual adapters for convs and linears.

Both are weight *parametrizations* (``torch.nn.utils.parametrize``): the host layer keeps its
frozen pretrained weight ``W`` and computes with ``W + delta``, where ``delta`` comes from a few
trainable parameters. Because ``delta`` is linear in the input, it can be merged into ``W``
after training (:func:`merge_adapters`), so a checkpoint is a plain encoder again and loads,
predicts and explains like any other (no extra modules at inference).

* **LoRA** (Hu et al., 2021): ``delta = (alpha / r) * B @ A`` reshaped to ``W``'s shape, with
  ``A`` of shape ``(r, C_in/groups * k * k)`` (so for a conv it spans the whole kernel) and
  ``B`` ``(C_out, r)`` zero-initialised.
* **Residual adapter**, parallel form (Rebuffi, Bilen & Vedaldi, CVPR 2018): a 1x1 conv in
  parallel with the host conv, here with a bottleneck of ``max(1, min(C_out, C_in/groups) //
  reduction)`` channels; ``up`` is zero-initialised. A parallel 1x1 conv equals a delta on the
  centre tap of the host's kernel, so it runs through the host's own padding and stride.

Both start as the identity (``delta = 0``): logits are unchanged before the first step.

Example:
    >>> conv = nn.Conv2d(8, 16, 3, padding=1)
    >>> x = torch.randn(2, 8, 12, 12); before = conv(x)
    >>> add_lora(conv, rank=2, alpha=4.0)
    ['']
    >>> torch.allclose(conv(x), before)
    True
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize

__all__ = ["LoRADelta", "ResidualAdapterDelta", "add_lora", "add_adapters", "merge_adapters",
           "adapter_parameters"]


class LoRADelta(nn.Module):
    """Parametrization ``W -> W + (alpha / rank) * (B @ A).view(W.shape)``.

    Args:
        weight_shape: shape of the host weight, ``(C_out, C_in/groups, *k)`` or ``(C_out, C_in)``.
        rank: the rank ``r`` of the update (capped at ``min(C_out, fan_in)``).
        alpha: scale numerator; the update is scaled by ``alpha / r``.
    """

    def __init__(self, weight_shape: torch.Size | tuple[int, ...], rank: int, alpha: float) -> None:
        super().__init__()
        out, fan_in = int(weight_shape[0]), int(math.prod(weight_shape[1:]))
        r = max(1, min(rank, out, fan_in))
        self.scale = float(alpha) / r
        self.A = nn.Parameter(torch.empty(r, fan_in))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # the LoRA reference init
        self.B = nn.Parameter(torch.zeros(out, r))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + (self.scale * (self.B @ self.A)).view(weight.shape).to(weight.dtype)


class ResidualAdapterDelta(nn.Module):
    """Parametrization adding a bottlenecked 1x1 ``up @ down`` on the centre tap of ``W``.

    Args:
        weight_shape: ``(C_out, C_in/groups, *k)`` (conv) or ``(C_out, C_in)`` (linear).
        reduction: bottleneck width is ``max(1, min(C_out, C_in/groups) // reduction)``.
    """

    def __init__(self, weight_shape: torch.Size | tuple[int, ...], reduction: int) -> None:
        super().__init__()
        out, cin = int(weight_shape[0]), int(weight_shape[1])
        width = max(1, min(out, cin) // reduction)
        self.kernel = tuple(int(k) for k in weight_shape[2:])
        self.down = nn.Parameter(torch.empty(width, cin))
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))
        self.up = nn.Parameter(torch.zeros(out, width))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        delta = self.up @ self.down  # (C_out, C_in/groups): a 1x1 conv
        if self.kernel:
            pads: list[int] = []
            for k in reversed(self.kernel):  # F.pad lists the last dim first
                pads += [(k - 1) // 2, k - 1 - (k - 1) // 2]
            delta = nn.functional.pad(delta.view(*delta.shape, *([1] * len(self.kernel))), pads)
        return weight + delta.to(weight.dtype)


_HOSTS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _hosts(module: nn.Module, exclude: Iterable[nn.Module]) -> Iterator[tuple[str, nn.Module]]:
    skip = {id(m) for m in exclude}
    skipped_prefixes = [n for n, m in module.named_modules() if id(m) in skip]
    for name, m in module.named_modules():
        if any(name == p or name.startswith(p + ".") for p in skipped_prefixes if p) or id(m) in skip:
            continue
        if isinstance(m, _HOSTS) and not parametrize.is_parametrized(m, "weight"):
            yield name, m


def _add(module: nn.Module, make, exclude: Iterable[nn.Module]) -> list[str]:
    names = []
    for name, m in list(_hosts(module, exclude)):
        p = make(m.weight.shape).to(device=m.weight.device)
        parametrize.register_parametrization(m, "weight", p)
        names.append(name)
    return names


def add_lora(module: nn.Module, rank: int = 4, alpha: float = 8.0, *, exclude: Iterable[nn.Module] = ()) -> list[str]:
    """Add LoRA to every conv and linear layer of ``module`` (in place).

    Args:
        module: any module; e.g. the encoder of a :class:`~medtl.models.MedtlClassifier`.
        rank: LoRA rank ``r``; alpha: the update is scaled by ``alpha / r``.
        exclude: modules (and their children) left alone, e.g. the classifier.

    Returns:
        Names (relative to ``module``) of the layers that got LoRA.
    """
    return _add(module, lambda shape: LoRADelta(shape, rank, alpha), exclude)


def add_adapters(module: nn.Module, reduction: int = 8, *, exclude: Iterable[nn.Module] = ()) -> list[str]:
    """Add a parallel residual adapter to every conv and linear layer of ``module`` (in place).

    Returns the names of the adapted layers. See :class:`ResidualAdapterDelta`.
    """
    return _add(module, lambda shape: ResidualAdapterDelta(shape, reduction), exclude)


def adapter_parameters(module: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of every LoRA/adapter parameter in ``module``."""
    for name, p in module.named_parameters():
        if ".parametrizations." in f".{name}" and not name.endswith(".original"):
            yield name, p


def merge_adapters(module: nn.Module) -> int:
    """Fold every LoRA/adapter update into its host weight (in place); returns how many.

    Afterwards the module has the plain layer layout again (same ``state_dict`` keys as
    before :func:`add_lora`/:func:`add_adapters`), so checkpoints load into a fresh encoder.
    """
    n = 0
    for m in list(module.modules()):
        if parametrize.is_parametrized(m, "weight") and isinstance(m, _HOSTS):
            requires_grad = m.parametrizations.weight.original.requires_grad
            with torch.no_grad():
                parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
            m.weight.requires_grad_(requires_grad)
            n += 1
    return n
