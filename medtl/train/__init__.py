"""Stage 4: training (loop, checkpoints)."""

from medtl.train.checkpoint import load_checkpoint, read_meta, save_checkpoint
from medtl.train.loop import FitResult, fit, predict_proba, resolve_device, seed_everything

__all__ = ["FitResult", "fit", "load_checkpoint", "predict_proba", "read_meta", "resolve_device",
           "save_checkpoint", "seed_everything"]
