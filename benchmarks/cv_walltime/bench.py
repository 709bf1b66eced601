"""5-fold CV wall time, end to end: ``medtl cv`` in a subprocess under ``/usr/bin/time -v``.

Times the whole command (start-up, decode, preprocessing, 5 folds of training, metrics,
plots) and reads its peak RSS. Every run writes into a fresh directory (a reused one would
resume finished folds). Writes ``results/<preset>-<device-tag>.json`` and ``.md``.

Cases:
* ``breastmnist``: ``configs/breastmnist.yaml --set data.split=pooled`` (780 images, pooled
  5-fold). Preset ``cpu``: 64 px, tf_efficientnet_lite0, 3 epochs, batch 32 (a CPU-affordable
  setting). Preset ``gpu``: resnet50 (random init: weights do not change
  speed and the GPU machine has no network), 224 px, 30 epochs, batch 128, ``train.device=cuda``.
* ``ct``: ``configs/ct_contrast.yaml`` as configured (100 CT slices, 128 px, 10 epochs); the
  ``gpu`` preset adds ``train.device=cuda``.

Usage:
    python benchmarks/cv_walltime/bench.py                      # preset cpu, both cases
    python benchmarks/cv_walltime/bench.py --preset gpu         # on a CUDA machine
    python benchmarks/cv_walltime/bench.py --cases ct --set train.epochs=3
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _env import describe, finish, md_header  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
ROOT = Path(__file__).resolve().parent

PRESETS: dict[str, dict[str, list[str]]] = {
    "cpu": {
        "breastmnist": ["data.split=pooled", "data.image_size=[64,64]", "train.epochs=3", "train.batch_size=32",
                        "train.device=cpu"],
        "ct": ["train.device=cpu"],
    },
    "gpu": {
        "breastmnist": ["data.split=pooled", "data.image_size=[224,224]", "model.name=resnet50",
                        "model.pretrained=false", "train.epochs=30", "train.batch_size=128", "train.device=cuda"],
        "ct": ["train.device=cuda"],
    },
}
CONFIGS = {"breastmnist": "configs/breastmnist.yaml", "ct": "configs/ct_contrast.yaml"}


def _parse_time_v(text: str) -> dict:
    """Wall seconds and peak RSS (MiB) from GNU time's ``-v`` report."""
    wall = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", text)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    h, m, s = (float(g) if g else 0.0 for g in wall.groups()) if wall else (0.0, 0.0, float("nan"))
    return {"wall_s": round(3600 * h + 60 * m + s, 1), "peak_rss_mib": round(int(rss.group(1)) / 1024, 1) if rss else None}


def run_case(case: str, overrides: list[str], keep: Path | None) -> dict:
    """Run ``medtl cv`` once in a fresh directory; return times, RSS and headline metrics."""
    out = Path(tempfile.mkdtemp(prefix=f"medtl-cvbench-{case}-")) if keep is None else keep / case
    shutil.rmtree(out, ignore_errors=True)
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "medtl", "cv", CONFIGS[case], "--out", str(out), "-q"]
    for o in overrides:
        cmd += ["--set", o]
    env = {**os.environ, "MEDTL_SHARED_DATA": os.environ.get("MEDTL_SHARED_DATA", str(REPO.parent / "shared/datasets"))}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"medtl cv ({case}) failed with exit {proc.returncode}")
    metrics = json.loads((out / "metrics.json").read_text())
    res = {"case": case, "command": "medtl cv " + CONFIGS[case] + "".join(f" --set {o}" for o in overrides),
           **_parse_time_v(proc.stderr), "wall_s_perf_counter": round(wall, 1), "medtl_seconds": metrics.get("seconds"),
           "n_cases": metrics["n_cases"], "model": metrics["model"], "device": metrics["device"],
           "auc": round(metrics["pooled"]["auc"]["value"], 3), "auc_ci95": [round(c, 3) for c in metrics["pooled"]["auc"]["ci95"]]}
    training = metrics.get("compute", {}).get("stages", {}).get("training")  # the run's compute bill
    if training and training.get("wall_s") is not None:
        res["train_seconds_sum"] = round(training["wall_s"], 1)
    cfg_file = next((p for p in (out / "config.yaml", out / "config.resolved.yaml") if p.exists()), None)
    if cfg_file is not None:
        txt = cfg_file.read_text()
        for key in ("backend", "compile", "image_size", "epochs"):
            m = re.search(rf"^\s*{key}:\s*(.+)$", txt, re.M)
            if m:
                res[f"resolved_{key}"] = m.group(1).strip()
    if keep is None:
        shutil.rmtree(out, ignore_errors=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    ap.add_argument("--cases", default="breastmnist,ct", help="comma list of breastmnist, ct")
    ap.add_argument("--set", dest="extra", action="append", default=[], help="extra override for every case")
    ap.add_argument("--keep", default=None, help="keep run directories under this folder")
    ap.add_argument("--out", default=str(ROOT / "results"))
    args = ap.parse_args()
    env = describe("cuda" if args.preset == "gpu" else "cpu")
    results = []
    for case in args.cases.split(","):
        print(f"[{time.strftime('%H:%M:%S')}] {case} ...", flush=True)
        r = run_case(case, PRESETS[args.preset][case] + args.extra, Path(args.keep) if args.keep else None)
        print(f"  {r['wall_s']} s, peak RSS {r['peak_rss_mib']} MiB, AUC {r['auc']}", flush=True)
        results.append(r)
    env = finish(env)
    rows = [f"| {r['case']} | `{r['command']}` | {r['n_cases']} | **{r['wall_s']} s** | {r.get('train_seconds_sum', '-')} | "
            f"{r['peak_rss_mib']} MiB | {r['auc']} {r['auc_ci95']} |" for r in results]
    cmd = "python benchmarks/cv_walltime/bench.py " + " ".join(sys.argv[1:])
    md = "\n".join([f"# 5-fold CV wall time, end to end (preset {args.preset})", "", md_header(env), "",
                    f"Command: `{cmd.strip()}`", "",
                    "| case | medtl command | cases | wall time | training s (sum) | peak RSS | pooled AUC [95 % CI] |",
                    "|---|---|---|---|---|---|---|", *rows, ""])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = f"{args.preset}-{env['tag']}"
    (out / f"{tag}.json").write_text(json.dumps({"env": env, "command": cmd.strip(), "preset": args.preset,
                                                 "results": results}, indent=2) + "\n")
    (out / f"{tag}.md").write_text(md)
    print(md)
    print(f"wrote {out / (tag + '.json')} and {out / (tag + '.md')}")


if __name__ == "__main__":
    main()
