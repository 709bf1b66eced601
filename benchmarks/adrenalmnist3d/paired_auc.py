"""Paired bootstrap of the test-AUC difference between two runs of the same split.

    python benchmarks/adrenalmnist3d/paired_auc.py RUN_A RUN_B [--n 2000]

Reads ``predictions.csv`` of both runs (rows in the same case order), resamples test cases
with replacement and prints AUC(A) - AUC(B) with a 95 % percentile interval.
"""

from __future__ import annotations

import argparse
import csv

import numpy as np
from sklearn.metrics import roc_auc_score

__all__: list[str] = []


def _read(run: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    with open(f"{run}/predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    pos = [c for c in rows[0] if c.startswith("prob_")][-1]  # (N,) probability of the last class
    y = np.array([r["label"] == pos[5:] for r in rows], dtype=int)
    return [r["id"] for r in rows], y, np.array([float(r[pos]) for r in rows])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_a")
    ap.add_argument("run_b")
    ap.add_argument("--n", type=int, default=2000)
    args = ap.parse_args()
    ids_a, y, pa = _read(args.run_a)
    ids_b, yb, pb = _read(args.run_b)
    if ids_a != ids_b or not np.array_equal(y, yb):
        raise SystemExit("the two runs do not hold the same test cases in the same order")
    rng = np.random.default_rng(0)
    diffs = []
    for _ in range(args.n):
        i = rng.integers(0, len(y), len(y))
        if y[i].min() != y[i].max():
            diffs.append(roc_auc_score(y[i], pa[i]) - roc_auc_score(y[i], pb[i]))
    d = roc_auc_score(y, pa) - roc_auc_score(y, pb)
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    print(f"AUC A - B = {d:+.3f} [95% CI {lo:+.3f}, {hi:+.3f}], P(diff <= 0) = {np.mean(np.array(diffs) <= 0):.3f}")


if __name__ == "__main__":
    main()
