"""Stage 5: evaluation, pure statistics. Arrays in, numbers and figures out.

Patient-grouped splits and CV schemes, metrics with patient-bootstrap CIs, operating points,
calibration, DeLong and multi-class statistics, plots. Nothing here trains, loads or writes a
run: the workflows (:mod:`medtl.workflows`) do that and call these functions.
"""

from medtl.evaluate.calibration import (
    TemperatureScaler,
    brier_score,
    calibration_metrics,
    expected_calibration_error,
)
from medtl.evaluate.metrics import (
    METRIC_KEYS,
    THRESHOLD_RULES,
    bootstrap_ci,
    choose_threshold,
    compute_metrics,
    predicted_class,
    youden_threshold,
)
from medtl.evaluate.plots import (
    plot_confusion,
    plot_reliability,
    plot_roc,
    plot_training_curves,
)
from medtl.evaluate.splits import check_disjoint_groups, inner_split, outer_splits
from medtl.evaluate.stats import (
    bootstrap_stat,
    delong_test,
    mean_sd,
    multiclass_metrics,
)

__all__ = ["METRIC_KEYS", "THRESHOLD_RULES", "TemperatureScaler", "bootstrap_ci", "bootstrap_stat", "brier_score",
           "calibration_metrics", "check_disjoint_groups", "choose_threshold", "compute_metrics", "delong_test",
           "expected_calibration_error", "inner_split", "mean_sd", "multiclass_metrics", "outer_splits",
           "plot_confusion", "plot_reliability", "plot_roc", "plot_training_curves", "predicted_class",
           "youden_threshold"]
