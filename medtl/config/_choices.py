"""Every set of config choices, spelled once: a ``Literal`` alias and a tuple beside it."""

from __future__ import annotations

from typing import Literal, get_args

# -- enumerations: each set of choices is written once -------------------------------------
DataFormat = Literal["manifest", "medmnist", "folder"]
DataSplit = Literal["official", "pooled"]
OnError = Literal["raise", "skip"]
IntensityMode = Literal["window", "multiwindow", "percentile", "range", "minmax"]
WindowPreset = Literal["lung", "mediastinum", "bone", "brain", "abdomen"]
ChannelMapping = Literal["auto", "repeat", "sum"]
Conversion3D = Literal["inflate", "acs", "slices", "channels"]
WeightLayout = Literal["timm", "efficientnet_pytorch", "torchvision", "radimagenet_torch", "radimagenet_keras",
                       "radimagenet_hf", "medicalnet"]
StrategyName = Literal["finetune", "llrd", "gradual_unfreeze", "partial", "adapters", "lora", "linear_probe"]
ProbeHead = Literal["logistic", "mlp"]
DAMethod = Literal["none", "adabn", "dsbn", "dann", "mmd", "coral"]
AugmentBackend = Literal["torch", "monai"]
Scheduler = Literal["cosine", "onecycle"]
SelectMetric = Literal["auc", "acc", "balanced_acc", "loss"]
AmpMode = Literal["auto", "on", "off"]
Device = Literal["auto", "cpu", "cuda"]
CompileMode = Literal["off", "default", "reduce-overhead", "max-autotune"]
CVScheme = Literal["kfold", "repeated", "nested", "leave_one_site_out"]
SearchMethod = Literal["grid", "optuna"]
SearchKind = Literal["float", "int", "categorical"]
SearchPruner = Literal["none", "median", "successive_halving"]
ThresholdRule = Literal["fixed", "youden_val", "sensitivity_val"]
Calibration = Literal["none", "temperature"]
ExplainMethod = Literal["gradcam", "guided_gradcam", "ig", "gradient_shap", "occlusion", "smoothgrad"]
Tracker = Literal["none", "mlflow"]
CurveStrategy = Literal["linear_probe", "prototype", "finetune"]
CurveMetric = Literal["auc", "acc", "balanced_acc", "sensitivity", "specificity", "f1"]
TaskKind = Literal["binary", "multiclass", "multilabel", "regression"]
TaskWeighting = Literal["fixed", "uncertainty"]
TaskGating = Literal["off", "validation"]
RegressionLoss = Literal["mse", "huber"]
RegressionRefit = Literal["none", "ridge"]
ContinualMethod = Literal["naive", "ewc", "replay", "joint"]
ReplayPolicy = Literal["class_balanced", "reservoir"]

DATA_FORMATS: tuple[str, ...] = get_args(DataFormat)
DATA_SPLITS: tuple[str, ...] = get_args(DataSplit)
ON_ERROR: tuple[str, ...] = get_args(OnError)
INTENSITY_MODES: tuple[str, ...] = get_args(IntensityMode)
WINDOW_PRESETS: tuple[str, ...] = get_args(WindowPreset)
CHANNEL_MAPPINGS: tuple[str, ...] = get_args(ChannelMapping)
CONVERSIONS_3D: tuple[str, ...] = get_args(Conversion3D)
#: key layouts of published weight files (``model.layout`` also takes ``auto``)
WEIGHT_LAYOUTS: tuple[str, ...] = get_args(WeightLayout)
STRATEGIES: tuple[str, ...] = get_args(StrategyName)
PROBE_HEADS: tuple[str, ...] = get_args(ProbeHead)
DA_METHODS: tuple[str, ...] = get_args(DAMethod)
AUGMENT_BACKENDS: tuple[str, ...] = get_args(AugmentBackend)
SCHEDULERS: tuple[str, ...] = get_args(Scheduler)
#: validation scores ``train.select_metric`` can pick the best epoch by (``loss``: lower is better)
SELECT_METRICS: tuple[str, ...] = get_args(SelectMetric)
AMP_MODES: tuple[str, ...] = get_args(AmpMode)
DEVICES: tuple[str, ...] = get_args(Device)
COMPILE_MODES: tuple[str, ...] = get_args(CompileMode)
CV_SCHEMES: tuple[str, ...] = get_args(CVScheme)
#: nested CV's inner search (``cv.search``), the kinds of an Optuna search dimension, and its pruners
SEARCH_METHODS: tuple[str, ...] = get_args(SearchMethod)
SEARCH_KINDS: tuple[str, ...] = get_args(SearchKind)
SEARCH_PRUNERS: tuple[str, ...] = get_args(SearchPruner)
THRESHOLD_RULES: tuple[str, ...] = get_args(ThresholdRule)
CALIBRATIONS: tuple[str, ...] = get_args(Calibration)
EXPLAIN_METHODS: tuple[str, ...] = get_args(ExplainMethod)
TRACKERS: tuple[str, ...] = get_args(Tracker)
CURVE_STRATEGIES: tuple[str, ...] = get_args(CurveStrategy)
CURVE_METRICS: tuple[str, ...] = get_args(CurveMetric)
TASK_KINDS: tuple[str, ...] = get_args(TaskKind)
TASK_WEIGHTINGS: tuple[str, ...] = get_args(TaskWeighting)
#: how much each non-primary head's gradient reaches the shared encoder (``train.task_gating``)
TASK_GATINGS: tuple[str, ...] = get_args(TaskGating)
#: a regression task's head loss (``tasks[].loss``) and its refit after fine-tuning (``tasks[].refit``)
REGRESSION_LOSSES: tuple[str, ...] = get_args(RegressionLoss)
REGRESSION_REFITS: tuple[str, ...] = get_args(RegressionRefit)
CONTINUAL_METHODS: tuple[str, ...] = get_args(ContinualMethod)
REPLAY_POLICIES: tuple[str, ...] = get_args(ReplayPolicy)

#: CT window presets: ``(center, width)`` in HU, in ``WINDOW_PRESETS`` order.
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (40.0, 400.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "abdomen": (40.0, 350.0),
}
