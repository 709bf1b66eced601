"""``medtl explain RUN_DIR``: saliency for selected out-of-fold cases, checked, in one HTML report.

Each case is explained by the model that did NOT train on it (its fold's checkpoint, or
the final model of an official-split run), on the windowed image exactly as the model saw
it. Every map gets the model-randomisation sanity check, and where a region mask is known
(the demo's lesions) the share of attribution inside it.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
from pathlib import Path

import numpy as np
import torch
import yaml

from medtl import __version__
from medtl.config import load_config
from medtl.data.prepare import load_cases, load_mask, prepare
from medtl.errors import MedtlError
from medtl.explain.attribution import explain
from medtl.explain.overlay import panel_png
from medtl.explain.report import write_report
from medtl.explain.sanity import mask_agreement, randomization_check
from medtl.train.checkpoint import load_checkpoint

__all__ = ["explain_run", "select_cases"]

_METHOD_TITLES = {"gradcam": "Grad-CAM", "ig": "Integrated Gradients"}
_REPORT_METRICS = ("pooled", "test", "val", "folds", "bootstrap", "class_counts")


def _read_run(run_dir: Path) -> tuple[dict, dict, list[dict]]:
    missing = [f for f in ("config.yaml", "metrics.json", "predictions.csv") if not (run_dir / f).is_file()]
    if missing:
        raise MedtlError(f"'{run_dir}' is not a finished medtl run: {', '.join(missing)} missing. "
                         "Run `medtl cv` or `medtl train` first and pass its --out directory.")
    raw = yaml.safe_load((run_dir / "config.yaml").read_text())
    raw = {k: v for k, v in raw.items() if not k.startswith("_")}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    with (run_dir / "predictions.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    return raw, metrics, rows


def select_cases(rows: list[dict], class_names: list[str], n_correct: int, n_wrong: int) -> list[dict]:
    """The most confident wrong predictions and the most confident correct ones, classes alternating.

    ``rows`` are ``predictions.csv`` rows; returns the chosen rows with ``confidence`` added.
    """
    def conf(r: dict) -> float:
        return float(r[f"prob_{r['pred']}"])

    picked = []
    for want_correct, n in ((False, n_wrong), (True, n_correct)):
        pool = [r for r in rows if (r["pred"] == r["label"]) == want_correct]
        by_class = {c: sorted([r for r in pool if r["label"] == c], key=conf, reverse=True) for c in class_names}
        chosen: list[dict] = []
        while len(chosen) < n and any(by_class.values()):
            for c in class_names:
                if by_class[c] and len(chosen) < n:
                    chosen.append(by_class[c].pop(0))
        picked += [{**r, "confidence": conf(r), "correct": want_correct} for r in chosen]
    return picked


def explain_run(run_dir: str | Path, out_dir: str | Path | None = None, *, overrides: list[str] | None = None,
                progress: bool = True) -> Path:
    """Write ``report.html`` for a finished run; returns its path.

    Args:
        run_dir: a ``medtl cv`` or ``medtl train`` output directory.
        out_dir: where to write the report (default: ``run_dir``).
        overrides: ``--set`` style overrides, e.g. ``["explain.n_wrong=8", "explain.methods=[gradcam]"]``.
    """
    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir
    raw, metrics, rows = _read_run(run_dir)
    cfg = load_config(raw, overrides)
    class_names = metrics["class_names"]
    cfg.data.class_names = class_names
    ex = cfg.explain
    chosen = select_cases(rows, class_names, ex.n_correct, ex.n_wrong)
    wanted = {r["id"]: r for r in chosen}
    cases = [c for c in load_cases(cfg.data.model_copy(update={"max_cases": None}), cfg.resolved_data_path())
             if c.case_id in wanted]
    if len(cases) != len(wanted):
        raise MedtlError(f"{len(wanted) - len(cases)} case(s) of the run are no longer in the data at "
                         f"'{cfg.resolved_data_path()}'. Explain needs the same data the run used.")
    data = prepare(cfg, cases, progress=False, require_all_classes=False)
    by_id = {c.case_id: i for i, c in enumerate(data.cases)}
    items = []
    models: dict[str, torch.nn.Module] = {}
    track = _tracker(progress)
    for r in track(chosen, "Explaining cases"):
        key = f"fold{r['fold']}" if r["fold"] not in ("", "test") else "final"
        if key not in models:
            models[key] = load_checkpoint(run_dir / "checkpoints" / key)[0]
        model = models[key]
        i = by_id[r["id"]]
        x = torch.from_numpy(data.images[i: i + 1])
        target = class_names.index(r["pred"])
        maps, sanity = {}, {}
        for method in ex.methods:
            kw = {"ig_steps": ex.ig_steps} if method == "ig" else {}
            maps[_METHOD_TITLES[method]] = explain(model, x, target=target, method=method, **kw)[0, 0].numpy()
            if ex.sanity_check:
                sanity[_METHOD_TITLES[method]] = randomization_check(model, x, target=target, method=method, **kw)
        mask = load_mask(data.cases[i], cfg.data.image_size)
        agreement = ({name: mask_agreement(m, mask) for name, m in maps.items()}
                     if mask is not None and mask.any() else None)
        title = f"{r['id']}: label {r['label']}, predicted {r['pred']} ({r['confidence']:.2f})"
        items.append({"case_id": r["id"], "label": r["label"], "pred": r["pred"], "prob": r["confidence"],
                      "correct": r["correct"], "fold": r["fold"],
                      "panel_png": panel_png(data.images[i, 0], maps, title=title, mask=mask),
                      "sanity": sanity or None, "mask_agreement": agreement})
    plots = {cap: run_dir / f for cap, f in (("ROC", "roc.png"), ("Confusion matrix", "confusion.png"),
                                             ("Training curves", "training.png")) if (run_dir / f).is_file()}
    run_info = {
        "config_name": cfg.name, "task": metrics.get("task"), "model": cfg.model.name,
        "weights": next(iter(models.values())).weights_record.name if models else "", "pretrained": cfg.model.pretrained,
        "n_cases": metrics.get("n_cases", metrics.get("n_test")), "n_patients": metrics.get("n_patients"),
        "intensity": _intensity_text(cfg), "image_size": "x".join(map(str, cfg.data.image_size)),
        "device": metrics.get("device"), "created": _dt.datetime.now().isoformat(timespec="seconds"),
        "medtl_version": __version__,
    }
    return write_report(out / "report.html", title=f"medtl report: {cfg.name}", run_info=run_info,
                        metrics={k: metrics[k] for k in _REPORT_METRICS if k in metrics}, plots=plots, cases=items, sanity=_sanity_summary(items),
                        notes=_notes(metrics, items))


def _intensity_text(cfg) -> str:
    it = cfg.data.intensity
    if it.mode == "window":
        from medtl.data.transforms import window_bounds

        lo, hi = window_bounds(it)
        return f"CT window {it.preset or 'custom'} [{lo:g}, {hi:g}] HU"
    if it.mode == "percentile":
        return f"percentiles {it.lower:g}-{it.upper:g}"
    if it.mode == "range":
        return f"fixed range [{it.vmin:g}, {it.vmax:g}]"
    return "per-image min-max"


def _sanity_summary(items: list[dict]) -> dict:
    out = {}
    for it in items:
        for method, res in (it["sanity"] or {}).items():
            s = out.setdefault(method, {"passed": 0, "total": 0, "rho": []})
            s["total"] += 1
            s["passed"] += int(bool(res["passed"]))
            s["rho"] += [abs(v) for v in res["spearman"] if v is not None]
    return {m: {"passed": s["passed"] == s["total"], "n_passed": s["passed"], "total": s["total"],
                "mean_abs_spearman": float(np.mean(s["rho"])) if s["rho"] else None} for m, s in out.items()}


def _notes(metrics: dict, items: list[dict]) -> list[str]:
    notes = []
    if metrics.get("task") == "cv":
        notes.append("Every case is explained by the fold model that never saw it in training (out-of-fold).")
    with_mask = [it for it in items if it["mask_agreement"]]
    if with_mask:
        for method in with_mask[0]["mask_agreement"]:
            rows = [it["mask_agreement"][method] for it in with_mask]
            e = [r["energy_in_mask"] for r in rows if r["energy_in_mask"] is not None]
            chance = [r["mask_fraction"] for r in rows if r["mask_fraction"] is not None]
            hits = [r["pointing_hit"] for r in rows if r["pointing_hit"] is not None]
            if e:
                notes.append(f"{method}: on average {np.mean(e):.0%} of the positive attribution falls inside the "
                             f"known lesion mask, which covers {np.mean(chance):.1%} of the image (chance level); "
                             f"the map's peak hits the lesion in {sum(hits)} of {len(hits)} case(s).")
    return notes


def _tracker(enabled: bool):
    if not enabled:
        return lambda items, desc: items
    from rich.progress import track

    return lambda items, desc: track(items, description=desc, transient=True)
