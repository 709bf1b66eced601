"""EWC (Fisher, penalty), the replay buffer and one continual-learning stage, on tiny models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from medtl.config import TrainConfig
from medtl.errors import ConfigError
from medtl.training.continual import EWC, ReplayBuffer, fisher_diagonal, train_stage


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one thread avoids OpenMP spin-waits when the CPU is shared; restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _linear(in_features: int = 4, k: int = 2, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, k))


def test_fisher_matches_the_softmax_closed_form():
    """For logits W x + b: d log p_c / dW = (e_c - p) x^T, so F_W = mean_i sum_c p_c ((e_c - p) x^T)^2."""
    model = _linear()
    x = np.random.default_rng(0).random((6, 1, 2, 2)).astype(np.float32)
    F = fisher_diagonal(model, x, batch_size=4)
    lin = model[1]
    xs = torch.as_tensor(x).flatten(1).double()
    p = torch.softmax(xs @ lin.weight.double().T + lin.bias.double(), -1)
    want_w, want_b = torch.zeros_like(lin.weight, dtype=torch.float64), torch.zeros_like(lin.bias, dtype=torch.float64)
    for i in range(len(xs)):
        for c in range(2):
            d = torch.nn.functional.one_hot(torch.tensor(c), 2).double() - p[i]
            want_w += p[i, c] * (d[:, None] * xs[i][None, :]) ** 2
            want_b += p[i, c] * d ** 2
    torch.testing.assert_close(F["1.weight"].double(), want_w / len(xs), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(F["1.bias"].double(), want_b / len(xs), rtol=1e-4, atol=1e-7)
    sub = fisher_diagonal(model, x, max_samples=3, seed=1)  # a seeded subset: same subset, same Fisher
    torch.testing.assert_close(sub["1.weight"], fisher_diagonal(model, x, max_samples=3, seed=1)["1.weight"])


def test_ewc_penalty_is_the_weighted_squared_distance_and_round_trips():
    model = _linear()
    x = np.random.default_rng(1).random((5, 1, 2, 2)).astype(np.float32)
    ewc = EWC(lam=10.0).consolidate(model, x)
    assert ewc.penalty(model).item() == 0.0  # at the anchor
    with torch.no_grad():
        model[1].weight += 0.5
    F = ewc.terms_[0][0]
    want = 0.5 * 10.0 * float((F["1.weight"] * 0.25).sum())
    assert ewc.penalty(model).item() == pytest.approx(want, rel=1e-5)
    ewc.penalty(model).backward()  # the gradient pulls back towards the anchor
    assert (model[1].weight.grad * 0.5 >= 0).all() and model[1].weight.grad.abs().sum() > 0
    again = EWC(lam=10.0).load_state_dict(ewc.state_dict())
    assert again.penalty(model).item() == pytest.approx(want, rel=1e-6)
    assert EWC(lam=0.0).consolidate(model, x).penalty(model).item() == 0.0
    with pytest.raises(ConfigError, match="'lam' parameter of EWC must be a float >= 0. Got -1"):
        EWC(lam=-1)


def test_replay_buffer_is_bounded_seeded_and_balanced():
    y = np.array([0, 1] * 20)
    bal = ReplayBuffer(8, policy="class_balanced", seed=3).add(np.arange(40), y, "a")
    assert len(bal) == 8 and bal.counts() == {"a/0": 4, "a/1": 4}
    bal.add(np.arange(100, 140), y, "b")
    assert len(bal) == 8 and bal.counts() == {"a/0": 2, "a/1": 2, "b/0": 2, "b/1": 2}
    again = ReplayBuffer(8, policy="class_balanced", seed=3).add(np.arange(40), y, "a").add(np.arange(100, 140), y, "b")
    assert np.array_equal(bal.indices(), again.indices())
    # a class with fewer cases than its quota lends its slots to the others
    few = ReplayBuffer(6, policy="class_balanced", seed=0).add(np.arange(7), np.array([0] * 6 + [1]), "a")
    assert few.counts() == {"a/0": 5, "a/1": 1}

    res = ReplayBuffer(5, policy="reservoir", seed=0).add(np.arange(50), np.zeros(50, int), "a")
    assert len(res) == 5 and res.seen_ == 50
    restored = ReplayBuffer.from_state(res.state())
    assert np.array_equal(restored.add(np.arange(50, 60), np.zeros(10, int), "b").indices(),
                          res.add(np.arange(50, 60), np.zeros(10, int), "b").indices())


def test_reservoir_keeps_every_case_with_equal_probability():
    kept = np.zeros(40)
    for seed in range(300):
        buf = ReplayBuffer(10, policy="reservoir", seed=seed).add(np.arange(20), np.zeros(20, int), "a")
        kept[buf.add(np.arange(20, 40), np.zeros(20, int), "b").indices()] += 1
    share = kept / 300  # expected 10 / 40 = 0.25 for every case, early or late
    assert abs(share[:20].mean() - 0.25) < 0.03 and abs(share[20:].mean() - 0.25) < 0.03
    assert share.min() > 0.12 and share.max() < 0.4


@pytest.mark.parametrize("kwargs, match", [({"size": 0}, "'size' parameter of ReplayBuffer must be an int >= 1"),
                                           ({"size": 4, "policy": "fifo"}, "one of \\['class_balanced', 'reservoir'\\]")])
def test_replay_buffer_rejects_bad_parameters(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ReplayBuffer(**kwargs)


def _stage_data(seed: int, shift: float = 0.0):
    rng = np.random.default_rng(seed)
    y = np.array([0, 1] * 16)
    x = rng.normal(0, 0.1, (32, 1, 8, 8)).astype(np.float32) + 0.5 + shift
    x[y == 1, :, 2:6, 2:6] += 0.3  # the positive class has a bright square
    return np.clip(x, 0, 1).astype(np.float32), y


def _conv() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 2))


def test_train_stage_learns_and_a_strong_ewc_penalty_holds_the_weights():
    cfg = TrainConfig(epochs=1, batch_size=8, lr=0.05, warmup_epochs=0, tta=False, device="cpu", seed=0,
                      augment={"flip": False, "affine": False, "intensity": False})
    xa, ya = _stage_data(0)
    res = train_stage(_conv(), xa, ya, xa[:8], ya[:8], cfg, num_classes=2, epochs=4)
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"] and 1 <= res.best_epoch <= 4
    anchor = {k: v.clone() for k, v in res.model.state_dict().items()}
    xb, yb = _stage_data(1, shift=-0.3)

    def moved(model) -> float:
        return sum(float((p.detach() - anchor[k]).abs().sum()) for k, p in model.named_parameters())

    free = train_stage(_clone(res.model), xb, yb, xb[:8], yb[:8], cfg, num_classes=2, epochs=2)
    ewc = EWC(lam=1e6).consolidate(res.model, xa)
    held = train_stage(_clone(res.model), xb, yb, xb[:8], yb[:8], cfg, num_classes=2, epochs=2, penalty=ewc.penalty)
    assert moved(held.model) < 0.5 * moved(free.model)
    assert held.history[0]["penalty"] > 0.0 and free.history[0]["penalty"] == 0.0
    rep = train_stage(_clone(res.model), xb, yb, xb[:8], yb[:8], cfg, num_classes=2, epochs=1,
                      replay=(xa[:6], ya[:6]), replay_batch=4)
    assert rep.history[0]["train_images_per_s"] > 0 and len(rep.history) == 1


def _clone(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)
