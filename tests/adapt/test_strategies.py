"""Fine-tuning strategies: what is trainable and at which LR; adapters/LoRA start as identity."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from medtl.adapt.layers import adapter_parameters, add_adapters, add_lora, merge_adapters
from medtl.adapt.strategies import make_strategy, parameter_blocks
from medtl.config import StrategyConfig, TrainConfig
from medtl.errors import ConfigError
from medtl.models import create_encoder
from medtl.training import fit


@pytest.fixture(scope="module")
def encoder_state():
    m = create_encoder("tf_efficientnet_lite0", pretrained=False, num_classes=2, in_chans=1)
    return {k: v.clone() for k, v in m.state_dict().items()}


def _encoder(state) -> nn.Module:
    m = create_encoder("tf_efficientnet_lite0", pretrained=False, num_classes=2, in_chans=1)
    m.load_state_dict(state)
    return m


def _trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _block_names(blocks, names) -> set[str]:
    return {n for b in blocks if b.name in names for n, _ in b.params}


def test_blocks_follow_timm_stages_and_end_with_the_head(encoder_state):
    m = _encoder(encoder_state)
    blocks = parameter_blocks(m)
    assert [b.name for b in blocks] == ["stem"] + [f"block{i}" for i in range(1, 8)] + ["head"]
    assert {id(p) for _, p in blocks[-1].params} == {id(p) for p in m.classifier_layer.parameters()}
    names = [n for b in blocks for n, _ in b.params]
    assert sorted(names) == sorted(n for n, _ in m.named_parameters())  # each parameter exactly once
    assert blocks[0].params[0][0] == "net.conv_stem.weight"


def test_blocks_of_a_plain_module_are_its_children():
    m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    m(torch.zeros(1, 1, 5, 5))
    assert [b.name for b in parameter_blocks(m)] == ["0", "3"]


def test_finetune_trains_everything_at_one_lr(encoder_state):
    m = _encoder(encoder_state)
    s = make_strategy(StrategyConfig(name="finetune"))
    s.prepare(m)
    assert _trainable(m) == {n for n, _ in m.named_parameters()}
    groups = s.param_groups(m, 1e-3, 0.01)
    assert {g["lr"] for g in groups} == {1e-3}
    assert all(g["weight_decay"] == (0.01 if g["name"].endswith("/decay") else 0.0) for g in groups)
    assert sum(len(g["params"]) for g in groups) == len(list(m.parameters()))


def test_llrd_decays_the_lr_per_block_from_the_head_down(encoder_state):
    m = _encoder(encoder_state)
    s = make_strategy(StrategyConfig(name="llrd", llrd_decay=0.5))
    s.prepare(m)
    groups = s.param_groups(m, 1e-3, 0.01)
    lr_of = {g["name"].split("/")[0]: g["lr"] for g in groups}
    order = [b.name for b in s.blocks_]
    n = len(order)
    for i, name in enumerate(order):
        assert lr_of[name] == pytest.approx(1e-3 * 0.5 ** (n - 1 - i))
    assert lr_of["head"] == 1e-3 and lr_of["stem"] == pytest.approx(1e-3 * 0.5 ** 8)
    assert _trainable(m) == {n for n, _ in m.named_parameters()}


def test_partial_trains_the_head_and_the_last_blocks_only(encoder_state):
    m = _encoder(encoder_state)
    s = make_strategy(StrategyConfig(name="partial", trainable_blocks=2))
    s.prepare(m)
    assert _trainable(m) == _block_names(s.blocks_, {"block6", "block7", "head"})
    in_groups = {id(p) for g in s.param_groups(m, 1e-3, 0.0) for p in g["params"]}
    assert in_groups == {id(p) for p in m.parameters() if p.requires_grad}
    m.train()
    s.on_epoch_start(m, 1)
    assert not m.net.bn1.training and m.net.blocks[6][0].bn1.training  # frozen BN keeps its statistics


def test_gradual_unfreeze_adds_one_block_every_n_epochs(encoder_state):
    m = _encoder(encoder_state)
    s = make_strategy(StrategyConfig(name="gradual_unfreeze", unfreeze_every=2))
    s.prepare(m)
    seen = []
    for epoch in range(1, 7):
        m.train()
        s.on_epoch_start(m, epoch)
        seen.append(_trainable(m))
        assert seen[-1] == _block_names(s.blocks_, set(s.trainable_blocks_at(epoch)))
    assert seen[0] == seen[1] == _block_names(s.blocks_, {"head"})
    assert seen[2] == _block_names(s.blocks_, {"head", "block7"})
    assert seen[4] == _block_names(s.blocks_, {"head", "block7", "block6"})
    # every parameter sits in the optimizer from the start; frozen ones get no gradient
    assert sum(len(g["params"]) for g in s.param_groups(m, 1e-3, 0.0)) == len(list(m.parameters()))


@pytest.mark.parametrize("name", ["adapters", "lora"])
def test_adapters_and_lora_start_as_identity_and_only_they_train(encoder_state, name):
    m = _encoder(encoder_state).eval()
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        before = m(x)
    s = make_strategy(StrategyConfig(name=name, lora_rank=2, adapter_reduction=4))
    s.prepare(m)
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(m(x), before, rtol=0, atol=1e-6)
    assert len(s.adapted_) > 30  # every conv of the encoder, not the classifier
    adapter = {n for n, _ in adapter_parameters(m)}
    head = {f"net.classifier.{k}" for k in ("weight", "bias")}
    assert _trainable(m) == adapter | head
    assert not any(n.startswith("net.classifier") for n in adapter)


def test_merge_restores_the_plain_layout_and_keeps_the_function():
    conv, lin = nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.Linear(6, 3)
    keys = set(conv.state_dict())
    add_adapters(conv, reduction=2)
    add_lora(lin, rank=2, alpha=4.0)
    with torch.no_grad():
        for p in list(conv.parameters()) + list(lin.parameters()):
            p.add_(0.1 * torch.randn_like(p))  # as if trained
    x = torch.randn(2, 4, 9, 9)
    out = lin(conv(x).mean((2, 3)))
    assert merge_adapters(conv) == 1 and merge_adapters(lin) == 1
    assert set(conv.state_dict()) == keys and isinstance(conv.weight, nn.Parameter)
    torch.testing.assert_close(lin(conv(x).mean((2, 3))), out)


def test_parallel_adapter_is_a_1x1_conv_on_the_centre_tap():
    conv = nn.Conv2d(3, 5, 3, padding=1, bias=False)
    add_adapters(conv, reduction=1)
    d = conv.parametrizations.weight[0]
    with torch.no_grad():
        d.up.normal_()
    delta = conv.weight - conv.parametrizations.weight.original
    assert torch.count_nonzero(delta[..., [0, 2], :]) == 0 and torch.count_nonzero(delta[..., 1, [0, 2]]) == 0
    torch.testing.assert_close(delta[..., 1, 1], d.up @ d.down)


def _tiny_data(n=32, size=32, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(0.3, 0.05, (n, 1, size, size)).astype(np.float32)
    y = np.arange(n) % 2
    x[y == 1, :, 8:20, 8:20] += 0.5
    return x.clip(0, 1), y


@pytest.mark.parametrize("name,frozen_prefix", [("partial", "net.conv_stem"), ("lora", "net.blocks.3"),
                                                ("gradual_unfreeze", "net.blocks.0")])
def test_fit_leaves_frozen_weights_untouched(encoder_state, name, frozen_prefix):
    m = _encoder(encoder_state)
    before = {k: v.clone() for k, v in m.state_dict().items() if k.startswith(frozen_prefix)}
    x, y = _tiny_data(n=16)
    cfg = TrainConfig(epochs=1, batch_size=8, lr=0.01, warmup_epochs=0, tta=False, device="cpu",
                      strategy=StrategyConfig(name=name, trainable_blocks=1, unfreeze_every=2, lora_rank=2))
    res = fit(m, x, y, x[:8], y[:8], cfg, num_classes=2)
    after = res.model.state_dict()
    if name == "lora":  # merged: block 3's convs changed by the LoRA update, its BatchNorms did not
        before = {k: v for k, v in before.items() if "bn" in k}
        assert not any("parametrizations" in k for k in after)
    assert before and all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.requires_grad for p in res.model.parameters())  # finalize: a normal model again


def test_linear_probe_is_not_trained_by_fit():
    with pytest.raises(ConfigError, match="medtl.adapt.probe"):
        make_strategy(StrategyConfig(name="linear_probe"))
