"""Rules that span several config keys, checked whenever a ``Config`` is validated."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator

from pydantic import (
    ValidationError,
)

from medtl.config._choices import WINDOW_PRESETS
from medtl.config._memory import _budget_text, format_bytes, memory_budget_bytes
from medtl.config._schema import _CHECKS, Config, _dotted_keys, _models_in, search_value
from medtl.errors import did_you_mean

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
    a `cv.grid` (or `cv.search: optuna`), and a grid needs `nested` (it wraps any trainer,
    `linear_probe` included).
    """
    cv = cfg.cv
    if cv.scheme != "repeated" and cv.n_repeats != 1:
        yield (f"cv.n_repeats={cv.n_repeats} only applies to cv.scheme=repeated. Got cv.scheme={cv.scheme} "
               "instead. Set cv.scheme=repeated or drop cv.n_repeats.")
    if cv.scheme == "repeated" and cv.n_repeats < 2:
        yield (f"The 'n_repeats' parameter of cv.scheme=repeated must be an int >= 2. Got {cv.n_repeats} instead. "
               "Set e.g. cv.n_repeats=3, or use cv.scheme=kfold.")
    if cv.scheme == "nested" and cv.search == "grid" and not cv.grid:
        yield ("cv.scheme=nested needs a cv.grid, e.g. `--set 'cv.grid={\"train.lr\": [3e-4, 1e-3]}'` (or "
               "cv.search=optuna with a cv.search_space). Got an empty grid. Without a grid there is nothing for the "
               "inner loop to choose; use cv.scheme=kfold.")
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


def _grid_key_problem(key: str, label: str = "cv.grid key") -> str | None:
    """Why ``key`` cannot be a nested-CV grid key (or, with ``label``, a search-space key), or ``None``."""
    parts = key.split(".")
    if parts[0] not in _GRID_SECTIONS:
        section = parts[0] if parts[0] in Config.model_fields else None
        if section is None:
            hint = did_you_mean(key, _dotted_keys())
            return (f"{label} '{key}' is not a config key.{hint} Grid keys are dotted keys under "
                    f"{', '.join(_GRID_SECTIONS)}, e.g. 'train.lr'.")
        return (f"{label} '{key}' cannot be searched: the inner CV reuses the decoded images and the "
                f"outer scoring settings, so only keys under {', '.join(_GRID_SECTIONS)} take effect. Got a key "
                f"under '{section}'.")
    anns: list = [Config]
    for depth, part in enumerate(parts):
        models = [m for a in anns for m in _models_in(a)]
        if not models:
            return (f"{label} '{key}' goes below '{'.'.join(parts[:depth])}', which is a value, not a "
                    f"section. Use '{'.'.join(parts[:depth])}'.")
        anns = [m.model_fields[part].annotation for m in models if part in m.model_fields]
        if not anns:
            prefix = ".".join(parts[:depth])
            valid = sorted({f for m in models for f in m.model_fields})
            hint = did_you_mean(key, [f"{prefix}.{f}" if prefix else f for f in valid])
            return (f"{label} '{key}' is not a config key.{hint} Valid keys under '{prefix}': "
                    f"{', '.join(valid)}.")
    if any(_models_in(a) for a in anns):
        model = next(m for a in anns for m in _models_in(a))
        return (f"{label} '{key}' names a section, not a value. Name a key inside it, e.g. "
                f"'{key}.{next(iter(model.model_fields))}'.")
    return None


@_rule
def _search(cfg: Config) -> Iterator[str]:
    """`cv.search: optuna` needs `cv.scheme: nested` and a `cv.search_space` (not a `cv.grid`), and
    a search space needs `optuna`. Each dimension names a `train.*`, `model.*` or `adapt.*` key
    once; `float` and `int` take `low` < `high` (integers for `int`; `log` needs `low` > 0) and
    no `choices`; `categorical` takes `choices` and no range.
    """
    cv = cfg.cv
    if cv.search == "optuna":
        if cv.scheme != "nested":
            yield (f"cv.search=optuna searches inside the inner folds of nested CV. Got cv.scheme={cv.scheme}. "
                   "Set cv.scheme=nested.")
        if not cv.search_space:
            yield ("cv.search=optuna needs a cv.search_space, e.g. `--set 'cv.search_space=[{key: train.lr, kind: "
                   "float, low: 1e-5, high: 1e-2, log: true}]'`. Got an empty list.")
        if cv.grid:
            yield (f"cv.grid is the search space of cv.search=grid; with cv.search=optuna give cv.search_space "
                   f"instead. Got a grid over {sorted(cv.grid)}. Drop the grid (--set 'cv.grid={{}}').")
    elif cv.search_space:
        yield (f"cv.search_space only applies to cv.search=optuna. Got cv.search={cv.search}. Set "
               "cv.search=optuna, or drop the search space (--set 'cv.search_space=[]').")
    keys = [p.key for p in cv.search_space]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        yield f"cv.search_space must name each key once. Got {keys} ({', '.join(repeated)} repeated)."
    for p in cv.search_space:
        problem = _grid_key_problem(p.key, "cv.search_space key")
        if problem:
            yield problem
        where = f"cv.search_space '{p.key}' (kind {p.kind})"
        if p.kind == "categorical":
            if not p.choices or p.low is not None or p.high is not None or p.log:
                yield (f"{where} takes `choices` and no low/high/log. Got choices={p.choices!r}, low={p.low!r}, "
                       f"high={p.high!r}, log={p.log}. Set e.g. choices: [false, true].")
            continue
        if p.choices is not None or p.low is None or p.high is None:
            yield (f"{where} takes `low` and `high` and no choices. Got low={p.low!r}, high={p.high!r}, "
                   f"choices={p.choices!r}. Set e.g. low: 1e-5, high: 1e-2.")
            continue
        if not p.low < p.high:
            yield f"{where}: low must be below high. Got low={p.low}, high={p.high} instead."
        if p.kind == "int" and not (float(p.low).is_integer() and float(p.high).is_integer()):
            yield f"{where}: low and high must be integers. Got low={p.low}, high={p.high} instead."
        if p.log and p.low <= 0:
            yield f"{where}: log: true needs low > 0. Got low={p.low} instead."


def _search_values(cfg: Config) -> Iterator[tuple[str, str, object]]:
    """``(label, key, config value)`` of every value the config's grid or search space may set."""
    for key in sorted(cfg.cv.grid):
        for value in cfg.cv.grid[key]:
            yield f"cv.grid['{key}']", key, search_value(key, value)
    for p in cfg.cv.search_space:
        for value in (p.choices if p.kind == "categorical" else [p.low, p.high]):
            yield f"cv.search_space '{p.key}'", p.key, p.config_value(int(value) if p.kind == "int" else value)


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


@_rule
def _tasks(cfg: Config) -> Iterator[str]:
    """`tasks`: distinct names; the first (primary) task is `binary` or `multiclass`; `multilabel`
    takes `columns`, the other kinds one `column`; `class_names` only for `binary` (2) and
    `multiclass`; a fine-tuning strategy, `adapt.method: none` and a manifest or label CSV (not
    `medmnist`); `train.task_weighting: uncertainty` needs `tasks`.
    """
    tasks = cfg.tasks or []
    if not tasks:
        if cfg.train.task_weighting != "fixed":
            yield (f"train.task_weighting={cfg.train.task_weighting} weighs the losses of several tasks, but the "
                   "config has no tasks. Add a tasks list, or set train.task_weighting=fixed.")
        return
    names = [t.name for t in tasks]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        yield f"tasks must have distinct names. Got {names} ({', '.join(repeated)} repeated). Rename the repeats."
    if tasks[0].kind not in ("binary", "multiclass"):
        yield (f"The first task is the primary one (it stratifies the folds and picks the epoch), so it must be "
               f"binary or multiclass. Got tasks[0] '{tasks[0].name}' of kind {tasks[0].kind}. Move a binary or "
               "multiclass task first.")
    for i, t in enumerate(tasks):
        where = f"tasks[{i}] '{t.name}' (kind {t.kind})"
        if t.kind == "multilabel":
            if not t.columns or t.column is not None:
                yield (f"{where} takes `columns` (one manifest column per label), not `column`. Got column="
                       f"{t.column!r}, columns={t.columns!r}. Set e.g. columns: [effusion, oedema].")
            elif len(set(t.columns)) != len(t.columns):
                yield f"{where} names a column twice in columns={t.columns}. Give each column once."
        elif t.column is None or t.columns is not None:
            yield (f"{where} takes one `column`, not `columns`. Got column={t.column!r}, columns={t.columns!r}. "
                   "Set e.g. column: Age.")
        if t.class_names is not None:
            if t.kind not in ("binary", "multiclass"):
                yield f"{where}: class_names apply to binary and multiclass tasks only. Drop them."
            elif t.kind == "binary" and len(t.class_names) != 2:
                yield (f"{where}: a binary task has 2 class_names. Got {t.class_names}. Use kind multiclass for "
                       "more classes.")
            elif len(set(t.class_names)) != len(t.class_names):
                yield f"{where}: class_names must be distinct. Got {t.class_names}."
        for key in ("loss", "refit"):
            if getattr(t, key) is not None and t.kind != "regression":
                yield (f"{where}: {key}={getattr(t, key)} applies to regression tasks only (classification heads are "
                       f"trained with cross-entropy and kept as trained). Drop {key}.")
    first = tasks[0]
    if cfg.data.class_names and first.class_names and list(cfg.data.class_names) != list(first.class_names):
        yield (f"data.class_names={list(cfg.data.class_names)} and tasks[0].class_names={list(first.class_names)} "
               "disagree; the primary task's class_names replace data.class_names. Keep one of them.")
    if cfg.data.format == "medmnist":
        yield ("tasks need label columns in a manifest or label CSV; data.format=medmnist has one label. Use "
               "data.format=manifest (or folder with data.labels) with one column per task.")
    if cfg.train.strategy.name == "linear_probe":
        yield ("tasks train one encoder with several heads, which train.strategy.name=linear_probe (one "
               "scikit-learn head) does not do. Pick a fine-tuning strategy (finetune, llrd, partial, ...).")
    if cfg.adapt.method != "none":
        yield (f"adapt.method={cfg.adapt.method} is not supported with tasks (its losses assume one "
               "classifier). Set adapt.method=none, or drop the tasks.")


@_rule
def _continual(cfg: Config) -> Iterator[str]:
    """`continual.methods` and `continual.sites` name each entry once."""
    c = cfg.continual
    for key, values in (("methods", c.methods), ("sites", c.sites or [])):
        repeated = sorted({v for v in values if values.count(v) > 1})
        if repeated:
            yield (f"continual.{key} must name each entry once. Got {list(values)} ({', '.join(repeated)} repeated). "
                   "Drop the repeats.")


@_rule
def _ensemble(cfg: Config) -> Iterator[str]:
    """`train.ensemble_folds` or `train.ensemble_seeds` > 1 needs a fine-tuning strategy (not `linear_probe`),
    `ensemble_folds` also no `tasks`; the two do not combine."""
    for key, k in (("ensemble_folds", cfg.train.ensemble_folds), ("ensemble_seeds", cfg.train.ensemble_seeds)):
        if k <= 1:
            continue
        if cfg.tasks and key == "ensemble_folds":
            yield (f"train.{key}={k} averages the class probabilities of one classifier per member; multi-task "
                   f"runs (tasks) are not supported. Set train.{key}=1, or drop the tasks.")
        if cfg.train.strategy.name == "linear_probe":
            why = ("trains one model per fold, but a linear probe fits its head on the training and selection cases "
                   "together, so every member would be the same probe on the whole train split"
                   if key == "ensemble_folds" else
                   "trains one model per seed, but a linear probe on frozen features is the same probe whatever the "
                   "seed")
            yield (f"train.{key}={k} {why}. Pick a fine-tuning strategy (finetune, llrd, partial, ...), or "
                   f"train.{key}=1.")
    if cfg.train.ensemble_folds > 1 and cfg.train.ensemble_seeds > 1:
        yield (f"train.ensemble_folds={cfg.train.ensemble_folds} and train.ensemble_seeds={cfg.train.ensemble_seeds} "
               "are two kinds of ensemble; a run builds one. Set one of them to 1.")


# -- checks after the rules: grid values (once the keys are sound), optional packages -------
def _grid_value_problems(cfg: Config) -> Iterator[str]:
    """Every `cv.grid` value (and `cv.search_space` bound or choice) is valid for its key: the
    config with that value applied passes every check.
    """
    for label, key, value in _search_values(cfg):
        raw = cfg.model_dump()
        raw["cv"].update(scheme="kfold", grid={}, search="grid", search_space=[], n_repeats=1)
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
                yield f"{label} value {value!r} is not valid: {why}"


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
    """`tracking: mlflow` needs the `mlflow` package (`pip install 'medtl[tracking]'`) and
    `cv.search: optuna` the `optuna` package (`pip install 'medtl[search]'`); checked on load, not
    after training.
    """
    problems = []
    if cfg.tracking == "mlflow" and not _module_available("mlflow"):
        problems.append("tracking=mlflow needs the 'mlflow' package, which is not installed. Install it with "
                        "pip install 'medtl[tracking]' (or mlflow-skinny), or set tracking=none.")
    if cfg.cv.search == "optuna" and not _module_available("optuna"):
        problems.append(OPTUNA_MISSING)
    return problems


#: the one message for a missing Optuna (on config load, and from ``medtl.workflows.search`` when used)
OPTUNA_MISSING = ("cv.search=optuna needs the 'optuna' package, which is not installed. Install it with "
                  "pip install 'medtl[search]' (or pip install 'optuna>=3'), or set cv.search=grid.")


def check_all(cfg: Config, context: dict) -> list[str]:
    """Every rule in ``_RULES``, then the grid values, the memory budget and (unless the context
    says ``check_dependencies: False``) the optional packages."""
    problems = [p for rule in _RULES for p in rule(cfg)]
    if not problems and (cfg.cv.grid or cfg.cv.search_space):
        problems = list(_grid_value_problems(cfg))
    problems += _memory_problems(cfg, machine=context.get("check_dependencies", True))
    if context.get("check_dependencies", True):
        problems += _dependency_problems(cfg)
    return problems


_CHECKS.append(check_all)
