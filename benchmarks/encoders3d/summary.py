"""Table of the 3D encoder linear probes with paired DeLong tests against the Astra row.

    python benchmarks/encoders3d/summary.py OUT_DIR

Reads ``metrics.json`` and ``predictions.csv`` of each row folder written by ``run.sh``
(same test cases in the same order) and prints a Markdown table: test AUC and ACC with
their 95 % bootstrap CIs, the probe's ``C`` and its best inner-CV AUC, the run's seconds, and the
paired DeLong difference of each row against ``astra``.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np

from medtl.evaluate.stats import delong_test

__all__: list[str] = []
ROWS = {"astra": "Astra CT I3ResNet-152 (MONAI ResNet)", "imagenet": "ImageNet Lite0, I3D-inflated",
        "scratch": "Lite0 inflated, random init", "astra_scratch": "I3ResNet-152, random init"}


def _scores(run: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    with open(run / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    pos = [c for c in rows[0] if c.startswith("prob_")][-1]  # (N,) probability of the last class
    return [r["id"] for r in rows], np.array([r["label"] == pos[5:] for r in rows], int), \
        np.array([float(r[pos]) for r in rows])


def _ci(metric: dict) -> str:
    return f"{metric['value']:.3f} [{metric['ci95'][0]:.3f}, {metric['ci95'][1]:.3f}]"


def main(out: Path) -> None:
    found = [r for r in ROWS if (out / r / "metrics.json").is_file()]
    ref = _scores(out / "astra") if "astra" in found else None
    print("| row | encoder | test AUC [95 % CI] | test ACC [95 % CI] | C | inner AUC | run s | AUC − astra (DeLong) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in found:
        m = json.loads((out / r / "metrics.json").read_text())
        t = m["test"]
        info = json.loads((out / r / "folds" / "final.json").read_text()).get("info", {})
        inner = info.get("inner_auc") or {}
        inner = f"{max(inner.values()):.3f}" if isinstance(inner, dict) and inner else ""
        diff = ""
        if ref is not None and r != "astra":
            ids, y, p = _scores(out / r)
            if ids != ref[0]:
                raise SystemExit(f"{r}: test cases differ from astra's")
            d = delong_test(y, p, ref[2])
            diff = f"{d['diff']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}], p = {d['p_value']:.3f}"
        print(f"| {r} | {ROWS[r]} | {_ci(t['auc'])} | {_ci(t['acc'])} | {info.get('C', '')} | "
              f"{inner} | {m.get('seconds', '')} | {diff} |")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/medtl-bench-encoders3d"))
