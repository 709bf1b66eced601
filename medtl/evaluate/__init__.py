"""Stage 5: evaluation. Patient-grouped splits, metrics with patient-bootstrap CIs, plots, run drivers."""

from medtl.evaluate.metrics import METRIC_KEYS, bootstrap_ci, compute_metrics, youden_threshold
from medtl.evaluate.plots import plot_confusion, plot_roc, plot_training_curves
from medtl.evaluate.splits import check_disjoint_groups, inner_split, outer_splits

__all__ = ["METRIC_KEYS", "bootstrap_ci", "check_disjoint_groups", "compute_metrics", "inner_split",
           "outer_splits", "plot_confusion", "plot_roc", "plot_training_curves", "youden_threshold"]
