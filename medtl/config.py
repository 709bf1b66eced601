"""Typed run configuration: YAML in ``configs/``, dotted ``--set`` overrides, clear errors.

Example:
    >>> cfg = load_config("configs/breastmnist.yaml", overrides=["train.epochs=2"])
    >>> cfg.train.epochs
    2

Data paths may use ``${MEDTL_SHARED_DATA}`` (default ``../shared/datasets``, resolved
against the current directory) so the same shipped configs work in CI and for users.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from medtl.errors import ConfigError, did_you_mean

__all__ = [
    "Config",
    "DataConfig",
    "LabelsConfig",
    "IntensityConfig",
    "ModelConfig",
    "TrainConfig",
    "AugmentConfig",
    "CVConfig",
    "EvalConfig",
    "ExplainConfig",
    "PrivacyConfig",
    "load_config",
    "apply_overrides",
    "config_hash",
    "dump_config",
    "shared_data_dir",
    "expand_path",
]


def shared_data_dir() -> Path:
    """``MEDTL_SHARED_DATA`` or ``../shared/datasets``."""
    return Path(os.environ.get("MEDTL_SHARED_DATA", "../shared/datasets")).expanduser()


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class WindowSpec(_Strict):
    """One CT window (HU) for ``intensity.mode: multiwindow``."""

    center: float
    width: float = Field(..., gt=0)


class IntensityConfig(_Strict):
    """How raw pixel values become [0, 1].

    ``window``: CT windowing in HU with a preset (``lung`` -600/1500, ``mediastinum``
    40/400, ``bone`` 400/1800, ``brain`` 40/80, ``abdomen`` 40/350) or ``center``/``width``;
    ``percentile``: per-image percentile scaling (MR, US); ``range``: fixed ``[vmin, vmax]``
    (e.g. 0-255 for 8-bit images); ``minmax``: per-image min-max.
    """

    mode: Literal["window", "multiwindow", "percentile", "range", "minmax"] = "percentile"
    preset: Literal["lung", "mediastinum", "bone", "brain", "abdomen"] | None = None
    center: float | None = None
    width: float | None = None
    lower: float = 1.0
    upper: float = 99.0
    vmin: float = 0.0
    vmax: float = 255.0
    # multiwindow: each window becomes one channel (e.g. lung/mediastinum/bone as "RGB")
    windows: list[WindowSpec | Literal["lung", "mediastinum", "bone", "brain", "abdomen"]] = Field(
        default_factory=lambda: ["lung", "mediastinum", "bone"])


class LabelsConfig(_Strict):
    """Labels for ``data.format: folder``: a CSV keyed by file name (relative to ``data.path``)."""

    csv: str
    file_column: str = "file"
    label_column: str = "label"
    patient_column: str | None = None  # default: each file's DICOM PatientID
    site_column: str | None = None


class DataConfig(_Strict):
    format: Literal["manifest", "medmnist", "folder"] = "manifest"
    path: str = Field(..., description="manifest CSV, MedMNIST .npz, or image folder (format folder)")
    labels: LabelsConfig | None = None
    split: Literal["official", "pooled"] = "official"
    label_column: str = "label"
    class_names: list[str] | None = None
    spatial_dims: Literal[2, 3] = 2
    image_size: list[int] = Field(default_factory=lambda: [224, 224])
    spacing: list[float] | None = Field(None, description="resample to this pixel size (mm) then crop/pad; "
                                        "null = plain resize to image_size")
    intensity: IntensityConfig = Field(default_factory=IntensityConfig)
    on_error: Literal["raise", "skip"] = "raise"
    max_cases: int | None = None

    @field_validator("image_size")
    @classmethod
    def _size(cls, v: list[int]) -> list[int]:
        if len(v) not in (2, 3) or any(int(s) < 8 for s in v):
            raise ValueError("image_size must be 2 (H, W) or 3 (D, H, W) integers >= 8")
        return v


class ModelConfig(_Strict):
    name: str = "tf_efficientnet_lite0"
    pretrained: bool = True
    weights_path: str | None = None
    channel_mapping: Literal["auto", "repeat", "sum"] = "auto"
    drop_rate: float = Field(0.2, ge=0.0, lt=1.0)
    # how a 2D weight set meets 3D data (ignored for native 3D weights such as MedicalNet):
    # inflate = I3D kernels repeated along depth and rescaled; acs = axial/coronal/sagittal
    # split of 2D kernels; slices = per-slice 2D encoder + pooling over depth;
    # channels = slices stacked as input channels (2.5D, stem filters summed)
    conversion_3d: Literal["inflate", "acs", "slices", "channels"] = "inflate"
    layout: Literal["auto", "timm", "efficientnet_pytorch", "torchvision", "radimagenet_torch",
                    "radimagenet_keras", "radimagenet_hf", "medicalnet"] = Field(
        "auto", description="key layout of model.weights_path (auto: detected from the keys)")


class StrategyConfig(_Strict):
    """How much of the pretrained encoder is trained.

    ``finetune``: everything, one LR; ``llrd``: everything, LR decayed by ``llrd_decay`` per
    block from the head down; ``gradual_unfreeze``: head first, then one more block every
    ``unfreeze_every`` epochs; ``partial``: the last ``trainable_blocks`` blocks only;
    ``adapters`` / ``lora``: encoder frozen, residual adapters or LoRA on the convs trained;
    ``linear_probe``: frozen encoder, features computed once and cached, sklearn head.
    """

    name: Literal["finetune", "llrd", "gradual_unfreeze", "partial", "adapters", "lora",
                  "linear_probe"] = "finetune"
    llrd_decay: float = Field(0.7, gt=0.0, le=1.0)
    unfreeze_every: int = Field(2, ge=1)
    trainable_blocks: int = Field(2, ge=0)
    adapter_reduction: int = Field(8, ge=1)
    lora_rank: int = Field(4, ge=1)
    lora_alpha: float = Field(8.0, gt=0)
    probe_head: Literal["logistic", "mlp"] = "logistic"
    probe_C: list[float] = Field(default_factory=lambda: [0.01, 0.1, 1.0, 10.0])
    feature_cache: bool = True


class DomainAdaptConfig(_Strict):
    """Domain adaptation across the manifest's ``site`` column.

    ``target_site``: the site treated as the new hospital (its labels are never used for
    training; with ``use_target_unlabelled`` its images are). ``none``: source-only.
    """

    method: Literal["none", "adabn", "dsbn", "dann", "mmd", "coral"] = "none"
    target_site: str | None = None
    use_target_unlabelled: bool = True
    weight: float = Field(1.0, ge=0.0, description="weight of the DANN/MMD/CORAL loss")


class AugmentConfig(_Strict):
    """``backend: torch`` augments whole batches on the training device (:mod:`medtl.data.batch_augment`);
    ``monai`` runs the per-image MONAI preset (:func:`medtl.data.transforms.augment_transform`) on the host.
    Both draw the same transform families with the same probabilities and ranges."""

    backend: Literal["torch", "monai"] = "torch"
    flip: bool = True
    vertical_flip: bool = False
    affine: bool = True
    rotate_deg: float = 15.0
    scale: float = 0.1
    translate: float = 0.06
    intensity: bool = True


class TrainConfig(_Strict):
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-2, ge=0)
    scheduler: Literal["cosine", "onecycle"] = "cosine"
    warmup_epochs: int = Field(1, ge=0)
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    class_weighted: bool = False
    select_metric: Literal["auc", "acc", "balanced_acc", "loss"] = "auc"
    amp: Literal["auto", "on", "off"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_threads: int | None = None
    seed: int = 0
    tta: bool = True
    ema: float = Field(0.0, ge=0.0, lt=1.0, description=(
        "exponential moving average of the weights, decay per step (0 = off; e.g. 0.99). Validation, "
        "best-epoch selection and the returned model use the averaged weights (timm ModelEmaV3, with "
        "warm-up so short runs are not dominated by the initial weights)"))
    compile: Literal["off", "default", "reduce-overhead", "max-autotune"] = Field(
        "off", description="torch.compile mode for the training forward; reduce-overhead uses CUDA graphs")
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    strategy: StrategyConfig = Field(default_factory=StrategyConfig)


class CVConfig(_Strict):
    """``kfold``: patient-grouped stratified k-fold; ``repeated``: ``n_repeats`` x k-fold with
    different shuffles; ``nested``: an inner grouped k-fold picks the ``grid`` point;
    ``leave_one_site_out``: one fold per site (needs the ``site`` column)."""

    scheme: Literal["kfold", "repeated", "nested", "leave_one_site_out"] = "kfold"
    n_splits: int = Field(5, ge=2)
    n_repeats: int = Field(1, ge=1)
    inner_splits: int = Field(3, ge=2)
    grid: dict[str, list[float | int | str]] = Field(
        default_factory=dict, description="nested CV grid, dotted keys, e.g. {'train.lr': [3e-4, 1e-3]}")
    val_fraction: float = Field(0.2, gt=0.0, lt=0.5)
    seed: int = 0


class EvalConfig(_Strict):
    n_bootstrap: int = Field(1000, ge=10)
    threshold: Literal["fixed", "youden_val", "sensitivity_val"] = "fixed"
    target_sensitivity: float = Field(0.9, gt=0.0, lt=1.0)
    calibration: Literal["none", "temperature"] = "none"
    ordinal: bool = False
    seed: int = 0


class ExplainConfig(_Strict):
    methods: list[Literal["gradcam", "guided_gradcam", "ig", "gradient_shap", "occlusion", "smoothgrad"]] = Field(
        default_factory=lambda: ["gradcam", "ig"])
    n_correct: int = Field(4, ge=0)
    n_wrong: int = Field(4, ge=0)
    ig_steps: int = Field(32, ge=2)
    ig_delta_threshold: float = Field(0.05, gt=0)  # warn when IG misses completeness by more
    n_samples: int = Field(16, ge=1)  # noisy samples for gradient_shap / smoothgrad
    batch_size: int = Field(16, ge=1)  # images per explain() call
    device: Literal["auto", "cpu", "cuda"] = "auto"
    sanity_check: bool = True  # cascading model-parameter randomisation test
    cascade_steps: int = Field(5, ge=2)  # top stages randomised one by one, then all of them
    faithfulness_steps: int = Field(16, ge=0)  # deletion/insertion curve points - 1; 0 = off
    localisation: bool = True  # pointing game over every correct case with a mask
    pointing_tolerance: int | None = Field(None, ge=0)  # px; None: 15 px at 224 px, scaled (Zhang et al.)
    gradcam_stride: int | None = Field(16, ge=1)  # deepest block at this output stride; None: feature_layer
    export_nifti: bool = True  # 3D maps as NIfTI in the scan's space


class PrivacyConfig(_Strict):
    reveal_ids: bool = False


class Config(_Strict):
    """A whole run. Unknown keys anywhere are errors."""

    name: str = "run"
    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    cv: CVConfig = Field(default_factory=CVConfig)
    evaluate: EvalConfig = Field(default_factory=EvalConfig)
    explain: ExplainConfig = Field(default_factory=ExplainConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    adapt: DomainAdaptConfig = Field(default_factory=DomainAdaptConfig)
    tracking: Literal["none", "mlflow"] = "none"

    def resolved_data_path(self) -> Path:
        return Path(expand_path(self.data.path))

    def resolved_labels_path(self) -> Path | None:
        return Path(expand_path(self.data.labels.csv)) if self.data.labels else None


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
            node[parts[-1]] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"Override '{item}': cannot parse value {value!r} ({exc}).") from exc
    return raw


def _format_validation(err: ValidationError, source: str) -> str:
    lines = [f"Invalid config {source}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            model = _model_at(e["loc"][:-1])
            valid = sorted(model.model_fields) if model else []
            hint = did_you_mean(str(e["loc"][-1]), valid)
            lines.append(f"  - unknown key '{loc}'.{hint} Valid keys here: {', '.join(valid)}.")
        elif e["type"] == "missing":
            lines.append(f"  - missing required key '{loc}'.")
        else:
            got = e.get("input")
            lines.append(f"  - '{loc}': {e['msg']}. Got {got!r}.")
    lines.append("Fix the YAML file or the --set override named above.")
    return "\n".join(lines)


def _model_at(loc: tuple) -> type[BaseModel] | None:
    model: type[BaseModel] = Config
    for part in loc:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None) if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    return model


def load_config(source: str | Path | dict, overrides: list[str] | None = None) -> Config:
    """Load and validate a config from a YAML file (or a dict), then apply overrides."""
    if isinstance(source, dict):
        raw, label = json.loads(json.dumps(source)), "(dict)"
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"Config file '{path}' does not exist. Shipped configs live in configs/, "
                              "e.g. configs/breastmnist.yaml.")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"Config file '{path}' is not valid YAML: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"Config file '{path}' must hold a mapping at the top level.")
        label = f"'{path}'"
    raw = apply_overrides(raw, overrides)
    try:
        return Config.model_validate(raw)
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
