"""Data-parallel CV under torchrun (gloo, 2 CPU processes) equals a single-process run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import yaml

from medtl.data.demo import make_demo_dataset

# ConvNeXt has no BatchNorm: PyTorch has no CPU SyncBatchNorm, so with BatchNorm models the
# per-process batch statistics would (legitimately) differ from one process.
SETS = ["model.name=convnext_atto", "model.pretrained=false", "model.drop_rate=0.0", "train.epochs=2",
        "train.batch_size=8", "data.image_size=[32, 32]", "cv.n_splits=2", "evaluate.n_bootstrap=20",
        "train.tta=false", "train.num_threads=1"]


def _cmd(config, out, launcher):
    cmd = [*launcher, "-m", "medtl", "cv", str(config), "--out", str(out), "--quiet", "--no-resume"]
    for s in SETS:
        cmd += ["--set", s]
    return cmd


@pytest.mark.slow
def test_torchrun_two_gloo_processes_match_one_process(tmp_path):
    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.fail("torchrun not found on PATH; it ships with torch")
    manifest = make_demo_dataset(tmp_path / "data", n_patients=8, slices_per_patient=2, size=32)
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump({"name": "ddp", "data": {"path": str(manifest),
                                                             "intensity": {"mode": "window", "preset": "lung"}}}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run(_cmd(config, tmp_path / "one", [sys.executable]), env=env, capture_output=True, text=True,
                            timeout=600)
    assert single.returncode == 0, single.stderr[-2000:]
    multi = subprocess.run(_cmd(config, tmp_path / "two", [torchrun, "--standalone", "--nproc_per_node", "2"]),
                           env=env, capture_output=True, text=True, timeout=600)
    assert multi.returncode == 0, multi.stderr[-3000:]
    for k in range(2):
        a = json.loads((tmp_path / "one" / "folds" / f"fold{k}.json").read_text())
        b = json.loads((tmp_path / "two" / "folds" / f"fold{k}.json").read_text())
        assert a["test_ids"] == b["test_ids"]
        la = [h["train_loss"] for h in a["info"]["history"]]
        lb = [h["train_loss"] for h in b["info"]["history"]]
        # rank 0 logs its own share's loss; the validation results are global
        assert np.allclose([h["val_loss"] for h in a["info"]["history"]], [h["val_loss"] for h in b["info"]["history"]], atol=1e-3)
        assert np.allclose(np.array(a["proba"]), np.array(b["proba"]), atol=1e-3), (la, lb)
    ma = json.loads((tmp_path / "one" / "metrics.json").read_text())
    mb = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert abs(ma["pooled"]["auc"]["value"] - mb["pooled"]["auc"]["value"]) < 1e-3
