"""medtl: transfer learning for medical imaging.

Scans in (DICOM, NIfTI, PNG, MedMNIST) -> pretrained encoder fine-tuned under
patient-grouped k-fold -> metrics with patient-bootstrap CIs -> checked saliency report.

Example:
    >>> import medtl
    >>> cfg = medtl.load_config("configs/breastmnist.yaml", overrides=["train.epochs=1"])
    >>> metrics = medtl.train(cfg, "runs/breast")          # official split
    >>> metrics = medtl.cross_validate(cfg, "runs/breast_cv")
    >>> medtl.explain_run("runs/breast_cv")                 # writes report.html
"""

from __future__ import annotations

__version__ = "0.1.0"

from medtl.config import Config, load_config
from medtl.errors import ConfigError, DataError, MedtlError, UnreadableFileError, WeightsError
from medtl.models import create_encoder, get_record, list_records

__all__ = [
    "__version__",
    "Config",
    "ConfigError",
    "DataError",
    "MedtlError",
    "UnreadableFileError",
    "WeightsError",
    "audit",
    "create_encoder",
    "cross_validate",
    "demo",
    "explain_run",
    "get_record",
    "list_records",
    "load_config",
    "train",
]


def train(cfg: Config, out_dir, **kwargs) -> dict:
    """Official-split training (train / val / test). See :func:`medtl.evaluate.runs.train_official`."""
    from medtl.evaluate.runs import train_official

    return train_official(cfg, out_dir, **kwargs)


def cross_validate(cfg: Config, out_dir, **kwargs) -> dict:
    """Patient-grouped stratified k-fold CV. See :func:`medtl.evaluate.runs.cross_validate`."""
    from medtl.evaluate.runs import cross_validate as _cv

    return _cv(cfg, out_dir, **kwargs)


def explain_run(run_dir, out_dir=None, **kwargs):
    """Saliency report for a finished run. See :func:`medtl.explain.run.explain_run`."""
    from medtl.explain.run import explain_run as _explain

    return _explain(run_dir, out_dir, **kwargs)


def audit(source, out_dir, **kwargs) -> dict:
    """Audit a manifest or config's data. See :func:`medtl.data.run_audit`."""
    from medtl.data import run_audit

    return run_audit(source, out_dir, **kwargs)


def demo(out_dir="medtl-demo", **kwargs) -> dict:
    """The offline demo: synthetic DICOM -> 5-fold CV -> saliency report."""
    from medtl.cli import run_demo

    return run_demo(out_dir, **kwargs)
