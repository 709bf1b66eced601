"""Per-task metrics: missing labels are left out, never counted, and the CIs are patient-level."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import r2_score, roc_auc_score

from medtl.config import load_config
from medtl.errors import ConfigError
from medtl.evaluate.metrics import bootstrap_ci
from medtl.evaluate.multitask import score_task


def _labels_with_blanks(rng, n, L=3):
    y = rng.integers(0, 2, (n, L)).astype(float)
    p = np.clip(0.6 * y + 0.4 * rng.random((n, L)), 0, 1)
    y[rng.random((n, L)) < 0.25] = np.nan
    return y, p


def test_multilabel_auc_per_label_ignores_blanks_and_macro_is_their_mean():
    rng = np.random.default_rng(1)
    y, p = _labels_with_blanks(rng, 120)
    groups = np.arange(120) // 3
    res = score_task("multilabel", y, p, groups, class_names=["a", "b", "c"], n_boot=200)
    for j, name in enumerate("abc"):
        lab = ~np.isnan(y[:, j])
        assert res["auc_per_label"][name]["value"] == pytest.approx(roc_auc_score(y[lab, j], p[lab, j]))
        assert res["auc_per_label"][name]["n_labelled"] == lab.sum()
    assert res["macro_auc"]["value"] == pytest.approx(np.mean([res["auc_per_label"][n]["value"] for n in "abc"]))
    lo, hi = res["macro_auc"]["ci95"]
    assert lo <= res["macro_auc"]["value"] <= hi
    # whatever the model said for a blank label changes nothing
    p2 = p.copy()
    p2[np.isnan(y)] = rng.random(int(np.isnan(y).sum()))
    again = score_task("multilabel", y, p2, groups, class_names=["a", "b", "c"], n_boot=200)
    assert again == res


def test_regression_mae_r2_and_baseline_on_labelled_cases_only():
    rng = np.random.default_rng(2)
    y = rng.normal(65, 9, 100)
    pred = y + rng.normal(0, 4, 100)
    y[::7] = np.nan
    groups = np.arange(100) // 2
    base = np.full(100, 65.0)
    res = score_task("regression", y, pred, groups, class_names=[], baseline=base, n_boot=300)
    lab = ~np.isnan(y)
    assert res["n_labelled"] == lab.sum() and res["n_missing"] == (~lab).sum()
    assert res["mae"]["value"] == pytest.approx(np.mean(np.abs(pred[lab] - y[lab])))
    assert res["r2"]["value"] == pytest.approx(r2_score(y[lab], pred[lab]))
    assert res["baseline_mae"]["value"] == pytest.approx(np.mean(np.abs(65.0 - y[lab])))
    d = res["mae_minus_baseline"]
    assert d["value"] == pytest.approx(res["mae"]["value"] - res["baseline_mae"]["value"]) and d["ci95"][1] < 0


def test_binary_task_with_blanks_equals_the_run_metrics_on_its_labelled_cases():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 80).astype(float)
    p1 = np.clip(0.5 * y + 0.5 * rng.random(80), 0, 1)
    proba = np.column_stack([1 - p1, p1])
    y[5::9] = np.nan
    groups = np.arange(80) // 2
    res = score_task("binary", y, proba, groups, class_names=["n", "y"], n_boot=100)
    lab = ~np.isnan(y)
    ref = bootstrap_ci(y[lab].astype(int), proba[lab], groups[lab], n_boot=100)
    assert res["auc"] == ref["auc"] and res["n_labelled"] == lab.sum()


@pytest.mark.parametrize("tasks, extra, fragment", [
    ([{"name": "age", "kind": "regression", "column": "Age"}], [], "must be binary or multiclass"),
    ([{"name": "a", "kind": "binary", "column": "label"}, {"name": "f", "kind": "multilabel", "column": "x"}], [],
     "takes `columns`"),
    ([{"name": "a", "kind": "binary", "column": "label"}, {"name": "a", "kind": "regression", "column": "x"}], [],
     "distinct names"),
    ([{"name": "a", "kind": "binary", "column": "label"}], ["train.strategy.name=linear_probe"], "linear_probe"),
    (None, ["train.task_weighting=uncertainty"], "has no tasks"),
])
def test_task_config_rules_say_what_is_wrong(tmp_path, tasks, extra, fragment):
    raw = {"data": {"path": str(tmp_path / "m.csv")}, "tasks": tasks}
    with pytest.raises(ConfigError, match=fragment):
        load_config(raw, extra)
