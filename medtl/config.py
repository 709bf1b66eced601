"""Typed run configuration: YAML in ``configs/``, dotted ``--set`` overrides, clear errors.

Example:
    >>> cfg = load_config("configs/breastmnist.yaml", overrides=["train.epochs=2"])
    >>> cfg.train.epochs
    2

Data paths may use ``${MEDTL_SHARED_DATA}`` (default ``../shared/datasets``, resolved
against the current directory) so the same shipped configs work in CI and for users.

A config is checked once, when it is loaded: field types and bounds by pydantic, then the
rules that span several fields (``_RULES``, e.g. ``cv.scheme: nested`` needs a ``cv.grid``)
on the whole :class:`Config`. Every problem is reported at once, as a :class:`ConfigError`
naming the key, the value received, what is valid and what to do. The section models
(:class:`TrainConfig`, :class:`IntensityConfig`, ...) stay plain parameter records when built
on their own; the functions that take them check their own parameters.

Each set of choices is spelled once, below, as a ``Literal`` alias with a tuple beside it
(``DEVICES``, ``CV_SCHEMES``, ``EXPLAIN_METHODS``, ...) for other modules to import.
:func:`config_reference_markdown` writes ``docs/config.md`` from this schema.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

from medtl.errors import ConfigError, did_you_mean

__all__ = [
    "Config",
    "DataConfig",
    "LabelsConfig",
    "IntensityConfig",
    "WindowSpec",
    "ModelConfig",
    "TrainConfig",
    "AugmentConfig",
    "StrategyConfig",
    "CVConfig",
    "EvalConfig",
    "ExplainConfig",
    "PrivacyConfig",
    "DomainAdaptConfig",
    "load_config",
    "apply_overrides",
    "config_hash",
    "dump_config",
    "shared_data_dir",
    "expand_path",
    "config_reference_markdown",
    "rule_descriptions",
    "available_memory",
    "memory_budget_bytes",
    "parse_bytes",
    "format_bytes",
    "MAX_CONFIG_BYTES",
    "MAX_YAML_NODES",
    "MAX_IMAGE_SIDE",
    "MAX_BOOTSTRAP",
    # enumerations (the Literal aliases are importable too)
    "DATA_FORMATS",
    "DATA_SPLITS",
    "ON_ERROR",
    "INTENSITY_MODES",
    "WINDOW_PRESETS",
    "CT_WINDOWS",
    "CHANNEL_MAPPINGS",
    "CONVERSIONS_3D",
    "WEIGHT_LAYOUTS",
    "STRATEGIES",
    "PROBE_HEADS",
    "DA_METHODS",
    "AUGMENT_BACKENDS",
    "SCHEDULERS",
    "SELECT_METRICS",
    "AMP_MODES",
    "DEVICES",
    "COMPILE_MODES",
    "CV_SCHEMES",
    "THRESHOLD_RULES",
    "CALIBRATIONS",
    "EXPLAIN_METHODS",
    "TRACKERS",
]


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
ThresholdRule = Literal["fixed", "youden_val", "sensitivity_val"]
Calibration = Literal["none", "temperature"]
ExplainMethod = Literal["gradcam", "guided_gradcam", "ig", "gradient_shap", "occlusion", "smoothgrad"]
Tracker = Literal["none", "mlflow"]

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
THRESHOLD_RULES: tuple[str, ...] = get_args(ThresholdRule)
CALIBRATIONS: tuple[str, ...] = get_args(Calibration)
EXPLAIN_METHODS: tuple[str, ...] = get_args(ExplainMethod)
TRACKERS: tuple[str, ...] = get_args(Tracker)

#: CT window presets: ``(center, width)`` in HU, in ``WINDOW_PRESETS`` order.
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (40.0, 400.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "abdomen": (40.0, 350.0),
}

PositiveFloat = Annotated[float, Field(gt=0)]


def shared_data_dir() -> Path:
    """``MEDTL_SHARED_DATA`` or ``../shared/datasets``."""
    return Path(os.environ.get("MEDTL_SHARED_DATA", "../shared/datasets")).expanduser()


class _Strict(BaseModel):
    # NaN and infinity are never a valid setting (`train.lr: .inf` would train on NaN losses)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


# -- memory: how much medtl may use for decoded images --------------------------------------
#: the largest config file (bytes) and YAML document (nodes, aliases expanded) that is read
MAX_CONFIG_BYTES = 1 << 20
MAX_YAML_NODES = 100_000
#: the largest `data.image_size` entry and `evaluate.n_bootstrap`
MAX_IMAGE_SIDE = 4096
MAX_BOOTSTRAP = 100_000
_MIN_BUDGET = 16 << 20
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
_BYTES = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*)\s*$")
_AVAILABLE: list[float] = []  # [monotonic time, bytes]: available_memory() caches for a second
_FALLBACK_AVAILABLE = 8 << 30  # when the platform cannot say (no /proc, no sysconf)


def parse_bytes(value: float | str) -> int:
    """A memory size in bytes from an int or a string such as ``"4GB"``, ``"512 MiB"``, ``"2e9"``.

    Units: B, KB/MB/GB/TB (powers of 1000; K/M/G/T too) and KiB/MiB/GiB/TiB (powers of 1024),
    in any letter case.

    Raises:
        ValueError: not a size, negative, or an unknown unit.
        TypeError: neither a number nor a string.

    Example:
        >>> parse_bytes("4GB"), parse_bytes("1.5 GiB"), parse_bytes(1024)
        (4000000000, 1610612736, 1024)
    """
    if isinstance(value, bool):
        raise TypeError(f"expected a size in bytes or a string such as '4GB'; got {value!r}")
    if isinstance(value, (int, float)):
        number, unit = float(value), ""
    elif isinstance(value, str):
        m = _BYTES.match(value)
        try:
            number, unit = (float(m.group(1)), m.group(2).lower()) if m else (float(value), "")
        except ValueError:
            raise ValueError(f"expected a size such as '4GB', '512MiB' or a number of bytes; got {value!r}") from None
    else:
        raise TypeError(f"expected a size in bytes or a string such as '4GB'; got {type(value).__name__}")
    if unit not in _UNITS:
        raise ValueError(f"unknown unit {unit!r} in {value!r}; use B, KB, MB, GB, TB or KiB, MiB, GiB, TiB")
    if not (number >= 0 and number * _UNITS[unit] < 2**63):  # also refuses NaN and infinity
        raise ValueError(f"expected a size between 0 and 9.2 EB; got {value!r}")
    return int(number * _UNITS[unit])


def format_bytes(n: float) -> str:
    """``1234567890`` -> ``"1.23 GB"`` (powers of 1000, three significant digits).

    Example:
        >>> format_bytes(4_294_967_296), format_bytes(512)
        ('4.29 GB', '512 B')
    """
    n = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} EB"  # pragma: no cover


def _proc_value(path: str, key: str) -> int | None:
    """A ``kB`` value from ``/proc/meminfo`` or ``/proc/self/status`` in bytes, or ``None``."""
    try:
        with open(path, encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _free_ram() -> int:
    value = _proc_value("/proc/meminfo", "MemAvailable")
    if value is not None:
        return value
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return _FALLBACK_AVAILABLE


def _limit_headroom() -> int | None:
    """Bytes left under the address-space and data-segment limits (``ulimit -v``/``-d``), if any."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    out = None
    for name, used_key in (("RLIMIT_AS", "VmSize"), ("RLIMIT_DATA", "VmData")):
        try:
            soft, _ = resource.getrlimit(getattr(resource, name))
        except (AttributeError, ValueError, OSError):
            continue
        if soft == resource.RLIM_INFINITY or soft < 0:
            continue
        used = _proc_value("/proc/self/status", used_key) or 0
        left = max(0, soft - used)
        out = left if out is None else min(out, left)
    return out


def available_memory() -> int:
    """Bytes this process can still allocate: free RAM (``MemAvailable``), capped by the
    address-space and data limits (``ulimit -v``, ``prlimit --as``) when they are set.

    Read at most once a second (decoding asks for every file).

    Example:
        >>> available_memory() > 0
        True
    """
    now = time.monotonic()
    if _AVAILABLE and now - _AVAILABLE[0] < 1.0:
        return int(_AVAILABLE[1])
    value = _free_ram()
    headroom = _limit_headroom()
    if headroom is not None:
        value = min(value, headroom)
    _AVAILABLE[:] = [now, value]
    return value


def memory_budget_bytes(budget: int | None = None) -> int:
    """The memory medtl may use for decoded images: ``data.memory_budget`` when set, else half of
    :func:`available_memory` (read now).

    Example:
        >>> memory_budget_bytes(4_000_000_000)
        4000000000
    """
    return int(budget) if budget is not None else available_memory() // 2


def _budget_text(budget: int | None) -> str:
    """Where the budget comes from, for messages: ``"data.memory_budget=4 GB"`` or the default."""
    if budget is not None:
        return f"data.memory_budget={format_bytes(budget)}"
    return (f"{format_bytes(memory_budget_bytes(None))}: half of the {format_bytes(available_memory())} "
            "available; set data.memory_budget to change it")


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
    intensity: IntensityConfig = Field(default_factory=IntensityConfig,
                                       description="how raw values become [0, 1]")
    on_error: OnError = Field("raise", description=(
        "unreadable files: `raise` stops before training and lists them all; `skip` trains without "
        "them and lists them in skipped.json"))
    max_cases: int | None = Field(None, ge=1, description="random subset of this many cases (quick trials); "
                                  "null: all")
    memory_budget: int | str | None = Field(None, description=(
        "how much memory medtl may use for decoded images: bytes, or a size such as `4GB` or `512MiB`. A file "
        "whose header declares a larger image (as float32) is refused before it is decoded, and the decoded "
        "cache, a batch and the image size must fit. null: half of the memory available when the run starts "
        "(free RAM, or the address-space limit `ulimit -v` when lower)"))

    @field_validator("image_size")
    @classmethod
    def _size(cls, v: list[int]) -> list[int]:
        if len(v) not in (2, 3) or any(int(s) < 8 for s in v):
            raise ValueError("image_size must be 2 (H, W) or 3 (D, H, W) integers >= 8")
        if any(int(s) > MAX_IMAGE_SIDE for s in v):
            raise ValueError(f"image_size entries must be <= {MAX_IMAGE_SIDE} (pixels per axis); resample "
                             "larger images down, e.g. image_size: [512, 512]")
        return v

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
        "validation score that picks the best epoch (`loss`: the lowest)"))
    amp: AmpMode = Field("auto", description="mixed precision; `auto`: on CUDA only; `on` needs CUDA")
    device: Device = Field("auto", description=(
        "`auto`: CUDA when available; `cuda` without a GPU is an error, never a silent fallback"))
    num_threads: int | None = Field(None, ge=1, description="CPU threads for torch; null: torch's default")
    seed: int = Field(0, description="seed of initialisation, augmentation and batch order")
    tta: bool = Field(True, description="average with the horizontally flipped image at prediction time")
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

    @field_validator("amp", "compile", mode="before")
    @classmethod
    def _yaml_switch(cls, v: Any, info: ValidationInfo) -> Any:
        """YAML 1.1 reads a bare ``on``/``off`` as true/false: ``amp: on`` and ``--set train.amp=on`` mean the words."""
        if isinstance(v, bool) and (info.field_name == "amp" or not v):
            return "on" if v else "off"
        return v


class CVConfig(_Strict):
    """``kfold``: patient-grouped stratified k-fold; ``repeated``: ``n_repeats`` x k-fold with
    different shuffles; ``nested``: an inner grouped k-fold picks the ``grid`` point;
    ``leave_one_site_out``: one fold per site (needs the ``site`` column)."""

    scheme: CVScheme = Field("kfold", description=(
        "`repeated`: n_repeats x k-fold; `nested`: an inner CV picks the cv.grid point; "
        "`leave_one_site_out`: one fold per site (needs a site column)"))
    n_splits: int = Field(5, ge=2, description="outer folds")
    n_repeats: int = Field(1, ge=1, description="repeated: how many reshuffled k-fold runs (other schemes: 1)")
    inner_splits: int = Field(3, ge=2, description="nested CV and linear_probe: inner grouped folds")
    grid: dict[str, list[bool | int | float | str]] = Field(
        default_factory=dict, description=(
            "nested CV grid, dotted train/model/adapt keys, e.g. {'train.lr': [3e-4, 1e-3]}"))
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

    @model_validator(mode="after")
    def _check_rules(self, info: ValidationInfo) -> Config:
        """Every rule in ``_RULES``, then the grid values and (unless the context says
        ``check_dependencies: False``) the optional packages; all problems in one error."""
        context = info.context or {}
        problems = [p for rule in _RULES for p in rule(self)]
        if not problems and self.cv.grid:
            problems = list(_grid_value_problems(self))
        problems += _memory_problems(self, machine=context.get("check_dependencies", True))
        if context.get("check_dependencies", True):
            problems += _dependency_problems(self)
        if problems:
            raise PydanticCustomError("config_rule", "{rules}", {"rules": "\n".join(problems)})
        return self

    def resolved_data_path(self) -> Path:
        return Path(expand_path(self.data.path))

    def resolved_labels_path(self) -> Path | None:
        return Path(expand_path(self.data.labels.csv)) if self.data.labels else None


_SECTIONS: tuple[type[BaseModel], ...] = (Config, DataConfig, LabelsConfig, IntensityConfig, WindowSpec, ModelConfig,
                                          TrainConfig, AugmentConfig, StrategyConfig, CVConfig, EvalConfig,
                                          ExplainConfig, PrivacyConfig, DomainAdaptConfig)


# -- rules that span several fields (checked on every Config) -----------------------------------
_RULES: list[Callable[[Config], Iterator[str]]] = []


def _rule(fn: Callable[[Config], Iterator[str]]) -> Callable[[Config], Iterator[str]]:
    """Register a cross-field rule: ``fn(cfg)`` yields one message per problem found.

    The first paragraph of its docstring documents the rule in ``docs/config.md``.
    """
    _RULES.append(fn)
    return fn


def rule_descriptions() -> list[str]:
    """One line per rule checked when a config is loaded (the first paragraph of its docstring)."""
    return [" ".join(fn.__doc__.strip().split("\n\n")[0].split())
            for fn in [*_RULES, _grid_value_problems, _memory_problems, _dependency_problems]]


@_rule
def _data_geometry(cfg: Config) -> Iterator[str]:
    """`data.image_size` (and `data.spacing`) give one entry per axis: [H, W] for
    `spatial_dims: 2`, [D, H, W] for 3.
    """
    d = cfg.data
    if d.spatial_dims != len(d.image_size):
        yield (f"data.spatial_dims={d.spatial_dims} but data.image_size={list(d.image_size)} has "
               f"{len(d.image_size)} entries. Use spatial_dims: 3 with image_size [D, H, W] for volumes, or "
               "spatial_dims: 2 with [H, W] for images.")
    if d.spacing is not None and len(d.spacing) != len(d.image_size):
        yield (f"data.spacing must give one pixel size (mm) per data.image_size entry ({len(d.image_size)}). "
               f"Got data.spacing={list(d.spacing)} instead. Give {len(d.image_size)} values, or null for a "
               "plain resize.")


@_rule
def _folder_needs_labels(cfg: Config) -> Iterator[str]:
    """`data.format: folder` needs a `data.labels` section."""
    if cfg.data.format == "folder" and cfg.data.labels is None:
        yield ("data.format=folder needs a data.labels section (csv, file_column, label_column). Got none. "
               "Add data.labels.csv, or use data.format=manifest with a CSV of path,label,patient_id.")


@_rule
def _intensity(cfg: Config) -> Iterator[str]:
    """`data.intensity`: `window` needs a `preset` or both `center` and `width` (not both);
    those keys apply to `window` only; `multiwindow` needs >= 1 window; `lower < upper`; `vmin < vmax`.
    """
    it = cfg.data.intensity
    manual = {k: v for k, v in (("center", it.center), ("width", it.width)) if v is not None}
    presets = ", ".join(WINDOW_PRESETS)
    if it.mode == "window":
        if it.preset is None and len(manual) < 2:
            got = f"only {next(iter(manual))}" if manual else "neither"
            yield (f"data.intensity.mode=window needs a preset ({presets}) or both center and width. Got {got}. "
                   "Set e.g. data.intensity.preset=lung.")
        elif it.preset is not None and manual:
            yield (f"data.intensity.preset={it.preset} and data.intensity.{'/'.join(manual)} are both set, so one "
                   "would be ignored. Keep the preset or center and width, not both.")
    else:
        given = [k for k, v in (("preset", it.preset), ("center", it.center), ("width", it.width)) if v is not None]
        if given:
            verb = "applies" if len(given) == 1 else "apply"
            yield (f"data.intensity.{'/'.join(given)} only {verb} to data.intensity.mode=window. Got "
                   f"mode={it.mode} instead. Set data.intensity.mode=window, or drop {'/'.join(given)}.")
    if it.mode == "multiwindow" and not it.windows:
        yield (f"data.intensity.mode=multiwindow needs at least one window in data.intensity.windows (presets "
               f"{presets} or {{center, width}}). Got an empty list.")
    if it.mode == "percentile" and not it.lower < it.upper:
        yield (f"data.intensity.lower must be below data.intensity.upper (percentiles). Got lower={it.lower}, "
               f"upper={it.upper} instead, e.g. lower: 1, upper: 99.")
    if it.mode == "range" and not it.vmin < it.vmax:
        yield (f"data.intensity.vmin must be below data.intensity.vmax. Got vmin={it.vmin}, vmax={it.vmax} "
               "instead, e.g. vmin: 0, vmax: 255 for 8-bit images.")


@_rule
def _conversion_3d(cfg: Config) -> Iterator[str]:
    """`model.conversion_3d` other than `inflate` needs 3D data (`data.spatial_dims: 3`)."""
    if cfg.model.conversion_3d != "inflate" and cfg.data.spatial_dims != 3:
        yield (f"model.conversion_3d={cfg.model.conversion_3d} only applies to 3D data (data.spatial_dims=3). "
               f"Got data.spatial_dims={cfg.data.spatial_dims} instead. Drop model.conversion_3d for 2D data.")


@_rule
def _amp_needs_cuda(cfg: Config) -> Iterator[str]:
    """`train.amp: on` needs CUDA, so it conflicts with `train.device: cpu`."""
    if cfg.train.amp == "on" and cfg.train.device == "cpu":
        yield ("train.amp=on needs a CUDA device, but train.device=cpu. Use train.amp=auto (or off) on the CPU, "
               "or train.device=cuda.")


@_rule
def _probe_class_weights(cfg: Config) -> Iterator[str]:
    """`train.class_weighted: true` with `linear_probe` needs `probe_head: logistic`
    (scikit-learn's MLP has no class weights).
    """
    s = cfg.train.strategy
    if s.name == "linear_probe" and s.probe_head == "mlp" and cfg.train.class_weighted:
        yield ("train.class_weighted=true needs train.strategy.probe_head=logistic with linear_probe "
               "(scikit-learn's MLPClassifier takes no class weights). Got probe_head=mlp. Use probe_head=logistic "
               "or train.class_weighted=false.")


@_rule
def _cv_scheme(cfg: Config) -> Iterator[str]:
    """`cv.n_repeats` > 1 needs `cv.scheme: repeated` (and `repeated` needs >= 2); `nested` needs
    a `cv.grid`, and a grid needs `nested` (it wraps any trainer, `linear_probe` included).
    """
    cv = cfg.cv
    if cv.scheme != "repeated" and cv.n_repeats != 1:
        yield (f"cv.n_repeats={cv.n_repeats} only applies to cv.scheme=repeated. Got cv.scheme={cv.scheme} "
               "instead. Set cv.scheme=repeated or drop cv.n_repeats.")
    if cv.scheme == "repeated" and cv.n_repeats < 2:
        yield (f"The 'n_repeats' parameter of cv.scheme=repeated must be an int >= 2. Got {cv.n_repeats} instead. "
               "Set e.g. cv.n_repeats=3, or use cv.scheme=kfold.")
    if cv.scheme == "nested" and not cv.grid:
        yield ("cv.scheme=nested needs a cv.grid, e.g. `--set 'cv.grid={\"train.lr\": [3e-4, 1e-3]}'`. Got an "
               "empty grid. Without a grid there is nothing for the inner loop to choose; use cv.scheme=kfold.")
    if cv.grid and cv.scheme != "nested":
        yield (f"cv.grid only applies to cv.scheme=nested. Got cv.scheme={cv.scheme} with a grid over "
               f"{sorted(cv.grid)}. Set cv.scheme=nested, or drop the grid (--set 'cv.grid={{}}').")


#: sections a nested-CV grid point may change: the inner loop reuses the decoded images and
#: the outer scoring settings, so only what one training run reads takes effect
_GRID_SECTIONS = ("train", "model", "adapt")


@_rule
def _grid_keys(cfg: Config) -> Iterator[str]:
    """Every `cv.grid` key is a dotted `train.*`, `model.*` or `adapt.*` config key with a
    non-empty list of values.
    """
    for key in sorted(cfg.cv.grid):
        values = cfg.cv.grid[key]
        if not values:
            yield f"cv.grid['{key}'] must be a non-empty list of values. Got {values!r} instead."
        problem = _grid_key_problem(key)
        if problem:
            yield problem


def _grid_key_problem(key: str) -> str | None:
    """Why ``key`` cannot be a nested-CV grid key, or ``None``."""
    parts = key.split(".")
    if parts[0] not in _GRID_SECTIONS:
        section = parts[0] if parts[0] in Config.model_fields else None
        if section is None:
            hint = did_you_mean(key, _dotted_keys())
            return (f"cv.grid key '{key}' is not a config key.{hint} Grid keys are dotted keys under "
                    f"{', '.join(_GRID_SECTIONS)}, e.g. 'train.lr'.")
        return (f"cv.grid key '{key}' cannot be searched: the inner CV reuses the decoded images and the "
                f"outer scoring settings, so only keys under {', '.join(_GRID_SECTIONS)} take effect. Got a key "
                f"under '{section}'.")
    anns: list = [Config]
    for depth, part in enumerate(parts):
        models = [m for a in anns for m in _models_in(a)]
        if not models:
            return (f"cv.grid key '{key}' goes below '{'.'.join(parts[:depth])}', which is a value, not a "
                    f"section. Use '{'.'.join(parts[:depth])}'.")
        anns = [m.model_fields[part].annotation for m in models if part in m.model_fields]
        if not anns:
            prefix = ".".join(parts[:depth])
            valid = sorted({f for m in models for f in m.model_fields})
            hint = did_you_mean(key, [f"{prefix}.{f}" if prefix else f for f in valid])
            return (f"cv.grid key '{key}' is not a config key.{hint} Valid keys under '{prefix}': "
                    f"{', '.join(valid)}.")
    if any(_models_in(a) for a in anns):
        model = next(m for a in anns for m in _models_in(a))
        return (f"cv.grid key '{key}' names a section, not a value. Name a key inside it, e.g. "
                f"'{key}.{next(iter(model.model_fields))}'.")
    return None


@_rule
def _linear_probe_has_no_adaptation(cfg: Config) -> Iterator[str]:
    """`adapt.method` other than `none` needs a fine-tuning strategy, not `linear_probe`."""
    if cfg.adapt.method != "none" and cfg.train.strategy.name == "linear_probe":
        yield (f"adapt.method={cfg.adapt.method} does not apply to train.strategy.name=linear_probe: the probe "
               "fits a scikit-learn head on frozen features and never sees the target site. Set "
               "adapt.method=none, or pick a fine-tuning strategy (e.g. train.strategy.name=partial).")


@_rule
def _adaptation_target(cfg: Config) -> Iterator[str]:
    """`adapt.method` other than `none` needs `use_target_unlabelled: true` and one target:
    `cv.scheme: leave_one_site_out` (each held-out site) or `adapt.target_site`, not both.
    """
    a = cfg.adapt
    if a.method == "none":
        return
    if not a.use_target_unlabelled:
        yield (f"adapt.method={a.method} learns from unlabelled target images, but adapt.use_target_unlabelled "
               "is false. Set it to true, or adapt.method=none.")
    loso = cfg.cv.scheme == "leave_one_site_out"
    if a.target_site is None and not loso:
        yield (f"adapt.method={a.method} needs a target site. Got cv.scheme={cfg.cv.scheme} and no "
               "adapt.target_site. Use cv.scheme=leave_one_site_out (each fold's held-out site is the target), "
               "or set adapt.target_site to the new hospital's site.")
    if a.target_site is not None and loso:
        yield (f"adapt.target_site='{a.target_site}' conflicts with cv.scheme=leave_one_site_out, where each "
               "fold's held-out site is the target (and the named site trains in the other folds). Drop "
               "adapt.target_site, or use another cv.scheme.")


@_rule
def _threshold_is_binary(cfg: Config) -> Iterator[str]:
    """`evaluate.threshold` other than `fixed` needs a binary task (when `data.class_names` are
    given).
    """
    names = cfg.data.class_names
    if cfg.evaluate.threshold != "fixed" and names is not None and len(names) > 2:
        yield (f"evaluate.threshold={cfg.evaluate.threshold} applies to binary tasks only; data.class_names "
               f"lists {len(names)} classes. Use evaluate.threshold=fixed (multi-class predictions are the argmax).")


@_rule
def _explain(cfg: Config) -> Iterator[str]:
    """`explain.methods` are distinct, and the report has cases to explain (`n_correct`,
    `n_wrong` or `localisation`).
    """
    ex = cfg.explain
    repeated = sorted({m for m in ex.methods if ex.methods.count(m) > 1})
    if repeated:
        yield (f"explain.methods must name each method once. Got {list(ex.methods)} ({', '.join(repeated)} "
               "repeated). Remove the repeats.")
    if ex.n_correct == 0 and ex.n_wrong == 0 and not ex.localisation:
        yield ("explain.n_correct and explain.n_wrong are both 0 and explain.localisation is false, so there is "
               "no case to explain. Set explain.n_correct (or n_wrong) >= 1, or explain.localisation=true.")


# -- checks after the rules: grid values (once the keys are sound), optional packages -------
def _grid_value_problems(cfg: Config) -> Iterator[str]:
    """Every `cv.grid` value is valid for its key: the config with that value applied passes
    every check.
    """
    for key in sorted(cfg.cv.grid):
        for value in cfg.cv.grid[key]:
            raw = cfg.model_dump()
            raw["cv"].update(scheme="kfold", grid={}, n_repeats=1)
            node = raw
            parts = key.split(".")
            for part in parts[:-1]:
                if not isinstance(node.get(part), dict):
                    node[part] = {}
                node = node[part]
            node[parts[-1]] = value
            try:
                Config.model_validate(raw, context={"check_dependencies": False})
            except ValidationError as err:
                for e in err.errors():
                    if e["type"] == "config_rule":
                        why = e["msg"].replace("\n", " ")
                    else:
                        why = f"{'.'.join(map(str, e['loc']))}: {e['msg']}"
                    yield f"cv.grid['{key}'] value {value!r} is not valid: {why}"


def _memory_problems(cfg: Config, *, machine: bool = True) -> list[str]:
    """One batch of input images (`train.batch_size` and `explain.batch_size` x channels x the
    product of `data.image_size` x 4 bytes) fits in the memory budget: `data.memory_budget`, or
    when unset (checked on this machine) half of the available memory.
    """
    budget_set = cfg.data.memory_budget
    if budget_set is None and not machine:
        return []
    budget = memory_budget_bytes(budget_set)
    it = cfg.data.intensity
    channels = len(it.windows) if it.mode == "multiwindow" else 1
    voxels = 1
    for s in cfg.data.image_size:
        voxels *= int(s)
    problems = []
    for key, batch in (("train.batch_size", cfg.train.batch_size), ("explain.batch_size", cfg.explain.batch_size)):
        need = batch * channels * voxels * 4
        if need > budget:
            fit = max(budget // max(channels * voxels * 4, 1), 0)
            size = "x".join(str(s) for s in cfg.data.image_size)
            hint = (f"Lower {key} to {fit} or less" if fit >= 1 else
                    "Lower data.image_size (one image alone does not fit)")
            problems.append(
                f"{key}={batch} images of {size} x {channels} channel(s) as float32 need {format_bytes(need)}, more "
                f"than the memory budget ({_budget_text(budget_set)}). {hint}, or raise data.memory_budget if "
                "the machine has the memory.")
    return problems


def _module_available(name: str) -> bool:
    """Whether ``import name`` would find the module (without importing it)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _dependency_problems(cfg: Config) -> list[str]:
    """`tracking: mlflow` needs the `mlflow` package (`pip install 'medtl[tracking]'`); checked
    on load, not after training.
    """
    if cfg.tracking == "mlflow" and not _module_available("mlflow"):
        return ["tracking=mlflow needs the 'mlflow' package, which is not installed. Install it with "
                "pip install 'medtl[tracking]' (or mlflow-skinny), or set tracking=none."]
    return []



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


# -- loading -------------------------------------------------------------------------------
_VAR = re.compile(r"\$\{(\w+)\}")


def expand_path(value: str) -> str:
    """Expand ``${MEDTL_SHARED_DATA}`` (and other ``${VARS}``) and ``~`` in a configured path."""
    def sub(m: re.Match) -> str:
        if m.group(1) == "MEDTL_SHARED_DATA":
            return str(shared_data_dir())
        return os.environ.get(m.group(1), m.group(0))

    return os.path.expanduser(_VAR.sub(sub, value))


def apply_overrides(raw: dict, overrides: list[str] | None) -> dict:
    """Apply ``a.b=c`` overrides to a raw config dict; values are parsed as YAML."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"Override '{item}' is not of the form key.path=value, e.g. train.epochs=5.")
        key, _, value = item.partition("=")
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise ConfigError(f"Override '{item}' has an empty key.")
        node = raw
        for depth, part in enumerate(parts[:-1]):
            sub = node.get(part)
            if sub is None:
                sub = node[part] = {}
            if not isinstance(sub, dict):
                raise ConfigError(f"Override '{item}': '{'.'.join(parts[:depth + 1])}' is a value, not a section.")
            node = sub
        try:
            node[parts[-1]] = _load_yaml(value) if value.strip() else ""
        except (yaml.YAMLError, _YamlTooLarge) as exc:
            raise ConfigError(f"Override '{_clip(item, 120)}': cannot parse value {_clip(value)!r} ({exc}).") from None
    return raw


class _YamlTooLarge(ValueError):
    """A YAML document over the node limit (an alias bomb) or nested too deeply."""


def _clip(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _expanded_nodes(root: yaml.Node, limit: int) -> int:
    """How many nodes ``root`` holds with every alias expanded, counting shared nodes once per use.

    Linear in the composed document (sizes of shared nodes are memoised), so a "billion laughs"
    alias bomb is measured without being expanded. Raises :class:`_YamlTooLarge` past ``limit``
    or on a node that contains itself.
    """
    sizes: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            on_path.discard(key)
            children = _children(node)
            total = 1 + sum(sizes[id(c)] for c in children)
            if total > limit:
                raise _YamlTooLarge(f"the document expands to more than {limit} values (through anchors and "
                                    "aliases: a YAML alias bomb?)")
            sizes[key] = total
            continue
        if key in sizes:
            continue
        if key in on_path:
            raise _YamlTooLarge("an alias refers to a node that contains it (a recursive YAML structure)")
        on_path.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in _children(node) if id(c) not in sizes)
    return sizes[id(root)]


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _load_yaml(text: str) -> Any:
    """``yaml.safe_load`` for at most :data:`MAX_YAML_NODES` values, aliases expanded.

    PyYAML shares the node an alias points to, so composing an alias bomb is cheap; what
    explodes is every later walk of the result (validation, hashing, dumping). The composed
    document is measured before any Python object is built.
    """
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_nodes(node, MAX_YAML_NODES)
        return loader.construct_document(node)
    except RecursionError:
        raise _YamlTooLarge("the document is nested too deeply") from None
    finally:
        loader.dispose()


def _read_config_text(path: Path) -> str:
    """The text of a config file: at most :data:`MAX_CONFIG_BYTES`, UTF-8, no NUL bytes."""
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(f"Config file '{path}' is {format_bytes(size)}; a config is at most "
                              f"{MAX_CONFIG_BYTES >> 20} MiB of YAML. Is it the right file? Shipped configs live "
                              "in configs/, e.g. configs/breastmnist.yaml.")
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"Config file '{path}' cannot be read: {exc.strerror or exc}.") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"Config file '{path}' is not a text file: byte 0x{raw[exc.start]:02x} at offset "
                          f"{exc.start} is not UTF-8. Give a YAML config (UTF-8 text), e.g. "
                          "configs/breastmnist.yaml.") from None
    if "\x00" in text:
        raise ConfigError(f"Config file '{path}' is not a text file: it holds NUL bytes (offset "
                          f"{text.index(chr(0))}). Give a YAML config (UTF-8 text), e.g. configs/breastmnist.yaml.")
    return text


def _is_union_tag(part: str | int) -> bool:
    """Pydantic names the member of a union an error came from (``WindowSpec``, ``literal['lung',...]``)."""
    return isinstance(part, str) and (part.startswith("literal[") or any(
        part == m.__name__ for m in _SECTIONS))


def _errors(err: ValidationError) -> list[dict]:
    """``err.errors()`` without the noise of unions such as ``windows: [{center, width} | preset]``:
    pydantic reports why a value fits no member; keep the section's errors for a mapping, else the
    choices' error."""
    errors = err.errors()

    def tag(e: dict) -> tuple[tuple, str | None]:
        for i, part in enumerate(e["loc"]):
            if _is_union_tag(part):
                return tuple(e["loc"][:i]), ("literal" if str(part).startswith("literal[") else "section")
        return tuple(e["loc"]), None

    kinds: dict[tuple, set] = {}
    not_mapping = set()
    for e in errors:
        prefix, kind = tag(e)
        if kind:
            kinds.setdefault(prefix, set()).add(kind)
            if kind == "section" and len(e["loc"]) == len(prefix) + 1:  # the value itself is not a mapping
                not_mapping.add(prefix)
    keep = []
    for e in errors:
        prefix, kind = tag(e)
        if kind and len(kinds[prefix]) > 1 and (kind == "section") == (prefix in not_mapping):
            continue
        keep.append(e)
    return keep


def _format_validation(err: ValidationError, source: str) -> str:
    lines = [f"Invalid config {source}:"]
    for e in _errors(err):
        loc = ".".join(str(p) for p in e["loc"] if not _is_union_tag(p))
        if e["type"] == "config_rule":
            lines += [f"  - {rule}" for rule in e["msg"].splitlines()]
        elif e["type"] == "extra_forbidden":
            model = _section_at(e["loc"][:-1])
            valid = sorted(model.model_fields) if model else []
            hint = did_you_mean(str(e["loc"][-1]), valid)
            listing = f" Valid keys here: {', '.join(valid)}." if valid else ""
            lines.append(f"  - unknown key '{loc}'.{hint}{listing}")
        elif e["type"] == "missing":
            lines.append(f"  - missing required key '{loc}'.")
        else:
            got = e.get("input")
            hint = ""
            if e["type"] == "literal_error" and isinstance(got, str):
                hint = did_you_mean(got, re.findall(r"'([^']*)'", str(e.get("ctx", {}).get("expected", ""))))
            lines.append(f"  - '{loc}': {e['msg']}. Got {got!r}.{hint}")
    lines.append("Fix the YAML file or the --set override named above.")
    return "\n".join(lines)


def load_config(source: str | Path | dict, overrides: list[str] | None = None, *,
                check_dependencies: bool = True) -> Config:
    """Load and validate a config from a YAML file (or a dict), then apply overrides.

    Args:
        source: a YAML file or an already parsed mapping.
        overrides: ``--set`` style ``dotted.key=value`` strings (values parsed as YAML).
        check_dependencies: check what depends on this machine: the optional packages the run
            will use are installed (``tracking: mlflow``), and a batch fits in half the available
            memory when ``data.memory_budget`` is unset. Pass ``False`` when reloading a finished
            run's config only to read it (predict, explain), where tracking does not run.

    Raises:
        ConfigError: naming every unknown key, wrong value and broken rule (``rule_descriptions()``);
            a file that is not UTF-8 text, larger than ``MAX_CONFIG_BYTES``, or whose YAML expands to
            more than ``MAX_YAML_NODES`` values through aliases (or nests too deeply).
    """
    if isinstance(source, dict):
        raw, label = json.loads(json.dumps(source)), "(dict)"
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"Config file '{path}' does not exist. Shipped configs live in configs/, "
                              "e.g. configs/breastmnist.yaml.")
        text = _read_config_text(path)
        try:
            raw = _load_yaml(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"Config file '{path}' is not valid YAML: {exc}") from None
        except _YamlTooLarge as exc:
            raise ConfigError(f"Config file '{path}' is refused: {exc}. A config holds at most {MAX_YAML_NODES} "
                              "values; write the values out instead of nesting aliases.") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"Config file '{path}' must hold a mapping at the top level.")
        label = f"'{path}'"
    raw = apply_overrides(raw, overrides)
    try:
        return Config.model_validate(raw, context={"check_dependencies": check_dependencies})
    except ValidationError as err:
        raise ConfigError(_format_validation(err, label)) from None


def dump_config(cfg: Config, path: str | Path) -> Path:
    """Write the resolved config (with the data path expanded) as YAML."""
    data = cfg.model_dump(mode="json")
    data["data"]["path"] = str(cfg.resolved_data_path().resolve())
    if cfg.data.labels is not None:
        data["data"]["labels"]["csv"] = str(cfg.resolved_labels_path().resolve())
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False))
    return Path(path)


def config_hash(cfg: Config) -> str:
    """sha256 of the resolved config (identifies a run's recipe in checkpoints)."""
    blob = json.dumps(cfg.model_dump(mode="json"), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# -- the reference in docs/config.md -------------------------------------------------------
_REGENERATE = ('python -c "from medtl.config import config_reference_markdown; '
               'print(config_reference_markdown())" > docs/config.md')
_BOUNDS = ((annotated_types.Gt, "gt", ">"), (annotated_types.Ge, "ge", ">="), (annotated_types.Lt, "lt", "<"),
           (annotated_types.Le, "le", "<="))


def _constraints(metadata: list) -> str:
    out = []
    for m in metadata:
        if isinstance(m, FieldInfo):  # Annotated[float, Field(gt=0)]
            out.append(_constraints(m.metadata))
            continue
        for cls, attr, sign in _BOUNDS:
            if isinstance(m, cls):
                out.append(f"{sign} {getattr(m, attr)}")
        if isinstance(m, annotated_types.MinLen):
            out.append(f"at least {m.min_length} item{'s' if m.min_length > 1 else ''}")
    return ", ".join(o for o in out if o)


def _type_text(ann: Any, metadata: list | None = None) -> str:
    """A short, Markdown-safe description of a field's type, e.g. ``one of `a`, `b` or null``."""
    nullable = get_origin(ann) in (Union, types.UnionType) and type(None) in get_args(ann)
    if get_origin(ann) is Annotated:
        base, *meta = get_args(ann)
        return _type_text(base, [*meta, *(metadata or [])])
    alts = _alternatives(ann)
    literals = [v for a in alts if get_origin(a) is Literal for v in get_args(a)]
    parts = []
    if literals:
        parts.append("one of " + ", ".join(f"`{v}`" for v in literals))
    for a in alts:
        origin = get_origin(a)
        if origin is Literal:
            continue
        if isinstance(a, type) and issubclass(a, BaseModel):
            parts.append("section" if len(alts) == 1 else "{" + ", ".join(a.model_fields) + "}")
        elif origin is list:
            parts.append(f"list of {_type_text(get_args(a)[0])}")
        elif origin is dict:
            k, v = get_args(a)
            parts.append(f"mapping of {_type_text(k)} to {_type_text(v)}")
        else:
            parts.append(getattr(a, "__name__", str(a)))
    text = " or ".join(parts)
    bounds = _constraints(metadata or [])
    if bounds:
        text = f"{text} ({bounds})"
    return f"{text} or null" if nullable else text


def _default_text(field) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "see below"
    if isinstance(value, str):
        return f"`{value}`"
    return f"`{json.dumps(value)}`"


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _summary(model: type[BaseModel]) -> str:
    """The first paragraph of a section's docstring, on one line."""
    doc = (model.__doc__ or "").strip().split("\n\n")[0]
    doc = re.sub(r":\w+:`", "`", doc)  # Sphinx roles (:mod:`x`) read as plain code in Markdown
    return " ".join(doc.split()).replace("``", "`")


def _section_tables(model: type[BaseModel], prefix: str) -> list[str]:
    """The table of one section (``prefix`` ``""``: the top level), then its subsections' tables."""
    title = f"`{prefix.rstrip('.')}`" if prefix else "Top level"
    lines = [f"## {title}", "", _summary(model), "",
             "| key | type / choices | default | meaning |", "|---|---|---|---|"]
    below = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        subs = _models_in(field.annotation)
        if subs:
            lines.append(f"| `{key}` | {_cell(_type_text(field.annotation))} | {_cell(_default_text(field))} | "
                         f"{_cell(field.description or '')}; keys in `{key}` below |")
            below += _section_tables(subs[0], f"{key}.")
        else:
            lines.append(f"| `{key}` | {_cell(_type_text(field.annotation, field.metadata))} | "
                         f"{_cell(_default_text(field))} | {_cell(field.description or '')} |")
    return [*lines, "", *below]


def config_reference_markdown() -> str:
    """The Markdown reference of every config key (``docs/config.md``), generated from the schema.

    The rules checked across keys when a config is loaded (``rule_descriptions()``), then one
    table per section: key, type or choices (with bounds), default, and meaning (the field's
    ``description``; the section's docstring above its table).

    Example:
        >>> "| `train.epochs` |" in config_reference_markdown()
        True
    """
    lines = [
        "# Config reference",
        "",
        "<!-- Generated from the schema in medtl/config.py by medtl.config.config_reference_markdown(). "
        "Do not edit by hand. -->",
        "",
        "This file is generated from the pydantic models in `medtl/config.py`; do not edit it by hand. "
        "After changing the schema, regenerate it with",
        "",
        "```bash",
        _REGENERATE,
        "```",
        "",
        "(`tests/test_config_docs.py` fails while this file and the schema disagree.) A config is a YAML "
        "file; every key can also be set with `--set dotted.key=value` (the value is parsed as YAML). "
        "Unknown keys are errors, with the valid keys of their section and a did-you-mean. A config file is UTF-8 "
        f"text of at most {MAX_CONFIG_BYTES >> 20} MiB holding at most {MAX_YAML_NODES} "
        "values once YAML aliases are expanded (an alias bomb is refused before it is built), and no number may "
        "be NaN or infinite.",
        "",
        "## Rules checked when a config is loaded",
        "",
        "Besides each key's type and bounds, `load_config` checks these rules across keys and reports "
        "every broken one at once:",
        "",
        *[f"- {text}" for text in rule_descriptions()],
        "",
    ]
    lines += _section_tables(Config, "")
    return "\n".join(lines).rstrip() + "\n"
