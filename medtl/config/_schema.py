"""The typed config: one pydantic model per section, ``Config`` for a whole run, and helpers that walk the schema."""

from __future__ import annotations

import os
import re
import types
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from medtl.config._choices import (
    CT_WINDOWS,
    AmpMode,
    AugmentBackend,
    Calibration,
    ChannelMapping,
    CompileMode,
    ContinualMethod,
    Conversion3D,
    CurveMetric,
    CurveStrategy,
    CVScheme,
    DAMethod,
    DataFormat,
    DataSplit,
    Device,
    ExplainMethod,
    IntensityMode,
    OnError,
    ProbeHead,
    RegressionLoss,
    RegressionRefit,
    ReplayPolicy,
    Scheduler,
    SearchKind,
    SearchMethod,
    SearchPruner,
    SelectMetric,
    StrategyName,
    TaskGating,
    TaskKind,
    TaskWeighting,
    ThresholdRule,
    Tracker,
    WeightLayout,
    WindowPreset,
)
from medtl.config._memory import _MIN_BUDGET, MAX_BOOTSTRAP, MAX_IMAGE_SIDE, format_bytes, parse_bytes

PositiveFloat = Annotated[float, Field(gt=0)]


def shared_data_dir() -> Path:
    """``MEDTL_SHARED_DATA`` or ``../shared/datasets``."""
    return Path(os.environ.get("MEDTL_SHARED_DATA", "../shared/datasets")).expanduser()


class _Strict(BaseModel):
    # NaN and infinity are never a valid setting (`train.lr: .inf` would train on NaN losses)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


_VAR = re.compile(r"\$\{(\w+)\}")


def expand_path(value: str) -> str:
    """Expand ``${MEDTL_SHARED_DATA}`` (and other ``${VARS}``) and ``~`` in a configured path."""
    def sub(m: re.Match) -> str:
        if m.group(1) == "MEDTL_SHARED_DATA":
            return str(shared_data_dir())
        return os.environ.get(m.group(1), m.group(0))

    return os.path.expanduser(_VAR.sub(sub, value))


# -- sections ------------------------------------------------------------------------------
class WindowSpec(_Strict):
    """One CT window (HU) for ``intensity.mode: multiwindow``."""

    center: float = Field(..., description="window centre (level) in HU")
    width: float = Field(..., gt=0, description="window width in HU")


class IntensityConfig(_Strict):
    """How raw pixel values become [0, 1].

    ``window``: CT windowing in HU with a preset (``CT_WINDOWS``: lung, mediastinum, bone,
    brain, abdomen) or ``center``/``width``; ``multiwindow``: one channel per window; ``percentile``: per-image
    percentile scaling (MR, US); ``range``: fixed ``[vmin, vmax]`` (e.g. 0-255 for 8-bit
    images); ``minmax``: per-image min-max.
    """

    mode: IntensityMode = Field("percentile", description=(
        "`window` (CT, HU), `multiwindow` (one channel per CT window), `percentile` (MR, US), `range` "
        "(fixed vmin/vmax, e.g. 8-bit images) or `minmax` (per image)"))
    preset: WindowPreset | None = Field(None, description=(
        "mode window: CT window preset, center/width in HU: "
        + ", ".join(f"{k} {c:g}/{w:g}" for k, (c, w) in CT_WINDOWS.items()) + "; or give center and width"))
    center: float | None = Field(None, description="mode window without a preset: window centre in HU")
    width: float | None = Field(None, gt=0, description="mode window without a preset: window width in HU")
    lower: float = Field(1.0, ge=0.0, le=100.0, description="mode percentile: percentile mapped to 0")
    upper: float = Field(99.0, ge=0.0, le=100.0, description="mode percentile: percentile mapped to 1")
    vmin: float = Field(0.0, description="mode range: raw value mapped to 0")
    vmax: float = Field(255.0, description="mode range: raw value mapped to 1")
    windows: list[WindowSpec | WindowPreset] = Field(
        default_factory=lambda: ["lung", "mediastinum", "bone"], description=(
            "mode multiwindow: the windows, one channel each, as presets or {center, width} "
            "(lung/mediastinum/bone makes an RGB-like image)"))


class LabelsConfig(_Strict):
    """Labels for ``data.format: folder``: a CSV keyed by file name (relative to ``data.path``)."""

    csv: str = Field(..., description="label CSV (may use ${MEDTL_SHARED_DATA})")
    file_column: str = Field("file", description="column with the file name, relative to data.path")
    label_column: str = Field("label", description="column with the class label")
    patient_column: str | None = Field(None, description="column with the patient ID; null: each file's "
                                       "DICOM PatientID")
    site_column: str | None = Field(None, description="column with the acquisition site (for "
                                    "leave-one-site-out CV and domain adaptation)")


class DataConfig(_Strict):
    """Where the cases come from and how every image is preprocessed (once per run, cached)."""

    format: DataFormat = Field("manifest", description=(
        "`manifest` (CSV with path,label,patient_id, optional site/mask/split), `folder` (scans + "
        "data.labels) or `medmnist` (official .npz)"))
    path: str = Field(..., description="manifest CSV, MedMNIST .npz, or image folder (format folder)")
    labels: LabelsConfig | None = Field(None, description="format folder: the label CSV (required there)")
    split: DataSplit = Field("official", description=(
        "MedMNIST: the `official` train/val/test split, or all images `pooled` (for cross-validation)"))
    label_column: str = Field("label", description="format manifest: column with the class label")
    class_names: list[str] | None = Field(None, min_length=2, description=(
        "class order (index 1 is the positive class of binary metrics); null: the sorted labels"))
    spatial_dims: Literal[2, 3] = Field(2, description="2 for images, 3 for volumes")
    image_size: list[int] = Field(default_factory=lambda: [224, 224], description=(
        f"network input size: [H, W] (spatial_dims 2) or [D, H, W] (spatial_dims 3); entries 8 to {MAX_IMAGE_SIDE}"))
    spacing: list[PositiveFloat] | None = Field(None, description=(
        "resample to this pixel size (mm, one per image_size entry) then crop/pad; null = plain resize "
        "to image_size"))
    orientation: str = Field("RAS", description=(
        "axis code every scan with patient geometry (DICOM, NIfTI) is flipped and transposed to, as MONAI's "
        "`Orientation`: one letter of each pair L/R, P/A, I/S in array order (`RAS`: axis 0 to the patient's "
        "right, 1 anterior, 2 superior). DICOM and NIfTI of the same scan then give the same array"))
    intensity: IntensityConfig = Field(default_factory=IntensityConfig,
                                       description="how raw values become [0, 1]")
    on_error: OnError = Field("raise", description=(
        "unreadable files: `raise` stops before training and lists them all; `skip` trains without "
        "them and lists them in skipped.json"))
    max_cases: int | None = Field(None, ge=1, description="random subset of this many cases (quick trials); "
                                  "null: all")
    memory_budget: int | str | None = Field(None, description=(
        "how much memory medtl may use for decoded images: bytes, or a size such as `4GB` or `512MiB`. When "
        "the decoded images of every case fit, they are held in memory; otherwise they are cached on disk "
        "(`data.cache_dir`, else the run's `decoded/` folder) and read a batch at a time, with the same results. "
        "A file whose header declares a larger image (as float32) is refused before it is decoded, and a batch "
        "must fit. null: half of the memory available when the run starts (free RAM, or the address-space "
        "limit `ulimit -v` when lower)"))
    cache_dir: str | None = Field(None, description=(
        "folder for the on-disk cache of decoded images when they exceed data.memory_budget (one entry per "
        "data and preprocessing, reused by later runs and checked by sha256); null: the run directory's "
        "`decoded/` folder"))

    @field_validator("image_size")
    @classmethod
    def _size(cls, v: list[int]) -> list[int]:
        if len(v) not in (2, 3) or any(int(s) < 8 for s in v):
            raise ValueError("image_size must be 2 (H, W) or 3 (D, H, W) integers >= 8")
        if any(int(s) > MAX_IMAGE_SIDE for s in v):
            raise ValueError(f"image_size entries must be <= {MAX_IMAGE_SIDE} (pixels per axis); resample "
                             "larger images down, e.g. image_size: [512, 512]")
        return v

    @field_validator("orientation")
    @classmethod
    def _axcodes(cls, v: str) -> str:
        code = str(v).strip().upper()
        pairs = (("L", "R"), ("P", "A"), ("I", "S"))
        if len(code) != 3 or any(sum(ch in pair for ch in code) != 1 for pair in pairs):
            raise ValueError(f"orientation must be a 3-letter axis code with one letter from each of L/R, P/A and "
                             f"I/S, e.g. 'RAS' (MONAI/NIfTI), 'LPS' (DICOM) or 'SPL'. Got {v!r} instead.")
        return code

    @field_validator("memory_budget", mode="before")
    @classmethod
    def _budget(cls, v: Any) -> int | None:
        if v is None:
            return None
        try:
            n = parse_bytes(v)
        except (ValueError, TypeError):
            raise ValueError("memory_budget must be a number of bytes or a size such as '4GB' or '512MiB' (units "
                             "B, KB, MB, GB, TB, KiB, MiB, GiB, TiB); null: half the available memory") from None
        if n < _MIN_BUDGET:
            raise ValueError(f"memory_budget must be at least 16 MiB (got {format_bytes(n)}); give a size such as "
                             "'4GB', or null for half the available memory")
        return n

    @field_validator("class_names")
    @classmethod
    def _distinct(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and len(set(v)) != len(v):
            repeated = sorted({c for c in v if v.count(c) > 1})
            raise ValueError(f"class_names must be distinct; {repeated} appear more than once")
        return v


class ModelConfig(_Strict):
    """The pretrained encoder and how it meets the data."""

    name: str = Field("tf_efficientnet_lite0", description="weight record (`medtl weights list`) or any timm "
                      "model name")
    pretrained: bool = Field(True, description="false: random initialisation, same architecture and "
                             "preprocessing")
    weights_path: str | None = Field(None, description="local weight file overriding the record's source")
    channel_mapping: ChannelMapping = Field("auto", description=(
        "grey data into an RGB stem: `repeat` the channel or `sum` the stem filters; `auto`: as the weight "
        "record says"))
    drop_rate: float = Field(0.2, ge=0.0, lt=1.0, description="dropout before the classifier")
    conversion_3d: Conversion3D = Field("inflate", description=(
        "how 2D weights meet 3D data (ignored for native 3D weights such as MedicalNet): `inflate` (I3D "
        "kernels repeated along depth), `acs` (axial/coronal/sagittal split), `slices` (per-slice 2D "
        "encoder, pooled over depth), `channels` (slices as input channels, 2.5D)"))
    layout: Literal["auto"] | WeightLayout = Field(
        "auto", description="key layout of model.weights_path (auto: detected from the keys)")
    recipe: bool = Field(True, description=(
        "fill the train keys this config leaves unset from the weight record's measured recipe (`medtl weights "
        "show NAME`; docs/models.md); false: the schema defaults"))


class StrategyConfig(_Strict):
    """How much of the pretrained encoder is trained.

    ``finetune``: everything, one LR; ``llrd``: everything, LR decayed by ``llrd_decay`` per
    block from the head down; ``gradual_unfreeze``: head first, then one more block every
    ``unfreeze_every`` epochs; ``partial``: the last ``trainable_blocks`` blocks only;
    ``adapters`` / ``lora``: encoder frozen, residual adapters or LoRA on the convs trained;
    ``linear_probe``: frozen encoder, features computed once and cached, sklearn head.
    """

    name: StrategyName = Field("finetune", description=(
        "how much of the encoder trains (see above); `linear_probe` (frozen features, scikit-learn head) "
        "runs in `medtl cv` only"))
    llrd_decay: float = Field(0.7, gt=0.0, le=1.0, description="llrd: LR factor per block, from the head down")
    unfreeze_every: int = Field(2, ge=1, description="gradual_unfreeze: epochs between unfreezing blocks")
    trainable_blocks: int = Field(2, ge=0, description="partial: trained blocks below the head (0: head only)")
    adapter_reduction: int = Field(8, ge=1, description="adapters: bottleneck reduction (C / reduction channels)")
    lora_rank: int = Field(4, ge=1, description="lora: rank of the low-rank update")
    lora_alpha: float = Field(8.0, gt=0, description="lora: scale of the update (alpha / rank)")
    probe_head: ProbeHead = Field("logistic", description="linear_probe: scikit-learn logistic regression or MLP head")
    probe_C: list[PositiveFloat] = Field(default_factory=lambda: [0.01, 0.1, 1.0, 10.0], min_length=1,
                                         description="linear_probe: inverse regularisation strengths, picked "
                                         "by grouped inner CV (cv.inner_splits)")
    feature_cache: bool = Field(True, description="linear_probe: cache the encoder features on disk "
                                "(MEDTL_CACHE_DIR)")


class DomainAdaptConfig(_Strict):
    """Domain adaptation across the manifest's ``site`` column.

    ``target_site``: the site treated as the new hospital (its labels are never used for
    training; with ``use_target_unlabelled`` its images are). ``none``: source-only.
    """

    method: DAMethod = Field("none", description=(
        "`none`: source only; the others adapt to the target site's unlabelled images (AdaBN, "
        "domain-specific BatchNorm, DANN, MMD, CORAL) and need cv.scheme leave_one_site_out or "
        "adapt.target_site"))
    target_site: str | None = Field(None, description=(
        "the new hospital's site (held out of training); null: in leave-one-site-out CV each held-out site"))
    use_target_unlabelled: bool = Field(True, description="let the method see the target site's images "
                                        "(never its labels); every method but none needs it")
    weight: float = Field(1.0, ge=0.0, description="weight of the DANN/MMD/CORAL loss")


class AugmentConfig(_Strict):
    """``backend: torch`` augments whole batches on the training device (:mod:`medtl.data.batch_augment`);
    ``monai`` runs the per-image MONAI preset (:func:`medtl.data.transforms.augment_transform`) on the host.
    Both draw the same transform families with the same probabilities and ranges."""

    backend: AugmentBackend = Field("torch", description=(
        "`torch`: whole batches on the training device (one affine_grid/grid_sample); `monai`: the "
        "per-image MONAI preset on the host (same families, probabilities and ranges)"))
    flip: bool = Field(True, description="random horizontal flip")
    vertical_flip: bool = Field(False, description="random vertical flip")
    affine: bool = Field(True, description="random rotation, scaling and translation")
    rotate_deg: float = Field(15.0, description="affine: maximum rotation in degrees")
    scale: float = Field(0.1, description="affine: maximum relative zoom (0.1 = ±10 %)")
    translate: float = Field(0.06, description="affine: maximum shift as a fraction of the image size")
    intensity: bool = Field(True, description="random contrast/brightness/noise")


class TrainConfig(_Strict):
    """Fine-tuning: AdamW, a warm-up then cosine (or one-cycle) schedule, best epoch on validation."""

    epochs: int = Field(20, ge=1, description="training epochs")
    batch_size: int = Field(32, ge=1, le=65536, description=(
        "images per step; one batch (x channels x image size x 4 bytes) must fit in data.memory_budget"))
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate (of the head, with llrd)")
    weight_decay: float = Field(1e-2, ge=0, description="AdamW weight decay")
    scheduler: Scheduler = Field("cosine", description="learning-rate schedule after the warm-up")
    warmup_epochs: int = Field(1, ge=0, description="linear warm-up epochs")
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0, description="label smoothing of the cross-entropy")
    class_weighted: bool = Field(False, description="inverse-frequency class weights in the loss")
    select_metric: SelectMetric = Field("auc", description=(
        "validation score that picks the best epoch (`loss`: the lowest); among epochs with the same score, the one "
        "with the lowest validation loss"))
    amp: AmpMode = Field("auto", description="mixed precision; `auto`: on CUDA only; `on` needs CUDA")
    device: Device = Field("auto", description=(
        "`auto`: CUDA when available; `cuda` without a GPU is an error, never a silent fallback"))
    num_threads: int | None = Field(None, ge=1, description="CPU threads for torch; null: torch's default")
    cpu_watts_per_core: float = Field(7.5, gt=0, description=(
        "compute bill: watts drawn by one busy CPU core, for the energy estimate where the RAPL counters "
        "cannot be read (default: TDP per core of an Intel Xeon Gold 6248, 150 W / 20 cores)"))
    seed: int = Field(0, description="seed of initialisation, augmentation and batch order")
    tta: bool = Field(True, description="average with the horizontally flipped image at prediction time")
    ensemble_folds: int = Field(1, ge=1, le=20, description=(
        "`medtl train` only (`medtl cv` ignores it: its fold models are already an ensemble). k > 1: k models, "
        "each trained on k-1 patient-grouped stratified folds of the train split and selecting its epoch on the "
        "remaining one; they predict as one model, the mean of their probabilities (flip TTA inside with "
        "train.tta). The val split chooses the ensemble's temperature and threshold. 1: one model"))
    ensemble_seeds: int = Field(1, ge=1, le=20, description=(
        "`medtl cv` and `medtl train`: n > 1 fine-tunes every model n times on the same cases, from seeds train.seed, "
        "train.seed + 1, ..., and predicts with the mean of their probabilities (a deep ensemble; member 0 is the "
        "single model of train.seed). It removes most of the seed-to-seed spread of small-data fine-tuning, for n "
        "times the training. Temperature and threshold are chosen on the ensemble's validation probabilities. "
        "Multi-task runs average every head's output. Fine-tuning only; not with train.ensemble_folds > 1. "
        "1: one model"))
    ema: float = Field(0.0, ge=0.0, lt=1.0, description=(
        "exponential moving average of the weights, decay per step (0 = off; e.g. 0.99). Validation, "
        "best-epoch selection and the returned model use the averaged weights (timm ModelEmaV3, with "
        "warm-up so short runs are not dominated by the initial weights)"))
    compile: CompileMode = Field(
        "off", description="torch.compile mode for the training forward; reduce-overhead uses CUDA graphs")
    augment: AugmentConfig = Field(default_factory=AugmentConfig,
                                   description="random transforms, replayable from train.seed")
    strategy: StrategyConfig = Field(default_factory=StrategyConfig,
                                     description="which parts of the encoder train, and how")
    task_weighting: TaskWeighting = Field("fixed", description=(
        "multi-task loss: `fixed` (each task's `weight`) or `uncertainty` (Kendall et al. 2018: a learned "
        "log-variance per task, trained with the model; the learned weights are reported)"))
    task_gating: TaskGating = Field("validation", description=(
        "multi-task runs: how much each non-primary task's gradient reaches the shared encoder (its head always "
        "learns at full rate). `validation`: none in the first epoch, then each epoch the task's skill on the fold's "
        "validation cases in the epoch before, 1 - loss / loss of the training prior (R² for a regression task), "
        "held to [0, 1], so a task the network cannot predict on held-out cases does not move the encoder the "
        "primary task depends on; `off`: all of it, scaled only by the task's weight"))

    @field_validator("amp", "compile", mode="before")
    @classmethod
    def _yaml_switch(cls, v: Any, info: ValidationInfo) -> Any:
        """YAML 1.1 reads a bare ``on``/``off`` as true/false: ``amp: on`` and ``--set train.amp=on`` mean the words."""
        if isinstance(v, bool) and (info.field_name == "amp" or not v):
            return "on" if v else "off"
        return v


class SearchParam(_Strict):
    """One dimension of nested CV's Optuna search (``cv.search: optuna``): a dotted ``train.*``,
    ``model.*`` or ``adapt.*`` key and the values tried, a range (``float``, ``int``) or a list
    (``categorical``)."""

    key: str = Field(..., description=(
        "the dotted config key searched, e.g. train.lr (train, model or adapt keys; a list-valued key such as "
        "train.strategy.probe_C is given a one-value list)"))
    kind: SearchKind = Field(..., description=(
        "`float` or `int`: a value in [low, high]; `categorical`: one of choices"))
    low: int | float | None = Field(None, description="float, int: the smallest value")
    high: int | float | None = Field(None, description="float, int: the largest value")
    log: bool = Field(False, description="float, int: sample on a log scale (needs low > 0)")
    choices: list[bool | int | float | str] | None = Field(None, min_length=1, description=(
        "categorical: the values tried"))

    def config_value(self, value: Any) -> Any:
        """``value`` as the config key takes it (:func:`search_value`)."""
        return search_value(self.key, value)


def search_value(key: str, value: Any) -> Any:
    """``value`` as the dotted config ``key`` takes it: a list-valued key (``train.strategy.probe_C``)
    gets ``[value]``, so one nested-CV grid point or search trial sets one value there."""
    anns: list = [Config]
    for part in key.split("."):
        anns = [b for a in anns for b in _step(a, part)]
    return [value] if any(get_origin(a) is list for ann in anns for a in _alternatives(ann)) else value


class CVConfig(_Strict):
    """``kfold``: patient-grouped stratified k-fold; ``repeated``: ``n_repeats`` x k-fold with
    different shuffles; ``nested``: an inner grouped k-fold picks the ``grid`` point (or, with
    ``search: optuna``, the best of ``n_trials`` Optuna trials over ``search_space``);
    ``leave_one_site_out``: one fold per site (needs the ``site`` column)."""

    scheme: CVScheme = Field("kfold", description=(
        "`repeated`: n_repeats x k-fold; `nested`: an inner CV picks the cv.grid point (or runs cv.search: optuna); "
        "`leave_one_site_out`: one fold per site (needs a site column)"))
    n_splits: int = Field(5, ge=2, description="outer folds")
    n_repeats: int = Field(1, ge=1, description="repeated: how many reshuffled k-fold runs (other schemes: 1)")
    inner_splits: int = Field(3, ge=2, description="nested CV and linear_probe: inner grouped folds")
    grid: dict[str, list[bool | int | float | str]] = Field(
        default_factory=dict, description=(
            "nested CV grid, dotted train/model/adapt keys, e.g. {'train.lr': [3e-4, 1e-3]}; a list-valued key "
            "takes one value per point, e.g. {'train.strategy.probe_C': [0.01, 0.1]}"))
    search: SearchMethod = Field("grid", description=(
        "nested CV's inner search: `grid` scores every cv.grid point; `optuna`: cv.n_trials Optuna trials (TPE "
        "sampler, pruned after each inner fold) over cv.search_space, stored in <run>/search/ so a killed run "
        "resumes (pip install 'medtl[search]')"))
    search_space: list[SearchParam] = Field(default_factory=list, description=(
        "search: optuna: the dimensions, each `{key, kind: float | int | categorical, low, high, log, choices}`, "
        "e.g. [{key: train.lr, kind: float, low: 1e-5, high: 1e-2, log: true}]"))
    n_trials: int = Field(20, ge=1, description=(
        "search: optuna: trials per outer fold that ran to the end or were pruned (failed ones, whose score was "
        "undefined on every inner fold, do not count; the search stops after this many failures)"))
    n_startup_trials: int = Field(5, ge=1, description=(
        "search: optuna: trials sampled at random before TPE models the space, and completed before the median "
        "pruner stops any"))
    search_timeout: float | None = Field(None, gt=0, description=(
        "search: optuna: stop starting trials once the fold's trials took this many seconds (the trial count then "
        "depends on the machine's speed); null: no limit"))
    pruner: SearchPruner = Field("median", description=(
        "search: optuna: stop a trial after an inner fold when its running mean score is worse than the `median` "
        "of earlier trials there, or by `successive_halving` (asynchronous); `none`: every trial runs every fold"))
    val_fraction: float = Field(0.2, gt=0.0, lt=0.5, description=(
        "share of each training fold's patients held out for validation (epoch, temperature, threshold)"))
    seed: int = Field(0, description="seed of the fold assignment")


class EvalConfig(_Strict):
    """Scoring: patient-level bootstrap CIs, the decision threshold and calibration."""

    n_bootstrap: int = Field(1000, ge=10, le=MAX_BOOTSTRAP, description=(
        "patient-level bootstrap resamples for the 95 % CIs"))
    threshold: ThresholdRule = Field("fixed", description=(
        "binary decision threshold: `fixed` = 0.5; `youden_val` and `sensitivity_val` are chosen on "
        "validation data only"))
    target_sensitivity: float = Field(0.9, gt=0.0, le=1.0, description=(
        "sensitivity_val: the highest threshold reaching this validation sensitivity"))
    calibration: Calibration = Field("none", description=(
        "`temperature`: temperature scaling fitted on each fold's validation split"))
    ordinal: bool = Field(False, description="ordinal classes: add quadratic-weighted kappa")
    seed: int = Field(0, description="seed of the bootstrap")


class ExplainConfig(_Strict):
    """``medtl explain``: attribution maps of a finished run, with their sanity checks."""

    methods: list[ExplainMethod] = Field(default_factory=lambda: ["gradcam", "smoothgrad"], min_length=1, description=(
        "attribution methods, each run on every case of the report (ig: integrated gradients; on deep ReLU6 "
        "networks it meets its completeness check only with hundreds of explain.ig_steps)"))
    n_correct: int = Field(4, ge=0, description="correctly classified cases per class in the report")
    n_wrong: int = Field(4, ge=0, description="misclassified cases per class in the report")
    ig_steps: int = Field(32, ge=2, description="integrated-gradients steps")
    ig_delta_threshold: float = Field(0.05, gt=0, description=(
        "warn when IG misses completeness by more than this share of f(x) - f(baseline)"))
    n_samples: int = Field(16, ge=1, description="noisy samples for gradient_shap / smoothgrad")
    batch_size: int = Field(16, ge=1, le=65536, description="images per explain() call")
    device: Device = Field("auto", description="as train.device, for computing the maps")
    sanity_check: bool = Field(True, description="cascading model-parameter randomisation test")
    cascade_steps: int = Field(5, ge=2, description="sanity check: top stages randomised one by one, then all")
    faithfulness_steps: int = Field(16, ge=0, description="deletion/insertion curve points - 1; 0 = off")
    localisation: bool = Field(True, description="pointing game over every correct case with a mask")
    pointing_tolerance: int | None = Field(None, ge=0, description=(
        "pointing game tolerance in px; null: 15 px at 224 px, scaled (Zhang et al.)"))
    gradcam_stride: int | None = Field(16, ge=1, description=(
        "Grad-CAM at the deepest block with this output stride; null: the encoder's feature layer"))
    export_nifti: bool = Field(True, description="write 3D maps as NIfTI in the scan's space")


class TaskConfig(_Strict):
    """One named head of a multi-task run: what it predicts and from which manifest column(s).

    The first task is the primary one: it must be ``binary`` or ``multiclass`` with a label on
    every case; it stratifies the patient-grouped folds, picks the best epoch and gives the
    headline metrics. Every other task may have missing labels (an empty cell, ``nan``, ``na``,
    ``none`` or ``null``): they are masked out of the loss and out of that task's metrics.
    """

    name: str = Field(..., pattern=r"^[A-Za-z][A-Za-z0-9_]*$", description=(
        "the task's name in metrics.json, predictions.csv and the report (letters, digits, _)"))
    kind: TaskKind = Field(..., description=(
        "`binary` or `multiclass` (softmax, cross-entropy), `multilabel` (one sigmoid per column, binary "
        "cross-entropy), `regression` (one value, mean squared error on the training-fold standardised target)"))
    column: str | None = Field(None, description=(
        "binary, multiclass, regression: the manifest (or data.labels CSV) column holding the target"))
    columns: list[str] | None = Field(None, min_length=1, description=(
        "multilabel: one manifest column per label, each 0/1 (or false/true) or empty when unknown"))
    class_names: list[str] | None = Field(None, min_length=2, description=(
        "binary, multiclass: class order (index 1 is the positive class); null: the sorted labels"))
    weight: float = Field(1.0, ge=0.0, description=(
        "loss weight with train.task_weighting: fixed (the starting weight is 1 with uncertainty)"))
    loss: RegressionLoss | None = Field(None, description=(
        "regression only: the head's loss on the training-fold standardised target, `huber` (squared error "
        "within one SD, linear beyond, so an outlying target cannot dominate the shared encoder's gradient) or "
        "`mse`; null: huber"))
    refit: RegressionRefit | None = Field(None, description=(
        "regression only: `ridge` refits the head after fine-tuning on the frozen encoder's features of the "
        "fold's training patients (scikit-learn ridge, its penalty chosen by patient-grouped inner CV on them; "
        "a head without signal falls back to the training mean), `none` keeps the trained head (shrunk on the "
        "validation cases); null: ridge"))


class CurveConfig(_Strict):
    """``medtl curve``: a learning curve, its power-law fit, and few-shot episodes.

    Every outer fold's training patients are subsampled, stratified by class, to each fraction
    in ``sizes`` (``repeats`` subsamples per size and fold; the test folds stay whole), and every
    strategy is trained on each subsample. ``shots``: episodic N-way K-shot evaluation of the
    prototype classifier against the linear probe on the frozen features.
    """

    sizes: list[float] = Field(default_factory=lambda: [0.05, 0.1, 0.2, 0.4, 0.7, 1.0], min_length=3, description=(
        "training-set sizes as fractions (0 < f <= 1) of each outer fold's training patients, stratified by class; "
        "at least 3 for the power-law fit"))
    repeats: int = Field(3, ge=1, description=(
        "subsamples per size and outer fold, each with its own seed (the full size has one subsample and runs once)"))
    strategies: list[CurveStrategy] | None = Field(None, min_length=1, description=(
        "`linear_probe` and `prototype` (frozen features, computed once), `finetune` (train.strategy, or plain "
        "fine-tuning when that is linear_probe; slow on a CPU); null: the config's own strategy plus prototype"))
    metric: CurveMetric = Field("auc", description="the metric fitted by the power law and compared in episodes")
    target: float | None = Field(0.9, gt=0.0, le=1.0, description=(
        "the metric value whose patients-needed is estimated (e.g. 0.9 AUC); null: no estimate"))
    shots: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [1, 5, 10], description=(
        "few-shot: labelled cases per class (K) of the N-way K-shot episodes (N: every class); []: no episodes"))
    episodes: int = Field(100, ge=2, description="few-shot: episodes per K (support and query patients disjoint)")

    @field_validator("sizes")
    @classmethod
    def _fractions(cls, v: list[float]) -> list[float]:
        bad = [f for f in v if not 0.0 < f <= 1.0]
        if bad:
            raise ValueError(f"sizes are fractions of the training patients, each in (0, 1]; got {bad}. Write e.g. "
                             "[0.05, 0.1, 0.2, 0.4, 0.7, 1.0]")
        if len(set(v)) < 3:
            raise ValueError(f"sizes needs at least 3 distinct fractions for the power-law fit; got {sorted(set(v))}")
        return v


class ContinualConfig(_Strict):
    """``medtl continual``: learning across sites in sequence, and what keeps it from forgetting.

    Each site's patients are split once (patient-grouped, stratified, ``cv.seed``) into training
    and held-out test patients; stage ``t`` trains on site ``t``'s training patients only (its
    validation patients, ``cv.val_fraction`` of them, pick the epoch). ``naive``: plain sequential
    fine-tuning; ``ewc``: plus the elastic weight consolidation penalty; ``replay``: plus a batch
    from a bounded buffer of earlier sites' cases every step; ``joint``: one training on every
    site's training patients at once (the upper bound). After every stage every site's held-out
    patients are scored.
    """

    site_column: str = Field("site", description=(
        "manifest column naming each case's site (data.format folder: the sites of data.labels.site_column)"))
    sites: list[str] | None = Field(None, min_length=2, description=(
        "the order the sites are learnt in (at least 2); null: every site in the data, sorted"))
    methods: list[ContinualMethod] = Field(default_factory=lambda: ["naive", "ewc", "replay", "joint"],
                                           min_length=1, description=(
        "`naive` (sequential fine-tuning), `ewc`, `replay`, `joint` (all sites at once: the upper bound)"))
    epochs_per_stage: int | None = Field(None, ge=1, description=(
        "epochs of each stage (joint: of its one stage, over every site); null: train.epochs"))
    test_fraction: float = Field(0.3, gt=0.0, lt=0.5, description=(
        "share of each site's patients held out for testing (patient-grouped, stratified by class)"))
    ewc_lambda: float = Field(1000.0, ge=0.0, description=(
        "ewc: weight lambda of the penalty lambda/2 * sum F (theta - theta*)^2 (F: the diagonal Fisher, mean "
        "over the earlier stage's training images)"))
    ewc_samples: int | None = Field(256, ge=1, description=(
        "ewc: at most this many training images of the finished stage estimate its Fisher; null: all"))
    replay_size: int = Field(32, ge=1, description="replay: the most cases the buffer holds, over all earlier sites")
    replay_policy: ReplayPolicy = Field("class_balanced", description=(
        "replay: `class_balanced` (equal slots per site and class) or `reservoir` (uniform over the cases seen)"))
    replay_batch: int | None = Field(None, ge=1, description=(
        "replay: buffer cases appended to every training batch; null: half of train.batch_size"))
    repeats: int = Field(1, ge=1, description=(
        "runs of the whole sequence with different training seeds (train.seed, repeat); the splits stay fixed"))
    site_shift: dict[str, str] = Field(default_factory=dict, description=(
        "simulate another scanner at a site: {site: preset of medtl.data.shift (ultrasound_b, ultrasound_mild, "
        "xray_b, ct_soft_tissue)}, applied to that site's preprocessed images, seeded by cv.seed; {}: the images as they are"))


class PrivacyConfig(_Strict):
    """What reports and run files may show about patients."""

    reveal_ids: bool = Field(False, description="show real patient IDs instead of pseudonyms")


class Config(_Strict):
    """A whole run: the top-level keys, and one section per stage. Unknown keys anywhere are errors.

    Rules across keys (``_RULES``, ``rule_descriptions()``) are checked on every validation,
    so ``load_config`` and ``Config.model_validate`` refuse a conflicting run before it starts.
    """

    name: str = Field("run", description="run name shown in reports (and the MLflow experiment)")
    data: DataConfig = Field(..., description="cases and preprocessing")
    model: ModelConfig = Field(default_factory=ModelConfig, description="the pretrained encoder")
    train: TrainConfig = Field(default_factory=TrainConfig, description="fine-tuning")
    cv: CVConfig = Field(default_factory=CVConfig, description="cross-validation (`medtl cv`)")
    evaluate: EvalConfig = Field(default_factory=EvalConfig, description="scoring")
    explain: ExplainConfig = Field(default_factory=ExplainConfig, description="attribution report (`medtl explain`)")
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig, description="patient identifiers")
    adapt: DomainAdaptConfig = Field(default_factory=DomainAdaptConfig, description="domain adaptation")
    tracking: Tracker = Field("none", description=(
        "`mlflow`: log the finished run to a local MLflow store (needs pip install 'medtl[tracking]')"))
    curve: CurveConfig = Field(default_factory=CurveConfig,
                               description="learning curve and few-shot episodes (`medtl curve`)")
    continual: ContinualConfig = Field(default_factory=ContinualConfig,
                                       description="learning across sites in sequence (`medtl continual`)")
    tasks: list[TaskConfig] | None = Field(None, min_length=1, description=(
        "multi-task run: one encoder, one named head per task, each `{name, kind: binary | multiclass | "
        "multilabel | regression, column (multilabel: columns), class_names, weight; regression: loss, refit}`; the "
        "first is the primary task and replaces the label column and data.class_names; empty cells are missing "
        "labels, masked out of the loss and the metrics (docs/multitask.md); null: one task from the label column"))

    # what load_config filled from the weight record's recipe (medtl.config._recipes.fill_recipe); not a key
    _recipe: dict[str, Any] = PrivateAttr(default_factory=dict)

    @property
    def recipe_applied(self) -> dict[str, Any]:
        """``{"source": record, "settings": {key: value filled}, "kept": [keys the config set]}`` from
        :func:`medtl.config.load_config`, or ``{}`` (no recipe, ``model.recipe: false``, or a Config
        built without load_config)."""
        return dict(self._recipe)

    @model_validator(mode="after")
    def _check_rules(self, info: ValidationInfo) -> Config:
        """Every check registered in ``_CHECKS`` (:mod:`medtl.config._rules`: the rules across keys,
        grid values, memory, optional packages); all problems in one error."""
        context = info.context or {}
        problems = [p for check in _CHECKS for p in check(self, context)]
        if problems:
            raise PydanticCustomError("config_rule", "{rules}", {"rules": "\n".join(problems)})
        return self

    def resolved_data_path(self) -> Path:
        return Path(expand_path(self.data.path))

    def resolved_labels_path(self) -> Path | None:
        return Path(expand_path(self.data.labels.csv)) if self.data.labels else None


_SECTIONS: tuple[type[BaseModel], ...] = (Config, DataConfig, LabelsConfig, IntensityConfig, WindowSpec, ModelConfig,
                                          TrainConfig, AugmentConfig, StrategyConfig, CVConfig, EvalConfig,
                                          ExplainConfig, PrivacyConfig, DomainAdaptConfig, TaskConfig, CurveConfig,
                                          ContinualConfig, SearchParam)

# Whole-config checks, run by Config's validator; medtl.config._rules registers them when the
# package is imported (a hook, so the rules can walk the schema without an import cycle).
_CHECKS: list[Callable[[Config, dict], list[str]]] = []


# -- walking the schema --------------------------------------------------------------------
def _alternatives(ann: Any) -> list:
    """The types an annotation allows: ``X | None`` -> ``[X]``, ``Annotated[X, ...]`` -> ``[X]``."""
    origin = get_origin(ann)
    if origin is Annotated:
        return _alternatives(get_args(ann)[0])
    if origin is Union or origin is types.UnionType:
        return [a for arg in get_args(ann) if arg is not type(None) for a in _alternatives(arg)]
    return [ann]


def _models_in(ann: Any) -> list[type[BaseModel]]:
    """The config sections (pydantic models) an annotation holds directly, e.g. ``LabelsConfig | None``."""
    return [a for a in _alternatives(ann) if isinstance(a, type) and issubclass(a, BaseModel)]


def _step(ann: Any, part: str | int) -> list:
    """The annotations one error-location step below ``ann`` (a field, a list index or a union tag)."""
    out = []
    for a in _alternatives(ann):
        origin = get_origin(a)
        if isinstance(a, type) and issubclass(a, BaseModel):
            if str(part) in a.model_fields:
                out.append(a.model_fields[str(part)].annotation)
            elif part == a.__name__:  # pydantic tags errors inside a union member with its name
                out.append(a)
        elif origin in (list, tuple, set, frozenset) and isinstance(part, int):
            out.extend(get_args(a)[:1])
        elif origin is dict:
            out.append(get_args(a)[1])
    return out


def _section_at(loc: tuple) -> type[BaseModel] | None:
    """The section (model) at error location ``loc``, e.g. ``("data", "labels")`` -> :class:`LabelsConfig`."""
    anns: list = [Config]
    for part in loc:
        anns = [b for a in anns for b in _step(a, part)]
    models = [m for a in anns for m in _models_in(a)]
    return models[0] if models else None


def _dotted_keys(model: type[BaseModel] | None = None, prefix: str = "") -> list[str]:
    """Every dotted key of the schema, sections included (``data``, ``data.path``, ...)."""
    out = []
    for name, field in (model or Config).model_fields.items():
        key = f"{prefix}{name}"
        out.append(key)
        for sub in _models_in(field.annotation):
            out += _dotted_keys(sub, f"{key}.")
    return out
