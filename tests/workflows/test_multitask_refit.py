"""Multi-task training pieces: the Huber regression loss, the primary head's single-task init
(an auxiliary head of weight 0 leaves the primary model as a single-task run trains it) and the
ridge refit of regression heads on the frozen fine-tuned features."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from medtl._runtime import FoldSeeds
from medtl.config import load_config
from medtl.data.tasks import TaskTargets
from medtl.errors import ConfigError
from medtl.models.heads import HeadSpec, MultiTaskHead
from medtl.training.loop import MultiTaskLoss, predict_outputs
from medtl.workflows.trainers import (
    RIDGE_ALPHAS,
    FineTune,
    _one_standard_error,
    fold_head,
    make_model,
    multitask_model,
    refit_regression,
)


def _reg_head(loss):
    return MultiTaskHead([HeadSpec("c", "binary", ["a", "b"]), HeadSpec("age", "regression", mean=60.0, std=10.0,
                                                                         loss=loss)])


def test_huber_matches_mse_within_one_sd_and_bounds_the_gradient_beyond():
    z = torch.tensor([[0.0, 0.0, 0.3], [0.0, 0.0, 4.0], [0.0, 0.0, -0.5]], requires_grad=True)
    y = torch.tensor([[0.0, 60.0], [1.0, 60.0], [0.0, float("nan")]])  # the third age is missing
    per = {}
    for loss in ("mse", "huber"):
        losses, counts = MultiTaskLoss(_reg_head(loss)).task_losses(z, y)
        (g,) = torch.autograd.grad(losses[1], z)
        per[loss] = (losses[1].item(), g[:, 2])
        assert counts[1] == 2 and g[2, 2] == 0  # the blank label adds nothing, gradient included
    # standardised errors 0.3 and 4.0: squared for both within 1 SD; Huber is 2|e| - 1 beyond
    assert per["mse"][0] == pytest.approx((0.3 ** 2 + 4.0 ** 2) / 2)
    assert per["huber"][0] == pytest.approx((0.3 ** 2 + 2 * 4.0 - 1) / 2)
    assert per["huber"][1][0] == pytest.approx(per["mse"][1][0].item())  # same pull within 1 SD
    assert per["huber"][1][1].item() == pytest.approx(1.0)  # 2 * sign(e) / n: bounded
    assert per["mse"][1][1].item() == pytest.approx(4.0)  # 2 * e / n: grows with the error


def test_loss_and_refit_are_regression_settings_with_defaults():
    from medtl.data.tasks import REGRESSION_DEFAULTS, encode_tasks
    from medtl.data.manifest import Case

    base = {"name": "x", "data": {"path": "."}}
    tasks = [{"name": "c", "kind": "binary", "column": "c"}, {"name": "age", "kind": "regression", "column": "Age"}]
    cfg = load_config({**base, "tasks": tasks})
    cases = [Case(f"k{i}", None, "x", f"P{i}", targets={"Age": str(50 + i)}) for i in range(3)]
    t = encode_tasks(cfg.tasks, cases, np.array([0, 1, 0]), ["x", "y"])
    assert (t[1].loss, t[1].refit) == (REGRESSION_DEFAULTS["loss"], REGRESSION_DEFAULTS["refit"])
    assert (t[0].loss, t[0].refit) == (None, None)
    assert MultiTaskHead.from_targets(t)["age"].loss == REGRESSION_DEFAULTS["loss"]
    cfg = load_config({**base, "tasks": [tasks[0], {**tasks[1], "loss": "mse", "refit": "none"}]})
    t = encode_tasks(cfg.tasks, cases, np.array([0, 1, 0]), ["x", "y"])
    assert (t[1].loss, t[1].refit) == ("mse", "none")
    with pytest.raises(ConfigError, match="regression tasks only"):
        load_config({**base, "tasks": [{**tasks[0], "refit": "ridge"}, tasks[1]]})
    with pytest.raises(ConfigError, match="loss"):
        HeadSpec("c", "binary", ["a", "b"], loss="huber")


class _Toy(nn.Module):
    """A linear encoder with the contract extract_features uses: features = flattened image."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.fc = nn.Linear(n_in, n_out)

    def forward_features(self, x):
        return x.flatten(1)

    def forward_head(self, f, pre_logits=False):
        return f if pre_logits else self.fc(f)

    @property
    def classifier_layer(self):
        return self.fc

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def _toy_data(age):
    rng = np.random.default_rng(0)
    n = len(age)
    images = rng.normal(size=(n, 1, 2, 4)).astype(np.float32)
    return images, SimpleNamespace(images=images, groups=np.arange(n) // 2,
                                   tasks=[TaskTargets("c", "binary", (np.arange(n) % 2).astype(float), ["a", "b"]),
                                          TaskTargets("age", "regression", age, [], refit="ridge")])


def test_ridge_refit_is_folded_into_the_head_and_predicts_what_the_ridge_predicts():
    from sklearn.linear_model import Ridge
    from sklearn.model_selection import GridSearchCV, GroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    n = 60
    rng = np.random.default_rng(1)
    images, _ = _toy_data(np.zeros(n))
    signal = images.reshape(n, -1) @ rng.normal(size=8)
    age = 60 + 5 * signal + rng.normal(0, 0.5, n)
    age[::7] = np.nan  # missing labels: left out of the refit
    images, data = _toy_data(age)
    head = fold_head(data, np.arange(40))
    model = _Toy(8, head.n_outputs)
    before = model.fc.weight[:2].detach().clone()
    tr = np.arange(40)
    info = refit_regression(model, head, data, tr, n_splits=3)["age"]
    assert info["n_train"] == int((~np.isnan(age[tr])).sum()) and info["alpha"] in RIDGE_ALPHAS
    assert torch.equal(model.fc.weight[:2], before)  # the primary rows are untouched
    lab = tr[~np.isnan(age[tr])]
    ref = GridSearchCV(make_pipeline(StandardScaler(), Ridge()), {"ridge__alpha": list(RIDGE_ALPHAS)},
                       cv=GroupKFold(3), scoring="neg_mean_squared_error", refit=_one_standard_error).fit(
        images[lab].reshape(len(lab), -1), age[lab], groups=data.groups[lab])
    assert info["alpha"] == ref.best_params_["ridge__alpha"] >= info["alpha_best"]
    test = np.arange(40, n)
    out = predict_outputs(model, images[test], head)["age"][:, 0]
    np.testing.assert_allclose(out, ref.predict(images[test].reshape(len(test), -1)), rtol=1e-4, atol=1e-3)
    ok = ~np.isnan(age[test])
    assert np.mean(np.abs(out[ok] - age[test][ok])) < 0.5 * np.mean(np.abs(age[lab].mean() - age[test][ok]))


def test_one_standard_error_rule_takes_the_largest_penalty_within_one_se_of_the_best():
    res = {"param_ridge__alpha": np.array([1.0, 10.0, 100.0, 1000.0]),
           "mean_test_score": np.array([-10.0, -8.0, -8.5, -9.5]), "std_test_score": np.full(4, 2.0),
           "split0_test_score": 0, "split1_test_score": 0, "split2_test_score": 0, "split3_test_score": 0}
    # best -8.0 (alpha 10), one SE = 2 / sqrt(4) = 1: alpha 100 (-8.5) is within it, alpha 1000 (-9.5) is not
    assert _one_standard_error(res) == 2
    res["std_test_score"] = np.full(4, 4.0)  # SE 2: alpha 1000 is within it too
    assert _one_standard_error(res) == 3
    res["std_test_score"] = np.zeros(4)  # no spread: the best alone
    assert _one_standard_error(res) == 1


def test_ridge_refit_of_a_target_without_signal_falls_back_to_the_training_mean():
    rng = np.random.default_rng(2)
    images, data = _toy_data(rng.normal(60, 10, 60))
    head = fold_head(data, np.arange(40))
    model = _Toy(8, head.n_outputs)
    info = refit_regression(model, head, data, np.arange(40), n_splits=3)["age"]
    out = predict_outputs(model, images[40:], head)["age"][:, 0]
    y = data.tasks[1].values
    # the penalty picked by grouped CV shrinks a head of noise towards the training mean: its
    # predictions spread far less than the target, and it does about as well as the mean does
    assert info["alpha"] >= 10 and np.std(out) < 0.35 * np.std(y)
    assert np.mean(np.abs(out - y[40:])) < 1.1 * np.mean(np.abs(y[:40].mean() - y[40:]))


def test_too_few_labels_keep_the_trained_head():
    age = np.full(20, np.nan)
    age[:4] = [50.0, 60.0, 70.0, 80.0]
    images, data = _toy_data(age)
    head = fold_head(data, np.arange(20))
    model = _Toy(8, head.n_outputs)
    w = model.fc.weight.detach().clone()
    assert refit_regression(model, head, data, np.arange(20))["age"]["alpha"] is None
    assert torch.equal(model.fc.weight, w)


def test_ridge_refit_needs_a_linear_final_layer():
    images, data = _toy_data(np.linspace(40, 80, 20))
    head = fold_head(data, np.arange(20))
    model = _Toy(8, head.n_outputs)
    model.fc = nn.Sequential(nn.Linear(8, head.n_outputs))
    with pytest.raises(ConfigError, match="refit: none"):
        refit_regression(model, head, data, np.arange(20))


def _tiny_cfg(tasks=None, **train):
    raw = {"name": "t", "data": {"path": ".", "image_size": [16, 16]},
           "model": {"name": "tf_efficientnet_lite0", "pretrained": False},
           "train": {"epochs": 1, "batch_size": 8, "tta": False, "augment": {"affine": False}, **train}}
    if tasks:
        raw["tasks"] = tasks
    return load_config(raw)


def test_the_primary_head_starts_as_the_single_task_head():
    cfg = _tiny_cfg()
    head = MultiTaskHead([HeadSpec("c", "binary", ["a", "b"]), HeadSpec("age", "regression")])
    torch.manual_seed(123)
    single = make_model(cfg, 2)
    torch.manual_seed(123)
    plain = make_model(cfg, 3)
    model = multitask_model(cfg, head, 123)
    assert torch.equal(model.classifier_layer.weight[:2], single.classifier_layer.weight)
    assert torch.equal(model.classifier_layer.bias[:2], single.classifier_layer.bias)
    assert torch.equal(model.classifier_layer.weight[2], plain.classifier_layer.weight[2])
    # without the copy the encoder's own init would draw the primary rows differently (timm scales by row count)
    assert not torch.allclose(plain.classifier_layer.weight[:2], single.classifier_layer.weight)


@pytest.mark.parametrize(("weight", "gating"), [(0.0, "off"), (1.0, "validation")])
def test_an_auxiliary_head_that_cannot_reach_the_encoder_leaves_the_primary_a_single_task_run(weight, gating):
    """Weight 0, or the validation gate still closed (one epoch): the primary model is the single-task one."""
    rng = np.random.default_rng(0)
    n = 32
    y = np.arange(n) % 2
    images = (rng.random((n, 1, 16, 16)) * 0.5 + 0.3 * y[:, None, None, None]).astype(np.float32)
    age = rng.normal(60, 10, n)
    cases = [SimpleNamespace(case_id=f"k{i}", patient_id=f"P{i // 2}", site=None) for i in range(n)]
    tasks = [TaskTargets("c", "binary", y.astype(float), ["a", "b"]),
             TaskTargets("age", "regression", age, [], weight=weight, loss="huber", refit="none")]
    data = SimpleNamespace(images=images, y=y, cases=cases, class_names=["a", "b"], tasks=tasks,
                           groups=np.arange(n) // 2)
    cfg = _tiny_cfg([{"name": "c", "kind": "binary", "column": "c"},
                     {"name": "age", "kind": "regression", "column": "Age", "weight": weight}], task_gating=gating)
    trn, val, test = np.arange(0, 20), np.arange(20, 26), np.arange(26, n)
    seeds = FoldSeeds(0, 0, 1)
    multi = FineTune().fit(cfg, data, trn, val, seeds, description="mt", bar=None)
    single = FineTune().fit(_tiny_cfg(), replace_ns(data, tasks=None), trn, val, seeds, description="st", bar=None)
    np.testing.assert_allclose(multi.predict(test), single.predict(test), atol=1e-5)
    assert multi.predict_tasks(test)["age"].shape == (len(test), 1)
    scale = multi.info["history"][0]["tasks"]["encoder_scale"] if gating == "validation" else None
    assert scale in (None, {"c": 1.0, "age": 0.0})


def replace_ns(ns: SimpleNamespace, **kw) -> SimpleNamespace:
    return SimpleNamespace(**{**vars(ns), **kw})



def test_the_gate_scales_each_heads_gradient_into_the_encoder_but_not_into_its_own_rows():
    from medtl.training.loop import TaskGate

    head = _reg_head("mse")
    model = _Toy(4, head.n_outputs)
    x = torch.randn(6, 1, 2, 2)
    plain = model(x).detach()
    gate = TaskGate(model, head, "validation")
    grads = {}
    for s in (0.0, 0.5, 1.0):
        gate._scale[1] = s
        f = x.flatten(1).requires_grad_(True)
        model.fc.weight.grad = None
        z = model.fc(f)
        assert torch.allclose(z, plain)  # the values never change, only the gradients
        z[:, 2].sum().backward()  # the regression head's output alone
        grads[s] = (f.grad.clone(), model.fc.weight.grad[2].clone())
    assert torch.equal(grads[0.0][0], torch.zeros_like(grads[0.0][0]))
    torch.testing.assert_close(grads[0.5][0], 0.5 * grads[1.0][0])
    for s in (0.0, 0.5):  # the head's own row learns at full rate whatever the scale
        torch.testing.assert_close(grads[s][1], grads[1.0][1])
    gate.update({"c": 0.9, "age": -0.3})
    assert gate.scales() == {"c": 1.0, "age": 0.0}  # the primary is never gated; negative skill closes the gate
    gate.update({"age": 0.4})
    assert gate.scales()["age"] == pytest.approx(0.4)
    gate.update({"age": None})  # no labelled validation case: kept
    assert gate.scales()["age"] == pytest.approx(0.4)
    gate.remove()
    f = x.flatten(1).requires_grad_(True)
    model.fc(f)[:, 2].sum().backward()
    torch.testing.assert_close(f.grad, grads[1.0][0])  # hook removed: a plain layer again


def test_skill_is_one_minus_the_loss_ratio_to_the_training_prior():
    from medtl.training.loop import _multitask_validation, _prior_logits, TaskGate, MultiTaskLoss

    head = MultiTaskHead([HeadSpec("c", "binary", ["a", "b"]), HeadSpec("age", "regression", mean=0.0, std=1.0,
                                                                         loss="mse")])
    y_train = np.array([[0, 1.0], [1, -1.0], [1, np.nan], [1, 0.0]])
    prior = _prior_logits(head, y_train)
    # binary: (1 + 1) / (4 + 2) and (3 + 1) / (4 + 2), add-one smoothed; regression: the training mean, 0
    torch.testing.assert_close(prior, torch.tensor([[np.log(1 / 3), np.log(2 / 3), 0.0]], dtype=torch.float32))
    model = _Toy(4, head.n_outputs)
    gate = TaskGate(model, head, "validation", prior=prior)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 1, 2, 2)).astype(np.float32)
    y_val = np.column_stack([rng.integers(0, 2, 40), rng.normal(size=40)]).astype(np.float64)
    with torch.no_grad():  # the regression row predicts half the target: skill = 1 - mse / var
        model.fc.weight.zero_()
        model.fc.bias.zero_()
    for i in range(40):
        x[i, 0, 0, 0] = y_val[i, 1]
    with torch.no_grad():
        model.fc.weight[2, 0] = 0.5
    _, _, extra = _multitask_validation(model, x, y_val, head, MultiTaskLoss(head), 64, torch.device("cpu"), False,
                                        gate)
    t = y_val[:, 1]
    assert extra["tasks"]["skill"]["age"] == pytest.approx(1 - np.mean((0.5 * t - t) ** 2) / np.mean(t ** 2), rel=1e-4)
    assert extra["tasks"]["encoder_scale"] == {"c": 1.0, "age": 0.0}  # the scale the epoch trained with
    assert gate.scales()["age"] == pytest.approx(extra["tasks"]["skill"]["age"], rel=1e-5)  # next epoch's
