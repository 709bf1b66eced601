"""Tutorial 01 as a script: demo, audit, BreastMNIST official split, pooled CV and report.

    python tutorials/01_quickstart.py [--quick]

``--quick`` shortens training to check that everything runs (about 5 min on 2 cores).
"""

from __future__ import annotations

import sys

import medtl
from medtl.data import run_audit


def main(quick: bool) -> None:
    fast = ["train.epochs=2", "data.image_size=[64, 64]"] if quick else []
    demo = medtl.demo("runs/tutorial/demo", overrides=["train.epochs=3"] if quick else None)
    print("demo pooled AUC", demo["metrics"]["auc"], "report:", demo["report"])
    audit = run_audit("runs/tutorial/demo/demo_data/manifest.csv", "runs/tutorial/audit", progress=False)
    print("audit findings:", len(audit["findings"]))
    cfg = medtl.load_config("configs/breastmnist.yaml", overrides=fast)
    print("BreastMNIST test", medtl.train(cfg, "runs/tutorial/breastmnist")["test"]["auc"])
    cv_cfg = medtl.load_config("configs/breastmnist.yaml", overrides=fast + ["data.split=pooled"])
    cv = medtl.cross_validate(cv_cfg, "runs/tutorial/breastmnist_cv")
    print("BreastMNIST pooled CV", cv["pooled"]["auc"])
    print("report:", medtl.explain_run("runs/tutorial/breastmnist_cv"))


if __name__ == "__main__":
    main("--quick" in sys.argv)
