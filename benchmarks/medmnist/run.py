"""MedMNIST official-split benchmark: mean +- sd over seeds, pretrained vs scratch, beside MedMNIST v2.

One command produces benchmarks/medmnist.md (and results.json):

    python benchmarks/medmnist/run.py --seeds 0 1 2                    # all three datasets
    python benchmarks/medmnist/run.py --datasets breastmnist --seeds 0 --set train.device=cuda

Each (dataset, init, seed) is one `medtl train CONFIG --set train.seed=S [--set model.pretrained=false]`
run into RUNS/<dataset>/<init>/seed<S>; finished runs (metrics.json present, same config hash)
are reused, so the script can be stopped and restarted.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = {"breastmnist": "configs/breastmnist.yaml", "pneumoniamnist": "configs/pneumoniamnist.yaml",
           "adrenalmnist3d": "configs/adrenalmnist3d.yaml"}
# MedMNIST v2 (Yang et al., Sci. Data 2023), official test split, AUC / ACC, trained from scratch
PAPER = {"breastmnist": {"ResNet-18 (28)": (.901, .863), "ResNet-50 (224)": (.866, .842),
                         "Google AutoML Vision": (.919, .861)},
         "pneumoniamnist": {"ResNet-18 (28)": (.944, .854), "ResNet-50 (224)": (.962, .884),
                            "Google AutoML Vision": (.991, .946)},
         "adrenalmnist3d": {"ResNet-18 + ACS": (.839, .754), "ResNet-50 + 3D": (.828, .745),
                            "auto-sklearn": (.828, .802)}}


def device_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001 - only for labelling the table
        pass
    import os

    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def run_one(dataset: str, init: str, seed: int, runs: Path, extra: list[str]) -> dict:
    out = runs / dataset / init / f"seed{seed}"
    if (out / "metrics.json").exists():
        return json.loads((out / "metrics.json").read_text())
    sets = [f"train.seed={seed}"] + (["model.pretrained=false"] if init == "scratch" else []) + extra
    cmd = [sys.executable, "-m", "medtl", "train", CONFIGS[dataset], "--out", str(out), "--quiet"]
    for s in sets:
        cmd += ["--set", s]
    print("+", " ".join(cmd), flush=True)
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT)
    m = json.loads((out / "metrics.json").read_text())
    m["wall_s"] = round(time.time() - t0, 1)
    return m


def summarise(results: dict, device: str, cmdline: str) -> str:
    lines = ["# MedMNIST official-split benchmark", "",
             f"Produced by `{cmdline}` on **{device}**. Test AUC / ACC, mean ± sd over seeds "
             "(each seed: one `medtl train` run; the test split is touched once, at the end).", ""]
    for ds, by_init in results.items():
        lines += [f"## {ds}", "", "| model | init | seeds | AUC | ACC | wall s / run |", "|---|---|---|---|---|---|"]
        for init, runs in by_init.items():
            auc = np.array([r["test"]["auc"]["value"] for r in runs])
            acc = np.array([r["test"]["acc"]["value"] for r in runs])
            wall = np.mean([r.get("seconds", np.nan) for r in runs])
            sd = lambda a: a.std(ddof=1) if len(a) > 1 else 0.0  # noqa: E731
            lines.append(f"| medtl {runs[0]['model']} | {init} | {len(runs)} | {auc.mean():.3f} ± {sd(auc):.3f} | "
                         f"{acc.mean():.3f} ± {sd(acc):.3f} | {wall:.0f} |")
        for name, (a, c) in PAPER[ds].items():
            lines.append(f"| MedMNIST v2: {name} | scratch | — | {a:.3f} | {c:.3f} | — |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--inits", nargs="+", default=["imagenet", "scratch"], choices=["imagenet", "scratch"])
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "medmnist_bench")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="extra --set for every run")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "medmnist.md")
    args = ap.parse_args()
    results = {ds: {init: [run_one(ds, init, s, args.runs, args.sets) for s in args.seeds] for init in args.inits}
               for ds in args.datasets}
    md = summarise(results, device_name(), "python benchmarks/medmnist/run.py " + " ".join(sys.argv[1:]))
    args.out.write_text(md + "\n")
    (args.out.with_suffix(".json")).write_text(json.dumps(
        {ds: {i: [{"auc": r["test"]["auc"]["value"], "acc": r["test"]["acc"]["value"], "seconds": r.get("seconds")}
                  for r in rs] for i, rs in d.items()} for ds, d in results.items()}, indent=2))
    print(md)


if __name__ == "__main__":
    main()
