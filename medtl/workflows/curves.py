"""``medtl curve``: how the metric grows with the number of training patients, and few-shot episodes.

For every strategy in ``curve.strategies`` (``linear_probe``, ``prototype``, ``finetune``), every
size in ``curve.sizes`` and every outer fold of the config's patient-grouped CV: the fold's
training patients are subsampled, stratified by class, to that fraction (``curve.repeats``
subsamples, each with its own seeds), the strategy is fitted on the subsample through the one
fold driver (:func:`~medtl.workflows._folds.fit_fold`: inner validation split, temperature,
threshold) and the whole test fold is predicted. The frozen-feature strategies extract the
encoder's features once per run and reuse them at every size, fold and repeat.

Per size, the out-of-fold predictions of each repeat are pooled and scored; the point is the
mean over repeats, with a 95 % CI from a bootstrap over test patients and repeats
(:func:`medtl.evaluate.curve.bootstrap_curve`). A power law ``1 - metric = a n^-b + c`` is fitted
on the points and refitted on every bootstrap draw, which gives CIs for the curve and for the
patients ``curve.target`` needs. With ``curve.shots``, N-way K-shot episodes compare the
prototype classifier with the linear probe on the same support sets.

Every finished point is written to ``points/<strategy>/<size>_<fold>_r<repeat>.json`` as soon as
it ends, so a killed run resumes where it stopped. Seeds: a point of fold ``i`` (outer repeat
``q``), size ``f`` and repeat ``r`` draws from ``FoldSeeds(train.seed, q, i).child(round(1e4 f)).child(r)``:
``inner_split`` picks the subsample and its validation patients, the trainer's streams as in ``medtl cv``.
Writes ``curve.json``, ``curve.png`` and the self-contained ``curve.html``.
"""

from __future__ import annotations

import base64
import json
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import jinja2
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from medtl._compute import ComputeBill, bill_rows
from medtl._io import atomic_write_bytes, atomic_write_text, read_json, write_json
from medtl._runtime import FoldSeeds, console, device_name, progress_bar, resolve_device
from medtl.adapt.probe import LinearProbe as _Probe
from medtl.adapt.prototype import PrototypeClassifier
from medtl.config import Config, config_hash
from medtl.data.prepare import PreparedData
from medtl.errors import ConfigError, DataError
from medtl.evaluate.curve import bootstrap_curve, curve_fit_summary, mean_ci, sample_episode
from medtl.evaluate.metrics import METRIC_KEYS, compute_metrics
from medtl.evaluate.schemes import FoldSpec, fold_plan
from medtl.evaluate.splits import inner_split
from medtl.workflows._folds import FoldContext, fit_fold, start
from medtl.workflows.rundir import FoldRecord, RunDir
from medtl.workflows.trainers import FineTune, FoldFit, LinearProbe

__all__ = ["Prototype", "curve"]

_COLOURS = {"linear_probe": "#2457a6", "prototype": "#c0392b", "finetune": "#1b7f3b"}
_LABELS = {"linear_probe": "linear probe", "prototype": "prototype", "finetune": "fine-tuning"}
_FEW_SHOT_METRICS = ("auc", "balanced_acc", "acc")


class Prototype:
    """Fold trainer: a :class:`~medtl.adapt.prototype.PrototypeClassifier` on the frozen features.

    Shares the feature pass of a :class:`~medtl.workflows.trainers.LinearProbe` trainer (one
    forward pass over the data per run). Nothing is tuned; the validation probabilities come
    from class means of ``train_idx`` alone. No checkpoint is written.
    """

    name = "prototype"

    def __init__(self, features: LinearProbe | None = None) -> None:
        self.source = features or LinearProbe()

    @property
    def feature_info_(self) -> dict:
        return self.source.feature_info_

    def features(self, cfg: Config, data: PreparedData, progress: bool = False):
        return self.source.features(cfg, data, progress)

    def fit(self, cfg: Config, data: PreparedData, trn: np.ndarray, val: np.ndarray, seeds: FoldSeeds, *,
            description: str, bar) -> FoldFit:
        _, feats = self.features(cfg, data)
        k = len(data.class_names)
        clf = PrototypeClassifier().fit(feats[np.concatenate([trn, val])], data.y[np.concatenate([trn, val])])

        def predict_val() -> np.ndarray:
            if len(np.unique(data.y[trn])) < 2:  # too few patients to leave validation out: no held-out guess
                return np.full((len(val), k), 1.0 / k)
            return _full(PrototypeClassifier().fit(feats[trn], data.y[trn]), feats[val], k)

        return FoldFit(predict=lambda idx: _full(clf, feats[idx], k), predict_val=predict_val, save=None,
                       info={"best_epoch": None}, meta={"strategy": "prototype"})


class _NoCheckpoint:
    """A trainer whose fits write no checkpoint (a curve trains hundreds of points)."""

    def __init__(self, inner) -> None:
        self.inner, self.name = inner, inner.name

    def fit(self, *args, **kwargs) -> FoldFit:
        fitted = self.inner.fit(*args, **kwargs)
        fitted.save = None
        return fitted


def curve(cfg: Config, out_dir: str | Path, *, resume: bool = True, progress: bool = True,
          data: PreparedData | None = None) -> dict:
    """Learning curve (and few-shot episodes) of ``cfg``; returns the ``curve.json`` dict.

    Args:
        cfg: the run config (``curve`` says sizes, repeats, strategies, target and shots; ``cv``
            the outer folds: kfold, repeated or leave_one_site_out).
        out_dir: the run directory; with ``resume``, points an earlier run of the same config
            finished there are reused.
        resume: reuse finished points.
        progress: show progress bars.
        data: already prepared data (otherwise decoded from ``cfg.data``).

    Example:
        >>> cfg = load_config("configs/breastmnist_linear_probe.yaml")   # doctest: +SKIP
        >>> res = curve(cfg, "runs/breast_curve")                          # doctest: +SKIP
        >>> res["strategies"]["linear_probe"]["fit"]["target"]["statement"]  # doctest: +SKIP
        'AUC 0.9 would need about 2,310 training patients (95% CI 900, not reached), ...'
    """
    t0 = time.time()
    if cfg.cv.scheme == "nested":
        raise ConfigError("medtl curve runs the outer folds of cv.scheme kfold, repeated or leave_one_site_out; "
                          "got cv.scheme=nested (an inner search at every point would multiply the cost). Use "
                          "--set cv.scheme=kfold.")
    if getattr(cfg, "tasks", None):
        raise ConfigError("medtl curve runs single-task configs; this config has `tasks`. Remove `tasks` (the "
                          "curve follows the label column) or run `medtl cv` for the multi-task model.")
    device = resolve_device(cfg.train.device)
    bill = ComputeBill(device, getattr(cfg.train, "cpu_watts_per_core", None))
    run, h, data, progress = start(cfg, out_dir, resume=resume, progress=progress, data=data, bill=bill)
    c = cfg.curve
    strategies = list(dict.fromkeys(c.strategies or _default_strategies(cfg)))
    sizes = sorted(set(c.sizes))
    plan = fold_plan(cfg, data.y, data.groups, np.array([x.site for x in data.cases], dtype=object),
                     data.class_names)
    source = LinearProbe()
    point_hash = config_hash(cfg.model_copy(update={"curve": type(c)()}))  # the curve keys do not change a point
    results, resumed = {}, 0
    with (progress_bar() if progress else nullcontext()) as bar:
        for name in strategies:
            scfg, trainer = _strategy(cfg, name, source)
            ctx = FoldContext(scfg, data, run, point_hash, _NoCheckpoint(trainer), bar, bill)
            task = bar.add_task(f"curve: {_LABELS[name]}", total=len(sizes) * len(plan)) if bar else None
            per_size = []
            for frac in sizes:
                reps = 1 if frac >= 1.0 else c.repeats
                recs = []
                for spec in plan:
                    for r in range(reps):
                        rec, fresh = _point(ctx, run, name, spec, frac, r, resume, len(plan))
                        resumed += not fresh
                        if not fresh and rec.info.get("compute"):
                            bill.merge(rec.info["compute"], earlier=True)
                        recs.append((spec, r, rec))
                    if bar is not None:
                        bar.advance(task)
                per_size.append((frac, recs))
            results[name] = per_size
    with bill.stage("evaluation"):
        out = _summarise(cfg, data, results, plan)
    if c.shots:
        with bill.stage("few_shot"):
            out["few_shot"] = _few_shot(cfg, data, source, run, point_hash, progress)
    out.update({"task": "curve", "name": cfg.name, "model": cfg.model.name, "pretrained": cfg.model.pretrained,
                "scheme": cfg.cv.scheme, "n_outer_folds": len(plan), "class_names": data.class_names,
                "n_cases": len(data.y), "n_patients": len(set(data.groups.tolist())), "n_skipped": len(data.skipped),
                "device": device_name(device), "config_hash": h, "resumed_points": resumed,
                "feature_cache": source.feature_info_ or None})
    with bill.stage("evaluation"):
        _plot(out, run / "curve.png")
    out["plots"] = {"curve": "curve.png"}
    out["statements"] = _statements(out)
    out["compute"] = bill.as_dict()
    out["seconds"] = round(time.time() - t0, 1)
    out["report"] = "curve.html"
    write_json(run / "curve.json", out)
    _write_report(out, run / "curve.png", run / "curve.html")
    for line in out["statements"]:
        console.print(line, highlight=False)
    return out


# ------------------------------------------------------------------------------ the points


def _default_strategies(cfg: Config) -> list[str]:
    own = "linear_probe" if cfg.train.strategy.name == "linear_probe" else "finetune"
    return [own, "prototype"]


def _strategy(cfg: Config, name: str, source: LinearProbe):
    if name == "linear_probe":
        return cfg, source
    if name == "prototype":
        return cfg, Prototype(source)
    if cfg.train.strategy.name == "linear_probe":  # fine-tuning of a probe config: plain fine-tuning
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(
            update={"strategy": cfg.train.strategy.model_copy(update={"name": "finetune"})})})
    return cfg, FineTune()


def _point(ctx: FoldContext, run: RunDir, name: str, spec: FoldSpec, frac: float, r: int, resume: bool,
           n_folds: int) -> tuple[FoldRecord, bool]:
    """One point: read it back (resume) or fit it and write it at once. Returns ``(record, fitted now)``."""
    data = ctx.data
    path = run / "points" / name / f"f{round(frac * 1e4):05d}_{spec.key}_r{r}.json"
    test_ids = [data.cases[i].case_id for i in spec.test]
    if resume and path.is_file():
        try:
            rec = FoldRecord.from_dict(read_json(path))
            if rec.config_hash == ctx.config_hash and rec.test_ids == test_ids:
                return rec, False
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError, AttributeError):
            pass  # a damaged record: fit the point again
    seeds = FoldSeeds(ctx.cfg.train.seed, spec.repeat, spec.index).child(round(frac * 1e4)).child(r)
    sub = _subsample(data.y[spec.train], data.groups[spec.train], frac, seeds.int("inner_split"))
    tr = spec.train[sub]
    with warnings.catch_warnings(record=True) as caught:  # small subsamples cannot always stratify: counted
        warnings.simplefilter("always", UserWarning)
        itr, iva = inner_split(data.y[tr], data.groups[tr], val_fraction=ctx.cfg.cv.val_fraction,
                               seed=seeds.int("inner_split"))
    rec, _ = fit_fold(ctx, spec.key, tr[itr], tr[iva], spec.test, seeds,
                      description=f"{_LABELS[name]} {frac:g} {spec.key} r{r} (of {n_folds} folds)")
    rec.info = {**rec.info, "patients": len(set(data.groups[tr].tolist())), "cases": len(tr), "fraction": frac,
                "history": None, "unstratified_val": any("cannot stratify" in str(w.message) for w in caught)}
    write_json(path, asdict(rec))
    return rec, True


def _subsample(y: np.ndarray, groups: np.ndarray, frac: float, seed: int) -> np.ndarray:
    """Indices of ``frac`` of the patients, stratified by each patient's most frequent class (>= 2 per class)."""
    pats, inv = np.unique(groups, return_inverse=True)
    inv = inv.ravel()
    counts = np.zeros((len(pats), int(y.max()) + 1))
    np.add.at(counts, (inv, y), 1)
    cls = counts.argmax(1)
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(cls):
        members = np.flatnonzero(cls == c)
        n = min(len(members), max(2, round(frac * len(members))))
        keep.append(rng.choice(members, size=n, replace=False))
    chosen = np.zeros(len(pats), bool)
    chosen[np.concatenate(keep)] = True
    return np.flatnonzero(chosen[inv])


# ------------------------------------------------------------------------------ statistics


def _summarise(cfg: Config, data: PreparedData, results: dict, plan: list[FoldSpec]) -> dict:
    c, n = cfg.curve, len(data.y)
    k = len(data.class_names)
    strategies, draws = {}, {}
    for name, per_size in results.items():
        probas, thresholds, points = [], [], []
        for frac, recs in per_size:
            keys = sorted({(spec.repeat, r) for spec, r, _ in recs})  # one pooled prediction per outer x curve repeat
            p = np.full((len(keys), n, k), np.nan)
            thr: list[list[float]] = [[] for _ in keys]
            for spec, r, rec in recs:
                j = keys.index((spec.repeat, r))
                p[j, spec.test] = np.asarray(rec.proba)
                thr[j].append(rec.threshold)
            if np.isnan(p).any():
                raise DataError(f"{name} at size {frac:g}: some cases have no out-of-fold prediction; the outer "
                                "folds must test every case once (cv.scheme kfold, repeated or leave_one_site_out).")
            pats = [rec.info["patients"] for _, _, rec in recs]
            probas.append(p)
            thresholds.append(np.array([np.mean(x) for x in thr]))
            unstrat = sum(bool(rec.info.get("unstratified_val")) for _, _, rec in recs)
            points.append({"unstratified_val_splits": unstrat, "fraction": frac, "patients": float(np.mean(pats)), "patients_range": [min(pats), max(pats)],
                           "cases": float(np.mean([rec.info["cases"] for _, _, rec in recs])),
                           "n_repeats": len(keys), "n_models": len(recs)})
        boot = bootstrap_curve(data.y, probas, data.groups, thresholds=thresholds, n_boot=cfg.evaluate.n_bootstrap,
                               seed=cfg.evaluate.seed)
        for i, pt in enumerate(points):
            pt["metrics"] = {m: boot["metrics"][m][i] for m in METRIC_KEYS}
        x = np.array([pt["patients"] for pt in points])
        v = np.array([pt["metrics"][c.metric]["value"] for pt in points])
        fit = curve_fit_summary(x, v, boot["draws"][c.metric], target=c.target, metric=c.metric)
        strategies[name] = {"label": _LABELS[name], "points": points, "fit": fit, "bootstrap": boot["bootstrap"]}
        draws[name] = boot["draws"][c.metric]
    return {"metric": c.metric, "target": c.target, "sizes": sorted(set(c.sizes)), "repeats": c.repeats,
            "x": "training patients given to the strategy (its inner validation patients included)",
            "ci_method": ("95% percentile CI from a bootstrap of the pooled out-of-fold predictions: test patients "
                          "resampled (the same draw at every size), then the repeats (training subsamples) "
                          "resampled within each size; the value is the mean over repeats of the pooled metric"),
            "strategies": strategies, "comparison": _compare(strategies, draws, c.metric)}


def _compare(strategies: dict, draws: dict, metric: str) -> dict | None:
    """Prototype minus every other strategy at each size, paired: every strategy's bootstrap draws
    resample the same test patients (same seed, same patients), so draw-wise differences are paired."""
    if "prototype" not in draws or len(draws) < 2:
        return None
    out = {}
    for other in (s for s in draws if s != "prototype"):
        rows = []
        for i, (pp, po) in enumerate(zip(strategies["prototype"]["points"], strategies[other]["points"])):
            d = draws["prototype"][:, i] - draws[other][:, i]
            d = d[np.isfinite(d)]
            lo, hi = np.percentile(d, [2.5, 97.5]).tolist() if len(d) else [float("nan")] * 2
            diff = pp["metrics"][metric]["value"] - po["metrics"][metric]["value"]
            rows.append({"fraction": pp["fraction"], "patients": pp["patients"], "difference": diff,
                         "ci95": [lo, hi], "verdict": "prototype better" if lo > 0 else
                         "prototype worse" if hi < 0 else "no clear difference"})
        better = [f"{r['patients']:.0f}" for r in rows if r["verdict"] == "prototype better"]
        worse = [f"{r['patients']:.0f}" for r in rows if r["verdict"] == "prototype worse"]
        parts = ([f"beats the {_LABELS[other]} at {', '.join(better)} training patients"] if better else []) + (
            [f"is beaten by it at {', '.join(worse)}"] if worse else [])
        text = "; ".join(parts) if parts else f"is not told apart from the {_LABELS[other]} at any size"
        out[other] = {"metric": metric, "sizes": rows,
                      "statement": f"prototype {text} ({_name(metric)}, paired patient bootstrap, 95% CI)."}
    return out


def _few_shot(cfg: Config, data: PreparedData, source: LinearProbe, run: RunDir, point_hash: str,
              progress: bool) -> dict:
    """N-way K-shot episodes: prototype against the linear probe on the same support sets."""
    c = cfg.curve
    _, feats = source.features(cfg, data, progress)
    s = cfg.train.strategy
    metric = c.metric if c.metric in _FEW_SHOT_METRICS else "balanced_acc"
    shots = []
    for k in sorted(set(c.shots)):
        path = run / "points" / "few_shot" / f"k{k}.json"
        rec = read_json(path) if path.is_file() else None
        if not (rec and rec.get("hash") == point_hash and rec.get("episodes") == c.episodes):
            rec = {"hash": point_hash, "episodes": c.episodes, "k": k, "values": {"prototype": {}, "linear_probe": {}}}
            vals = {st: {m: [] for m in _FEW_SHOT_METRICS} for st in ("prototype", "linear_probe")}
            try:
                for e in range(c.episodes):
                    seeds = FoldSeeds(cfg.train.seed, 0, 0).child(k).child(e)
                    sup, qry = sample_episode(data.y, data.groups, k, np.random.default_rng(seeds.int("inner_split")))
                    yq = data.y[qry]
                    models = {"prototype": PrototypeClassifier(),
                              "linear_probe": _Probe(head=s.probe_head, C_grid=list(s.probe_C),
                                                     class_weight="balanced" if cfg.train.class_weighted else None,
                                                     inner_splits=cfg.cv.inner_splits,
                                                     random_state=seeds.int("probe"))}
                    for st, model in models.items():
                        model.fit(feats[sup], data.y[sup], **({"groups": data.groups[sup]} if st != "prototype"
                                                               else {}))
                        m = compute_metrics(yq, _full(model, feats[qry], len(data.class_names)))
                        for key in _FEW_SHOT_METRICS:
                            vals[st][key].append(m[key])
            except DataError as exc:
                shots.append({"k": k, "skipped": str(exc)})
                continue
            rec["values"] = vals
            write_json(path, rec)
        vals = rec["values"]
        entry = {"k": k, "episodes": c.episodes,
                 "prototype": {m: mean_ci(vals["prototype"][m]) for m in _FEW_SHOT_METRICS},
                 "linear_probe": {m: mean_ci(vals["linear_probe"][m]) for m in _FEW_SHOT_METRICS},
                 "difference": {m: mean_ci(np.subtract(vals["prototype"][m], vals["linear_probe"][m]))
                                for m in _FEW_SHOT_METRICS}}
        lo, hi = entry["difference"][metric]["ci95"]
        entry["verdict"] = ("prototype better" if lo > 0 else "probe better" if hi < 0 else "no clear difference")
        shots.append(entry)
    ways = len(data.class_names)
    return {"ways": ways, "episodes": c.episodes, "metric": metric,
            "support": "K cases per class, each from a different patient",
            "query": "every case of every patient not in the support set",
            "ci_method": "mean over episodes with its 95% t-interval; the difference is paired (same episodes)",
            "shots": shots, "summary": _few_shot_summary(shots, metric, ways)}


def _few_shot_summary(shots: list[dict], metric: str, ways: int) -> str:
    done = [s for s in shots if "verdict" in s]
    if not done:
        return "No few-shot episodes could be drawn (too few patients per class)."
    better = [s["k"] for s in done if s["verdict"] == "prototype better"]
    worse = [s["k"] for s in done if s["verdict"] == "probe better"]
    tied = [s["k"] for s in done if s["verdict"] == "no clear difference"]
    parts = []
    if better:
        parts.append(f"the prototype beats the linear probe at K = {', '.join(map(str, better))}")
    if worse:
        parts.append(f"the probe beats the prototype at K = {', '.join(map(str, worse))}")
    if tied:
        parts.append(f"their paired 95% CIs overlap zero at K = {', '.join(map(str, tied))}")
    return f"{ways}-way episodes, {_name(metric)}: " + "; ".join(parts) + "."


def _full(model, X: np.ndarray, n_classes: int) -> np.ndarray:
    """``(n, n_classes)`` probabilities even when the training cases missed a class."""
    p = model.predict_proba(X)
    full = np.zeros((len(X), n_classes))
    full[:, np.asarray(model.classes_).astype(int)] = p
    return full


def _statements(out: dict) -> list[str]:
    lines = []
    for s in out["strategies"].values():
        fit = s["fit"]
        if fit.get("target"):
            lines.append(f"{s['label']}: {fit['target']['statement']}")
        elif fit["fit"] is None:
            lines.append(f"{s['label']}: no power law could be fitted.")
    for cmp in (out.get("comparison") or {}).values():
        lines.append(f"learning curve: {cmp['statement']}")
    if out.get("few_shot"):
        lines.append(f"few-shot: {out['few_shot']['summary']}")
    return lines


def _name(metric: str) -> str:
    return {"auc": "AUC", "acc": "accuracy", "balanced_acc": "balanced accuracy"}.get(metric, metric)


# ------------------------------------------------------------------------------ figure and report


def _plot(out: dict, path: Path) -> Path:
    few = [s for s in (out.get("few_shot") or {}).get("shots", []) if "verdict" in s]
    fig = Figure(figsize=(12.5 if few else 7.5, 5.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2 if few else 1, squeeze=False)[0]
    ax, metric = axes[0], out["metric"]
    for name, s in out["strategies"].items():
        col = _COLOURS[name]
        x = np.array([p["patients"] for p in s["points"]])
        m = [p["metrics"][metric] for p in s["points"]]
        v = np.array([q["value"] for q in m])
        err = np.abs(np.array([q["ci95"] for q in m], dtype=float).T - v)
        ax.errorbar(x, v, yerr=np.nan_to_num(err), fmt="o", color=col, capsize=3, label=s["label"])
        band = s["fit"].get("band")
        if band:
            ax.plot(band["n"], band["value"], color=col, lw=1.5)
            if band["lo"] is not None:
                ax.fill_between(band["n"], band["lo"], band["hi"], color=col, alpha=0.15, lw=0)
        t = (s["fit"].get("target") or {})
        need = (t.get("patients") or {}).get("value")
        if need and band and need <= band["n"][-1]:
            ax.axvline(need, color=col, ls=":", lw=1)
    if out.get("target") is not None:
        ax.axhline(out["target"], color="#555", ls="--", lw=1, label=f"target {out['target']:g}")
    ax.set_xscale("log")
    ax.set_xlabel("training patients")
    ax.set_ylabel(_name(metric))
    ax.set_title(f"Learning curve, {_name(metric)} (95% CI; power-law fit and band)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    if few:
        fm = out["few_shot"]["metric"]
        ax2 = axes[1]
        for j, st in enumerate(("prototype", "linear_probe")):
            ks = np.array([s["k"] for s in few], dtype=float)
            v = np.array([s[st][fm]["mean"] for s in few])
            err = np.abs(np.array([s[st][fm]["ci95"] for s in few], dtype=float).T - v)
            ax2.errorbar(ks * (0.96 + 0.08 * j), v, yerr=np.nan_to_num(err), fmt="o-", color=_COLOURS[st],
                         capsize=3, label=_LABELS[st])
        ax2.set_xscale("log")
        ax2.set_xticks([s["k"] for s in few], [str(s["k"]) for s in few])
        ax2.set_xlabel("K (labelled cases per class)")
        ax2.set_ylabel(_name(fm))
        ax2.set_title(f"{out['few_shot']['ways']}-way K-shot episodes (mean, 95% CI)")
        ax2.grid(alpha=0.3)
        ax2.legend(loc="lower right")
    import io

    buf = io.BytesIO()
    fig.savefig(buf, dpi=110, format="png")
    fig.clear()
    return atomic_write_bytes(path, buf.getvalue())


_TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'">
<meta name="referrer" content="no-referrer"><meta name="generator" content="medtl">
<title>{{ title }}</title>
<style>
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, Arial, sans-serif; margin: 0; color: #1d2330;
       background: #f6f7f9; }
header { background: #1d2330; color: #fff; padding: 1.2rem 2rem; } header h1 { margin: 0; font-size: 1.5rem; }
main { max-width: 1200px; margin: 0 auto; padding: 1rem 2rem 3rem; }
h2 { font-size: 1.2rem; border-bottom: 2px solid #d8dde6; padding-bottom: .25rem; margin-top: 1.6rem; }
img { max-width: 100%; height: auto; } .table-wrap { max-width: 100%; overflow-x: auto; }
table { border-collapse: collapse; background: #fff; margin: .3rem 0 1rem; font-size: .9rem; }
th, td { border: 1px solid #d8dde6; padding: .3rem .6rem; text-align: left; } th { background: #eef1f6; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.note { color: #5b6475; font-size: .9rem; }
</style></head><body>
<header><h1>{{ title }}</h1></header><main>
<section><h2>Answer</h2><ul>{% for s in statements %}<li>{{ s }}</li>{% endfor %}</ul></section>
<section><h2>Run</h2><div class="table-wrap"><table>{% for k, v in facts %}<tr><th>{{ k }}</th><td>{{ v }}</td></tr>
{% endfor %}</table></div></section>
<section><h2>Learning curve</h2><img alt="learning curve" src="{{ png }}">
<p class="note">{{ ci_method }}. Fit: {{ model }}.</p>
{% for s in strategies %}<h3>{{ s.label }}</h3><div class="table-wrap"><table>
<tr><th>fraction</th><th>patients</th><th>cases</th><th>models</th>{% for m in metrics %}<th>{{ m }}</th>{% endfor %}</tr>
{% for p in s.points %}<tr><td class="num">{{ p.fraction }}</td><td class="num">{{ p.patients }}</td>
<td class="num">{{ p.cases }}</td><td class="num">{{ p.models }}</td>
{% for v in p.cells %}<td class="num">{{ v }}</td>{% endfor %}</tr>{% endfor %}</table></div>
{% if s.fit %}<p>Power law: {% for k, v in s.fit %}{{ k }} = {{ v }}{% if not loop.last %}; {% endif %}{% endfor %}.</p>
{% endif %}{% endfor %}
{% for c in comparisons %}<h3>{{ c.title }}</h3><p>{{ c.statement }}</p><div class="table-wrap"><table>
<tr><th>patients</th><th>difference [95% CI]</th><th>verdict</th></tr>{% for r in c.rows %}
<tr><td class="num">{{ r[0] }}</td><td class="num">{{ r[1] }}</td><td>{{ r[2] }}</td></tr>{% endfor %}
</table></div>{% endfor %}</section>
{% if few %}<section><h2>Few-shot episodes</h2><p>{{ few.summary }}</p><div class="table-wrap"><table>
<tr><th>K</th><th>episodes</th>{% for m in few.metrics %}<th>prototype {{ m }}</th><th>probe {{ m }}</th>
<th>difference {{ m }}</th>{% endfor %}<th>verdict ({{ few.metric }})</th></tr>
{% for r in few.rows %}<tr><td class="num">{{ r.k }}</td><td class="num">{{ r.episodes }}</td>
{% for v in r.cells %}<td class="num">{{ v }}</td>{% endfor %}<td>{{ r.verdict }}</td></tr>{% endfor %}
</table></div><p class="note">{{ few.method }}</p></section>{% endif %}
<section><h2>Compute bill</h2><div class="table-wrap"><table><tr><th>stage</th><th>wall</th><th>images</th>
<th>images/s</th></tr>{% for r in bill %}<tr>{% for v in r %}<td class="num">{{ v }}</td>{% endfor %}</tr>
{% endfor %}</table></div><p class="note">{{ bill_note }}</p></section>
</main></body></html>
"""


def _ci(d: dict) -> str:
    v, (lo, hi) = d.get("value", d.get("mean")), d["ci95"]
    fmt = (lambda x: "n/a" if x is None or not np.isfinite(x) else f"{x:.3f}")
    return f"{fmt(v)} [{fmt(lo)}, {fmt(hi)}]"


def _write_report(out: dict, png: Path, path: Path) -> Path:
    uri = "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode("ascii")
    strategies = []
    for s in out["strategies"].values():
        fit = s["fit"]["fit"]
        strategies.append({
            "label": s["label"],
            "points": [{"fraction": f"{p['fraction']:g}", "patients": f"{p['patients']:.0f}",
                        "cases": f"{p['cases']:.0f}", "models": p["n_models"],
                        "cells": [_ci(p["metrics"][m]) for m in METRIC_KEYS]} for p in s["points"]],
            "fit": None if fit is None else [(k, _ci(fit[k])) for k in ("a", "b", "c", "asymptote")]})
    few = out.get("few_shot")
    few_view = None
    if few:
        done = [s for s in few["shots"] if "verdict" in s]
        few_view = {"summary": few["summary"], "metric": few["metric"], "metrics": _FEW_SHOT_METRICS,
                    "method": f"{few['ci_method']}. Support: {few['support']}; query: {few['query']}.",
                    "rows": [{"k": s["k"], "episodes": s["episodes"], "verdict": s["verdict"],
                              "cells": [_ci(s[st][m]) for m in _FEW_SHOT_METRICS
                                         for st in ("prototype", "linear_probe", "difference")]} for s in done]}
    bill = out.get("compute") or {}
    facts = [("config", out["name"]), ("model", f"{out['model']} ({'pretrained' if out['pretrained'] else 'scratch'})"),
             ("cases / patients", f"{out['n_cases']} / {out['n_patients']}"),
             ("outer folds", f"{out['n_outer_folds']} ({out['scheme']})"),
             ("sizes (fractions of a fold's training patients)", ", ".join(f"{f:g}" for f in out["sizes"])),
             ("repeats per size", out["repeats"]), ("device", out["device"]),
             ("wall time", f"{out['seconds']:.0f} s"), ("config hash", out["config_hash"])]
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    html = env.from_string(_TEMPLATE).render(
        title=f"Learning curve: {out['name']}", statements=out["statements"], facts=facts, png=uri,
        ci_method=out["ci_method"], model=next(iter(out["strategies"].values()))["fit"]["model"],
        strategies=strategies, metrics=METRIC_KEYS, few=few_view, bill=bill_rows(bill),
        comparisons=[{"title": f"Prototype minus {_LABELS[o]} ({_name(cmp['metric'])})", "statement": cmp["statement"],
                      "rows": [(f"{r['patients']:.0f}", _ci({"value": r["difference"], "ci95": r["ci95"]}),
                                r["verdict"]) for r in cmp["sizes"]]}
                     for o, cmp in (out.get("comparison") or {}).items()],
        bill_note=f"{bill.get('device_name', '')}; peak memory {bill.get('peak_rss_bytes', 0) / 2**30:.2f} GiB; "
                  f"energy {bill.get('energy_wh', 0):.3f} Wh ({bill.get('energy_method', '')})")
    return atomic_write_text(path, html)
