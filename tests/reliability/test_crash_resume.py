"""A `medtl cv` killed with SIGKILL after its first fold resumes to the same results.

Three subprocess runs of a tiny CV (9 synthetic patients, 32 px, 1 epoch, 3 folds): one
straight through; one killed (SIGKILL, no cleanup) as soon as its first fold record
appears; the same command rerun with ``--resume``. The resumed run must reuse the finished
fold and write ``metrics.json`` and ``predictions.csv`` equal to the uninterrupted run's.
Then a finished fold's checkpoint is corrupted: the next resume retrains that fold (never
loads it) and still reproduces the same results.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from reliability_util import REPO_ROOT, medtl_env, run_medtl

from medtl.data.demo import make_demo_dataset

pytestmark = pytest.mark.slow

SETTINGS = {
    "name": "crash", "data": {"format": "manifest", "image_size": [32, 32], "class_names": ["normal", "lesion"],
                              "intensity": {"mode": "window", "preset": "lung"}},
    "model": {"name": "tf_efficientnet_lite0", "pretrained": True},
    "train": {"epochs": 1, "batch_size": 8, "tta": False, "num_threads": 2},
    "cv": {"n_splits": 3}, "evaluate": {"n_bootstrap": 50},
}
SALT = "00112233445566778899aabbccddeeff"  # same pseudonyms in both run folders


def _config(tmp_path: Path) -> Path:
    manifest = make_demo_dataset(tmp_path / "data", n_patients=9, slices_per_patient=2, size=32)
    cfg = {**SETTINGS, "data": {**SETTINGS["data"], "path": str(manifest)}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _new_run(path: Path) -> Path:
    path.mkdir()
    (path / ".pseudonym_salt").write_text(SALT)
    return path


def _kill_after_first_fold(cfg: Path, out: Path, timeout: float = 400) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "medtl", "cv", str(cfg), "--out", str(out), "-q"],
                            cwd=REPO_ROOT, env=medtl_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    try:
        while not list((out / "folds").glob("*.json")):
            if proc.poll() is not None:
                pytest.fail(f"medtl cv ended (rc {proc.returncode}) before any fold finished: "
                            f"{proc.stderr.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail("no fold finished in time")
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL


def _comparable(metrics: dict) -> dict:
    # what the run cost (wall time, the compute bill) differs between any two runs; the results may not
    return {k: v for k, v in metrics.items() if k not in ("seconds", "compute")}


def test_sigkilled_cv_resumes_to_identical_results(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    straight = _new_run(tmp_path / "straight")
    done = run_medtl(["cv", str(cfg), "--out", str(straight), "-q"], cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr[-3000:]

    killed = _new_run(tmp_path / "killed")
    _kill_after_first_fold(cfg, killed)
    finished = sorted(p.name for p in (killed / "folds").glob("*.json"))
    assert finished and len(finished) < 3 and not (killed / "metrics.json").exists()

    resumed = run_medtl(["cv", str(cfg), "--out", str(killed), "--resume", "-q"], cwd=REPO_ROOT)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{Path(finished[0]).stem}: finished earlier" in resumed.stderr

    a = json.loads((straight / "metrics.json").read_text())
    b = json.loads((killed / "metrics.json").read_text())
    assert _comparable(a) == _comparable(b)
    assert (straight / "predictions.csv").read_bytes() == (killed / "predictions.csv").read_bytes()
    for fold in (straight / "folds").glob("*.json"):
        ra, rb = json.loads(fold.read_text()), json.loads((killed / "folds" / fold.name).read_text())
        assert ra["proba"] == rb["proba"], fold.name

    # a corrupt checkpoint is detected by its sha256 and the fold retrained, not loaded
    key = Path(finished[0]).stem
    weights = killed / "checkpoints" / key / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    weights.write_bytes(bytes(raw))
    (killed / "metrics.json").unlink()
    again = run_medtl(["cv", str(cfg), "--out", str(killed), "--resume", "-q"], cwd=REPO_ROOT)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{key}: " in again.stderr and "sha256 mismatch" in again.stderr and "retraining" in again.stderr
    assert _comparable(json.loads((killed / "metrics.json").read_text())) == _comparable(a)
    assert (straight / "predictions.csv").read_bytes() == (killed / "predictions.csv").read_bytes()
