"""`medtl auto`: DATA of every kind dispatches, the plan is written, loads and reruns, --plan-only stops
there, a run writes the usual run directory with its budget bookkeeping, bad DATA is a clear error."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from medtl.config import load_config
from medtl.errors import ConfigError, DataError
from medtl.workflows import auto
from medtl.workflows import autoconfig as A
from medtl.workflows.official import train
from medtl.workflows.planning import Timing

REPO = Path(__file__).resolve().parents[2]


def _npz(path, n=(120, 24, 24), side=16, dims=2):
    """A learnable tiny MedMNIST-like file: class 1 has a bright square (cube)."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, k in zip(("train", "val", "test"), n):
        y = (np.arange(k) % 3 == 0).astype(np.int64)
        img = rng.integers(0, 120, size=(k, *[side] * dims), dtype=np.uint8)
        img[(y == 1, *[slice(4, 12)] * dims)] += 120
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = img, y[:, None]
    np.savez(path, **arrays)
    return path


def _pngs(folder: Path, n=24, patients=12):
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        arr = np.random.default_rng(i).integers(0, 100, size=(20, 20), dtype=np.uint8)
        if i % 2:
            arr[5:15, 5:15] += 150
        Image.fromarray(arr).save(folder / f"s{i:02d}.png")
        rows.append((f"s{i:02d}.png", "pos" if i % 2 else "neg", f"P{i % patients}"))
    return rows


@pytest.fixture
def fake_timing(monkeypatch, tmp_path):
    """Timings without building networks: 0.05 s per step at 128 px, growing with the pixels."""
    monkeypatch.setenv("MEDTL_CACHE_DIR", str(tmp_path / "cache"))

    def fake(cfg, encoder, side, *, n_classes, batch_size, **kw):
        scale = (side / 128) ** 2
        return Timing(encoder, side, batch_size, 0.05 * scale, 0.02 * scale)

    monkeypatch.setattr(A, "time_encoder", fake)


def test_each_data_kind_dispatches(tmp_path):
    npz = _npz(tmp_path / "tiny.npz")
    base, user, kind = A.source_config(npz)
    assert kind == "medmnist" and base["data"] == {"format": "medmnist", "path": str(npz.resolve()), "split": "official"}
    assert base["name"] == "tiny" and user == set()

    rows = _pngs(tmp_path / "scans")
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label,patient_id\n" + "".join(f"scans/{f},{y},{p}\n" for f, y, p in rows))
    base, _, kind = A.source_config(manifest)
    assert kind == "manifest" and base["data"]["format"] == "manifest"

    (tmp_path / "scans" / "labels.csv").write_text("file,label,patient_id,site\n" + "".join(
        f"{f},{y},{p},A\n" for f, y, p in rows))
    base, _, kind = A.source_config(tmp_path / "scans")
    lab = base["data"]["labels"]
    assert kind == "folder" and (lab["file_column"], lab["patient_column"], lab["site_column"]) == (
        "file", "patient_id", "site")
    other = tmp_path / "other.csv"
    other.write_text("filename,label\n" + "".join(f"{f},{y}\n" for f, y, _ in rows))
    base, _, _ = A.source_config(tmp_path / "scans", labels=other)
    assert base["data"]["labels"]["file_column"] == "filename" and base["data"]["labels"]["patient_column"] is None
    load_config(base)  # a loadable starting config

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"name: mine\ndata:\n  path: {manifest}\ntrain:\n  epochs: 3\n")
    base, user, kind = A.source_config(cfg)
    assert kind == "config" and base["train"] == {"epochs": 3} and {"data.path", "train.epochs"} <= user


def test_bad_data_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="does not exist.*MedMNIST .npz, a manifest CSV"):
        A.source_config(tmp_path / "nothing.npz")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match=r"\(\.txt\) is not something medtl auto reads"):
        A.source_config(tmp_path / "notes.txt")
    (tmp_path / "labels_only.csv").write_text("file,label\na.png,1\n")
    with pytest.raises(DataError, match="pass the image folder as DATA and this file as --labels"):
        A.source_config(tmp_path / "labels_only.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="needs a label CSV: pass --labels"):
        A.source_config(tmp_path / "empty")
    with pytest.raises(DataError, match="--labels is for a folder"):
        A.source_config(tmp_path / "notes.txt", labels=tmp_path / "labels_only.csv")
    (tmp_path / "bad.yaml").write_text("data:\n  path: x.csv\ntrain:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match="train.epoch"):
        A.source_config(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="'budget' parameter of auto must be a positive"):
        auto(_npz(tmp_path / "t.npz"), tmp_path / "out", budget=0)


def test_plan_only_ranks_plans_and_writes_a_config_that_reruns(tmp_path, fake_timing, monkeypatch):
    monkeypatch.setattr(A, "available_candidates", lambda dims: ["tf_efficientnet_lite0.in1k",
                                                                 "tf_efficientnet_lite1.in1k"])
    out = tmp_path / "run"
    res = auto(_npz(tmp_path / "tiny.npz"), out, budget=10, plan_only=True, progress=False)
    assert (res["workflow"], res["mode"]) == ("train", "finetune")
    assert not (out / "metrics.json").exists()                          # --plan-only: nothing trained
    fp = json.loads((out / "fingerprint.json").read_text())
    assert fp["n_cases"] == 168 and fp["shape"] == [16, 16] and fp["has_official_split"]
    assert [r["encoder"] for r in json.loads((out / "rank" / "rank.json").read_text())["candidates"]]
    text = (out / "plan.yaml").read_text()
    assert "# best linear-probe AUC" in text and "rerun it with" in text and "medtl train plan.yaml" in text
    plan = yaml.safe_load(text)
    assert plan["model"]["name"] in ("tf_efficientnet_lite0.in1k", "tf_efficientnet_lite1.in1k")
    assert plan["data"]["image_size"] == [128, 128] and plan["train"]["epochs"] == 20  # 10 min fit them all
    doc = json.loads((out / "auto.json").read_text())
    assert doc["budget"]["budget_min"] == 10 and doc["budget"]["planned_total_min"] < 10
    assert {"fingerprint", "timing", "ranking", "run_training"} <= set(doc["budget"]["planned_min"])
    assert len(doc["ranking"]) == 2 and doc["timings"]
    # the plan is an ordinary config: `medtl train plan.yaml` reruns it (here shortened)
    cfg = load_config(out / "plan.yaml", ["train.epochs=1", "data.image_size=[32, 32]", "evaluate.n_bootstrap=20"])
    metrics = train(cfg, tmp_path / "rerun", progress=False)
    assert 0.0 <= metrics["test"]["auc"]["value"] <= 1.0 and metrics["n_test"] == 24


def test_tiny_data_runs_a_probe_into_the_usual_run_directory(tmp_path, fake_timing, monkeypatch):
    monkeypatch.setattr(A, "available_candidates", lambda dims: ["tf_efficientnet_lite0.in1k"])
    out = tmp_path / "run"
    res = auto(_npz(tmp_path / "tiny.npz", n=(40, 12, 12)), out, budget=5, progress=False)
    assert res["mode"] == "probe" and "tiny data" in res["plan"]["reasons"]["train.strategy.name"]
    for name in ("plan.yaml", "config.yaml", "metrics.json", "predictions.csv", "fingerprint.json", "auto.json"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["strategy"]["name"] == "linear_probe" and metrics["n_test"] == 12
    doc = json.loads((out / "auto.json").read_text())
    assert doc["metrics"]["auc"] == metrics["test"]["auc"]["value"]
    b = doc["budget"]
    assert b["run_actual_min"] > 0 and b["actual_total_min"] >= b["run_actual_min"] and "within_budget" in b
    assert not (out / "rank").exists()                                # one candidate: nothing to rank


def test_manifest_without_split_plans_grouped_cv(tmp_path, fake_timing, monkeypatch):
    monkeypatch.setattr(A, "available_candidates", lambda dims: ["tf_efficientnet_lite0.in1k"])
    rows = _pngs(tmp_path / "scans", n=24, patients=8)
    (tmp_path / "scans" / "labels.csv").write_text("file,label,patient_id\n" + "".join(
        f"{f},{y},{p}\n" for f, y, p in rows))
    res = auto(tmp_path / "scans", tmp_path / "run", budget=5, plan_only=True, progress=False)
    plan = yaml.safe_load((tmp_path / "run" / "plan.yaml").read_text())
    assert res["workflow"] == "cv" and plan["cv"]["n_splits"] == 4  # the smallest class has 4 patients
    assert plan["data"]["format"] == "folder" and plan["train"]["strategy"]["name"] == "linear_probe"
    assert "patient-grouped" in res["plan"]["reasons"]["cv.n_splits"]
    assert "medtl cv" in (tmp_path / "run" / "plan.yaml").read_text()
    load_config(tmp_path / "run" / "plan.yaml")


def test_volumes_plan_3d_without_ranking(tmp_path, fake_timing, monkeypatch):
    seen = []
    monkeypatch.setattr(A, "available_candidates", lambda dims: seen.append(dims) or [
        "tf_efficientnet_lite0.in1k", "resnet18"])
    res = auto(_npz(tmp_path / "vol.npz", n=(150, 30, 30), side=12, dims=3), tmp_path / "run", budget=30, plan_only=True,
               progress=False)
    plan = yaml.safe_load((tmp_path / "run" / "plan.yaml").read_text())
    assert seen == [3] and plan["data"]["spatial_dims"] == 3 and plan["data"]["image_size"] == [12, 12, 12]
    assert "not ranked" in res["plan"]["reasons"]["model.name"] and not (tmp_path / "run" / "rank").exists()
    assert res["mode"] == "finetune" and plan["train"]["epochs"] == 20
    load_config(tmp_path / "run" / "plan.yaml")


def test_a_config_keeps_its_values_and_gets_the_rest_planned(tmp_path, fake_timing):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"name: mine\ndata:\n  format: medmnist\n  path: {_npz(tmp_path / 't.npz')}\n"
                   "  image_size: [32, 32]\nmodel:\n  name: tf_efficientnet_lite0\ntrain:\n  lr: 0.0005\n")
    res = auto(cfg, tmp_path / "run", budget=10, plan_only=True, progress=False)
    plan = yaml.safe_load((tmp_path / "run" / "plan.yaml").read_text())
    assert plan["name"] == "mine" and plan["model"]["name"] == "tf_efficientnet_lite0"
    assert plan["data"]["image_size"] == [32, 32] and plan["train"]["lr"] == 0.0005
    assert plan["data"]["intensity"]["mode"] == "range" and "epochs" in plan["train"]  # planned: unset keys
    assert {"model.name", "train.lr", "data.image_size"}.isdisjoint(res["plan"]["reasons"])


def test_time_encoder_measures_a_real_step():
    cfg = load_config({"data": {"path": "unused.csv"}})
    t = A.time_encoder(cfg, "tf_efficientnet_lite0", 32, n_classes=2, batch_size=4, steps=1)
    assert t.side == 32 and t.batch_size == 4 and t.train_step_s > 0 and t.eval_batch_s > 0


def test_cli_plan_only_and_bad_data(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data:\n  format: medmnist\n  path: {_npz(tmp_path / 't.npz')}\n  image_size: [32, 32]\n"
                   "model:\n  name: tf_efficientnet_lite0\n")
    run = lambda *a: subprocess.run([sys.executable, "-m", "medtl", "auto", *map(str, a)], cwd=REPO,  # noqa: E731
                                    capture_output=True, text=True, timeout=600)
    r = run(cfg, "--out", tmp_path / "run", "--plan-only", "-q", "--budget", "5")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "run" / "plan.yaml").is_file() and not (tmp_path / "run" / "metrics.json").exists()
    r = run(tmp_path / "missing.npz", "--out", tmp_path / "x")
    err = " ".join(r.stderr.split())  # the console wraps long lines
    flat = "".join(err.split())  # the console wraps a long path anywhere
    assert r.returncode == 2 and "Traceback" not in err and "missing.npz'doesnotexist" in flat
    assert err.startswith("error: ") and "a manifest CSV" in err
