"""Official-split fold ensembles (train.ensemble_folds): k members train, the ensemble predicts and is
scored against each member, predict/export load it as one model, a killed run resumes member by
member, and k = 1 keeps the single-model run."""

from __future__ import annotations

import csv
import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from medtl.config import load_config
from medtl.data.demo import make_demo_dataset
from medtl.errors import ConfigError, DataError
from medtl.evaluate.metrics import METRIC_KEYS
from medtl.models.ensemble import EnsembleClassifier
from medtl.workflows import RunDir
from medtl.workflows import train as train_official
from medtl.workflows.ensembles import member_folds

TINY = ["train.epochs=1", "train.batch_size=8", "data.image_size=[32, 32]", "evaluate.n_bootstrap=50",
        "model.drop_rate=0.0", "train.tta=true", "evaluate.calibration=temperature"]


@pytest.fixture(scope="module")
def split_manifest(tmp_path_factory):
    """16 synthetic CT patients (2 slices each) with an official split by patient: per class 4 train,
    2 val, 2 test patients."""
    root = tmp_path_factory.mktemp("ens")
    manifest = make_demo_dataset(root / "data", n_patients=16, slices_per_patient=2, size=32)
    rows = list(csv.DictReader(manifest.open()))
    order: dict[str, list[str]] = {}
    for r in rows:
        pats = order.setdefault(r["label"], [])
        if r["patient_id"] not in pats:
            pats.append(r["patient_id"])
    split = {p: ("train", "train", "train", "train", "val", "val", "test", "test")[i]
             for pats in order.values() for i, p in enumerate(pats)}
    out = manifest.parent / "manifest_split.csv"
    with out.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=[*rows[0], "split"])
        w.writeheader()
        w.writerows({**r, "split": split[r["patient_id"]]} for r in rows)
    return out


def _cfg(manifest, *extra):
    raw = {"name": "tiny", "data": {"path": str(manifest), "intensity": {"mode": "window", "preset": "lung"}}}
    return load_config(raw, [*TINY, *extra])


@pytest.fixture(scope="module")
def ensemble_run(split_manifest, tmp_path_factory):
    out = tmp_path_factory.mktemp("ens_run") / "run"
    cfg = _cfg(split_manifest, "train.ensemble_folds=3")
    return out, cfg, train_official(cfg, out, progress=False)


def test_k_members_train_on_train_folds_and_the_ensemble_is_scored_against_each(ensemble_run):
    out, cfg, m = ensemble_run
    block = m["ensemble"]
    assert block["folds"] == 3 and [e["key"] for e in block["members"]] == ["member0", "member1", "member2"]
    assert set(m["test"]) == set(METRIC_KEYS) and len(m["test"]["auc"]["ci95"]) == 2
    for e in block["members"]:
        assert set(e["test"]) >= set(METRIC_KEYS) and e["n_train"] + e["n_select"] == m["n_train"]
        d = e["delong"]  # paired: a = ensemble, b = member, on the same test cases
        assert d["n"] == m["n_test"] and d["auc_a"] == pytest.approx(m["test"]["auc"]["value"])
        assert d["auc_b"] == pytest.approx(e["test"]["auc"]) and 0.0 <= d["p_value"] <= 1.0
    aucs = [e["test"]["auc"] for e in block["members"]]
    assert block["member_mean"]["auc"]["mean"] == pytest.approx(np.mean(aucs))
    # the selection folds split the train patients; val and test stay out of every member
    sel = [set(json.loads((out / "folds" / f"member{i}.json").read_text())["test_ids"]) for i in range(3)]
    assert sel[0] == sel[1] == sel[2]  # every member predicts the same (test) cases
    data_y = {r["id"] for r in csv.DictReader((out / "predictions.csv").open())}
    assert sel[0] == data_y and len(data_y) == m["n_test"]
    # members are checkpoints inside the one `final` model; its meta pins each by sha256
    meta = json.loads((out / "checkpoints" / "final" / "meta.json").read_text())
    assert [p["key"] for p in meta["ensemble"]["members"]] == ["member0", "member1", "member2"]
    assert meta["ensemble"]["tta"] is True and meta["temperature"] == m["temperature"] > 0
    for p in meta["ensemble"]["members"]:
        member = json.loads((out / "checkpoints" / "final" / p["key"] / "meta.json").read_text())
        assert member["model_sha256"] == p["model_sha256"]
    assert not (out / "checkpoints" / "final" / "model.safetensors").exists()
    assert RunDir(out).model_keys() == ["final"]
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert {r["fold"] for r in rows} == {"member0|member1|member2"}
    # the bill covers every member's training
    epochs = sum(len([h for h in m["history"] if h["fold"] == e["key"]]) * e["n_train"] for e in block["members"])
    assert m["compute"]["stages"]["training"]["images"] == epochs and m["compute"]["resumed_folds"] == []


def test_member_folds_are_patient_grouped_and_cover_the_train_split():
    y = np.array([0, 0, 1, 1] * 6)
    groups = np.repeat(np.arange(12), 2)
    data = SimpleNamespace(y=y, groups=groups, class_names=["a", "b"])
    trn = np.arange(24)[::-1]  # indices into the data, in any order
    plan = member_folds(data, trn, 3, seed=0)
    assert sorted(np.concatenate([s for _, s in plan]).tolist()) == list(range(24))
    for fit_idx, sel in plan:
        assert not set(groups[fit_idx]) & set(groups[sel]) and len(fit_idx) + len(sel) == 24
    with pytest.raises(DataError, match="train.ensemble_folds=7"):
        member_folds(data, trn, 7, seed=0)


def test_predict_and_export_load_the_ensemble_as_one_model(ensemble_run, split_manifest, tmp_path):
    from medtl.data.prepare import prepare
    from medtl.workflows import export as export_run
    from medtl.workflows import predict as predict_run

    out, cfg, m = ensemble_run
    (key, model, meta), = RunDir(out).load_models()
    assert key == "final" and isinstance(model, EnsembleClassifier) and len(model.members) == 3 and model.tta
    run_rows = {r["id"]: r for r in csv.DictReader((out / "predictions.csv").open())}
    res = predict_run(out, split_manifest, out_dir=tmp_path / "pred", progress=False)
    assert res["n_models"] == 1 and res["threshold"] == pytest.approx(m["threshold"])
    pred = {r["id"]: r for r in csv.DictReader((tmp_path / "pred" / "predictions.csv").open())}
    for cid, r in run_rows.items():
        for c in m["class_names"]:
            assert float(pred[cid][f"prob_{c}"]) == pytest.approx(float(r[f"prob_{c}"]), abs=2e-6)
        assert pred[cid]["pred"] == r["pred"]
    record = json.loads((tmp_path / "pred" / "predict.json").read_text())
    assert record["models"] == ["final"] and record["ensemble_members"] == {"final": ["member0", "member1", "member2"]}

    # the exported graph is the whole ensemble, TTA and temperature inside: the run's test probabilities
    data = prepare(cfg, progress=False)
    tst = data.subset("test")
    x = torch.from_numpy(np.asarray(data.images[tst]))
    want = np.array([[float(run_rows[data.cases[i].case_id][f"prob_{c}"]) for c in m["class_names"]] for i in tst])
    rec = export_run(out, "torchscript", out_dir=tmp_path / "ts")
    assert rec["n_models"] == 1 and rec["max_abs_diff"] <= 1e-4
    assert rec["ensemble"] == {"final": {"members": ["member0", "member1", "member2"], "tta": True}}
    with torch.inference_mode():
        got = torch.jit.load(str(tmp_path / "ts" / "model.ts"))(x).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_a_changed_member_is_refused_unless_trusted(ensemble_run, tmp_path):
    from medtl.training.checkpoint import UnverifiedCheckpointError

    out, _, _ = ensemble_run
    run2 = tmp_path / "run"
    shutil.copytree(out, run2)
    weights = run2 / "checkpoints" / "final" / "member1" / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 0xFF
    weights.write_bytes(bytes(blob))
    with pytest.raises(UnverifiedCheckpointError, match="member1"):
        RunDir(run2).load_models()
    (_, model, meta), = RunDir(run2).load_models(trust_unverified=True)
    assert "sha256 mismatch" in meta["unverified"] and len(model.members) == 3


def test_a_killed_run_resumes_member_by_member_with_identical_results(ensemble_run, tmp_path):
    out, cfg, m = ensemble_run
    run2 = tmp_path / "run2"
    shutil.copytree(out, run2)
    # killed while training member 2: its record, the ensemble's meta.json and the run's figures are gone
    for f in ("folds/member2.json", "checkpoints/final/meta.json", "metrics.json", "predictions.csv"):
        (run2 / f).unlink()
    again = train_official(cfg, run2, progress=False)
    assert again["compute"]["resumed_folds"] == ["member0", "member1"]
    assert again["test"] == m["test"] and again["val"] == m["val"] and again["threshold"] == m["threshold"]
    assert [e["test"] for e in again["ensemble"]["members"]] == [e["test"] for e in m["ensemble"]["members"]]
    assert (run2 / "predictions.csv").read_text() == (out / "predictions.csv").read_text()
    # the resumed members' recorded cost is in the bill: it is not smaller than the first run's training
    assert again["compute"]["resumed_units"] == 2
    assert again["compute"]["stages"]["training"]["images"] == m["compute"]["stages"]["training"]["images"]


def test_single_model_run_keeps_its_layout(split_manifest, tmp_path):
    m = train_official(_cfg(split_manifest), tmp_path / "one", progress=False)
    assert "ensemble" not in m and isinstance(m["best_epoch"], int)
    ck = tmp_path / "one" / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["final"]
    assert sorted(p.name for p in (ck / "final").iterdir()) == ["meta.json", "model.safetensors"]
    assert sorted(p.name for p in (tmp_path / "one" / "folds").iterdir()) == ["final.json"]
    assert {r["fold"] for r in csv.DictReader((tmp_path / "one" / "predictions.csv").open())} == {"test"}
    (_, model, meta), = RunDir(tmp_path / "one").load_models()
    assert not isinstance(model, EnsembleClassifier) and "ensemble" not in meta


def test_ensemble_module_exports_to_onnx_as_one_graph(tmp_path):
    pytest.importorskip("onnxruntime")
    from medtl.workflows.exporting import EnsemblePredictor, _onnx

    torch.manual_seed(0)
    members = [torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.Linear(64, 2))
               for _ in range(3)]
    predictor = EnsemblePredictor([EnsembleClassifier(members, tta=True)], [1.7]).eval()
    x = torch.rand(2, 1, 6, 6)
    path, got = _onnx(predictor, x, tmp_path)
    with torch.inference_mode():
        want = predictor(x).numpy()
    assert path.name == "model.onnx"
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_ensemble_module_averages_member_probabilities_with_flip_inside():
    torch.manual_seed(0)
    members = [torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3)) for _ in range(2)]
    x = torch.rand(5, 1, 3, 4)
    flip = torch.flip(x, dims=(-1,))
    probs = [0.5 * (mm(x).softmax(-1) + mm(flip).softmax(-1)) for mm in members]
    ens = EnsembleClassifier(members, tta=True)
    torch.testing.assert_close(ens(x).softmax(-1), (probs[0] + probs[1]) / 2)
    ens.tta = False
    torch.testing.assert_close(ens(x).softmax(-1), (members[0](x).softmax(-1) + members[1](x).softmax(-1)) / 2)
    with pytest.raises(ConfigError, match="at least one model"):
        EnsembleClassifier([])


def test_config_rules_and_fold_key(split_manifest):
    from medtl.workflows.rundir import FoldKey

    with pytest.raises(ConfigError, match="linear probe"):
        _cfg(split_manifest, "train.ensemble_folds=3", "train.strategy.name=linear_probe")
    with pytest.raises(ConfigError, match="ensemble_folds"):
        _cfg(split_manifest, "train.ensemble_folds=0")
    assert str(FoldKey.parse("member2")) == "member2" and FoldKey.parse("member2").kind == "member"
    assert RunDir("r").checkpoint("member2").as_posix() == "r/checkpoints/final/member2"
