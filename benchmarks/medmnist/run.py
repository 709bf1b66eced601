"""MedMNIST official-split benchmark: mean +- sd over seeds, pretrained vs scratch, beside MedMNIST v2.

One command produces benchmarks/medmnist.md (and medmnist.json):

    python benchmarks/medmnist/run.py                                   # GPU: shipped configs, 3 seeds, both inits
    python benchmarks/medmnist/run.py --preset cpu --scratch-seeds 0    # 2-core CPU budget (see PRESETS)
    python benchmarks/medmnist/run.py --datasets breastmnist --seeds 0 --set train.device=cuda

Each (dataset, init, seed) is one `medtl train CONFIG --set train.seed=S [--set model.pretrained=false]`
run into RUNS/<dataset>/<init>/seed<S>. A finished run (metrics.json present) is reused only if its
config hash equals the one this command would train, so the script can be stopped and restarted, and a
changed config or preset is retrained rather than silently mixed in.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(1, str(Path(__file__).resolve().parents[2]))  # medtl from this checkout, installed or not
from _env import describe, finish, md_header  # noqa: E402

from medtl.config import Config, config_hash, expand_path, load_config

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


# Per-dataset overrides. "shipped" trains the configs as they are (the GPU setting). "cpu" keeps the
# 2-core budget to ~10 min a run: PneumoniaMNIST's 4708 images at 128 px would take ~4 min an epoch.
PRESETS = {"shipped": {},
           "cpu": {"pneumoniamnist": ["data.image_size=[64, 64]", "train.epochs=10"]}}


def _sets(dataset: str, init: str, seed: int, preset: str, extra: list[str]) -> list[str]:
    return ([f"train.seed={seed}"] + (["model.pretrained=false"] if init == "scratch" else [])
            + PRESETS[preset].get(dataset, []) + extra)


def _recipe(cfg: Config) -> str:
    """Config hash with the data path resolved (runs store it absolute; configs use ${MEDTL_SHARED_DATA})."""
    path = str((ROOT / expand_path(str(cfg.data.path))).resolve())
    return config_hash(cfg.model_copy(update={"data": cfg.data.model_copy(update={"path": path})}))


def run_one(dataset: str, init: str, seed: int, runs: Path, preset: str, extra: list[str]) -> dict:
    out = runs / dataset / init / f"seed{seed}"
    sets = _sets(dataset, init, seed, preset, extra)
    want = _recipe(load_config(ROOT / CONFIGS[dataset], sets))
    if (out / "metrics.json").exists():
        # re-read the finished run's recipe with today's schema: fields added since then take their
        # defaults (which keep the old behaviour), so only a real recipe change forces a retrain
        raw = {k: v for k, v in yaml.safe_load((out / "config.yaml").read_text()).items() if not k.startswith("_")}
        have = _recipe(load_config(raw))
        if have == want:
            return {**json.loads((out / "metrics.json").read_text()), "seed": seed}
        print(f"  {out}: finished with another config (hash {have} != {want}); retraining", flush=True)
    cmd = [sys.executable, "-m", "medtl", "train", CONFIGS[dataset], "--out", str(out), "--quiet"]
    for s in sets:
        cmd += ["--set", s]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    return {**json.loads((out / "metrics.json").read_text()), "seed": seed}


def _cell(vals: np.ndarray) -> str:
    return f"{vals.mean():.3f} ± {vals.std(ddof=1):.3f}" if len(vals) > 1 else f"{vals.mean():.3f}"


def summarise(results: dict, preset: str, extra: list[str], cmdline: str, env: dict) -> str:
    devices = sorted({f"{r.get('device', '?')}" for by in results.values() for rs in by.values() for r in rs})
    lines = ["# MedMNIST official-split benchmark", "",
             f"Produced by `{cmdline}` (preset `{preset}`); training device as recorded by the runs: "
             f"{', '.join(devices)}.", "", md_header(env), "",
             "Test AUC / ACC on the official test split: mean ± sd over seeds. Each seed is one `medtl train` run: "
             "best epoch picked on the official val split, flip TTA, threshold 0.5; the test split is used once, at "
             "the end. MedMNIST v2 rows are from Yang et al., Sci. Data 2023 (28 px; the 224 px rows are upsampled).", ""]
    for ds, by_init in results.items():
        sets = PRESETS[preset].get(ds, []) + extra
        lines += [f"## {ds}", "", f"`{CONFIGS[ds]}`" + (" with " + " ".join(f"`--set {x}`" for x in sets) if sets else ""), "",
                  "| model | init | seeds | test AUC | test ACC | per seed (AUC / ACC) | best epoch | wall s / run |",
                  "|---|---|---|---|---|---|---|---|"]
        for init, runs in by_init.items():
            auc = np.array([r["test"]["auc"]["value"] for r in runs])
            acc = np.array([r["test"]["acc"]["value"] for r in runs])
            per = ", ".join(f"{x:.3f} / {y:.3f}" for x, y in zip(auc, acc))
            ep = ", ".join(str(r["best_epoch"]) for r in runs)
            wall = np.mean([r.get("seconds", np.nan) for r in runs])
            lines.append(f"| medtl {runs[0]['model']} | {init} | {len(runs)} | {_cell(auc)} | {_cell(acc)} | {per} | "
                         f"{ep} | {wall:.0f} |")
        for name, (a, c) in PAPER[ds].items():
            lines.append(f"| MedMNIST v2: {name} | scratch | — | {a:.3f} | {c:.3f} | | | |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--inits", nargs="+", default=["imagenet", "scratch"], choices=["imagenet", "scratch"])
    ap.add_argument("--scratch-seeds", nargs="+", type=int, default=None,
                    help="seeds for the scratch rows (default: --seeds); fewer keeps a CPU run short")
    ap.add_argument("--preset", default="shipped", choices=list(PRESETS))
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "medmnist_bench")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="extra --set for every run")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "medmnist.md")
    args = ap.parse_args()
    import torch

    env = describe("cuda" if torch.cuda.is_available() and "train.device=cpu" not in args.sets else "cpu")
    seeds = {"imagenet": args.seeds, "scratch": args.scratch_seeds or args.seeds}
    results = {ds: {init: [run_one(ds, init, s, args.runs, args.preset, args.sets) for s in seeds[init]]
                    for init in args.inits} for ds in args.datasets}
    md = summarise(results, args.preset, args.sets, "python benchmarks/medmnist/run.py " + " ".join(sys.argv[1:]),
                   finish(env))
    args.out.write_text(md + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(
        {ds: {i: [{"seed": r["seed"], "auc": r["test"]["auc"]["value"],
                   "acc": r["test"]["acc"]["value"], "auc_ci95": r["test"]["auc"]["ci95"],
                   "best_epoch": r["best_epoch"], "seconds": r.get("seconds"), "config_hash": r.get("config_hash")}
                  for r in rs] for i, rs in d.items()} for ds, d in results.items()}, indent=2))
    print(md)


if __name__ == "__main__":
    main()
