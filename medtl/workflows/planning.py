"""The planning rules of ``medtl auto``: from a data fingerprint, encoder scores and timings to a config.

Every rule is a plain function of what it is given (a :class:`~medtl.data.fingerprint.Fingerprint`,
ranking rows, :class:`Timing` measurements, a budget in seconds): no file is read, no network
is built, so each rule is tested on its own. :func:`plan_run` applies them in order and returns
a :class:`Plan`: the config (a nested dict that ``load_config`` accepts), the reason for every
value it chose (the comments of ``plan.yaml``) and the time it expects each stage to take.
The rules, in the order :func:`plan_run` applies them (their constants are module-level names;
docs/auto.md explains each):

1. **Evaluation** (:func:`choose_evaluation`): the official train/val/test split when the data
   has one (``medtl train``); otherwise patient-grouped stratified k-fold CV (``medtl cv``) with
   ``MAX_FOLDS`` folds, fewer when the smallest class has fewer patients.
2. **Intensity** (:func:`choose_intensity`): 8-bit images keep their scale (``range`` 0-255);
   CT in Hounsfield units becomes three standard windows as three channels (``multiwindow``:
   lung, mediastinum, bone), which assumes nothing about the task; anything else is scaled per
   image between its 1st and 99th percentiles.
3. **Input size** (:func:`preferred_side`): small images are upsampled to ``MIN_SIDE_2D`` (an
   ImageNet encoder downsamples 32x, so 128 px leave a 4x4 feature map), large ones resized
   down to at most ``MAX_SIDE_2D``; volumes keep their native side, at most ``MAX_SIDE_3D``.
4. **Encoder** (:func:`choose_encoder`): the candidate with the highest quick linear-probe AUC
   of ``medtl rank`` (out-of-fold, on train + val only: the metric the run is judged by), the
   cheapest training step among those within ``SCORE_TIE`` of it. LogME and LEEP are shown beside it.
5. **Recipe** (:func:`recipe_overrides`): the encoder's weight record may carry a training recipe
   (``WeightRecord.recipe``); its values are used where the user's config leaves a key unset.
6. **Batch size** (:func:`choose_batch_size`): the largest of 32, 16, 8 that gives at least
   ``MIN_STEPS`` steps per epoch.
7. **Probe or fine-tune, size, epochs and folds** (:func:`fit_budget`): a linear probe (frozen
   features, a scikit-learn head) when the data is tiny (fewer than ``TINY_TRAIN_CASES``
   training cases or ``TINY_PATIENTS`` patients in the smallest class); otherwise fine-tuning
   with the most epochs (up to the target) that fit the budget, measured by the timing probe:
   first at the preferred size with at least ``KEEP_EPOCHS`` of the target, then at smaller
   sizes (``LADDER_2D`` / ``LADDER_3D``), then with as few as ``MIN_EPOCHS``, then with
   ``MIN_FOLDS`` folds; when nothing fits, the linear probe.
8. **Seed ensemble** (:func:`seed_members`): when the full target of epochs fits and the budget
   holds two or more such runs, every model becomes a seed ensemble (``train.ensemble_seeds``)
   of as many fine-tunes as fit, at most ``MAX_SEED_MEMBERS``: on small data one fine-tune's
   test AUC moves by a few points with the seed, and the mean of several removes most of that.

Every time estimate is multiplied by ``SAFETY`` (another job on the machine, a slow first epoch).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import yaml

from medtl.config import TrainConfig
from medtl.data.fingerprint import Fingerprint
from medtl.errors import DataError

__all__ = ["DEFAULT_BUDGET_MIN", "Plan", "Timing", "choose_batch_size", "choose_encoder", "choose_evaluation",
           "choose_intensity", "estimate_seconds", "fit_budget", "is_tiny", "plan_run", "plan_yaml",
           "preferred_side", "recipe_overrides", "seed_members", "side_ladder"]

DEFAULT_BUDGET_MIN = 20.0  # minutes: planning, decoding, training and evaluation together
MAX_FOLDS = 5              # CV folds when the data allows
MIN_FOLDS = 3              # fewer folds are tried before giving up fine-tuning
TARGET_EPOCHS = 20         # fine-tuning epochs without a recipe (train.epochs' default)
MIN_EPOCHS = 5             # fewer epochs than this: the linear probe instead
KEEP_EPOCHS = 0.6          # share of the target epochs kept before a smaller input size is tried
MIN_SIDE_2D = 128          # images smaller than this are upsampled to it
MAX_SIDE_2D = 224          # larger images are resized down to it (the ImageNet weights' training size)
MAX_SIDE_3D = 64           # volumes larger than this are resized down to it
LADDER_2D = (64, 96, 128, 160, 192, 224)  # input sides tried when the preferred one does not fit
LADDER_3D = (16, 24, 32, 48, 64)
TINY_TRAIN_CASES = 100     # fewer training cases: linear probe
TINY_PATIENTS = 20         # fewer patients in the smallest class: linear probe
SCORE_TIE = 0.01           # probe AUCs this close count as a tie, broken by the cheaper training step
MIN_STEPS = 8              # training steps per epoch the batch size should leave
EVAL_BATCH = 64            # images per forward pass when predicting (as the training loop does)
SAFETY = 1.2               # every time estimate is multiplied by this
OVERHEAD_S = 20.0          # per run: building models, bootstrap CIs, plots, writing files
FOLD_OVERHEAD_S = 5.0      # per fold: model build, checkpoint, threshold and calibration
MAX_SEED_MEMBERS = 5       # the most fine-tunes a spare budget turns into a seed ensemble


@dataclass(frozen=True)
class Timing:
    """One timing-probe measurement on this machine.

    Attributes:
        encoder: the encoder (weight record or timm name).
        side: the input side in pixels (``(B, C, side, side)`` or ``(B, C, side, side, side)``).
        batch_size: images per training step.
        train_step_s: seconds of one training step: augmentation, forward, backward and AdamW update.
        eval_batch_s: seconds of one forward pass over ``EVAL_BATCH`` images, without gradients.
    """

    encoder: str
    side: int
    batch_size: int
    train_step_s: float
    eval_batch_s: float


@dataclass
class Plan:
    """What ``medtl auto`` will run, and why.

    Attributes:
        workflow: ``"train"`` (official split) or ``"cv"`` (patient-grouped cross-validation).
        config: the config as a nested dict (``load_config`` accepts it; ``plan.yaml`` is its YAML).
        reasons: dotted key -> why that value was chosen (the comment above it in ``plan.yaml``).
        estimate: expected seconds per stage (``decode``, ``features``, ``training``, ``evaluation``,
            ``overhead``, ``total``), safety factor included.
        mode: ``"finetune"`` or ``"probe"``.
        notes: what else the user should know (the budget is too small, a rule could not apply, ...).
        timings: every timing-probe measurement used.
    """

    workflow: str
    config: dict
    reasons: dict[str, str]
    estimate: dict[str, float]
    mode: str
    notes: list[str] = field(default_factory=list)
    timings: list[Timing] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"workflow": self.workflow, "mode": self.mode, "config": self.config, "reasons": self.reasons,
                "estimate_s": self.estimate, "notes": self.notes, "timings": [asdict(t) for t in self.timings]}


# -- the rules ---------------------------------------------------------------------------
def choose_evaluation(fp: Fingerprint) -> tuple[str, int, str]:
    """``(workflow, folds, reason)``: ``("train", 1, ...)`` on an official split, else ``("cv", k, ...)``.

    Raises:
        DataError: a class with fewer than 2 patients (no grouped split can test it).

    Example:
        >>> choose_evaluation(fp)[:2]          # doctest: +SKIP
        ('train', 1)
    """
    if fp.has_official_split:
        s = fp.splits
        return "train", 1, (f"the data has an official split ({s['train']} train / {s['val']} val / {s['test']} "
                            "test): train on train, pick the epoch on val, report on test once")
    least = fp.min_patients_per_class
    if least < 2:
        small = [k for k, v in fp.patients_per_class.items() if v == least]
        raise DataError(f"Class {small[0]!r} has {least} patient; patient-grouped cross-validation needs at "
                        "least 2 patients per class. Add cases of that class, or give an official split (a "
                        "manifest 'split' column with train/val/test).")
    k = min(MAX_FOLDS, least)
    why = f"{MAX_FOLDS} folds" if k == MAX_FOLDS else f"{k} folds: the smallest class has {least} patients"
    return "cv", k, (f"no official split: patient-grouped stratified {why} ({fp.n_patients} patients, at most "
                     f"{fp.max_cases_per_patient} case(s) each, never split across folds)")


def choose_intensity(fp: Fingerprint) -> tuple[dict, str]:
    """``(data.intensity, reason)`` from the value range the fingerprint sampled."""
    lo, hi = fp.value_range
    if fp.is_8bit:
        return {"mode": "range", "vmin": 0, "vmax": 255}, (
            f"8-bit images (sampled values {lo:g}..{hi:g}): the fixed 0-255 scale keeps brightness comparable "
            "across images")
    if fp.is_hu:
        return {"mode": "multiwindow", "windows": ["lung", "mediastinum", "bone"]}, (
            f"CT in Hounsfield units (sampled {lo:g}..{hi:g} HU): three standard windows as three channels, "
            "which assumes nothing about the task")
    return {"mode": "percentile", "lower": 1.0, "upper": 99.0}, (
        f"{fp.modality} values {lo:g}..{hi:g} on no fixed scale: each image scaled between its 1st and 99th "
        "percentiles")


def preferred_side(fp: Fingerprint) -> tuple[int, str]:
    """``(side, reason)``: the input side the plan aims for before the budget is considered."""
    native = max(fp.shape) if fp.shape else MIN_SIDE_2D
    size = "x".join(map(str, fp.shape))
    if fp.spatial_dims == 3:
        side = min(native, MAX_SIDE_3D)
        return side, (f"volumes of {size} voxels (median): " + (
            "kept at their native side" if side == native else f"resized down to {side} per axis (CPU cost)"))
    if native < MIN_SIDE_2D:
        return MIN_SIDE_2D, (f"{size} px images (median) upsampled to {MIN_SIDE_2D} px: ImageNet encoders "
                             f"downsample 32x, so {MIN_SIDE_2D} px leave a {MIN_SIDE_2D // 32}x{MIN_SIDE_2D // 32} "
                             "feature map")
    side = min(native, MAX_SIDE_2D)
    return side, f"{size} px images (median)" + (
        "" if side == native else f" resized down to {side} px, the ImageNet weights' training size")


def side_ladder(preferred: int, spatial_dims: int) -> list[int]:
    """The input sides tried, largest first: the preferred one, then the ladder's smaller ones."""
    ladder = LADDER_3D if spatial_dims == 3 else LADDER_2D
    return [preferred] + [s for s in sorted(ladder, reverse=True) if s < preferred]


def choose_encoder(rows: list[dict], timings: dict[str, Timing]) -> tuple[str, str]:
    """``(encoder, reason)`` from ``medtl rank`` rows and each candidate's timing at the preferred side.

    The highest ``probe_auc`` wins; candidates within ``SCORE_TIE`` of it are a tie, won by the
    cheapest training step (more epochs fit the budget). Rows without a probe AUC fall back to LogME.
    """
    if not rows:
        raise ValueError("The 'rows' parameter of choose_encoder must hold at least one ranking row. Got [] "
                         "instead.")
    scored = [r for r in rows if r.get("probe_auc") is not None and not math.isnan(r["probe_auc"])]
    key = "probe_auc" if scored else "logme"
    scored = scored or rows
    best = max(r[key] for r in scored)
    tied = [r for r in scored if r[key] >= best - SCORE_TIE]

    def cost(r: dict) -> float:
        t = timings.get(r["encoder"])
        return t.train_step_s if t is not None else math.inf

    pick = min(tied, key=lambda r: (cost(r), -r[key]))
    what = "linear-probe AUC" if key == "probe_auc" else "LogME"
    others = ", ".join(f"{r['encoder']} {r[key]:.3f}" for r in sorted(scored, key=lambda r: -r[key])
                       if r is not pick)
    why = f"best {what} of the candidates on train+val ({pick[key]:.3f}; {others or 'no other candidate'})"
    if len(tied) > 1:
        why += f"; within {SCORE_TIE} of the best, the cheapest training step"
    if pick["encoder"] in timings:
        t = timings[pick["encoder"]]
        why += f" ({t.train_step_s:.2f} s per batch of {t.batch_size} at {t.side} px)"
    return pick["encoder"], why


def recipe_overrides(record: Any) -> dict[str, Any]:
    """The training recipe a weight record carries, as dotted config keys (``{"train.lr": 3e-4, ...}``).

    ``record.recipe`` is a :class:`medtl.models.records.Recipe` (its ``settings``), a mapping (nested
    sections or dotted keys; a bare key such as ``lr`` means ``train.lr``) or an object with
    ``to_dict()``; a record without one gives ``{}``.
    """
    recipe = getattr(record, "recipe", None)
    if not recipe:
        return {}
    if hasattr(recipe, "settings"):  # medtl.models.Recipe: dotted settings and the evidence behind them
        recipe = recipe.settings
    elif hasattr(recipe, "to_dict"):
        recipe = recipe.to_dict()
    elif hasattr(recipe, "__dataclass_fields__"):
        recipe = asdict(recipe)
    out: dict[str, Any] = {}

    def walk(node: dict, prefix: str) -> None:
        for k, v in node.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict) and k not in ("grid",):
                walk(v, f"{key}.")
            elif v is not None:
                out[key if "." in key else f"train.{key}"] = v

    walk(dict(recipe), "")
    return out


def choose_batch_size(n_train: int) -> tuple[int, str]:
    """``(batch_size, reason)``: the largest of 32, 16, 8 leaving at least ``MIN_STEPS`` steps per epoch."""
    for bs in (32, 16, 8):
        if n_train // bs >= MIN_STEPS:
            return bs, f"{n_train // bs} steps per epoch over {n_train} training cases"
    return 8, f"{n_train} training cases: the smallest batch (8) for the most steps per epoch"


def is_tiny(fp: Fingerprint, n_train: int) -> str | None:
    """Why the data is too small to fine-tune on (the linear probe then), or ``None``."""
    if n_train < TINY_TRAIN_CASES:
        return f"{n_train} training cases (fewer than {TINY_TRAIN_CASES})"
    if fp.min_patients_per_class < TINY_PATIENTS:
        return f"{fp.min_patients_per_class} patients in the smallest class (fewer than {TINY_PATIENTS})"
    return None


def split_sizes(fp: Fingerprint, workflow: str, folds: int, val_fraction: float = 0.2) -> dict[str, int]:
    """Cases per fold: ``train`` (fitted), ``val`` (epoch choice), ``test`` (scored)."""
    if workflow == "train":
        return {k: fp.splits.get(k, 0) for k in ("train", "val", "test")}
    test = fp.n_cases // folds
    val = int(round((fp.n_cases - test) * val_fraction))
    return {"train": fp.n_cases - test - val, "val": val, "test": test}


def estimate_seconds(fp: Fingerprint, *, mode: str, workflow: str, folds: int, timing: Timing, epochs: int,
                     batch_size: int, tta: bool, val_fraction: float = 0.2) -> dict[str, float]:
    """Expected seconds per stage of the run, ``SAFETY`` included (``total`` is their sum).

    Fine-tuning: ``folds x epochs`` x (the training steps of an epoch + the validation forward
    passes, doubled by flip TTA) + per fold the test and validation predictions. Probe: one
    forward pass over every case. Both: decoding (the fingerprint's read time per file) and
    ``OVERHEAD_S`` + ``FOLD_OVERHEAD_S`` per fold.
    """
    n = split_sizes(fp, workflow, folds, val_fraction)
    passes = 2 if tta else 1
    batches = lambda k: math.ceil(k / EVAL_BATCH)  # noqa: E731
    est = {"decode": fp.seconds_per_image * fp.n_cases, "features": 0.0, "training": 0.0, "evaluation": 0.0,
           "overhead": OVERHEAD_S + FOLD_OVERHEAD_S * folds}
    if mode == "probe":
        est["features"] = batches(fp.n_cases) * timing.eval_batch_s * passes
    else:
        steps = max(1, n["train"] // batch_size)
        per_epoch = steps * timing.train_step_s + batches(n["val"]) * timing.eval_batch_s * passes
        est["training"] = folds * epochs * per_epoch
        est["evaluation"] = folds * batches(n["val"] + n["test"]) * timing.eval_batch_s * passes
    est = {k: round(v * SAFETY, 1) for k, v in est.items()}
    est["total"] = round(sum(est.values()), 1)
    return est


def fit_budget(fp: Fingerprint, *, workflow: str, folds: int, sides: list[int], target_epochs: int,
               batch_size: int, tta: bool, available_s: float, timing: Callable[[int], Timing],
               val_fraction: float = 0.2) -> tuple[str, int, int, int, str]:
    """``(mode, side, epochs, folds, reason)``: the largest fine-tuning run that fits ``available_s``.

    Tried in order, each over ``sides`` from largest to smallest: at least ``KEEP_EPOCHS`` of
    ``target_epochs``, then at least ``MIN_EPOCHS``; for CV the same again with ``MIN_FOLDS`` folds.
    ``timing(side)`` measures (or looks up) one side; it is called only for the sides tried.
    Nothing fits: ``("probe", sides[0], 0, folds, reason)``.
    """
    keep = max(MIN_EPOCHS, math.ceil(KEEP_EPOCHS * target_epochs))
    fold_options = [folds] + ([MIN_FOLDS] if workflow == "cv" and folds > MIN_FOLDS else [])
    for k in fold_options:
        for floor in (keep, MIN_EPOCHS):
            for side in sides:
                t = timing(side)
                one = estimate_seconds(fp, mode="finetune", workflow=workflow, folds=k, timing=t, epochs=1,
                                       batch_size=batch_size, tta=tta, val_fraction=val_fraction)
                fixed = one["total"] - one["training"]
                fits = int((available_s - fixed) // one["training"]) if one["training"] > 0 else target_epochs
                if fits >= floor:
                    epochs = min(fits, target_epochs)
                    why = (f"{epochs} epochs at {side} px" + (f" on each of {k} folds" if workflow == "cv" else "")
                           + f": {one['training']:.0f} s per epoch{' per fold' if workflow == 'cv' else ''} "
                           f"measured here ({t.train_step_s:.2f} s per batch of {t.batch_size}, safety x{SAFETY})")
                    if epochs < target_epochs:
                        why += f"; the target of {target_epochs} epochs does not fit {available_s / 60:.1f} min"
                    return "finetune", side, epochs, k, why
    t = timing(sides[-1])
    return "probe", sides[0], 0, folds, (
        f"fine-tuning {MIN_EPOCHS} epochs does not fit {available_s / 60:.1f} min even at {sides[-1]} px "
        f"({t.train_step_s:.2f} s per batch of {t.batch_size}): linear probe on frozen features instead")


def seed_members(estimate: dict[str, float], available_s: float) -> tuple[int, str]:
    """``(n, reason)``: how many fine-tunes of one ``estimate`` (:func:`estimate_seconds`) fit
    ``available_s``, at most ``MAX_SEED_MEMBERS``; decoding and the run's overhead are paid once,
    training and prediction once per member. ``n < 2``: no ensemble (``reason`` says why)."""
    per_model = estimate["training"] + estimate["evaluation"]
    fixed = estimate["total"] - per_model
    if per_model <= 0:
        return 1, "nothing to repeat"
    n = min(MAX_SEED_MEMBERS, int((available_s - fixed) // per_model))
    if n < 2:
        return 1, f"one fine-tune ({per_model / 60:.1f} min) is what the budget holds"
    return n, (f"the budget holds {n} fine-tunes ({per_model / 60:.1f} min each, at most {MAX_SEED_MEMBERS}): "
               f"each model is the mean of {n} seeds' fine-tunes, which removes most of the seed-to-seed "
               "spread of small-data fine-tuning")


def _times_members(estimate: dict[str, float], n: int) -> dict[str, float]:
    est = {**estimate, "training": round(estimate["training"] * n, 1),
           "evaluation": round(estimate["evaluation"] * n, 1)}
    est["total"] = round(sum(v for k, v in est.items() if k != "total"), 1)
    return est


# -- the whole plan ----------------------------------------------------------------------
# the fine-tuning settings plan.yaml spells out when the weight record has no recipe (TrainConfig's defaults)
_TRAIN_DEFAULTS = {f"train.{k}": TrainConfig.model_fields[k].default
                   for k in ("lr", "weight_decay", "scheduler", "warmup_epochs")}


def _get(d: dict, dotted: str, default: Any = None) -> Any:
    node: Any = d
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def _set(d: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = d
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def _user_has(user_keys: set[str], dotted: str) -> bool:
    """The user's config sets ``dotted`` itself or a key inside it (``data.intensity.mode`` for ``data.intensity``)."""
    return dotted in user_keys or any(k.startswith(f"{dotted}.") for k in user_keys)


def plan_run(fp: Fingerprint, base: dict, *, budget_s: float, spent_s: float, candidates: list[str],
             rows: list[dict] | None, timing: Callable[[str, int], Timing],
             recipe: Callable[[str], dict[str, Any]] = lambda name: {},
             user_keys: Iterable[str] = ()) -> Plan:
    """Apply the rules in order to ``base`` (a config dict with its ``data`` section) and return the plan.

    Args:
        fp: the data's fingerprint.
        base: the starting config (``name``, ``data`` with format and path; a user's config as written).
        budget_s: the whole budget in seconds; spent_s: what fingerprinting, timing and ranking took.
        candidates: encoders considered (one: no choice to make).
        rows: ``medtl rank`` rows of the candidates (``None`` when not ranked).
        timing: ``(encoder, side) -> Timing``, measured on this machine (memoise it: rules may ask twice).
        recipe: ``encoder -> dotted overrides`` from its weight record (:func:`recipe_overrides`), or
            ``(overrides, evidence)`` with the record's words on how the recipe was measured.
        user_keys: dotted keys the user's config sets itself; the plan never changes them.
    """
    user = set(user_keys)
    cfg = copy.deepcopy(base)
    reasons: dict[str, str] = {}
    notes: list[str] = []

    def put(key: str, value: Any, why: str) -> None:
        if _user_has(user, key):
            return
        _set(cfg, key, value)
        reasons[key] = why

    workflow, folds, why = choose_evaluation(fp)
    if workflow == "cv":
        if _user_has(user, "cv.n_splits"):
            folds = int(_get(cfg, "cv.n_splits"))
        put("cv.n_splits", folds, why)
    else:
        reasons.setdefault("data.split", why)
    intensity, why = choose_intensity(fp)
    put("data.intensity", intensity, why)

    dims = fp.spatial_dims
    if dims == 3:
        put("data.spatial_dims", 3, f"volumes ({'x'.join(map(str, fp.shape))} voxels, median)")
    if _user_has(user, "data.image_size"):
        side = max(int(s) for s in _get(cfg, "data.image_size"))
        side_why = "as the config sets it"
        sides = [side]
    else:
        side, side_why = preferred_side(fp)
        sides = side_ladder(side, dims)

    # encoder
    if _user_has(user, "model.name") or len(candidates) == 1:
        encoder = _get(cfg, "model.name") if _user_has(user, "model.name") else candidates[0]
        enc_why = "as the config sets it" if _user_has(user, "model.name") else "the only candidate available here"
    else:
        pre = {c: timing(c, sides[0]) for c in candidates}
        if rows:
            encoder, enc_why = choose_encoder(rows, pre)
        else:
            encoder = min(candidates, key=lambda c: pre[c].train_step_s)
            enc_why = "not ranked (medtl rank scores 2D images only): the cheapest training step of the candidates"
    put("model.name", encoder, enc_why)
    put("model.pretrained", True, "pretrained weights (transfer learning)")

    # the recipe of the encoder's weight record, where the user left the key unset (model.recipe: false: none)
    rec = recipe(encoder) if _get(cfg, "model.recipe", True) is not False else {}
    rec, evidence = rec if isinstance(rec, tuple) else (rec, "")
    grouped = [k for k in rec if k != "data.image_size" and not _user_has(user, k)]
    for key, value in rec.items():
        if key == "data.image_size" and not _user_has(user, key):
            side = max(int(s) for s in (value if isinstance(value, list) else [value]))
            sides = side_ladder(side, dims)
            side_why = f"the weight record's recipe trains at {side} px"
        elif key in grouped:  # one comment above the first of the recipe's keys
            _set(cfg, key, value)
            if key == grouped[0]:
                reasons[key] = (f"{', '.join(k.split('.')[-1] for k in grouped)}: the recipe of {encoder}'s weight "
                                f"record" + (f", measured: {evidence}" if evidence else
                                             f" (medtl weights show {encoder})"))
    target = int(_get(cfg, "train.epochs", TARGET_EPOCHS)) if (
        _user_has(user, "train.epochs") or "train.epochs" in rec) else TARGET_EPOCHS

    sizes = split_sizes(fp, workflow, folds)
    if _user_has(user, "train.batch_size") or "train.batch_size" in rec:
        bs = int(_get(cfg, "train.batch_size"))
    else:
        bs, why = choose_batch_size(sizes["train"])
        put("train.batch_size", bs, why)

    available = budget_s - spent_s
    tiny = is_tiny(fp, sizes["train"])
    strategy_set = _user_has(user, "train.strategy.name")
    user_probe = strategy_set and _get(cfg, "train.strategy.name") == "linear_probe"
    tta = bool(_get(cfg, "train.tta", True)) if _user_has(user, "train.tta") else True
    if user_probe or (tiny and not strategy_set):
        mode, epochs, why = "probe", 0, ("as the config sets it" if user_probe else
                                         f"tiny data, {tiny}: a linear probe on frozen features, its C chosen "
                                         "by grouped inner CV, instead of fine-tuning a whole network")
    else:
        mode, side_fit, epochs, k, why = fit_budget(fp, workflow=workflow, folds=folds, sides=sides,
                                                    target_epochs=target, batch_size=bs, tta=tta,
                                                    available_s=available, timing=lambda s: timing(encoder, s))
        if mode == "finetune":
            side = side_fit
            if k != folds:
                folds = k
                put("cv.n_splits", k, f"{k} folds instead of {MAX_FOLDS}: {MAX_FOLDS} do not fit the budget")
        elif strategy_set:  # the user asked for a fine-tuning strategy: keep it, say it will run over
            mode, epochs = "finetune", MIN_EPOCHS
            notes.append(f"the config's fine-tuning strategy is kept, but {why.split(':')[0]}; the run will "
                         "take longer than the budget")
    if mode == "finetune" and not rec:  # spell out the training settings that are the defaults, and why
        unset = {k: v for k, v in _TRAIN_DEFAULTS.items() if not _user_has(user, k)}
        for i, (key, value) in enumerate(unset.items()):
            _set(cfg, key, value)
            if i == 0:
                reasons[key] = (f"{', '.join(k.split('.')[-1] for k in unset)}: the train defaults (AdamW); "
                                f"{encoder}'s weight record carries no recipe")
    if mode == "probe":
        put("train.strategy.name", "linear_probe", why)
        put("train.tta", False, "probe features without flip averaging: as good at half the cost "
                                "(benchmarks/linear_probe)")
        tta = False
    else:
        put("train.epochs", epochs, why)
    size = [side] * dims
    put("data.image_size", size, side_why if side == sides[0] else
        f"{side_why}; {side} px to fit the budget (see train.epochs)")

    t = timing(encoder, side)  # the estimate of what the config says (a user's train.epochs included)
    est = estimate_seconds(fp, mode=mode, workflow=workflow, folds=folds, timing=t,
                           epochs=int(_get(cfg, "train.epochs", TARGET_EPOCHS)) if mode == "finetune" else 1,
                           batch_size=bs, tta=bool(_get(cfg, "train.tta", tta)))
    members = int(_get(cfg, "train.ensemble_seeds", 1))
    if (mode == "finetune" and epochs >= target and not _user_has(user, "train.ensemble_seeds")
            and "train.ensemble_seeds" not in rec and int(_get(cfg, "train.ensemble_folds", 1)) <= 1):
        members, why = seed_members(est, available)
        if members > 1:
            put("train.ensemble_seeds", members, why)
    if members > 1:
        est = _times_members(est, members)
    if est["total"] > available:
        notes.append(f"the run is expected to take {est['total'] / 60:.1f} min, more than the "
                     f"{max(available, 0) / 60:.1f} min left of the budget")
    timings = getattr(timing, "measured", None)
    return Plan(workflow=workflow, config=cfg, reasons=reasons, estimate=est, mode=mode, notes=notes,
                timings=list(timings() if callable(timings) else []))


# -- plan.yaml -----------------------------------------------------------------------------
def _scalar(value: Any) -> str:
    """One YAML flow value (``128``, ``[128, 128]``, ``'a: b'``, ``null``)."""
    text = yaml.safe_dump([value], default_flow_style=True, width=10**6, sort_keys=False).strip()
    return text[1:-1]


def _wrap(text: str, indent: str, width: int = 100) -> list[str]:
    import textwrap

    return [f"{indent}# {line}" for line in textwrap.wrap(text, width=width - len(indent) - 2)] or [f"{indent}#"]


def plan_yaml(config: dict, reasons: dict[str, str], header: list[str]) -> str:
    """The plan as commented YAML: ``header`` lines first, then every key, the reason for a chosen
    value on the line(s) above it. ``yaml.safe_load`` of the text gives ``config`` back.

    Written as text (the project depends on PyYAML, which drops comments; ruamel.yaml is not a
    dependency): sections become blocks, values flow style.
    """
    lines = [line for h in header for line in (_wrap(h, "") if h else ["#"])]

    def emit(node: dict, prefix: str, indent: str) -> None:
        for key, value in node.items():
            dotted = f"{prefix}{key}"
            if dotted in reasons:
                lines.extend(_wrap(reasons[dotted], indent))
            name = _scalar(key)  # quoted where YAML needs it (a site name with a colon, say)
            if isinstance(value, dict) and value and not (
                    dotted in reasons and _flat(value) and not _has_reason_below(dotted, reasons)):
                lines.append(f"{indent}{name}:")
                emit(value, f"{dotted}.", indent + "  ")
            else:  # a value, or a small section chosen as a whole: one line, flow style
                lines.append(f"{indent}{name}: {_scalar(value)}")

    emit(config, "", "")
    text = "\n".join(lines) + "\n"
    if yaml.safe_load(text) != json_roundtrip(config):  # the comments must never change the config
        raise RuntimeError("plan.yaml does not read back as the planned config; this is a medtl bug")
    return text


def _flat(value: dict) -> bool:
    """A small section of plain values (written in flow style on one line)."""
    return all(not isinstance(v, dict) for v in value.values()) and len(_scalar(value)) <= 80


def _has_reason_below(dotted: str, reasons: dict[str, str]) -> bool:
    return any(k.startswith(f"{dotted}.") for k in reasons)


def json_roundtrip(obj: Any) -> Any:
    """``obj`` as YAML reads it back (tuples become lists)."""
    return yaml.safe_load(yaml.safe_dump(obj))
