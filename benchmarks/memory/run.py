"""3D data larger than the memory budget: `medtl cv` from the on-disk cache, its peak RSS and its metrics.

Generates a 3D data set (NIfTI volumes, half with a bright blob) whose decoded size at
``data.image_size`` is at least twice ``data.memory_budget``, then runs three 5-fold CVs of
the same tiny 3D model (timm ``test_resnet`` inflated to 3D, random init, 1 epoch), each
``python -m medtl cv`` in its own subprocess, reading that process's peak RSS (``wait4``):

* ``model``: the same config on a tiny data set (20 volumes, in memory): the model's own memory
  (the Python process, torch, the model, its optimiser and activations, a batch);
* ``disk``: the full data set with ``data.memory_budget`` below its decoded size: decoded
  once into the run's ``decoded/`` cache and read a batch at a time;
* ``memory``: the same data with a budget it fits in: held in memory.

Checks: ``disk`` peak RSS <= budget + ``model`` peak RSS, and ``disk`` and ``memory`` write the
same metrics.json numbers (every key but wall time, compute bill and config hash, which
differ by construction). Writes ``results.json`` beside this file.

Usage:
    python benchmarks/memory/run.py                      # 576 volumes, 16 MiB budget (about 37.7 MB of images)
    python benchmarks/memory/run.py --cases 1100 --budget 32MiB
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from _env import describe, finish

from medtl.config import parse_bytes

REPO = Path(__file__).resolve().parents[2]
IMAGE_SIZE = [16, 32, 32]
SOURCE_SHAPE = (24, 40, 40)
VARYING = ("seconds", "compute", "config_hash")  # differ between any two runs by construction


def make_volumes(root: Path, n: int, seed: int = 0) -> Path:
    """``n`` int16 NIfTI volumes (one per patient, label 1 with a blob at a random place) and a manifest."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    rows = ["path,label,patient_id"]
    for i in range(n):
        vol = rng.normal(0, 60, SOURCE_SHAPE).astype(np.int16)
        label = i % 2
        if label:
            z, y, x = (int(rng.integers(4, s - 8)) for s in SOURCE_SHAPE)
            vol[z:z + 5, y:y + 7, x:x + 7] += 500
        path = root / f"vol{i:05d}.nii"
        nib.save(nib.Nifti1Image(vol, affine), path)
        rows.append(f"{path},{label},P{i:05d}")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    return root / "manifest.csv"


def config(manifest: Path, budget: str, out: Path) -> Path:
    cfg = {"name": "memory-bench",
           "data": {"path": str(manifest), "spatial_dims": 3, "image_size": IMAGE_SIZE, "memory_budget": budget,
                    "intensity": {"mode": "range", "vmin": -200, "vmax": 800}},
           "model": {"name": "test_resnet", "pretrained": False},
           "train": {"epochs": 1, "batch_size": 16, "tta": False, "num_threads": 2, "device": "cpu"},
           "cv": {"n_splits": 5}, "evaluate": {"n_bootstrap": 200}}
    out.write_text(yaml.safe_dump(cfg))
    return out


def run_cv(cfg: Path, out: Path) -> dict:
    """``python -m medtl cv`` in a subprocess: wall seconds and that process's peak RSS (MiB)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "medtl", "cv", str(cfg), "--out", str(out), "-q"], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"medtl cv failed ({cfg}):\n{err[-3000:]}")
    return {"wall_s": round(wall, 1), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}


def comparable(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k not in VARYING}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=int, default=576)
    ap.add_argument("--budget", default="16MiB")
    ap.add_argument("--work", type=Path, default=None, help="working folder (default: a temporary one)")
    args = ap.parse_args()
    budget = parse_bytes(args.budget)
    decoded = args.cases * int(np.prod(IMAGE_SIZE)) * 4
    if decoded < 2 * budget:
        raise SystemExit(f"{args.cases} cases decode to {decoded} bytes, less than twice the budget; raise --cases")
    env = describe("cpu")
    with tempfile.TemporaryDirectory(prefix="medtl-memory-") as tmp:
        work = args.work or Path(tmp)
        t0 = time.perf_counter()
        big = make_volumes(work / "big", args.cases)
        tiny = make_volumes(work / "tiny", 20, seed=1)
        gen_s = time.perf_counter() - t0
        runs = {
            "model": run_cv(config(tiny, args.budget, work / "model.yaml"), work / "run_model"),
            "disk": run_cv(config(big, args.budget, work / "disk.yaml"), work / "run_disk"),
            "memory": run_cv(config(big, "4GiB", work / "memory.yaml"), work / "run_memory"),
        }
        cache = list((work / "run_disk" / "decoded").glob("*/images.f32"))
        metrics = {k: json.loads((work / f"run_{k}" / "metrics.json").read_text()) for k in ("disk", "memory")}
        same = comparable(metrics["disk"]) == comparable(metrics["memory"])
        differing = sorted(k for k in comparable(metrics["disk"])
                           if metrics["disk"].get(k) != metrics["memory"].get(k))
        limit = budget / 2**20 + runs["model"]["peak_rss_mib"]
        result = {
            "command": "python benchmarks/memory/run.py " + " ".join(sys.argv[1:]),
            "cases": args.cases, "image_size": IMAGE_SIZE, "source_shape": list(SOURCE_SHAPE),
            "decoded_mib": round(decoded / 2**20, 2), "budget_mib": round(budget / 2**20, 2),
            "decoded_over_budget": round(decoded / budget, 2), "generate_s": round(gen_s, 1), "runs": runs,
            "disk_cache_written": bool(cache), "disk_cache_mib": round(sum(p.stat().st_size for p in cache) / 2**20, 2),
            "disk_peak_within_budget_plus_model": runs["disk"]["peak_rss_mib"] <= limit,
            "budget_plus_model_mib": round(limit, 1), "metrics_equal": same, "metrics_differing_keys": differing,
            "pooled_auc": metrics["disk"]["pooled"]["auc"]["value"], "env": finish(env),
        }
    out = Path(__file__).resolve().parent / "results.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    if not (same and result["disk_peak_within_budget_plus_model"] and cache):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
