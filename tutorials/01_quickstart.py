"""Tutorial 01 as a script: the public API from the demo to a transfer comparison.

    python tutorials/01_quickstart.py [--quick | --tiny] [--out runs/tutorial]

1. ``medtl.demo``: synthetic two-site CT DICOM, 5-fold CV, saliency report;
2. ``medtl.audit`` of the demo's manifest;
3. ``medtl.train`` on BreastMNIST's official split, twice: ImageNet weights and random init;
4. ``medtl.compare``: the paired DeLong test of the two on the same test images;
5. ``medtl.cross_validate`` on the pooled images, ``medtl.explain_run`` for its report;
6. ``medtl.predict``: new scans through the demo run's fold ensemble.

Sizes: the default is the shipped configs (about an hour on 2 CPU cores); ``--quick``
shortens training to check that everything runs (a few minutes); ``--tiny`` is what the
test suite runs (a subset of the data, one epoch, seconds per step). Needs
``../shared/datasets`` (or ``MEDTL_SHARED_DATA``) for BreastMNIST, and torchvision's MobileNetV2
ImageNet file, downloaded once (offline: in ``MEDTL_WEIGHTS_DIR``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import medtl
from medtl.data.demo import make_demo_dataset

SIZES = {
    "full": {"demo": [], "demo_patients": 32, "breast": []},
    "quick": {"demo": ["train.epochs=3"], "demo_patients": 32,
              "breast": ["train.epochs=2", "data.image_size=[64, 64]"]},
    "tiny": {"demo": ["train.epochs=1", "cv.n_splits=3", "data.image_size=[32, 32]", "evaluate.n_bootstrap=50",
                      "explain.n_correct=2", "explain.n_wrong=2", "explain.methods=[gradcam]",
                      "explain.cascade_steps=2", "explain.faithfulness_steps=4"],
             "demo_patients": 9,
             "breast": ["train.epochs=1", "data.image_size=[32, 32]", "data.max_cases=160", "train.tta=false",
                        "evaluate.n_bootstrap=50", "cv.n_splits=3", "explain.n_correct=2", "explain.n_wrong=2",
                        "explain.methods=[gradcam]", "explain.cascade_steps=2", "explain.faithfulness_steps=4"]},
}


def main(size: str, out: Path) -> None:
    s = SIZES[size]
    demo = medtl.demo(out / "demo", overrides=s["demo"], n_patients=s["demo_patients"], progress=False)
    print("demo pooled AUC", demo["metrics"]["auc"], "report:", demo["report"])

    report = medtl.audit(out / "demo" / "demo_data" / "manifest.csv", out / "audit", progress=False)
    print("audit findings:", len(report["findings"]))

    cfg = medtl.load_config("configs/breastmnist.yaml", overrides=s["breast"])
    imagenet = medtl.train(cfg, out / "breast_imagenet", progress=False)
    scratch_cfg = medtl.load_config("configs/breastmnist.yaml", overrides=s["breast"] + ["model.pretrained=false"])
    scratch = medtl.train(scratch_cfg, out / "breast_scratch", progress=False)
    print("BreastMNIST test AUC: ImageNet", imagenet["test"]["auc"]["value"], "scratch", scratch["test"]["auc"]["value"])
    paired = medtl.compare(out / "breast_imagenet", out / "breast_scratch")
    print("paired DeLong difference", paired["delong"]["diff"], "95% CI", paired["delong"]["ci"])

    cv_cfg = medtl.load_config("configs/breastmnist.yaml", overrides=s["breast"] + ["data.split=pooled"])
    cv = medtl.cross_validate(cv_cfg, out / "breast_cv", progress=False)
    print("BreastMNIST pooled CV AUC", cv["pooled"]["auc"]["value"])
    print("report:", medtl.explain_run(out / "breast_cv", progress=False))

    # new scans from the same synthetic "hospital" (another seed: none of them trained the demo's folds)
    new = make_demo_dataset(out / "new_scans", n_patients=4, size=96, seed=1).parent / "dicom"
    pred = medtl.predict(out / "demo" / "run", new, out_dir=out / "new_scans_predicted", progress=False)
    print(f"predicted {pred['n_cases']} new scans with the demo's {pred['n_models']}-model fold ensemble:",
          pred["out_dir"])


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_const", const="quick", dest="size", help="a few minutes")
    group.add_argument("--tiny", action="store_const", const="tiny", dest="size", help="what the tests run")
    ap.add_argument("--out", type=Path, default=Path("runs/tutorial"), help="where the runs go")
    args = ap.parse_args()
    main(args.size or "full", args.out)
