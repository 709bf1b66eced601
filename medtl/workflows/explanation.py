"""``medtl explain RUN_DIR``: saliency for out-of-fold cases, checked, in one HTML report.

Each case is explained by the model that did NOT train on it (its fold's checkpoint, or
the final model of an official-split run), on the windowed image exactly as the model saw
it, with every method in ``explain.methods``. The report holds:

* a gallery: correct and wrong predictions, the most and the least confident of each;
* the cascading randomisation test per method (Adebayo et al. 2018) on the gallery cases;
* deletion/insertion faithfulness curves per method against a random pixel order;
* localisation where masks exist (the demo's lesions): pointing game and attribution
  inside the mask over EVERY correctly classified case with a mask, not just the gallery.

Everything measured is also written to ``explain.json``; 3D maps of the gallery cases are
exported as NIfTI in ``saliency/``, on the scan's own grid with the scan's affine (the geometry
that travelled with the image from the reader), so they open over the scan in any viewer.
"""

from __future__ import annotations

import datetime as _dt
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from medtl._compute import ComputeBill
from medtl._fastpath import batches, resident
from medtl._io import write_json
from medtl._runtime import device_name, resolve_device
from medtl._version import __version__
from medtl.data.prepare import load_cases, load_mask, prepare
from medtl.errors import MedtlError
from medtl.explain import _plots
from medtl.explain._summary import localisation_summary, merge_randomization, notes
from medtl.explain.attribution import (
    ConvergenceWarning,
    explain,
    gradcam_layer,
    relative_delta,
)
from medtl.explain.export import save_nifti
from medtl.explain.faithfulness import deletion_insertion, summarize_faithfulness
from medtl.explain.overlay import montage_png, panel_png
from medtl.explain.report import write_report
from medtl.explain.sanity import (
    RANDOMIZATION_THRESHOLD,
    mask_agreement,
    randomization_check,
)
from medtl.models.heads import MultiTaskHead, TaskView
from medtl.workflows.rundir import PredictionRow, RunDir

__all__ = ["explain_run", "select_cases"]

_REPORT_METRICS = ("pooled", "test", "val", "folds", "bootstrap", "class_counts")


def select_cases(rows: list[dict], class_names: list[str], n_correct: int, n_wrong: int) -> list[dict]:
    """Gallery: for correct and for wrong predictions, the most and the least confident.

    ``rows`` are ``predictions.csv`` rows. Of ``n_correct`` (``n_wrong``) cases, the first
    half (rounded up) are the most confident, the rest the least confident; classes
    alternate inside each part. Returns the chosen rows with ``confidence``, ``correct``
    and ``group`` (e.g. ``"wrong, most confident"``) added; no case appears twice.

    Example:
        >>> [r["group"] for r in select_cases(rows, ["normal", "lesion"], 2, 2)]  # doctest: +SKIP
        ['correct, most confident', 'correct, least confident', 'wrong, most confident', ...]
    """
    def conf(r: dict) -> float:
        return float(r[f"prob_{r['pred']}"])

    picked: list[dict] = []
    seen: set[str] = set()
    for want_correct, n in ((True, n_correct), (False, n_wrong)):
        pool = [r for r in rows if (r["pred"] == r["label"]) == want_correct]
        kind = "correct" if want_correct else "wrong"
        for which, k, reverse in (("most", (n + 1) // 2, True), ("least", n // 2, False)):
            by_class = {c: sorted([r for r in pool if r["label"] == c and r["id"] not in seen],
                                  key=conf, reverse=reverse) for c in class_names}
            chosen: list[dict] = []
            while len(chosen) < k and any(by_class.values()):
                for c in class_names:
                    if by_class[c] and len(chosen) < k:
                        chosen.append(by_class[c].pop(0))
            seen.update(r["id"] for r in chosen)
            picked += [{**r, "confidence": conf(r), "correct": want_correct,
                        "group": f"{kind}, {which} confident"} for r in chosen]
    return picked


def explain_run(run_dir: str | Path, out_dir: str | Path | None = None, *, overrides: list[str] | None = None,
                progress: bool = True, trust_unverified: bool = False) -> Path:
    """Write ``report.html`` (and ``explain.json``) for a finished run; returns the report path.

    Args:
        run_dir: a ``medtl cv`` or ``medtl train`` output directory.
        out_dir: where to write the report (default: ``run_dir``).
        overrides: ``--set`` style overrides, e.g. ``["explain.n_wrong=8", "explain.methods=[gradcam]"]``.
        progress: show a progress bar.
        trust_unverified: load checkpoints whose sha256 is missing or wrong (recorded in
            ``explain.json``); without it such a checkpoint is refused.

    Example:
        >>> explain_run("runs/demo", overrides=["explain.methods=[gradcam,ig,smoothgrad]"])  # doctest: +SKIP
        PosixPath('runs/demo/report.html')
    """
    t0 = time.perf_counter()
    run = RunDir(run_dir)
    run.require(run.CONFIG, run.METRICS, run.PREDICTIONS)
    run_dir = run.path
    out = Path(out_dir) if out_dir is not None else run_dir
    cfg = run.read_config(overrides)
    run_metrics = run.read_metrics()
    metrics = run_metrics.raw
    rows = [_row_dict(r) for r in run.read_predictions()]
    class_names = run_metrics.class_names
    cfg.data.class_names = class_names
    ex = cfg.explain
    device = resolve_device(ex.device, "explain.device")
    bill = ComputeBill(device, cfg.train.cpu_watts_per_core)  # this report's own cost, beside the run's
    gallery = select_cases(rows, class_names, ex.n_correct, ex.n_wrong)
    all_cases = {c.case_id: c for c in load_cases(cfg.data.model_copy(update={"max_cases": None}),
                                                  cfg.resolved_data_path(), cfg.tasks)}
    localise = [r for r in rows if r["pred"] == r["label"] and all_cases.get(r["id"]) is not None
                and all_cases[r["id"]].mask] if ex.localisation else []
    wanted = {r["id"]: r for r in [*gallery, *localise]}
    missing = [i for i in wanted if i not in all_cases]
    if missing:
        raise MedtlError(f"{len(missing)} case(s) of the run are no longer in the data at "
                         f"'{cfg.resolved_data_path()}'. Explain needs the same data the run used.")
    with bill.stage("decode"):
        data = prepare(cfg, [all_cases[i] for i in wanted], progress=False, require_all_classes=False)
        by_id = {c.case_id: i for i, c in enumerate(data.cases)}
        masks = {cid: load_mask(data.cases[i], cfg.data.image_size, cfg.data.orientation) for cid, i in by_id.items()}
    bill.add_images("decode", len(data.cases))
    bill.begin("explanation")  # maps, sanity checks and faithfulness of every fold
    gallery_ids = {r["id"] for r in gallery}

    maps: dict[str, dict[str, np.ndarray]] = {}      # case id -> method -> map
    deltas: dict[str, float] = {}
    randomization: dict[str, list[dict]] = {m: [] for m in ex.methods}
    curves: dict[str, list[dict]] = {m: [] for m in ex.methods}
    record_name, cam_layer, task_explained = "", "", {}
    checked: list[tuple[str, object, dict]] = []
    for key, fold_rows in _track(_by_model(wanted.values()), "Explaining folds", progress):
        model, meta = run.load_model(key, trust_unverified=trust_unverified)
        model = model.to(device)
        head = MultiTaskHead.from_dict(meta["tasks"]) if meta.get("tasks") else None
        full = model
        if head is not None:  # multi-task: the maps, checks and curves explain the primary head
            model = TaskView(full, head, head.primary.name)
        checked.append((key, None, meta))
        record_name = model.weights_record.name
        ids = [r["id"] for r in fold_rows]
        x = torch.from_numpy(np.asarray(data.images[[by_id[i] for i in ids]]))  # read when cached on disk
        target = torch.tensor([class_names.index(r["pred"]) for r in fold_rows])
        g = [j for j, i in enumerate(ids) if i in gallery_ids]
        layer, name, grid = gradcam_layer(model, x, ex.gradcam_stride)
        x_dev = resident(x, device)  # held on the device once for every method, not once per method
        cam_layer = f"{name} ({'x'.join(map(str, grid))} map)"
        for method in ex.methods:
            kw = {**_kwargs(method, ex), **({"layer": layer} if "gradcam" in method else {})}
            m = _batched(model, x_dev, target, method, ex, deltas, ids, kw)
            for j, i in enumerate(ids):
                maps.setdefault(i, {})[method] = m[j]
            if not g:
                continue
            xg, tg, mg = x[g], target[g], torch.from_numpy(m[g])
            if ex.sanity_check:
                randomization[method].append(randomization_check(
                    model, xg, tg, method, max_steps=ex.cascade_steps, original=mg, **kw))
            if ex.faithfulness_steps:
                curves[method] += deletion_insertion(model, xg.to(device), mg, tg,
                                                     n_steps=ex.faithfulness_steps)
        if head is not None and g:  # every other head, one at a time, on the gallery cases
            method = ex.methods[0]
            kw = {**_kwargs(method, ex), **({"layer": layer} if "gradcam" in method else {})}
            for name, m in _task_maps(full, head, x[g], method, ex, [ids[j] for j in g], kw, device).items():
                for jj, j in enumerate(g):
                    maps[ids[j]][f"{method} · {name}"] = m[jj]
            task_explained = {h.name: {"method": method, "target": _TASK_TARGET[h.kind]} for h in head.heads[1:]}
        bill.add_images("explanation", len(ids))
        del model
    bill.end("explanation")

    if "ig" in ex.methods:
        _warn_ig(deltas, ex)
    tol = ex.pointing_tolerance
    if tol is None:  # Zhang et al. (2016): 15 px on ~224 px images, scaled to this image size
        tol = max(1, round(15 / 224 * float(np.mean(cfg.data.image_size))))
    agreement = {i: {m: {**mask_agreement(maps[i][m], masks[i], tolerance=tol),
                         "pointing_hit_1px": mask_agreement(maps[i][m], masks[i])["pointing_hit"]}
                     for m in ex.methods}
                 for i in maps if masks.get(i) is not None and masks[i].any()}
    sanity = {m: merge_randomization(res, RANDOMIZATION_THRESHOLD) for m, res in randomization.items() if res}
    faith = {m: summarize_faithfulness(rows_) for m, rows_ in curves.items() if rows_}
    local = localisation_summary({i: a for i, a in agreement.items() if i in {r["id"] for r in localise}},
                                 ex.methods, tol)
    items = [_case_item(r, data, by_id[r["id"]], maps[r["id"]], masks[r["id"]], agreement.get(r["id"]),
                        deltas.get(r["id"]), out, ex.export_nifti, cfg.data.spacing) for r in gallery]
    check_plots = {}
    if sanity:
        check_plots["Randomisation test"] = _plots.randomization_plot(sanity, RANDOMIZATION_THRESHOLD)
    if faith:
        check_plots["Deletion and insertion curves"] = _plots.faithfulness_plot(curves)
    plots = {cap: run_dir / f for cap, f in (("ROC", "roc.png"), ("Confusion matrix", "confusion.png"),
                                             ("Training curves", "training.png")) if (run_dir / f).is_file()}
    seconds = time.perf_counter() - t0
    run_info = {
        "config_name": cfg.name, "task": metrics.get("task"), "model": cfg.model.name, "weights": record_name,
        "pretrained": cfg.model.pretrained, "n_cases": run_metrics.n_cases,
        "n_patients": metrics.get("n_patients"), "intensity": _intensity_text(cfg),
        "image_size": "x".join(map(str, cfg.data.image_size)), "device": metrics.get("device"),
        "explain_device": device_name(device), "methods": ", ".join(ex.methods),
        "gradcam_layer": cam_layer,
        "explain_seconds": round(seconds, 1),
        "created": _dt.datetime.now().isoformat(timespec="seconds"), "medtl_version": __version__,
    }
    summary = {"methods": list(ex.methods), "device": device_name(device), "seconds": seconds,
               "gradcam_layer": cam_layer, "pointing_tolerance_px": tol,
               "gallery": [r["id"] for r in gallery], "localisation": local, "randomization": sanity,
               "faithfulness": faith, "ig_delta": deltas, **RunDir.trust_record(checked, trust_unverified),
               **({"tasks": task_explained} if task_explained else {}),
               "compute": bill.as_dict()}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "explain.json", summary)
    return write_report(
        out / "report.html", title=f"medtl report: {cfg.name}", run_info=run_info,
        metrics={**{k: metrics[k] for k in _REPORT_METRICS if k in metrics}, **_task_sections(metrics)},
        plots=plots, cases=items,
        randomization=sanity, faithfulness=faith, localisation=local, check_plots=check_plots,
        notes=notes(metrics, local, deltas),
        compute={f"the run ({metrics.get('task', 'cv')})": run_metrics.compute,
                 "this report (explain)": summary["compute"]})


def _task_sections(metrics: dict) -> dict[str, dict]:
    """Multi-task runs: one report table per non-primary task (``task_<name>``): its metrics with CIs
    (multilabel: ``auc_<label>`` per label and ``macro_auc``) and how many cases had its label."""
    out = {}
    for name, e in (metrics.get("tasks") or {}).items():
        m = e.get("metrics")
        if not isinstance(m, dict):
            continue
        body = {k: v for k, v in m.items() if k != "auc_per_label"}
        body.update({f"auc_{lab}": v for lab, v in (m.get("auc_per_label") or {}).items()})
        out[f"task_{name}"] = {"kind": e["kind"], **body}
    return out


_TASK_TARGET = {"binary": "the predicted class", "multiclass": "the predicted class",
                "multilabel": "the most probable label", "regression": "the predicted value"}


def _task_maps(model, head: MultiTaskHead, x: torch.Tensor, method: str, ex, ids: list[str], kw: dict,
               device) -> dict[str, np.ndarray]:
    """``{task: (n, *S)}`` maps of each non-primary head of a multi-task model: of the predicted
    class (binary, multiclass), the most probable label (multilabel) or the predicted value (regression)."""
    out = {}
    x_dev = resident(x, device)
    for h in head.heads[1:]:
        view = TaskView(model, head, h.name).eval()
        with torch.no_grad():
            z = torch.cat([view(xb).float() for xb in batches(x_dev, ex.batch_size, device)]).cpu()
        target = torch.zeros(len(x), dtype=torch.long) if h.kind == "regression" else z.argmax(1)
        out[h.name] = _batched(view, x_dev, target, method, ex, {}, ids, kw)
    return out


def _batched(model, x, target, method, ex, deltas: dict, ids: list[str], kw: dict) -> np.ndarray:
    """Maps ``(N, *spatial)`` for one method of images ``x`` (a :class:`Resident`), ``ex.batch_size`` per call."""
    out = []
    # the training fast path: channels_last batches of the images already held on the device
    for lo, xb in zip(range(0, len(x), ex.batch_size), batches(x, ex.batch_size, x.device)):
        tb = target[lo: lo + ex.batch_size]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # reported once per run, by _warn_ig
            m, d = explain(model, xb, tb, method, return_delta=True, **kw)
        if d is not None:
            deltas.update(zip(ids[lo: lo + ex.batch_size], relative_delta(m, d).tolist()))
        out.append(m.cpu().numpy())
    return np.concatenate(out)


def _warn_ig(deltas: dict[str, float], ex) -> None:
    """One warning per run (not per fold) when Integrated Gradients missed its completeness check."""
    vals = np.array(list(deltas.values()), dtype=float)
    over = vals[vals > ex.ig_delta_threshold]
    if len(over):
        warnings.warn(f"Integrated Gradients: {len(over)} of {len(vals)} case(s) miss the completeness check "
                      f"(|sum of attributions - (f(x) - f(baseline))| above {ex.ig_delta_threshold:.0%} of the "
                      f"change; median {np.median(vals):.1%}, worst {vals.max():.1%}) with {ex.ig_steps} steps. "
                      "Their IG maps are approximate: raise explain.ig_steps substantially (hundreds), or use "
                      "smoothgrad or occlusion.", ConvergenceWarning, stacklevel=3)


def _kwargs(method: str, ex) -> dict:
    if method == "ig":
        return {"n_steps": ex.ig_steps, "delta_threshold": ex.ig_delta_threshold}
    if method in ("gradient_shap", "smoothgrad"):
        return {"n_samples": ex.n_samples}
    return {}


def _case_item(r: dict, data, i: int, maps: dict, mask, agreement, delta, out: Path, export: bool,
               spacing) -> dict:
    image = data.images[i, 0]
    title = f"{r['id']}: label {r['label']}, predicted {r['pred']} ({r['confidence']:.2f})"
    extra = []
    geometry = data.geometry[i] if i < len(data.geometry) else None
    axcodes = None if geometry is None else geometry.axcodes  # radiological display; None: as stored
    if image.ndim == 3:
        for method, m in maps.items():
            extra.append((f"{method}: three planes + MIP", montage_png(image, m, title=f"{r['id']} {method}",
                                                                      mask=mask, axcodes=axcodes)))
            if export:  # on the scan's grid with its affine; a plain grid for arrays without geometry
                save_nifti(m, out / "saliency" / f"{r['id']}_{method}.nii.gz", geometry=geometry,
                           spacing=None if geometry is not None else spacing)
    return {"case_id": r["id"], "label": r["label"], "pred": r["pred"], "prob": r["confidence"],
            "correct": r["correct"], "fold": r["fold"], "group": r["group"],
            "panel_png": panel_png(image, maps, title=title, mask=mask, axcodes=axcodes), "extra_pngs": extra,
            "ig_delta": delta, "mask_agreement": agreement}


def _row_dict(row: PredictionRow) -> dict:
    """A prediction row as the gallery code reads it, with the checkpoint that never trained on the case."""
    return {"id": row.id, "label": row.label, "pred": row.pred, "fold": "|".join(row.folds),
            "model_key": RunDir.model_key(row), **{f"prob_{c}": p for c, p in row.proba.items()}}


def _by_model(rows) -> list[tuple[str, list[dict]]]:
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["model_key"], []).append(r)
    return sorted(groups.items())


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


def _track(items, desc: str, enabled: bool):
    if not enabled:
        return items
    from rich.progress import track

    return track(items, description=desc, transient=True)
