"""The top floor: what a user runs. Each workflow reads a config or a run directory, calls the
stages below (data, models, adapt, training, evaluate, explain) and writes a run directory.

Module names are nouns (``crossval``, ``official``, ``prediction``...) so that importing a
module never shadows the verb of the same workflow.
"""

from medtl.workflows.auditing import audit
from medtl.workflows.autoconfig import auto
from medtl.workflows.comparison import compare
from medtl.workflows.crossval import cross_validate
from medtl.workflows.curves import curve
from medtl.workflows.demonstration import demo
from medtl.workflows.explanation import explain_run
from medtl.workflows.exporting import EXPORT_FORMATS, export
from medtl.workflows.official import train
from medtl.workflows.prediction import predict
from medtl.workflows.ranking import rank
from medtl.workflows.rundir import FoldKey, FoldRecord, PredictionRow, RunDir, RunMetrics
from medtl.workflows.trainers import FineTune, FoldTrainer, LinearProbe, NestedSelection, SeedEnsemble, make_trainer

__all__ = ["EXPORT_FORMATS", "FineTune", "FoldKey", "FoldRecord", "FoldTrainer", "LinearProbe", "NestedSelection",
           "PredictionRow", "SeedEnsemble", "RunDir", "RunMetrics", "audit", "auto", "compare", "cross_validate", "curve", "demo",
           "explain_run", "export", "make_trainer", "predict", "rank", "train"]
