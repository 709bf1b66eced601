"""medtl: transfer learning for medical imaging.

Scans in (DICOM, NIfTI, PNG, MedMNIST) -> pretrained encoder fine-tuned under
patient-grouped k-fold -> metrics with patient-bootstrap CIs -> checked saliency report.

Example:
    >>> import medtl
    >>> cfg = medtl.load_config("configs/breastmnist.yaml", overrides=["train.epochs=1"])
    >>> metrics = medtl.train(cfg, "runs/breast")            # official split      # doctest: +SKIP
    >>> metrics = medtl.cross_validate(cfg, "runs/breast_cv")                       # doctest: +SKIP
    >>> medtl.explain_run("runs/breast_cv")                   # writes report.html # doctest: +SKIP

Every public name is a function or class from :mod:`medtl.workflows`, :mod:`medtl.config`
or :mod:`medtl.models`; the stages below are libraries, imported by their full path.
"""

from __future__ import annotations

from medtl._version import __version__
from medtl.config import Config, load_config
from medtl.errors import ConfigError, DataError, MedtlError, OutputError, UnreadableFileError, WeightsError
from medtl.models import create_encoder, get_record, list_records
from medtl.workflows import (
    RunDir,
    audit,
    auto,
    compare,
    cross_validate,
    curve,
    demo,
    explain_run,
    export,
    predict,
    rank,
    train,
)
from medtl.workflows.continual import continual

__all__ = [
    "__version__",
    "Config",
    "ConfigError",
    "DataError",
    "MedtlError",
    "OutputError",
    "RunDir",
    "UnreadableFileError",
    "WeightsError",
    "audit",
    "auto",
    "compare",
    "continual",
    "create_encoder",
    "cross_validate",
    "curve",
    "demo",
    "explain_run",
    "export",
    "get_record",
    "list_records",
    "load_config",
    "predict",
    "rank",
    "train",
]
