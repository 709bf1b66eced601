"""Typed run configuration: YAML in ``configs/``, dotted ``--set`` overrides, clear errors.

Example:
    >>> cfg = load_config("configs/breastmnist.yaml", overrides=["train.epochs=2"])
    >>> cfg.train.epochs
    2

Data paths may use ``${MEDTL_SHARED_DATA}`` (default ``../shared/datasets``, resolved
against the current directory) so the same shipped configs work in CI and for users.

A config is checked once, when it is loaded: field types and bounds by pydantic, then the
rules that span several fields (``medtl.config._rules``, e.g. ``cv.scheme: nested`` needs a ``cv.grid``)
on the whole :class:`Config`. Every problem is reported at once, as a :class:`ConfigError`
naming the key, the value received, what is valid and what to do. The section models
(:class:`TrainConfig`, :class:`IntensityConfig`, ...) stay plain parameter records when built
on their own; the functions that take them check their own parameters.

The package: ``_choices`` (each set of choices spelled once, as a ``Literal`` alias with a tuple
beside it: ``DEVICES``, ``CV_SCHEMES``, ``EXPLAIN_METHODS``, ...), ``_memory`` (``data.memory_budget``),
``_schema`` (the section models and ``Config``), ``_rules`` (checks across keys), ``_loading``
(YAML, overrides, errors, the hash) and ``_reference`` (:func:`config_reference_markdown` writes
``docs/config.md`` from the schema). Import the public names from ``medtl.config``.
"""

from __future__ import annotations

from medtl.config._choices import (  # noqa: F401  (the Literal aliases are importable too)
    AMP_MODES,
    AUGMENT_BACKENDS,
    CALIBRATIONS,
    CHANNEL_MAPPINGS,
    COMPILE_MODES,
    CONVERSIONS_3D,
    CT_WINDOWS,
    CV_SCHEMES,
    DA_METHODS,
    DATA_FORMATS,
    DATA_SPLITS,
    DEVICES,
    EXPLAIN_METHODS,
    INTENSITY_MODES,
    ON_ERROR,
    PROBE_HEADS,
    REGRESSION_LOSSES,
    SCHEDULERS,
    SELECT_METRICS,
    STRATEGIES,
    THRESHOLD_RULES,
    TRACKERS,
    WEIGHT_LAYOUTS,
    WINDOW_PRESETS,
    AmpMode,
    AugmentBackend,
    Calibration,
    ChannelMapping,
    CompileMode,
    Conversion3D,
    CVScheme,
    DAMethod,
    DataFormat,
    DataSplit,
    Device,
    ExplainMethod,
    IntensityMode,
    OnError,
    ProbeHead,
    Scheduler,
    SelectMetric,
    StrategyName,
    ThresholdRule,
    Tracker,
    WeightLayout,
    WindowPreset,
)
from medtl.config._loading import apply_overrides, config_hash, config_yaml, dump_config, load_config
from medtl.config._recipes import fill_recipe, register_recipe_lookup
from medtl.config._memory import (
    MAX_BOOTSTRAP,
    MAX_CONFIG_BYTES,
    MAX_IMAGE_SIDE,
    MAX_YAML_NODES,
    available_memory,
    format_bytes,
    memory_budget_bytes,
    parse_bytes,
)
from medtl.config._reference import config_reference_markdown
from medtl.config._rules import rule_descriptions
from medtl.config._schema import (
    AugmentConfig,
    Config,
    CVConfig,
    DataConfig,
    DomainAdaptConfig,
    EvalConfig,
    ExplainConfig,
    IntensityConfig,
    LabelsConfig,
    ModelConfig,
    PrivacyConfig,
    StrategyConfig,
    TaskConfig,
    TrainConfig,
    WindowSpec,
    _models_in,  # noqa: F401  (tests walk the schema with it)
    expand_path,
    shared_data_dir,
)

__all__ = [
    "Config",
    "fill_recipe",
    "register_recipe_lookup",
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
    "TaskConfig",
    "load_config",
    "apply_overrides",
    "config_hash",
    "config_yaml",
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
    "REGRESSION_LOSSES",
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
