"""Domain adaptation: GRL, MMD/CORAL, AdaBN, DSBN, and fit end to end with every method."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from medtl.adapt.domain import (DomainObjective, DomainSpecificBatchNorm, adabn, collapse_dsbn, convert_dsbn,
                                coral_loss, dann_lambda, domain_context, grad_reverse, mmd_loss)
from medtl.config import DomainAdaptConfig, TrainConfig
from medtl.errors import ConfigError
from medtl.training import fit, predict_proba


class Tiny(nn.Module):
    """The encoder contract in miniature: forward_features, forward_head(pre_logits), classifier_layer."""

    num_features = 8

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Linear(8, 2)

    def forward_features(self, x):
        return self.body(x)

    def forward_head(self, f, pre_logits=False):
        f = f.amax((2, 3))
        return f if pre_logits else self.head(f)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))

    @property
    def classifier_layer(self):
        return self.head


def _sites(n=32, size=16, seed=0, target_shift=0.3):
    """Two labelled source sites and a brighter, noisier unlabelled target site."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0.3, 0.05, (n, 1, size, size)).astype(np.float32)
    y = np.arange(n) % 2
    for i in np.where(y == 1)[0]:
        r, c = rng.integers(1, size - 6, 2)
        x[i, 0, r:r + 5, c:c + 5] = 0.8
    sites = np.array(["a", "b"])[(np.arange(n) // 2) % 2]
    xt = (x[: n // 2] * 0.7 + target_shift + rng.normal(0, 0.05, x[: n // 2].shape)).astype(np.float32)
    return x.clip(0, 1), y, sites, xt.clip(0, 1)


CFG = TrainConfig(epochs=2, batch_size=8, lr=0.02, warmup_epochs=0, tta=False, device="cpu")


def test_gradient_reversal_flips_and_scales_the_gradient():
    x = torch.randn(5, 3, requires_grad=True)
    y = grad_reverse(x, 0.5)
    torch.testing.assert_close(y, x)
    (y * torch.arange(3.0)).sum().backward()
    torch.testing.assert_close(x.grad, -0.5 * torch.arange(3.0).expand(5, 3))
    assert dann_lambda(0.0) == 0.0 and 0.99 < dann_lambda(1.0) < 1.0


def test_mmd_and_coral_are_zero_for_identical_and_positive_for_shifted():
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(128, 16, generator=g)
    same = torch.randn(128, 16, generator=g)
    shifted = 1.5 * torch.randn(128, 16, generator=g) + 1.0
    assert mmd_loss(xs, xs) == pytest.approx(0.0, abs=1e-6) and coral_loss(xs, xs) == pytest.approx(0.0, abs=1e-9)
    assert mmd_loss(xs, shifted) > 5 * mmd_loss(xs, same)
    assert coral_loss(xs, shifted) > 5 * coral_loss(xs, same) > 0
    fs = torch.randn(16, 16, requires_grad=True)
    (mmd_loss(fs, shifted[:16]) + coral_loss(fs, shifted[:16])).backward()
    assert fs.grad.abs().sum() > 0


def test_adabn_sets_running_stats_to_the_target_statistics():
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Dropout(0.5), nn.Flatten(), nn.Linear(3 * 4 * 4, 2)).eval()
    target = (torch.randn(50, 3, 4, 4) * torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1) + 5).numpy()
    t = torch.as_tensor(target)
    bn = model[0]
    adabn(model, target, batch_size=64)  # one chunk: exact
    torch.testing.assert_close(bn.running_mean, t.mean((0, 2, 3)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn.running_var, t.var((0, 2, 3), unbiased=True), rtol=1e-4, atol=1e-4)
    assert not model.training and bn.momentum == 0.1
    adabn(model, target, batch_size=16)  # 4 chunks of 12-13 images, averaged
    torch.testing.assert_close(bn.running_mean, t.mean((0, 2, 3)), rtol=3e-3, atol=0)
    torch.testing.assert_close(bn.running_var, t.var((0, 2, 3)), rtol=0.1, atol=0)


def test_dsbn_keeps_separate_statistics_per_domain():
    model = nn.Sequential(nn.BatchNorm2d(2))
    convert_dsbn(model, 2)
    w = model[0]
    assert isinstance(w, DomainSpecificBatchNorm)
    x = torch.cat([torch.randn(8, 2, 3, 3), torch.randn(8, 2, 3, 3) + 10])
    dom = np.array([0] * 8 + [1] * 8)
    model.train()
    with pytest.raises(RuntimeError, match="domain_context"):
        model(x)
    with domain_context(model, dom):
        out = model(x)
    # each half normalised with its own batch statistics
    assert out[:8].mean().abs() < 1e-5 and out[8:].mean().abs() < 1e-5
    assert w.mean1.mean() > 0.9 and w.mean0.abs().mean() < 0.3  # momentum 0.1 towards 10 vs 0
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    fresh = convert_dsbn(nn.Sequential(nn.BatchNorm2d(2)), 2)
    fresh.load_state_dict(sd)
    torch.testing.assert_close(fresh[0].mean1, w.mean1)
    torch.testing.assert_close(fresh[0].mean0, w.mean0)
    collapse_dsbn(model, 1)
    assert isinstance(model[0], nn.BatchNorm2d)
    torch.testing.assert_close(model[0].running_mean, w.mean1)


@pytest.mark.parametrize("method", ["none", "adabn", "dsbn", "dann", "mmd", "coral"])
def test_fit_runs_end_to_end_with_every_method(method):
    x, y, sites, xt = _sites()
    adapt = DomainAdaptConfig(method=method, target_site="c", weight=0.5)
    res = fit(Tiny(), x, y, x[:16], y[:16], CFG, num_classes=2, adapt=adapt, x_target=xt,
              sites_train=sites, sites_val=sites[:16])
    assert not any(isinstance(m, DomainSpecificBatchNorm) for m in res.model.modules())
    p = predict_proba(res.model, xt)
    assert p.shape == (len(xt), 2) and np.allclose(p.sum(1), 1) and len(res.history) == 2
    bn = res.model.body[1]
    target_mean = float(torch.as_tensor(xt).mean())
    if method in ("adabn", "dsbn"):  # the kept statistics are the target's, not the source's
        src = Tiny()
        src.load_state_dict(fit(Tiny(), x, y, x[:16], y[:16], CFG, num_classes=2).model.state_dict())
        assert not torch.allclose(bn.running_mean, src.body[1].running_mean)
    if method == "adabn":
        with torch.no_grad():
            conv_out = res.model.body[0](torch.as_tensor(xt))
        torch.testing.assert_close(bn.running_mean, conv_out.mean((0, 2, 3)), rtol=1e-3, atol=1e-3)
    assert target_mean > 0.3


def test_domain_objective_changes_the_loss_and_trains_the_domain_classifier():
    obj = DomainObjective(DomainAdaptConfig(method="dann"), num_features=8)
    fs, ft = torch.randn(6, 8, requires_grad=True), torch.randn(6, 8) + 3
    loss = obj(fs, ft, progress=0.5)
    loss.backward()
    assert loss > 0 and all(p.grad is not None for p in obj.classifier.parameters())
    assert DomainObjective(DomainAdaptConfig(method="dsbn"))(fs, ft, 0.5) == 0


def test_da_without_target_images_or_with_a_leaking_target_site_is_an_error():
    x, y, sites, xt = _sites(n=16)
    with pytest.raises(ConfigError, match="needs unlabelled images of the target site"):
        fit(Tiny(), x, y, x, y, CFG, num_classes=2, adapt=DomainAdaptConfig(method="mmd"))
    with pytest.raises(ConfigError, match="also appears among the training sites"):
        fit(Tiny(), x, y, x, y, CFG, num_classes=2, adapt=DomainAdaptConfig(method="coral", target_site="a"),
            x_target=xt, sites_train=sites)
    with pytest.raises(ConfigError, match="use_target_unlabelled"):
        fit(Tiny(), x, y, x, y, CFG, num_classes=2, x_target=xt,
            adapt=DomainAdaptConfig(method="dann", use_target_unlabelled=False))
    with pytest.raises(ConfigError, match="not among the training sites"):
        fit(Tiny(), x, y, x, y, CFG, num_classes=2, adapt=DomainAdaptConfig(method="dsbn"), x_target=xt,
            sites_train=sites, sites_val=["z"] * len(x))


def test_adaptation_inputs_take_the_held_out_site_as_target():
    from medtl.adapt.domain import adaptation_inputs

    images = np.arange(8, dtype=np.float32).reshape(8, 1, 1, 1)
    sites = ["a", "a", "b", "b", "c", "c", None, None]
    trn, val = np.array([0, 2, 6]), np.array([1, 3, 7])
    assert adaptation_inputs(DomainAdaptConfig(), images, sites, trn, val) == {}
    kw = adaptation_inputs(DomainAdaptConfig(method="mmd"), images, sites, trn, val)  # leave-one-site-out
    assert kw["x_target"].ravel().tolist() == [4.0, 5.0] and kw["sites_train"] == ["a", "b", ""]
    kw = adaptation_inputs(DomainAdaptConfig(method="dsbn", target_site="c"), images, sites, trn, val)
    assert kw["x_target"].ravel().tolist() == [4.0, 5.0] and kw["sites_val"] == ["a", "b", ""]
    with pytest.raises(ConfigError, match="has cases in the training"):
        adaptation_inputs(DomainAdaptConfig(method="dsbn", target_site="a"), images, sites, trn, val)
    with pytest.raises(ConfigError, match="Did you mean 'c'"):
        adaptation_inputs(DomainAdaptConfig(method="dsbn", target_site="cc"), images, sites, trn, val)
