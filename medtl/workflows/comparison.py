"""Compare two runs on the same cases: paired DeLong test on AUC, plus the accuracy difference.

Both runs' ``predictions.csv`` are matched by case ``id``; cases only one run predicted
are counted and left out (never silently: the counts are in the result). The labels of
matched cases must agree, otherwise the runs did not evaluate the same data.

Beside the metrics stands each run's compute bill (``metrics.json``'s ``compute`` block: wall
time, images per second, peak memory, energy), so a pretrained run is weighed against one
from scratch on cost as well as accuracy. A run recorded without a bill shows "not recorded".

Example:
    >>> res = compare("runs/imagenet", "runs/scratch")   # doctest: +SKIP
    >>> round(res["delong"]["p_value"], 3)                    # doctest: +SKIP
    0.004
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from medtl._io import read_json, write_json
from medtl.errors import DataError
from medtl.evaluate.stats import delong_test
from medtl.workflows.rundir import PredictionRow, RunDir

__all__ = ["compare", "print_comparison", "print_cost"]


def _read(run: Path) -> dict[str, PredictionRow]:
    folder = run.parent if run.is_file() else run
    return {r.id: r for r in RunDir(folder).read_predictions()}


def _bill(run: Path) -> dict | None:
    """The run's compute bill from its ``metrics.json``, or None when it has none."""
    path = (run.parent if run.is_file() else run) / RunDir.METRICS
    try:
        return read_json(path).get("compute") if path.is_file() else None
    except (ValueError, UnicodeDecodeError, AttributeError):
        return None


def _cost_ratios(a: dict | None, b: dict | None) -> dict:
    """A / B for wall time, training time, peak memory and energy (None where either is missing or 0)."""
    def pick(bill: dict | None, key: str) -> float | None:
        if not bill:
            return None
        v = (bill.get("stages") or {}).get("training", {}).get("wall_s") if key == "training_s" else bill.get(key)
        return None if v is None else float(v)

    out = {}
    for key in ("wall_s", "training_s", "peak_rss_bytes", "energy_wh"):
        va, vb = pick(a, key), pick(b, key)
        out[key] = round(va / vb, 3) if va is not None and vb else None
    return out


def compare(run_a: str | Path, run_b: str | Path, *, positive: str | None = None,
                 out: str | Path | None = None) -> dict:
    """Paired comparison of two runs' out-of-fold (or test) predictions.

    Returns ``{"n_common", "only_a", "only_b", "positive", "delong": {...}, "acc_a", "acc_b", "compute"}``;
    ``compute`` holds both bills (``a``, ``b``; None when a run has none) and ``ratio_a_to_b``.
    """
    a, b = _read(Path(run_a)), _read(Path(run_b))
    common = sorted(set(a) & set(b))
    if len(common) < 2:
        raise DataError(f"The runs share {len(common)} case id(s); a paired test needs the same cases. Compare runs "
                        "made on the same data (same manifest, same split).")
    probs = list(a[common[0]].proba)
    pos = positive or (probs[1] if len(probs) == 2 else None)
    if pos is None or pos not in a[common[0]].proba or pos not in b[common[0]].proba:
        raise DataError(f"Choose the positive class with --positive; classes in run A: {probs}.")
    bad = [i for i in common if a[i].label != b[i].label]
    if bad:
        raise DataError(f"{len(bad)} case(s) have different labels in the two runs (e.g. id {bad[0]}); they did not "
                        "evaluate the same data.")
    y = np.array([a[i].label == pos for i in common], dtype=int)
    sa = np.array([a[i].proba[pos] for i in common])
    sb = np.array([b[i].proba[pos] for i in common])
    res = {"run_a": str(run_a), "run_b": str(run_b), "n_common": len(common), "only_a": len(set(a) - set(b)),
           "only_b": len(set(b) - set(a)), "positive": pos, "delong": delong_test(y, sa, sb),
           "acc_a": float(np.mean([a[i].correct for i in common])),
           "acc_b": float(np.mean([b[i].correct for i in common]))}
    bill_a, bill_b = _bill(Path(run_a)), _bill(Path(run_b))
    res["compute"] = {"a": bill_a, "b": bill_b, "ratio_a_to_b": _cost_ratios(bill_a, bill_b)}
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        write_json(Path(out) / "compare.json", res)
    return res


def print_comparison(res: dict, console: Console) -> None:
    d = res["delong"]
    t = Table(title=f"Paired DeLong test on {res['n_common']} common cases (positive class '{res['positive']}')")
    for col in ("", "run A", "run B", "A - B", "95% CI", "p"):
        t.add_column(col, justify="right")
    t.add_row("AUC", f"{d['auc_a']:.3f}", f"{d['auc_b']:.3f}", f"{d['diff']:+.3f}",
              f"[{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]", f"{d['p_value']:.4f}")
    t.add_row("ACC", f"{res['acc_a']:.3f}", f"{res['acc_b']:.3f}", f"{res['acc_a'] - res['acc_b']:+.3f}", "", "")
    console.print(t)
    if res["only_a"] or res["only_b"]:
        console.print(f"[yellow]{res['only_a']} case(s) only in A and {res['only_b']} only in B were left out.[/]")
    print_cost(res.get("compute") or {}, console)


def print_cost(compute: dict, console: Console) -> None:
    """The two runs' compute bills side by side (``compare(...)["compute"]``)."""
    a, b, ratio = compute.get("a"), compute.get("b"), compute.get("ratio_a_to_b") or {}
    if not a and not b:
        console.print("No compute bill recorded in either run's metrics.json.")
        return
    t = Table(title="Compute bill")
    for col in ("", "run A", "run B", "A / B"):
        t.add_column(col, justify="right")

    def cell(bill: dict | None, fn) -> str:
        if not bill:
            return "not recorded"
        try:
            return fn(bill)
        except (KeyError, TypeError, ValueError):
            return "–"

    def stage(name: str, field: str):
        def get(bill: dict) -> str:
            s = (bill.get("stages") or {}).get(name)
            if not s or s.get(field) is None:
                return "–"
            return f"{s[field]:.1f} s" if field == "wall_s" else f"{s[field]:.3g}"
        return get

    def r(key: str) -> str:
        return "" if ratio.get(key) is None else f"{ratio[key]:.2f}"

    t.add_row("device", cell(a, lambda d: d["device_name"]), cell(b, lambda d: d["device_name"]), "")
    t.add_row("wall time", cell(a, lambda d: f"{d['wall_s']:.1f} s"), cell(b, lambda d: f"{d['wall_s']:.1f} s"),
              r("wall_s"))
    t.add_row("training time", cell(a, stage("training", "wall_s")), cell(b, stage("training", "wall_s")),
              r("training_s"))
    t.add_row("training images/s", cell(a, stage("training", "images_per_s")),
              cell(b, stage("training", "images_per_s")), "")
    t.add_row("peak memory (RSS)", cell(a, lambda d: f"{d['peak_rss_bytes'] / 2**30:.2f} GiB"),
              cell(b, lambda d: f"{d['peak_rss_bytes'] / 2**30:.2f} GiB"), r("peak_rss_bytes"))
    if (a and a.get("peak_gpu_bytes")) or (b and b.get("peak_gpu_bytes")):
        t.add_row("peak GPU memory", cell(a, lambda d: f"{(d['peak_gpu_bytes'] or 0) / 2**30:.2f} GiB"),
                  cell(b, lambda d: f"{(d['peak_gpu_bytes'] or 0) / 2**30:.2f} GiB"), "")
    t.add_row("energy", cell(a, lambda d: f"{d['energy_wh']:.3f} Wh"), cell(b, lambda d: f"{d['energy_wh']:.3f} Wh"),
              r("energy_wh"))
    console.print(t)
    for label, bill in (("run A", a), ("run B", b)):
        if bill and bill.get("energy_method"):
            console.print(f"Energy, {label}: {bill['energy_method']}", markup=False, highlight=False)
