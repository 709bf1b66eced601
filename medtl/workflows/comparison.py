"""Compare two runs on the same cases: paired DeLong test on AUC, plus the accuracy difference.

Both runs' ``predictions.csv`` are matched by case ``id``; cases only one run predicted
are counted and left out (never silently: the counts are in the result). The labels of
matched cases must agree, otherwise the runs did not evaluate the same data.

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

from medtl._io import write_json
from medtl.errors import DataError
from medtl.evaluate.stats import delong_test
from medtl.workflows.rundir import PredictionRow, RunDir

__all__ = ["compare", "print_comparison"]


def _read(run: Path) -> dict[str, PredictionRow]:
    folder = run.parent if run.is_file() else run
    return {r.id: r for r in RunDir(folder).read_predictions()}


def compare(run_a: str | Path, run_b: str | Path, *, positive: str | None = None,
                 out: str | Path | None = None) -> dict:
    """Paired comparison of two runs' out-of-fold (or test) predictions.

    Returns ``{"n_common", "only_a", "only_b", "positive", "delong": {...}, "acc_a", "acc_b"}``.
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
