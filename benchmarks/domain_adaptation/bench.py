"""Domain-adaptation benchmark: source-only vs AdaBN / DSBN / DANN / MMD / CORAL on a new site.

BreastMNIST: the official train split trains, the official val split selects the epoch (both
"source hospital"); the official test split passed through a simulated scanner
(medtl.data.shift) is the "new hospital". Its images (never its labels) are the unlabelled
target data, and its labels score the result (transductive UDA, as in the DA literature).

Every method gets the same data, model, epochs, LR and seed. AdaBN trains exactly like
source-only (it only re-estimates BatchNorm statistics after training), so it reuses the
source-only weights instead of training them a second time.

Usage (hold the CPU lock):
    flock /tmp/medtl-cpu.lock python benchmarks/domain_adaptation/bench.py --out /tmp/medtl-da
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from medtl.adapt.domain import adabn
from medtl.config import load_config
from medtl.data.prepare import prepare
from medtl.data.shift import scanner_shift
from medtl.evaluate.metrics import bootstrap_ci
from medtl.models.encoders import create_encoder
from medtl._runtime import resolve_device, seed_everything
from medtl.training.loop import fit, predict_proba

METHODS = ("none", "adabn", "dsbn", "dann", "mmd", "coral")


def paired_auc_diff(y: np.ndarray, p_a: np.ndarray, p_b: np.ndarray, n_boot: int, seed: int) -> list[float]:
    """95 % percentile CI of AUC(a) - AUC(b) over the same case resamples (each image is its own patient)."""
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(n_boot):
        i = rng.integers(0, len(y), len(y))
        if len(np.unique(y[i])) < 2:
            continue
        diffs.append(roc_auc_score(y[i], p_a[i]) - roc_auc_score(y[i], p_b[i]))
    return [float(v) for v in np.percentile(diffs, [2.5, 97.5])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/breastmnist_da.yaml")
    ap.add_argument("--out", default="/tmp/medtl-bench-da")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--shift", default="ultrasound_b", help="preset of medtl.data.shift.SCANNER_PRESETS")
    ap.add_argument("--weights", nargs="*", default=["dann=1", "mmd=1", "coral=50"],
                    help="adapt.weight per method, METHOD=W (label-free choice, see README)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override k.path=value")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(args.config, overrides=args.overrides)
    weights = {k: float(v) for k, v in (w.split("=", 1) for w in args.weights)}
    data = prepare(cfg, progress=False)
    trn, val, tst = data.subset("train"), data.subset("val"), data.subset("test")
    shift = scanner_shift(args.shift)
    x_tgt = shift(data.images[tst], seed=0)
    y_tgt = data.y[tst]
    groups = np.array([data.cases[i].case_id for i in tst])  # MedMNIST: one image per patient
    device = resolve_device(cfg.train.device)
    pos = 1  # AUC of class index 1 (BreastMNIST: normal+benign); symmetric for binary tasks
    results, probas, models = {}, {}, {}
    print(f"source train/val {len(trn)}/{len(val)}, target {len(tst)}; shift {args.shift}: {shift.to_dict()}; "
          f"{cfg.data.image_size[0]} px, {cfg.train.epochs} epochs, lr {cfg.train.lr}, seed {cfg.train.seed}",
          flush=True)
    for method in args.methods:
        t0 = time.time()
        if method == "adabn" and "none" in models:
            model = adabn(copy.deepcopy(models["none"]), x_tgt, device=device)
            best_epoch = results["none"]["best_epoch"]
        else:
            seed_everything(cfg.train.seed)
            model = create_encoder(cfg.model.name, pretrained=cfg.model.pretrained, num_classes=len(data.class_names),
                                   in_chans=1, drop_rate=cfg.model.drop_rate)
            adapt = cfg.adapt.model_copy(update={"method": method, "weight": weights.get(method, cfg.adapt.weight)})
            res = fit(model, data.images[trn], data.y[trn], data.images[val], data.y[val], cfg.train,
                      num_classes=len(data.class_names), adapt=adapt, x_target=x_tgt)
            model, best_epoch = res.model, res.best_epoch
        models[method] = model
        p = predict_proba(model, x_tgt, device=device, tta=cfg.train.tta)
        probas[method] = p
        ci = bootstrap_ci(y_tgt, p, groups, n_boot=cfg.evaluate.n_bootstrap, seed=cfg.evaluate.seed)
        row = {"method": method, "auc": ci["auc"]["value"], "auc_ci95": ci["auc"]["ci95"],
               "acc": ci["acc"]["value"], "acc_ci95": ci["acc"]["ci95"], "best_epoch": best_epoch,
               "seconds": round(time.time() - t0, 1)}
        if method == "none":
            pc = predict_proba(model, data.images[tst], device=device, tta=cfg.train.tta)
            row["clean_test_auc"] = bootstrap_ci(y_tgt, pc, groups, n_boot=cfg.evaluate.n_bootstrap,
                                                 seed=cfg.evaluate.seed)["auc"]
        elif "none" in probas:
            row["auc_minus_source_only_ci95"] = paired_auc_diff(y_tgt, p[:, pos], probas["none"][:, pos],
                                                                cfg.evaluate.n_bootstrap, cfg.evaluate.seed)
        results[method] = row
        print(json.dumps(row), flush=True)
    meta = {"config": args.config, "overrides": args.overrides, "shift": {"preset": args.shift, **shift.to_dict()},
            "image_size": cfg.data.image_size, "epochs": cfg.train.epochs, "lr": cfg.train.lr,
            "seed": cfg.train.seed, "adapt_weight": weights, "n_bootstrap": cfg.evaluate.n_bootstrap,
            "n_source_train": int(len(trn)), "n_source_val": int(len(val)), "n_target": int(len(tst))}
    (out / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"wrote {out / 'results.json'}")


if __name__ == "__main__":
    main()
