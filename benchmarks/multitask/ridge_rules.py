"""How a refitted regression head's ridge penalty is chosen: the plain best inner score against the
one-standard-error rule that `refit: ridge` uses, on the frozen features of finished runs.

For each run directory (any `medtl cv` run on the same data: single-task or multi-task) and each of
its folds, the fold checkpoint's pooled features of every case are extracted; the ridge is fitted on
the fold's training patients (every case outside its test fold), its penalty chosen from
`RIDGE_ALPHAS` by 5-fold patient-grouped inner CV, and the test cases are predicted. `pretrained`
does the same on the untrained encoder's features. Scored like `metrics.json["tasks"]`: pooled MAE
against the training-fold mean, patient-bootstrap CIs.

    python benchmarks/multitask/ridge_rules.py configs/ct_multitask.yaml RUN_DIR [RUN_DIR ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import Ridge
from sklearn.model_selection import GridSearchCV, GroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from medtl.adapt.probe import extract_features
from medtl.config import load_config
from medtl.data.prepare import prepare
from medtl.evaluate.multitask import score_regression
from medtl.workflows.rundir import RunDir
from medtl.workflows.trainers import RIDGE_ALPHAS, RIDGE_INNER_SPLITS, _one_standard_error, make_model


def _fmt(m: dict) -> str:
    return f"{m['value']:+.2f} [{m['ci95'][0]:+.2f}, {m['ci95'][1]:+.2f}]"


def main(config: str, runs: list[str]) -> None:
    cfg = load_config(config)
    data = prepare(cfg, progress=False)
    task = next(t for t in data.tasks if t.kind == "regression")
    y, groups = task.values, data.groups
    ids = [c.case_id for c in data.cases]
    torch.manual_seed(0)
    pretrained = extract_features(make_model(cfg, 2), data.images, tta=cfg.train.tta, progress=False)
    sources = {"pretrained": None, **{r: RunDir(Path(r)) for r in runs}}
    folds = sorted(p.stem for p in (Path(runs[0]) / "folds").glob("*.json"))
    for name, run in sources.items():
        for rule in ("best", "one_se"):
            pred, base = np.full(len(y), np.nan), np.full(len(y), np.nan)
            for key in folds:
                test_ids = json.loads((Path(runs[0]) / "folds" / f"{key}.json").read_text())["test_ids"]
                test = np.array([ids.index(i) for i in test_ids])
                tr = np.setdiff1d(np.arange(len(y)), test)
                tr = tr[~np.isnan(y[tr])]
                feats = pretrained if run is None else extract_features(run.load_model(key)[0], data.images,
                                                                        tta=cfg.train.tta, progress=False)
                search = GridSearchCV(make_pipeline(StandardScaler(), Ridge()), {"ridge__alpha": list(RIDGE_ALPHAS)},
                                      cv=GroupKFold(RIDGE_INNER_SPLITS), scoring="neg_mean_squared_error",
                                      refit=_one_standard_error if rule == "one_se" else True)
                search.fit(feats[tr], y[tr], groups=groups[tr])
                pred[test], base[test] = search.predict(feats[test]), y[tr].mean()
            r = score_regression(y, pred, groups, baseline=base, n_boot=cfg.evaluate.n_bootstrap,
                                 seed=cfg.evaluate.seed)
            print(f"{Path(name).name:>16s} {rule:7s} MAE {r['mae']['value']:.2f} "
                  f"[{r['mae']['ci95'][0]:.2f}, {r['mae']['ci95'][1]:.2f}]  MAE - baseline "
                  f"{_fmt(r['mae_minus_baseline'])}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
