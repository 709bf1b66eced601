"""Stage 4: training. The fine-tuning loop and checkpoints (a noun, so the verb ``medtl.train`` is never shadowed)."""

from medtl.training.checkpoint import ModelSpec, load_checkpoint, read_meta, save_checkpoint, verify_checkpoint
from medtl.training.loop import FitResult, fit, predict_proba, validation_scores

__all__ = ["FitResult", "ModelSpec", "fit", "load_checkpoint", "predict_proba", "read_meta", "save_checkpoint",
           "validation_scores", "verify_checkpoint"]
