"""Fine-tuning strategies: what trains, at which learning rate, and when.

A :class:`Strategy` plugs into :func:`medtl.training.fit` through four calls::

    model = strategy.prepare(model)                  # freeze / add adapters, once
    groups = strategy.param_groups(model, lr, wd)    # optimizer groups with per-block LRs
    strategy.on_epoch_start(model, epoch)            # each epoch, after model.train()
    model = strategy.finalize(model)                 # merge adapters, unfreeze everything

Blocks are found without layer names from the user: for timm networks from the model's own
``group_matcher(coarse=True)`` (stem, one block per stage, then the head; the same grouping
timm's layer-decay optimizer uses), otherwise from the top-level children. The classifier
(``classifier_layer`` / ``get_classifier()``) is always the last block, the "head".

Frozen means frozen: a BatchNorm whose parameters are all frozen runs in eval mode, so its
running statistics keep their pretrained values (re-estimate them on target data with
``adapt.method: adabn``).

Example:
    >>> from medtl.config import StrategyConfig
    >>> s = make_strategy(StrategyConfig(name="llrd", llrd_decay=0.5))
    >>> model = s.prepare(create_encoder("tf_efficientnet_lite0"))          # doctest: +SKIP
    >>> [g["lr"] for g in s.param_groups(model, 1e-3, 0.01)][-2:]           # doctest: +SKIP
    [0.001, 0.001]
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from medtl.adapt.layers import add_adapters, add_lora, merge_adapters
from medtl.config import StrategyConfig
from medtl.errors import ConfigError

__all__ = ["Block", "Strategy", "make_strategy", "parameter_blocks", "freeze_bn_of_frozen"]


@dataclass
class Block:
    """One block of parameters, ordered from the input (index 0) to the head (last)."""

    name: str
    params: list[tuple[str, nn.Parameter]]


def _net_and_prefix(model: nn.Module) -> tuple[nn.Module, str]:
    net = getattr(model, "net", None)  # MedtlClassifier wraps a timm net
    return (net, "net.") if isinstance(net, nn.Module) else (model, "")


def _head(model: nn.Module) -> nn.Module | None:
    try:
        head = model.classifier_layer
    except AttributeError:
        net, _ = _net_and_prefix(model)
        head = net.get_classifier() if hasattr(net, "get_classifier") else None
    return head if isinstance(head, nn.Module) else None


def parameter_blocks(model: nn.Module) -> list[Block]:
    """The model's parameters grouped into blocks, input to output, the head last.

    Args:
        model: a :class:`~medtl.models.MedtlClassifier`, a timm model, or any module.

    Returns:
        ``[Block(name, [(param_name, param), ...]), ...]``; every parameter appears once.

    Example:
        >>> [b.name for b in parameter_blocks(create_encoder("tf_efficientnet_lite0"))]  # doctest: +SKIP
        ['stem', 'block1', ..., 'block7', 'head']
    """
    named = dict(model.named_parameters())
    head = _head(model)
    head_ids = {id(p) for p in head.parameters()} if head is not None else set()
    net, prefix = _net_and_prefix(model)
    groups: list[tuple[str, list[str]]] = []
    if hasattr(net, "group_matcher"):
        from timm.models import group_parameters

        for gid, names in group_parameters(net, net.group_matcher(coarse=True)).items():
            groups.append(("stem" if gid == 0 else f"block{gid}", [prefix + n for n in names]))
    else:
        for child_name, child in model.named_children():
            groups.append((child_name, [f"{child_name}.{n}" for n, _ in child.named_parameters()]))
    blocks, seen = [], set()
    for gname, names in groups:
        params = [(n, named[n]) for n in names if n in named and id(named[n]) not in head_ids]
        seen.update(n for n in names)
        if params:
            blocks.append(Block(gname, params))
    leftover = [(n, p) for n, p in named.items() if n not in seen and id(p) not in head_ids]
    if leftover:  # parameters no group claimed (e.g. added after the matcher was written)
        blocks.append(Block("other", leftover))
    head_params = [(n, p) for n, p in named.items() if id(p) in head_ids]
    if head_params:
        blocks.append(Block("head", head_params))
    if not blocks:
        raise ConfigError("The model has no parameters to train.")
    return blocks


def freeze_bn_of_frozen(model: nn.Module) -> None:
    """Put every BatchNorm whose parameters are all frozen into eval mode (call after ``train()``)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            params = list(m.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                m.eval()


def _set_trainable(blocks: list[Block], n_top: int) -> None:
    """Train the last ``n_top`` blocks (the head is the last one); freeze the rest."""
    for i, b in enumerate(blocks):
        for _, p in b.params:
            p.requires_grad_(i >= len(blocks) - n_top)


class Strategy:
    """A fine-tuning strategy built from :class:`~medtl.config.StrategyConfig`.

    ``finetune``: every parameter, one LR. ``llrd``: every parameter, block ``i`` of ``n``
    (head = ``n-1``) at ``lr * llrd_decay ** (n - 1 - i)``. ``gradual_unfreeze``: the head for
    the first ``unfreeze_every`` epochs, then one more block (top down) every
    ``unfreeze_every`` epochs. ``partial``: the head plus the last ``trainable_blocks``
    blocks. ``adapters`` / ``lora``: the encoder frozen, parallel residual adapters or LoRA
    on every conv/linear of the encoder and the head trained; merged into the weights by
    :meth:`finalize`.

    Attributes (set by :meth:`prepare`):
        blocks_: the :class:`Block` list of the prepared model.
        adapted_: names of layers that got adapters/LoRA (empty otherwise).
    """

    def __init__(self, cfg: StrategyConfig) -> None:
        self.cfg = cfg

    @property
    def name(self) -> str:
        return self.cfg.name

    def prepare(self, model: nn.Module) -> nn.Module:
        """Freeze and insert adapters as the strategy says (in place); returns ``model``."""
        self.adapted_: list[str] = []
        for p in model.parameters():
            p.requires_grad_(True)
        if self.name in ("adapters", "lora"):
            for p in model.parameters():
                p.requires_grad_(False)
            head = _head(model)
            exclude = [head] if head is not None else []
            if self.name == "lora":
                self.adapted_ = add_lora(model, self.cfg.lora_rank, self.cfg.lora_alpha, exclude=exclude)
            else:
                self.adapted_ = add_adapters(model, self.cfg.adapter_reduction, exclude=exclude)
            if not self.adapted_:
                raise ConfigError(f"train.strategy.name={self.name} found no conv or linear layer to adapt.")
            if head is not None:
                for p in head.parameters():
                    p.requires_grad_(True)
        self.blocks_ = parameter_blocks(model)
        if self.name == "partial":
            _set_trainable(self.blocks_, 1 + self.cfg.trainable_blocks)
        elif self.name == "gradual_unfreeze":
            _set_trainable(self.blocks_, 1)
        return model

    def param_groups(self, model: nn.Module, lr: float, weight_decay: float) -> list[dict]:
        """AdamW parameter groups: per block, one with weight decay (``ndim > 1``) and one without.

        Each group carries ``name`` (``"<block>/decay"`` or ``"<block>/no_decay"``) and ``lr``.
        Parameters that stay frozen for the whole run are left out; ``gradual_unfreeze``
        keeps all of them (frozen ones get no gradient, so AdamW skips them until unfrozen).
        """
        n = len(self.blocks_)
        groups = []
        for i, b in enumerate(self.blocks_):
            scale = self.cfg.llrd_decay ** (n - 1 - i) if self.name == "llrd" else 1.0
            keep = [p for _, p in b.params if p.requires_grad or self.name == "gradual_unfreeze"]
            for kind, ps, wd in (("decay", [p for p in keep if p.ndim > 1], weight_decay),
                                 ("no_decay", [p for p in keep if p.ndim <= 1], 0.0)):
                if ps:
                    groups.append({"params": ps, "lr": lr * scale, "weight_decay": wd, "name": f"{b.name}/{kind}"})
        return groups

    def on_epoch_start(self, model: nn.Module, epoch: int) -> None:
        """Unfreeze on schedule (``gradual_unfreeze``) and keep frozen BatchNorms in eval mode.

        ``epoch`` is 1-based; call it after ``model.train()``.
        """
        if self.name == "gradual_unfreeze":
            _set_trainable(self.blocks_, 1 + (epoch - 1) // self.cfg.unfreeze_every)
        freeze_bn_of_frozen(model)

    def trainable_blocks_at(self, epoch: int) -> list[str]:
        """Names of the blocks that train in ``epoch`` (1-based), head last."""
        n = len(self.blocks_)
        top = {"partial": 1 + self.cfg.trainable_blocks,
               "gradual_unfreeze": 1 + (epoch - 1) // self.cfg.unfreeze_every,
               "adapters": 1, "lora": 1}.get(self.name, n)
        return [b.name for b in self.blocks_[max(0, n - top):]]

    def finalize(self, model: nn.Module) -> nn.Module:
        """Merge adapters/LoRA into the weights and make every parameter trainable again."""
        if self.name in ("adapters", "lora"):
            merge_adapters(model)
        for p in model.parameters():
            p.requires_grad_(True)
        return model


def make_strategy(cfg: StrategyConfig | None) -> Strategy:
    """The :class:`Strategy` for ``train.strategy`` (``None`` = plain fine-tuning)."""
    cfg = cfg if cfg is not None else StrategyConfig()
    if cfg.name == "linear_probe":
        raise ConfigError("train.strategy.name=linear_probe does not train through medtl.training.fit: the "
                          "encoder's features are computed once and a scikit-learn head is fitted "
                          "(medtl.adapt.probe). Pick another strategy for fit, e.g. partial with "
                          "trainable_blocks=0 to train only the head by gradient descent.")
    return Strategy(cfg)
