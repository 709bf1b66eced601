"""Seed ensembles (train.ensemble_seeds): every fold's model is the mean of n fine-tunes from seeds
train.seed, train.seed + 1, ...; member 0 is the single model of train.seed, the checkpoint loads as
one model (multi-task members too), the bill counts every member, and the config refuses what it
cannot do."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medtl.config import load_config
from medtl.data.demo import make_demo_dataset
from medtl.errors import ConfigError
from medtl.models.ensemble import EnsembleClassifier
from medtl.workflows import RunDir, cross_validate
from medtl.workflows import train as train_official

TINY = ["train.epochs=2", "train.batch_size=8", "data.image_size=[32, 32]", "evaluate.n_bootstrap=50",
        "model.drop_rate=0.0", "train.tta=true", "evaluate.calibration=temperature", "cv.n_splits=2"]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("seeds") / "data", n_patients=12, slices_per_patient=2, size=32)


def _cfg(manifest, *extra):
    raw = {"name": "tiny", "data": {"path": str(manifest), "intensity": {"mode": "window", "preset": "lung"}}}
    return load_config(raw, [*TINY, *extra])


@pytest.fixture(scope="module")
def runs(manifest, tmp_path_factory):
    root = tmp_path_factory.mktemp("seed_runs")
    out = {}
    for name, extra in (("s0", ["train.seed=0"]), ("ens", ["train.seed=0", "train.ensemble_seeds=2"])):
        out[name] = (root / name, cross_validate(_cfg(manifest, *extra), root / name, progress=False))
    return out


def _folds(run_dir):
    return {p.stem: json.loads(p.read_text()) for p in sorted((run_dir / "folds").glob("*.json"))}


def test_each_fold_is_the_mean_of_its_members_and_member_0_is_the_single_model(runs, manifest):
    from medtl.data.prepare import prepare
    from medtl.training.loop import predict_proba

    single0, ens = _folds(runs["s0"][0]), _folds(runs["ens"][0])
    assert set(ens) == set(single0) and len(ens) == 2
    data = prepare(_cfg(manifest, "train.seed=0"), progress=False)
    index = {c.case_id: i for i, c in enumerate(data.cases)}
    run = RunDir(runs["ens"][0])
    for key, rec in ens.items():
        assert rec["test_ids"] == single0[key]["test_ids"]  # the folds come from cv.seed
        x = data.images[[index[i] for i in rec["test_ids"]]]
        model, _ = run.load_model(key)
        member = [predict_proba(m, x, tta=True) for m in model.members]
        np.testing.assert_allclose(member[0], np.asarray(single0[key]["proba_raw"]), atol=1e-5)
        np.testing.assert_allclose(np.mean(member, axis=0), np.asarray(rec["proba_raw"]), atol=1e-5)
        assert np.abs(member[0] - member[1]).max() > 1e-4  # the seeds made two different models
        info = rec["info"]
        assert info["ensemble_seeds"] == [0, 1] and len(info["member_best_epochs"]) == 2
        assert info["best_epoch"] == single0[key]["info"]["best_epoch"] == info["member_best_epochs"][0]


def test_the_bill_counts_every_member(runs):
    one = runs["s0"][1]["compute"]["stages"]["training"]["images"]
    assert runs["ens"][1]["compute"]["stages"]["training"]["images"] == 2 * one


def test_the_fold_checkpoint_is_one_model_over_its_members(runs):
    out = runs["ens"][0]
    models = RunDir(out).load_models()
    assert len(models) == 2
    for key, model, meta in models:
        assert isinstance(model, EnsembleClassifier) and len(model.members) == 2 and model.tta
        assert [m["key"] for m in meta["ensemble"]["members"]] == ["member0", "member1"]
        assert json.loads((out / "checkpoints" / key / "member1" / "meta.json").read_text())["seed"] == 1


def test_explain_explains_the_ensemble_not_one_member(runs, tmp_path):
    from medtl.workflows import explain_run

    explain_run(runs["ens"][0], tmp_path / "explain", progress=False,
                overrides=["explain.methods=[gradcam]", "explain.n_correct=1", "explain.n_wrong=1",
                           "explain.cascade_steps=2", "explain.faithfulness_steps=0"])
    rec = json.loads((tmp_path / "explain" / "explain.json").read_text())
    steps = rec["randomization"]["gradcam"]["steps"]
    # the first cascade step re-initialises the classifier of both members, not all of one member
    assert steps[0]["randomized"].endswith("(x2 members)") and "members." not in steps[0]["randomized"]
    assert (tmp_path / "explain" / "report.html").stat().st_size > 0


def test_official_split_run_records_its_members(manifest, tmp_path):
    import csv

    rows = list(csv.DictReader(manifest.open()))
    pats = sorted({r["patient_id"] for r in rows})
    by_label: dict[str, list[str]] = {}
    for r in rows:
        if r["patient_id"] not in by_label.setdefault(r["label"], []):
            by_label[r["label"]].append(r["patient_id"])
    split = {p: ("train", "train", "train", "val", "test", "test")[i % 6]
             for ps in by_label.values() for i, p in enumerate(ps)}
    assert set(split) == set(pats)
    man = manifest.parent / "manifest_split.csv"  # beside the manifest: its paths are relative to its folder
    with man.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=[*rows[0], "split"])
        w.writeheader()
        w.writerows({**r, "split": split[r["patient_id"]]} for r in rows)
    m = train_official(_cfg(man, "train.ensemble_seeds=2", "train.seed=3"), tmp_path / "run", progress=False)
    assert m["ensemble_seeds"] == [3, 4] and len(m["member_best_epochs"]) == 2
    (key, model, _), = RunDir(tmp_path / "run").load_models()
    assert key == "final" and isinstance(model, EnsembleClassifier) and len(model.members) == 2


@pytest.mark.parametrize("extra, match", [
    (["train.strategy.name=linear_probe"], "same probe whatever the seed"),
    (["train.ensemble_folds=3"], "two kinds of ensemble"),
    (["train.ensemble_seeds=0"], "ensemble_seeds"),
    (["train.ensemble_seeds=21"], "ensemble_seeds"),
])
def test_config_refuses_what_a_seed_ensemble_cannot_do(manifest, extra, match):
    with pytest.raises(ConfigError, match=match):
        _cfg(manifest, "train.ensemble_seeds=3", *extra)


def test_multitask_members_average_every_head_and_the_checkpoint_gives_it_back(shared_data, tmp_path):
    """Four kinds of head (binary, multilabel, multiclass, regression with blanks) on real images: the
    fold's task outputs are the members' means, and the saved ensemble, loaded as one module,
    predicts them back through the ensemble's head."""
    from medtl.data.prepare import prepare
    from medtl.models.heads import MultiTaskHead
    from medtl.training.loop import predict_outputs
    from tests.workflows.test_multitask import _config, _medmnist_manifest

    manifest, _ = _medmnist_manifest(shared_data, tmp_path / "data")
    cfg = _config(manifest, "train.ensemble_seeds=2", "train.tta=true")
    m = cross_validate(cfg, tmp_path / "run", progress=False)
    assert {"lesion", "findings", "band", "intensity"} <= set(m["tasks"])
    data = prepare(cfg, progress=False)
    index = {c.case_id: i for i, c in enumerate(data.cases)}
    run = RunDir(tmp_path / "run")
    for key, rec in _folds(tmp_path / "run").items():
        assert rec["info"]["ensemble_seeds"] == [0, 1] and len(rec["info"]["member_task_info"]) == 2
        x = data.images[[index[i] for i in rec["test_ids"]]]
        model, meta = run.load_model(key)
        assert isinstance(model, EnsembleClassifier) and model.heads is not None
        head = MultiTaskHead.from_dict(meta["tasks"])
        got = predict_outputs(model, x, head)  # the module flips inside (tta), as predict runs it
        want = {name: np.mean([predict_outputs(mb, x, h, tta=True)[name] for mb, h in zip(model.members, model.heads)],
                              axis=0) for name in got}
        for name in got:
            np.testing.assert_allclose(got[name], want[name], atol=1e-5, err_msg=name)
        np.testing.assert_allclose(got["lesion"], np.asarray(rec["proba_raw"]), atol=1e-5)
