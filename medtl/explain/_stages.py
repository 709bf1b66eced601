"""Stages of a network for the cascading randomisation test (private).

A *stage* is a group of parametrised modules that the cascade re-initialises together.
Stages are derived from module names, so any network works, without layer names from the
user: a module's stage is its dotted name cut after the first numeric part
(``net.blocks.4.1.conv_dw`` -> ``net.blocks.4``, ``features.3.0`` -> ``features.3``) or,
without one, the module itself (``net.conv_head``). A stage made only of normalisation
layers joins the stage before it (``bn2`` goes with ``conv_head``), and the encoder
contract's ``classifier_layer`` is always the top stage.

An ensemble (a module holding its models in a ``members`` ``ModuleList``, as
:class:`medtl.models.ensemble.EnsembleClassifier` does) is staged by its members' own stages,
each step re-initialising that stage in every member: the first step randomises all the
members' classifiers, not the whole of one member.
"""

from __future__ import annotations

import re

import torch
from torch import nn

__all__ = ["cascade_stages", "ensemble_members", "randomise"]

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm,
          nn.modules.instancenorm._InstanceNorm)


def ensemble_members(model: nn.Module) -> nn.ModuleList | None:
    """The ``members`` of the first ensemble inside ``model`` (itself, or wrapped, e.g. by a
    :class:`~medtl.models.heads.TaskView`), when it has two or more; else ``None``."""
    for module in model.modules():
        members = getattr(module, "members", None)
        if isinstance(members, nn.ModuleList) and len(members) > 1:
            return members
    return None


def cascade_stages(model: nn.Module) -> list[tuple[str, list[nn.Module]]]:
    """Stages, top (classifier) first: ``[(name, [modules...]), ...]``.

    An ensemble's stages are its members' (named as in one member, ``(xN members)`` added),
    each holding that stage of every member, when the members share one architecture.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
        >>> [name for name, _ in cascade_stages(net)]            # doctest: +SKIP
        ['3', '0']
    """
    members = ensemble_members(model)
    if members is not None:
        per = [cascade_stages(m) for m in members]
        if all([n for n, _ in p] == [n for n, _ in per[0]] for p in per):
            return [(f"{name} (x{len(per)} members)", [m for p in per for m in p[i][1]])
                    for i, (name, _) in enumerate(per[0])]
    head = getattr(model, "classifier_layer", None)
    head_ids = {id(m) for m in head.modules()} if isinstance(head, nn.Module) else set()
    stages: list[tuple[str, list[nn.Module]]] = []
    head_modules: list[nn.Module] = []
    for name, module in model.named_modules():
        if not any(True for _ in module.parameters(recurse=False)):
            continue
        if id(module) in head_ids:
            head_modules.append(module)
            continue
        key = _stage_key(name)
        if stages and stages[-1][0] == key:
            stages[-1][1].append(module)
        else:
            stages.append((key, [module]))
    merged: list[tuple[str, list[nn.Module]]] = []
    for key, modules in stages:
        if merged and all(isinstance(m, _NORMS) for m in modules):
            merged[-1][1].extend(modules)
        else:
            merged.append((key, modules))
    out = list(reversed(merged))
    if head_modules:
        out.insert(0, (_head_name(model, head), head_modules))
    return out


def randomise(modules: list[nn.Module], generator: torch.Generator) -> None:
    """Re-initialise ``modules`` in place: ``reset_parameters()`` where a module has one
    (the initialisation it was created with), else each own parameter ~ N(0, its std)."""
    seed = int(torch.randint(0, 2 ** 31 - 1, (1,), generator=generator))
    cuda = sorted({p.device.index or 0 for m in modules for p in m.parameters()
                   if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda), torch.no_grad():  # the global RNG is left as it was
        torch.manual_seed(seed)
        for module in modules:
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()
                continue
            for p in module.parameters(recurse=False):
                std = float(p.detach().float().std()) if p.numel() > 1 else 0.02
                p.normal_(0.0, std if std > 0 else 0.02)


def _stage_key(name: str) -> str:
    parts = name.split(".")
    for i, part in enumerate(parts):
        if re.fullmatch(r"\d+", part):
            return ".".join(parts[: i + 1])
    return name


def _head_name(model: nn.Module, head: nn.Module) -> str:
    return next((n for n, m in model.named_modules() if m is head), "classifier") or "classifier"
