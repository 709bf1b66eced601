"""Multi-task runs end to end on real images: MedMNIST images given several derived labels, some blank.

The set: 32 BreastMNIST images (28 px ultrasound) written as PNG with a manifest. Tasks: the
MedMNIST class (binary, primary), `findings` (multilabel: brighter than the median, more
textured than the median), `band` (multiclass: intensity tertile) and `intensity` (regression:
the mean pixel value); every task but the primary has blank cells.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from medtl.config import load_config
from medtl.data.manifest import MEDMNIST_CLASSES
from medtl.data.prepare import prepare
from medtl.data.tasks import label_counts, target_matrix
from medtl.models.heads import MultiTaskHead
from medtl.training.loop import MultiTaskLoss, predict_outputs

N = 32
TASKS = [{"name": "lesion", "kind": "binary", "column": "label"},
         {"name": "findings", "kind": "multilabel", "columns": ["bright", "textured"]},
         {"name": "band", "kind": "multiclass", "column": "band", "class_names": ["low", "mid", "high"]},
         {"name": "intensity", "kind": "regression", "column": "intensity", "weight": 0.5}]
TINY = ["train.epochs=1", "train.batch_size=8", "data.image_size=[16, 16]", "cv.n_splits=2",
        "evaluate.n_bootstrap=50", "train.tta=false", "train.augment.affine=false"]


def _medmnist_manifest(shared_data, folder):
    npz = np.load(shared_data / "medmnist" / "breastmnist.npz")
    rng = np.random.default_rng(0)
    y = npz["train_labels"][:, 0]
    # a balanced draw of real images, so every class has patients in each fold
    take = np.concatenate([rng.choice(np.flatnonzero(y == c), N // 2, replace=False) for c in (0, 1)])
    images, labels = npz["train_images"][take], y[take]
    mean, std = images.reshape(N, -1).mean(1), images.reshape(N, -1).std(1)
    tert = np.quantile(mean, [1 / 3, 2 / 3])
    folder.mkdir(parents=True, exist_ok=True)
    rows, truth = [], {}
    for i in range(N):
        Image.fromarray(images[i]).save(folder / f"img{i:03d}.png")
        blank = {"bright": i % 5 == 1, "textured": i % 7 == 2, "band": i % 6 == 3, "intensity": i % 4 == 0}
        vals = {"bright": str(int(mean[i] > np.median(mean))), "textured": "true" if std[i] > np.median(std) else "false",
                "band": ["low", "mid", "high"][int(np.searchsorted(tert, mean[i]))], "intensity": f"{mean[i]:.3f}"}
        cells = {k: ("" if blank[k] else v) for k, v in vals.items()}
        if i % 10 == 5:
            cells["intensity"] = "NaN"  # a missing-value word, not a number
        truth[f"img{i:03d}"] = {**vals, "blank": blank}
        rows.append({"path": f"img{i:03d}.png", "label": MEDMNIST_CLASSES["breastmnist"][labels[i]],
                     "patient_id": f"P{i // 2:02d}", **cells})
    manifest = folder / "manifest.csv"
    with manifest.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return manifest, truth


def _config(manifest, *extra):
    raw = {"name": "mt", "data": {"path": str(manifest), "intensity": {"mode": "range", "vmin": 0, "vmax": 255}},
           "model": {"name": "tf_efficientnet_lite0", "pretrained": False}, "tasks": TASKS}
    return load_config(raw, [*TINY, *extra])


@pytest.fixture(scope="module")
def medmnist_tasks(tmp_path_factory):
    from tests.conftest import shared_data_dir

    shared = shared_data_dir()
    if not (shared / "medmnist" / "breastmnist.npz").is_file():
        pytest.fail(f"Real test data not found: {shared / 'medmnist' / 'breastmnist.npz'}. Set MEDTL_SHARED_DATA.")
    root = tmp_path_factory.mktemp("mt")
    manifest, truth = _medmnist_manifest(shared, root / "data")
    return root, manifest, truth


def test_prepare_reads_every_task_and_keeps_blanks_as_missing(medmnist_tasks):
    _, manifest, truth = medmnist_tasks
    data = prepare(_config(manifest), progress=False)
    assert len(data.cases) == N and data.class_names == MEDMNIST_CLASSES["breastmnist"]
    by = {t.name: t for t in data.tasks}
    for i, c in enumerate(data.cases):
        name = str(c.path).rsplit("/", 1)[-1][:-4]
        t, blank = truth[name], truth[name]["blank"]
        assert np.isnan(by["findings"].values[i, 0]) == blank["bright"]
        assert np.isnan(by["findings"].values[i, 1]) == blank["textured"]
        assert np.isnan(by["band"].values[i]) == blank["band"]
        assert np.isnan(by["intensity"].values[i]) == (blank["intensity"] or i % 10 == 5)
        if not blank["textured"]:
            assert by["findings"].values[i, 1] == (t["textured"] == "true")
        if not blank["band"]:
            assert by["band"].class_names[int(by["band"].values[i])] == t["band"]
    counts = label_counts(data.tasks)
    # nothing dropped: every case stays, blanks are counted
    assert counts["lesion"] == {"n_labelled": N, "n_missing": 0}
    assert counts["band"]["n_labelled"] + counts["band"]["n_missing"] == N
    assert counts["findings"]["per_label"]["bright"] == N - sum(i % 5 == 1 for i in range(N))
    assert counts["intensity"]["n_missing"] == sum(i % 4 == 0 or i % 10 == 5 for i in range(N))


def test_masked_labels_give_no_gradient_and_do_not_change_the_loss(medmnist_tasks):
    _, manifest, _ = medmnist_tasks
    data = prepare(_config(manifest), progress=False)
    head = MultiTaskHead.from_targets(data.tasks).with_stats({"intensity": (100.0, 30.0)})
    idx = np.arange(16)
    y = torch.as_tensor(target_matrix(data.tasks, idx), dtype=torch.float32)
    assert torch.isnan(y).any()
    logits = torch.randn(16, head.n_outputs, requires_grad=True)
    for weighting in ("fixed", "uncertainty"):
        loss_fn = MultiTaskLoss(head, weighting)
        loss = loss_fn(logits, y)
        assert torch.isfinite(loss)
        (grad,) = torch.autograd.grad(loss, logits)
        assert torch.isfinite(grad).all()
        col = 0
        for h in head.heads:
            rows = head.slice(h.name)
            n_t = h.n_outputs if h.kind == "multilabel" else 1
            miss = torch.isnan(y[:, col:col + n_t])
            g = grad[:, rows]
            if h.kind == "multilabel":  # one label's blank silences that label's output only
                assert (g[miss] == 0).all() and (g[~miss] != 0).any()
            else:
                assert (g[miss[:, 0]] == 0).all() and (g[~miss[:, 0]] != 0).any()
            col += n_t
        # a blank label changes nothing: any value behind the mask gives the same loss
        filled = torch.where(torch.isnan(y), torch.full_like(y, 1.0), y)
        lab = ~torch.isnan(y)
        losses, counts = loss_fn.task_losses(logits, y)
        ref = [nn_loss for nn_loss in loss_fn.task_losses(logits[lab[:, -1]], filled[lab[:, -1]])[0]][-1]
        assert torch.allclose(losses[-1], ref) and counts[-1] == lab[:, -1].sum()


def test_multitask_cv_scores_each_task_and_writes_its_columns(medmnist_tasks):
    from medtl.workflows import cross_validate

    root, manifest, _ = medmnist_tasks
    cfg = _config(manifest, "train.task_weighting=uncertainty")
    metrics = cross_validate(cfg, root / "run", progress=False)
    tasks = metrics["tasks"]
    assert list(tasks) == ["lesion", "findings", "band", "intensity"]
    assert tasks["lesion"]["primary"] and "auc" in metrics["pooled"]
    fl = tasks["findings"]["metrics"]
    assert set(fl["auc_per_label"]) == {"bright", "textured"} and len(fl["macro_auc"]["ci95"]) == 2
    assert fl["auc_per_label"]["bright"]["n_labelled"] == tasks["findings"]["per_label"]["bright"]
    reg = tasks["intensity"]["metrics"]
    assert reg["n_labelled"] == tasks["intensity"]["n_labelled"] < N
    for k in ("mae", "r2", "baseline_mae", "mae_minus_baseline"):
        assert np.isfinite(reg[k]["value"]) and len(reg[k]["ci95"]) == 2
    assert tasks["band"]["metrics"]["n_labelled"] == tasks["band"]["n_labelled"]
    # uncertainty weighting: the learned weights are reported per fold and moved from their start
    w = metrics["task_weights"]
    assert set(w) == {"fold0", "fold1"} and set(w["fold0"]) == set(tasks)
    assert metrics["task_weighting"] == "uncertainty"
    with (root / "run" / "predictions.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert {"findings.prob_bright", "findings.label_textured", "band.prob_mid", "band.pred", "intensity.pred",
            "intensity.baseline"} <= set(rows[0])
    blank = [r for r in rows if r["intensity.label"] == ""]
    assert blank and all(r["intensity.pred"] != "" for r in blank)  # predicted, not scored
    # the regression MAE in metrics.json is computed on the labelled rows of predictions.csv only
    lab = [r for r in rows if r["intensity.label"] != ""]
    mae = np.mean([abs(float(r["intensity.pred"]) - float(r["intensity.label"])) for r in lab])
    assert abs(mae - reg["mae"]["value"]) < 1e-4
    base = np.mean([abs(float(r["intensity.baseline"]) - float(r["intensity.label"])) for r in lab])
    assert abs(base - reg["baseline_mae"]["value"]) < 1e-4
    # the checkpoint carries the heads; the model rebuilds and predicts every head
    meta = json.loads((root / "run" / "checkpoints" / "fold0" / "meta.json").read_text())
    head = MultiTaskHead.from_dict(meta["tasks"])
    assert meta["num_classes"] == head.n_outputs == 2 + 2 + 3 + 1
    from medtl.workflows.rundir import RunDir

    model, _ = RunDir(root / "run").load_model("fold0")
    out = predict_outputs(model, np.zeros((2, 1, 16, 16), np.float32), head)
    assert out["band"].shape == (2, 3) and np.allclose(out["band"].sum(1), 1, atol=1e-5)
    assert out["intensity"].shape == (2, 1)


def test_regression_recalibration_is_fitted_on_validation_and_shrinks_noise_to_the_mean():
    from types import SimpleNamespace

    from medtl.data.tasks import TaskTargets
    from medtl.models.heads import HeadSpec
    from medtl.workflows.trainers import recalibrate_regression

    rng = np.random.default_rng(0)
    y = rng.normal(60, 10, 30)
    data = SimpleNamespace(tasks=[TaskTargets("c", "binary", np.zeros(30), ["a", "b"]),
                                  TaskTargets("age", "regression", y, [])])
    head = MultiTaskHead([HeadSpec("c", "binary", ["a", "b"]), HeadSpec("age", "regression", mean=60, std=10)])
    val = np.arange(30)
    # an informative head keeps its slope; a head that overshoots is shrunk towards the training mean
    new, info = recalibrate_regression(head, {"age": y[:, None]}, data, val)
    assert info["age"]["b"] == pytest.approx(1.0)
    new, info = recalibrate_regression(head, {"age": (60 + 2 * (y - 60))[:, None]}, data, val)
    assert info["age"]["b"] == pytest.approx(0.5)
    z = torch.tensor([[0.0, 0.0, 1.0]])  # one training SD above the mean, before shrinking
    assert new.activate(z)["age"].item() == pytest.approx(60 + 0.5 * 10)
    # a head of noise predicts the validation mean
    _, info = recalibrate_regression(head, {"age": rng.normal(60, 10, (30, 1))}, data, val)
    assert info["age"]["b"] < 0.5
