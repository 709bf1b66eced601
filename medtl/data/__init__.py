"""Stage 1: data. Manifests and MedMNIST, readers, MONAI transforms, the decode-once cache, audit, demo data."""

from __future__ import annotations

from pathlib import Path

from medtl.data.manifest import Case, read_manifest, read_medmnist
from medtl.data.prepare import PreparedData, load_cases, prepare
from medtl.data.privacy import Pseudonymizer

__all__ = ["Case", "PreparedData", "Pseudonymizer", "load_cases", "prepare", "read_manifest",
           "read_medmnist", "run_audit"]


def run_audit(source: str | Path, out_dir: str | Path, *, overrides: list[str] | None = None,
              progress: bool = True, reveal_ids: bool = False) -> dict:
    """Audit a manifest CSV or the data of a YAML config; writes ``out_dir/audit.json``.

    Returns the report dict (``report["clean"]`` is False when there are findings).
    """
    from medtl.data.audit import audit_cases, write_audit

    source = Path(source)
    if source.suffix.lower() in (".yaml", ".yml"):
        from medtl.config import load_config

        cfg = load_config(source, overrides)
        cases = load_cases(cfg.data, cfg.resolved_data_path())
        reveal_ids = reveal_ids or cfg.privacy.reveal_ids
    else:
        cases = read_manifest(source, allow_duplicates=True)  # duplicates are an audit finding, not a stop
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = audit_cases(cases, pseudonymize=Pseudonymizer.for_run(out, reveal=reveal_ids), progress=progress)
    write_audit(report, out)
    return report
