"""``medtl audit``: check a dataset before training (balance, unreadable files, duplicates,
label conflicts, header shortcuts). The checks live in :mod:`medtl.data.audit`; this workflow
finds the cases, pseudonymises, writes ``audit.json`` and returns the report.
"""

from __future__ import annotations

from pathlib import Path

from medtl._compute import ComputeBill
from medtl.config import load_config
from medtl.data.audit import audit_cases, write_audit
from medtl.data.manifest import read_manifest
from medtl.data.prepare import load_cases
from medtl.data.privacy import Pseudonymizer

__all__ = ["audit"]


def audit(source: str | Path, out_dir: str | Path, *, overrides: list[str] | None = None,
          progress: bool = True, reveal_ids: bool = False) -> dict:
    """Audit a manifest CSV or the data of a YAML config; writes ``out_dir/audit.json``.

    Returns the report dict (``report["clean"]`` is False when there are findings).

    Example:
        >>> report = audit("configs/ct_contrast.yaml", "runs/ct_audit")   # doctest: +SKIP
        >>> report["clean"]                                               # doctest: +SKIP
        False
    """
    source = Path(source)
    watts = None
    if source.suffix.lower() in (".yaml", ".yml"):
        cfg = load_config(source, overrides)
        cases = load_cases(cfg.data, cfg.resolved_data_path())
        reveal_ids = reveal_ids or cfg.privacy.reveal_ids
        budget, watts = cfg.data.memory_budget, cfg.train.cpu_watts_per_core
    else:
        cases = read_manifest(source, allow_duplicates=True)  # duplicates are an audit finding, not a stop
        budget = None
    bill = ComputeBill("cpu", watts)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with bill.stage("audit"):  # every file read and checked once
        report = audit_cases(cases, pseudonymize=Pseudonymizer.for_run(out, reveal=reveal_ids), progress=progress,
                             memory_budget=budget)
    bill.add_images("audit", len(cases))
    report["compute"] = bill.as_dict()
    write_audit(report, out)
    return report
