"""Optional experiment tracking with MLflow (``tracking: mlflow`` in the config).

medtl's own run directory stays the record of truth; MLflow gets a copy: the flattened
config as params, the headline metrics (value and CI bounds), and the run directory's
files as artefacts. The store is local: ``MLFLOW_TRACKING_URI`` if set, otherwise the file
store ``mlruns/`` beside the run directory, so nothing leaves the machine. MLflow 3 put the
file store into maintenance mode and refuses it unless ``MLFLOW_ALLOW_FILE_STORE=true``;
medtl sets that default because the file store needs no database package (``mlflow-skinny``
cannot use SQLite) and is what the issue asks for. Point ``MLFLOW_TRACKING_URI`` at a
database or server to use one. Checkpoints are not uploaded
(they can be large); predictions hold pseudonymised ids only.
"""

from __future__ import annotations

import os

from medtl.config import Config
from medtl.errors import MedtlError
from medtl.workflows.rundir import RunDir

__all__ = ["log_run"]

def _flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = str(v)[:500]
    return out


def _headline(metrics: dict) -> dict[str, float]:
    block = metrics.get("pooled") or metrics.get("test") or {}
    out = {}
    for k, v in block.items():
        if isinstance(v, dict) and v.get("value") is not None:
            out[k] = float(v["value"])
            lo, hi = v.get("ci95", [None, None])
            if lo is not None and hi is not None:
                out[f"{k}_ci_lo"], out[f"{k}_ci_hi"] = float(lo), float(hi)
    for label, part in (metrics.get("calibration") or {}).items():
        for k in ("ece", "brier"):
            val = part.get(k, {}).get("value") if isinstance(part.get(k), dict) else None
            if val is not None:
                out[f"{k}_{label}"] = float(val)
    return out


def log_run(cfg: Config, run: RunDir, metrics: dict) -> str:
    """Log one finished run to MLflow; returns the MLflow run id."""
    try:
        import mlflow
    except ImportError as exc:
        raise MedtlError("tracking: mlflow needs MLflow: pip install 'medtl[tracking]' (or mlflow-skinny), or set "
                         "tracking: none.") from exc
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = os.environ.get("MLFLOW_TRACKING_URI") or (run.path.resolve().parent / "mlruns").as_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(cfg.name)
    with mlflow.start_run(run_name=run.path.name) as active:
        params = _flatten(cfg.model_dump(mode="json", exclude={"data": {"path"}}))
        mlflow.log_params(params)
        mlflow.log_metrics(_headline(metrics))
        for f in run.files():
            if f.is_file():
                mlflow.log_artifact(str(f))
            else:
                mlflow.log_artifacts(str(f), artifact_path=f.name)
        return active.info.run_id
