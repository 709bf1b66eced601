"""The self-contained HTML saliency report.

:func:`write_report` renders ``templates/report.html.j2`` (Jinja2, autoescaping on) into
ONE file: every image is embedded as a ``data:image/png;base64,`` URI, the CSS is inline,
and a Content-Security-Policy forbids every network load, so the page opens offline in any
browser and can be attached to an e-mail or a ticket as is.

Privacy: the page names cases by ``case_id`` only. Keys that name a file-system location
or an identifying DICOM attribute (``path``, ``*_path``, ``*_dir``, ``*_file``, ``*Path``,
``patient_name``, ``patient_id``, every keyword in
:data:`medtl.data.privacy.IDENTIFYING_TAGS` in any spelling) and values that are paths
(``os.PathLike``, or strings that start like an absolute path) are never rendered; the page
lists the names of the withheld keys so their absence is visible.
"""

from __future__ import annotations

import base64
import math
import numbers
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import numpy as np

from medtl.data.privacy import IDENTIFYING_TAGS
from medtl.errors import UnreadableFileError

__all__ = ["write_report", "METRIC_SECTION_TITLES"]

#: Headings of the metric summary tables, by the key they have in ``metrics.json``.
METRIC_SECTION_TITLES: dict[str, str] = {
    "pooled": "Pooled over all folds",
    "test": "Official test split",
    "val": "Validation split",
}
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_WIDE_PX = 800  # plots at least this many pixels wide get a row of their own (shown larger)


def _norm_key(key: object) -> str:
    return re.sub(r"[^a-z0-9]", "", str(key).lower())


_WITHHELD_KEYS = frozenset({"path", "patientname", "patientid", "filename", "filepath",
                            *(_norm_key(t) for t in IDENTIFYING_TAGS)})
_WITHHELD_LAST_WORDS = frozenset({"path", "paths", "dir", "directory", "file", "filename",
                                  "filepath", "folder", "uri", "url"})
_ABS_PATH = re.compile(r"^(/|~|[A-Za-z]:[\\/]|\\\\|file:)")


def write_report(
    path: str | Path,
    *,
    title: str,
    run_info: Mapping[str, Any],
    metrics: Mapping[str, Any],
    plots: Mapping[str, str | Path | bytes],
    cases: Sequence[Mapping[str, Any]],
    randomization: Mapping[str, Mapping[str, Any]] | None = None,
    faithfulness: Mapping[str, Mapping[str, Any]] | None = None,
    localisation: Mapping[str, Mapping[str, Any]] | None = None,
    check_plots: Mapping[str, str | Path | bytes] | None = None,
    notes: Sequence[str] | None = None,
    compute: Mapping[str, Mapping[str, Any] | None] | None = None,
) -> Path:
    """Write the saliency report as one self-contained HTML file.

    Args:
        path: output ``.html`` file (parent folders are created; written atomically).
        title: page title.
        run_info: run facts shown as a key/value table (``config_name``, ``model``,
            ``weights``, ``n_cases``, ``n_patients``, ``created``, ``medtl_version``...).
        metrics: the run's ``metrics.json``: k-fold form ``{"folds": [{metric: value}, ...],
            "pooled": {metric: {"value": x, "ci95": [lo, hi]}}}`` or official-split form
            ``{"test": {metric: {"value": x, "ci95": [lo, hi]}}}``.
        plots: caption -> PNG file (or PNG bytes), e.g. ROC and calibration curves.
        cases: one dict per explained case: ``case_id`` (str), ``label``, ``pred``, ``prob``,
            ``correct``, ``fold``, ``group`` (e.g. ``"wrong, most confident"``), ``panel_png``
            (PNG bytes from :func:`medtl.explain.overlay.panel_png`), optional ``extra_pngs``
            (``[(caption, PNG bytes)]``, e.g. 3D montages), ``ig_delta`` and
            ``mask_agreement`` (method -> dict). Shown grouped as correct / wrong predictions.
        randomization: method -> cascading randomisation result (``steps``, ``passed``,
            ``verdict``, ``mean_abs_spearman``), see :mod:`medtl.explain.sanity`.
        faithfulness: method -> deletion/insertion AUC summary
            (:func:`medtl.explain.faithfulness.summarize_faithfulness`).
        localisation: method -> pointing game / attribution-in-mask summary.
        check_plots: caption -> PNG of the trust checks (shown in the sanity section).
        notes: free-text remarks shown as a list.
        compute: heading -> compute bill (:meth:`medtl._compute.ComputeBill.as_dict`, e.g. the run's
            ``metrics.json["compute"]`` and this report's own), shown as one compact "Compute" table.

    Returns:
        The written path.

    Raises:
        UnreadableFileError: a plot file is missing or not a PNG.
        ValueError: a case lacks ``case_id`` or a PNG ``panel_png``.

    Example:
        >>> write_report("out/report.html", title="CT contrast", run_info={"model": "resnet18"},
        ...              metrics={"test": {"auc": {"value": 0.91, "ci95": [0.85, 0.96]}}},
        ...              plots={"ROC": "out/roc.png"}, cases=[])          # doctest: +SKIP
        PosixPath('out/report.html')
    """
    withheld: set[str] = set()
    context = {
        "title": str(title),
        "run_info": _items(run_info, withheld),
        "metric_tables": _metric_tables(metrics),
        "fold_table": _fold_table(metrics),
        "plots": [_plot_view(k, v) for k, v in plots.items()],
        "randomization": _randomization_view(randomization),
        "faithfulness": _faithfulness_view(faithfulness),
        "localisation": _localisation_view(localisation),
        "check_plots": [_plot_view(k, v) for k, v in (check_plots or {}).items()],
        "notes": [str(n) for n in (notes or [])],
        "compute": _compute_view(compute),
    }
    views = [_case_view(i, c, withheld) for i, c in enumerate(cases)]
    context["groups"] = [
        {"key": "correct", "title": "Correct predictions",
         "cases": [v for v in views if v["correct"]]},
        {"key": "wrong", "title": "Wrong predictions",
         "cases": [v for v in views if not v["correct"]]},
    ]
    context["n_cases"] = len(views)
    context["withheld"] = sorted(withheld)
    html = _environment().get_template("report.html.j2").render(**context)

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(html)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


@lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("medtl.explain", "templates"),
        autoescape=True,  # every value is escaped; the template never uses |safe
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["fmt"] = _fmt
    return env


def _case_view(index: int, case: Mapping[str, Any], withheld: set[str]) -> dict[str, Any]:
    """Template-ready dict for one case (only known keys are read)."""
    case_id = case.get("case_id")
    if not isinstance(case_id, str) or not case_id:
        raise ValueError(f"cases[{index}] needs a non-empty string 'case_id'; got {case_id!r}.")
    png = case.get("panel_png")
    if not isinstance(png, (bytes, bytearray)) or not bytes(png).startswith(_PNG_MAGIC):
        raise ValueError(
            f"cases[{index}] ({case_id}) needs 'panel_png' as PNG bytes (from "
            f"medtl.explain.overlay.panel_png); got {type(png).__name__}."
        )
    for key in case:
        if _withheld(key, case[key]):
            withheld.add(str(key))
    extras = []
    for caption, extra in case.get("extra_pngs") or ():
        if not isinstance(extra, (bytes, bytearray)) or not bytes(extra).startswith(_PNG_MAGIC):
            raise ValueError(f"cases[{index}] ({case_id}) 'extra_pngs' must hold (caption, PNG bytes) pairs.")
        extras.append({"caption": str(caption), "src": _data_uri(bytes(extra))})
    correct = case.get("correct")
    if correct is None:
        correct = case.get("label") is not None and case.get("label") == case.get("pred")
    return {
        "case_id": case_id,
        "label": case.get("label"),
        "pred": case.get("pred"),
        "prob": case.get("prob"),
        "fold": case.get("fold"),
        "correct": bool(correct),
        "group": case.get("group"),
        "src": _data_uri(bytes(png)),
        "extras": extras,
        "ig_delta": case.get("ig_delta"),
        "mask_agreement": _items(case.get("mask_agreement"), withheld),
    }


def _title(method: str) -> str:
    from medtl.explain.overlay import METHOD_TITLES

    return METHOD_TITLES.get(str(method), str(method))


def _randomization_view(results: Mapping[str, Mapping[str, Any]] | None) -> dict[str, Any] | None:
    """Verdict table (one row per method) and the per-step |rho| / SSIM table."""
    if not results:
        return None
    labels: list[str] = []
    for res in results.values():
        if len(res.get("steps", ())) > len(labels):
            labels = [str(s["randomized"]) for s in res["steps"]]
    rows = []
    for method, res in results.items():
        steps = list(res.get("steps", ()))
        cells = [(f"{_fmt(s['mean_abs_spearman'])} / {_fmt(s['mean_ssim'])}") for s in steps]
        rows.append({"method": _title(method), "passed": bool(res.get("passed")),
                     "verdict": str(res.get("verdict", "")), "cells": cells + ["—"] * (len(labels) - len(cells)),
                     "n_images": res.get("n_images", len(steps[-1]["spearman"]) if steps else 0)})
    return {"labels": labels, "rows": rows, "all_passed": all(r["passed"] for r in rows),
            "failed": [r["method"] for r in rows if not r["passed"]],
            "threshold": _fmt(next(iter(results.values())).get("threshold"))}


def _faithfulness_view(results: Mapping[str, Mapping[str, Any]] | None) -> list[dict[str, Any]]:
    out = []
    for method, r in (results or {}).items():
        if not r:
            continue
        out.append({"method": _title(method), "deletion": _fmt(r["deletion_auc"]),
                    "random_deletion": _fmt(r["random_deletion_auc"]),
                    "insertion": _fmt(r["insertion_auc"]), "random_insertion": _fmt(r["random_insertion_auc"]),
                    "deletion_ok": bool(r["deletion_better_than_random"]),
                    "insertion_ok": bool(r["insertion_better_than_random"]), "n": r.get("n_images")})
    return out


def _localisation_view(results: Mapping[str, Mapping[str, Any]] | None) -> list[dict[str, Any]]:
    out = []
    for method, r in (results or {}).items():
        game = r.get("pointing_game")
        strict = r.get("pointing_game_1px")
        out.append({"method": _title(method), "n": r.get("n_cases"), "hits": r.get("pointing_hits"),
                    "game": "—" if game is None else f"{game:.0%}", "tolerance": r.get("tolerance_px"),
                    "strict": "—" if strict is None else f"{strict:.0%} ({r.get('pointing_hits_1px')})",
                    "energy": _fmt(r.get("mean_energy_in_mask")), "chance": _fmt(r.get("mean_mask_fraction"))})
    return out


def _items(mapping: Mapping[str, Any] | None, withheld: set[str]) -> list[tuple[str, str]]:
    """``(key, formatted value)`` pairs, minus the privacy-withheld ones."""
    if not mapping:
        return []
    out = []
    for key, value in mapping.items():
        if _withheld(key, value):
            withheld.add(str(key))
        else:
            out.append((str(key), _fmt(value)))
    return out


def _withheld(key: object, value: object) -> bool:
    """Whether a key/value may reveal a location or an identifying DICOM attribute."""
    words = re.findall(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])", str(key))  # snake & camel case
    if _norm_key(key) in _WITHHELD_KEYS or (words and words[-1].lower() in _WITHHELD_LAST_WORDS):
        return True
    if isinstance(value, (list, tuple)):
        return any(_withheld("", v) for v in value)
    if isinstance(value, os.PathLike):
        return True
    return isinstance(value, str) and bool(_ABS_PATH.match(value.strip()))


def _metric_tables(metrics: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One ``metric | value | 95% CI`` table per summary section (pooled, test, ...)."""
    tables = []
    for section, body in (metrics or {}).items():
        if section == "folds" or not isinstance(body, Mapping):
            continue
        rows = []
        for name, entry in body.items():
            if isinstance(entry, Mapping) and "value" in entry:
                rows.append((str(name), _fmt(entry["value"]), _fmt_ci(entry.get("ci95"))))
            elif _is_scalar(entry):
                rows.append((str(name), _fmt(entry), "—"))
        if rows:
            title = METRIC_SECTION_TITLES.get(section, str(section).replace("_", " ").capitalize())
            tables.append({"key": str(section), "title": title, "rows": rows})
    return tables


def _fold_table(metrics: Mapping[str, Any]) -> dict[str, Any] | None:
    """Per-fold table: one row per fold, one column per scalar metric that tells folds apart.

    So that the table fits the page, columns with no value in any fold (e.g. ``site`` outside
    leave-site-out CV) are dropped, and columns with the same value in every fold (``repeat``,
    a fixed ``threshold``) are listed once under the table (``constant``) instead. ``summary``
    holds a ``mean`` and an ``sd`` row over the folds for the columns with fractional values.
    """
    folds = (metrics or {}).get("folds")
    if not isinstance(folds, Sequence) or not folds:
        return None
    folds = [f if isinstance(f, Mapping) else {} for f in folds]

    def value(fold: Mapping[str, Any], name: str) -> object:
        v = fold.get(name)
        return v.get("value") if isinstance(v, Mapping) else v

    columns: list[str] = []
    for fold in folds:
        for name in fold:
            if name != "fold" and _is_scalar(value(fold, name)) and name not in columns:
                columns.append(str(name))
    shown, constant = [], []
    for name in columns:
        cells = [_fmt(value(f, name)) for f in folds]
        if all(c == "—" for c in cells):
            continue  # never set: nothing to show
        if len(folds) > 1 and len(set(cells)) == 1:
            constant.append((name, cells[0]))
        else:
            shown.append(name)
    rows = [(_fmt(f.get("fold", i)), [_fmt(value(f, name)) for name in shown]) for i, f in enumerate(folds)]
    summary = []
    if len(folds) > 1:
        reals = {name: [float(v) for v in (value(f, name) for f in folds) if _is_real(v)] for name in shown}
        fractional = {name for name, vs in reals.items() if any(not v.is_integer() for v in vs)}
        if fractional:
            summary.append(("mean", [_fmt(np.mean(reals[n])) if n in fractional else "" for n in shown]))
            summary.append(("sd", [_fmt(np.std(reals[n], ddof=1)) if n in fractional and len(reals[n]) > 1
                                   else "" for n in shown]))
    return {"columns": shown, "rows": rows, "summary": summary, "constant": constant}


def _is_real(value: object) -> bool:
    return (isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
            and math.isfinite(float(value)))


def _plot_view(caption: object, source: str | Path | bytes) -> dict[str, Any]:
    """Template view of one plot: its data URI, caption, and whether it needs a full row."""
    png = _read_png(caption, source)
    width = int.from_bytes(png[16:20], "big") if len(png) >= 24 else 0  # the IHDR chunk
    return {"caption": str(caption), "src": _data_uri(png), "wide": width >= _WIDE_PX}


def _read_png(caption: object, source: str | Path | bytes) -> bytes:
    if isinstance(source, (bytes, bytearray)):
        data = bytes(source)
        if not data.startswith(_PNG_MAGIC):
            raise UnreadableFileError(f"<plot {caption!s}>", "not PNG data")
        return data
    try:
        data = Path(source).read_bytes()
    except OSError as err:
        raise UnreadableFileError(source, f"plot {caption!s} could not be read "
                                          f"({err.strerror or err})") from None
    if not data.startswith(_PNG_MAGIC):
        raise UnreadableFileError(source, f"plot {caption!s} is not a PNG file; save plots "
                                          "with savefig(..., format='png')")
    return data


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _compute_view(bills: Mapping[str, Mapping[str, Any] | None] | None) -> list[dict[str, Any]]:
    """One block per bill: its stage rows (wall time, images, images/s) and a one-line total."""
    out = []
    for heading, bill in (bills or {}).items():
        if not bill:
            continue
        rows = [(str(name), f"{float(st.get('wall_s') or 0):.1f} s", _fmt(st.get("images") or None),
                 "—" if st.get("images_per_s") is None else f"{float(st['images_per_s']):.3g}")
                for name, st in (bill.get("stages") or {}).items()]
        peak = f"{int(bill.get('peak_rss_bytes') or 0) / 2**30:.2f} GiB RSS"
        if bill.get("peak_gpu_bytes"):
            peak += f", {int(bill['peak_gpu_bytes']) / 2**30:.2f} GiB GPU"
        total = (f"{float(bill.get('wall_s') or 0):.1f} s on {bill.get('device_name') or bill.get('device')}; "
                 f"peak memory {peak}; energy {float(bill.get('energy_wh') or 0):.3g} Wh")
        out.append({"heading": str(heading), "rows": rows, "total": total,
                    "method": str(bill.get("energy_method") or "")})
    return out


def _is_scalar(value: object) -> bool:
    return value is None or isinstance(value, (numbers.Number, np.bool_, str))


def _fmt(value: object) -> str:
    """Human format: 3 decimals for floats, yes/no for bools, '—' for missing/NaN."""
    if value is None:
        return "—"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        v = float(value)  # numpy floats too
        if math.isnan(v):
            return "—"
        if v.is_integer() and abs(v) >= 1000:
            return f"{v:.0f}"
        return f"{v:.3f}" if v == 0 or 1e-3 <= abs(v) < 1e4 else f"{v:.3g}"
    if isinstance(value, Mapping) and {"spearman", "passed", "threshold"} <= value.keys():
        # a randomization_check result: the verdict first, then the evidence
        verdict = "passed" if value["passed"] else "FAILED"
        return (f"{verdict} (Spearman rho {_fmt(value['spearman'])}; "
                f"passes when |rho| < {_fmt(value['threshold'])})")
    if isinstance(value, Mapping):
        return "; ".join(f"{k}: {_fmt(v)}" for k, v in value.items() if not _withheld(k, v))
    if isinstance(value, (list, tuple)):
        shown = ", ".join(_fmt(v) for v in value[:12])
        return shown + (f", … ({len(value)} in all)" if len(value) > 12 else "")
    return str(value)


def _fmt_ci(ci: object) -> str:
    if isinstance(ci, (list, tuple)) and len(ci) == 2:
        lo, hi = _fmt(ci[0]), _fmt(ci[1])
        return "—" if "—" in (lo, hi) else f"{lo} – {hi}"
    return "—"
