"""Official-split fold ensembles: k models trained on folds of ``train``, one model afterwards.

``medtl train`` with ``train.ensemble_folds`` k > 1 (:func:`medtl.workflows.official.train`
calls :func:`train_ensemble`). The train split is divided into k patient-grouped, stratified
folds (:func:`medtl.evaluate.splits.outer_splits`, seeded by ``cv.seed`` as CV's folds are);
member ``i`` trains on the other k-1 folds and chooses its epoch on fold ``i``, drawing its
randomness from ``FoldSeeds(train.seed, 0, i)``. Each member goes through the same fold driver
as a CV fold (:func:`medtl.workflows._folds.fit_fold`) and leaves an ordinary checkpoint,
``checkpoints/final/member<i>/``, and a fold record, ``folds/member<i>.json``, so a killed run
resumes member by member and gives the numbers of an uninterrupted one.

The ensemble is the mean of the members' class probabilities, each averaged with the
left-right flipped image when ``train.tta`` (:class:`medtl.models.ensemble.EnsembleClassifier`).
The official ``val`` split is kept out of every member's training and selection, so it stays
for the ensemble what it is for a single model: the ensemble's temperature
(``evaluate.calibration``) and threshold (``evaluate.threshold``) are chosen on its own
probabilities of ``val`` cases no member has seen, and ``val`` metrics are the ensemble's.
(Pooling ``val`` into the folds would give each member more data, but then no case would be
unseen by the ensemble, and its threshold would have to come from single members' out-of-fold
probabilities, which are spread wider than the ensemble's.) Once the members are done,
``checkpoints/final/meta.json`` pins them by sha256, and ``medtl predict`` and ``medtl export``
load the ensemble as one model. The run's own ``val`` and ``test`` probabilities are computed by
that same module, so ``medtl predict`` on the test cases gives them back.

``metrics.json`` reports the ensemble as the run's model (``test`` with CIs, ``val``,
``calibration``, ...) and, under ``ensemble``, each member on the same test cases (at the
threshold and temperature chosen on its selection fold), the members' mean and sd, and a
paired DeLong test of the ensemble's AUC against each member's.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext

import numpy as np
from rich.table import Table

from medtl._runtime import FoldSeeds, console, device_name, progress_bar, resolve_device, split_seed
from medtl.data.prepare import PreparedData
from medtl.errors import DataError
from medtl.evaluate.calibration import TemperatureScaler
from medtl.evaluate.metrics import METRIC_KEYS, choose_threshold, compute_metrics
from medtl.evaluate.splits import outer_splits
from medtl.evaluate.stats import delong_test, mean_sd
from medtl.models.ensemble import EnsembleClassifier
from medtl.training.checkpoint import ModelSpec
from medtl.training.loop import predict_proba
from medtl.workflows._folds import FoldContext, fit_fold, prediction_rows, print_summary, score, track, write_plots
from medtl.workflows.rundir import FoldRecord
from medtl.workflows.trainers import n_outputs

__all__ = ["member_folds", "train_ensemble"]


def member_folds(data: PreparedData, trn: np.ndarray, k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The members' cases: ``k`` pairs ``(training, selection)`` of indices into ``data``.

    Patient-grouped, stratified folds of the train split ``trn``; member ``i`` selects on
    fold ``i`` and trains on the rest, so every training case selects for exactly one member.

    Raises:
        DataError: some class of the train split is held by fewer than ``k`` patients.

    Example:
        >>> plan = member_folds(data, data.subset("train"), 3, seed=0)  # doctest: +SKIP
        >>> [len(sel) for _, sel in plan]                               # doctest: +SKIP
        [182, 182, 182]
    """
    y, g = data.y[trn], data.groups[trn]
    short = {data.class_names[c]: len(set(g[y == c].tolist())) for c in np.unique(y).tolist()}
    short = {c: n for c, n in short.items() if n < k}
    if short:
        held = ", ".join(f"'{c}' by {n}" for c, n in short.items())
        raise DataError(f"train.ensemble_folds={k} splits the train split into {k} patient-grouped, stratified folds, "
                        f"which needs every class held by at least {k} patients; in the train split, {held}. Lower "
                        "train.ensemble_folds, or add training patients of that class.")
    return [(trn[a], trn[b]) for a, b in outer_splits(y, g, n_splits=k, seed=seed, class_names=data.class_names)]


def train_ensemble(ctx: FoldContext, trn: np.ndarray, val: np.ndarray, tst: np.ndarray, *, resume: bool,
                   progress: bool, t0: float) -> dict:
    """Train (or resume) the members, score the ensemble and its members; returns ``metrics.json``.

    ``ctx`` is the run's fold context (its ``bill`` receives every member's compute bill, resumed
    ones included); ``trn``, ``val``, ``tst`` index the official splits of ``ctx.data``.
    """
    cfg, data, run, bill = ctx.cfg, ctx.data, ctx.run, ctx.bill
    k = cfg.train.ensemble_folds
    plan = member_folds(data, trn, k, split_seed(cfg.cv.seed, 0))
    test_ids = [data.cases[i].case_id for i in tst]
    run.drop_final_model()  # the ensemble's meta.json comes last; until then nothing loads as `final`
    records, resumed = [], []
    with (progress_bar() if progress else nullcontext()) as bar:
        ctx.bar = bar
        for i, (m_trn, m_sel) in enumerate(plan):
            key = f"member{i}"
            done = run.read_fold(key, test_ids) if resume else None
            if done is None:
                done, _ = fit_fold(ctx, key, m_trn, m_sel, tst, FoldSeeds(cfg.train.seed, 0, i),
                                   description=f"{key} (of {k})")
                run.write_fold(done)
            else:
                console.print(f"{key}: finished earlier, loaded from folds/{key}.json")
                resumed.append(key)
                if done.info.get("compute"):  # its recorded cost counts: the bill covers every member
                    bill.merge(done.info["compute"], earlier=True)
            records.append(done)
    keys = [r.fold for r in records]

    bill.begin("evaluation")  # the ensemble's predictions, bootstrap CIs, member tests and plots
    device = resolve_device(cfg.train.device)
    # the members as saved (sha256-verified), in the module that predict and export load
    ens = EnsembleClassifier([run.load_model(key)[0] for key in keys], tta=cfg.train.tta).to(device)
    p_val_raw = predict_proba(ens, data.images[val], device=device)
    p_test_raw = predict_proba(ens, data.images[tst], device=device)
    bill.add_images("evaluation", k * (len(val) + len(tst)))
    temperature, p_val, p_test = None, p_val_raw, p_test_raw
    if cfg.evaluate.calibration == "temperature":
        ts = TemperatureScaler().fit(p_val_raw, data.y[val])
        temperature = float(ts.temperature_)
        p_val, p_test = ts.transform(p_val_raw), ts.transform(p_test_raw)
    thr = choose_threshold(data.y[val], p_val, cfg.evaluate.threshold,
                           target_sensitivity=cfg.evaluate.target_sensitivity)
    spec = ModelSpec.from_config(cfg, n_outputs(data))
    run.save_ensemble(keys, run.checkpoint_meta(cfg, spec, data.class_names, ctx.config_hash, fold="final",
                                                best_epoch=None, threshold=thr, temperature=temperature),
                      tta=cfg.train.tta)

    calibrated = p_test if temperature is not None else None
    y_test = data.y[tst]
    scored = score(cfg, y_test, p_test_raw, data.groups[tst], thr, calibrated)
    pseudo = run.pseudonymizer(cfg.privacy.reveal_ids)
    run.write_predictions(prediction_rows(data, tst, p_test, [keys] * len(tst), pseudo, thr), data.class_names)
    history = [{**row, "fold": r.fold} for r in records for row in r.history]
    plots = write_plots(run, y_test, p_test_raw, data.class_names, thr, history, None,
                        f"official test split, ensemble of {k}", calibrated)
    block = _members_block(cfg, y_test, records, p_test, plan)
    metrics = {
        "task": "official", "trainer": ctx.trainer.name, "name": cfg.name, "test": scored["metrics"],
        "val": compute_metrics(data.y[val], p_val, threshold=thr), "calibration": scored["calibration"],
        "temperature": temperature, "bootstrap": scored["bootstrap"], "threshold": thr,
        "threshold_rule": cfg.evaluate.threshold, "best_epoch": None,
        "class_names": data.class_names, "n_train": int(len(trn)), "n_val": int(len(val)), "n_test": int(len(tst)),
        "n_skipped": len(data.skipped), "model": cfg.model.name, "pretrained": cfg.model.pretrained,
        "plots": plots, "device": device_name(device), "seconds": round(time.time() - t0, 1),
        "config_hash": ctx.config_hash, "history": history, "ensemble": block,
    }
    if "multiclass" in scored:
        metrics["multiclass"] = scored["multiclass"]
    bill.end("evaluation")
    metrics["compute"] = {**bill.as_dict(), "resumed_folds": resumed}
    run.write_metrics(metrics)
    run.write_fold(FoldRecord(config_hash=ctx.config_hash, fold="final", test_ids=test_ids, proba=p_test.tolist(),
                              proba_raw=p_test_raw.tolist(), threshold=thr, temperature=temperature,
                              n_train=int(len(trn)), n_val=int(len(val)), info={"members": keys, "best_epoch": None}))
    print_summary(f"{cfg.name}: official test split ({len(tst)} cases), ensemble of {k} members",
                  scored["metrics"])
    _print_members(scored["metrics"], block)
    track(cfg, run, metrics)
    return metrics


def _members_block(cfg, y: np.ndarray, records: list[FoldRecord], p_ens: np.ndarray,
                   plan: list[tuple[np.ndarray, np.ndarray]]) -> dict:
    """``metrics.json["ensemble"]``: every member on the test cases, their mean, DeLong vs the ensemble."""
    members = []
    for r, (m_trn, m_sel) in zip(records, plan):
        p = np.asarray(r.proba)
        members.append({"key": r.fold, "n_train": int(len(m_trn)), "n_select": int(len(m_sel)),
                        "best_epoch": r.info.get("best_epoch"), "threshold": r.threshold,
                        "temperature": r.temperature, "test": compute_metrics(y, p, threshold=r.threshold),
                        "delong": _delong(y, p_ens, p)})
    return {"folds": len(records), "members": members,
            "member_mean": {m: mean_sd([e["test"][m] for e in members]) for m in METRIC_KEYS},
            "tta": cfg.train.tta, "combine": "mean of the members' probabilities (each flip-averaged when tta)",
            "split": "patient-grouped stratified folds of the train split (seed cv.seed); val held out for the "
                     "ensemble's temperature and threshold"}


def _delong(y: np.ndarray, p_ens: np.ndarray, p_member: np.ndarray) -> dict | None:
    """Paired DeLong test, ensemble (``a``) vs member (``b``), on the positive class (index 1);
    ``None`` for more than two classes or test cases of one class."""
    if p_ens.shape[1] != 2:
        return None
    try:
        return delong_test(y == 1, p_ens[:, 1], p_member[:, 1])
    except DataError:
        return None


def _print_members(ens_metrics: dict, block: dict) -> None:
    def fmt(x, sign: str = "") -> str:
        return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:{sign}.3f}"

    t = Table(title="Members vs ensemble on test (diff: ensemble - member AUC, DeLong)")
    for col in ("model", "AUC", "ACC", "diff", "95% CI", "p"):
        t.add_column(col, justify="left" if col == "model" else "right", no_wrap=True)
    for e in block["members"]:
        d = e["delong"] or {}
        ci = d.get("ci") or [None, None]
        t.add_row(e["key"], fmt(e["test"]["auc"]), fmt(e["test"]["acc"]), fmt(d.get("diff"), "+"),
                  f"[{fmt(ci[0], '+')}, {fmt(ci[1], '+')}]" if d else "", fmt(d.get("p_value")) if d else "")
    mm = block["member_mean"]
    t.add_row("member mean", f"{fmt(mm['auc']['mean'])}±{fmt(mm['auc']['sd'])}",
              f"{fmt(mm['acc']['mean'])}±{fmt(mm['acc']['sd'])}", "", "", "")
    t.add_row("ensemble", fmt(ens_metrics["auc"]["value"]), fmt(ens_metrics["acc"]["value"]), "", "", "")
    console.print(t)
