"""Nested CV's inner search: the inner folds of one outer fold, and the two ways to search them.

Inside one outer fold, the training patients (the fold's ``trn`` and ``val``) are split into
``cv.inner_splits`` grouped, stratified folds (stream ``nested_split`` of the fold's
:class:`~medtl._runtime.FoldSeeds`). A candidate setting is trained on each inner training part
with the wrapped trainer and scored (``train.select_metric``) on the held-out part; the best mean
score wins, and the wrapped trainer is fitted once more at it on ``trn``/``val`` exactly as
without nesting. The outer test patients are never seen: they are not among the indices the
search receives.

* :class:`InnerSearch` is that frame. ``search()`` runs a fold's search (the fold driver bills it
  as the ``search`` stage of the compute bill); ``fit()`` refits at the choice.
* ``cv.search: grid``: :class:`medtl.workflows.trainers.NestedSelection` scores every ``cv.grid`` point.
* ``cv.search: optuna``: :class:`OptunaSelection` runs ``cv.n_trials`` Optuna trials over
  ``cv.search_space`` (the optional extra ``pip install 'medtl[search]'``).

Optuna, per outer fold: one study in SQLite, ``<run>/search/fold_<repeat>_<fold>.db``, named by
the fold and a hash of its training cases and of the config without ``cv.n_trials`` and
``cv.search_timeout`` (a changed config or data never reuses trials; a larger ``n_trials`` extends
the study). A TPE sampler proposes each
trial; after each inner fold the trial reports its running mean score and the pruner
(``cv.pruner``) may stop it. The search ends when ``n_trials`` trials completed or were pruned
(failed ones do not count), or when the fold's trials have taken ``cv.search_timeout`` seconds.

Resume: rerunning a killed run reopens the study. A trial the kill left running is marked failed
and its parameters are tried again first (as Optuna's ``RetryFailedTrialCallback`` does). The
sampler of the i-th trial is seeded from the fold's ``search`` stream and i, so the
resumed search proposes what the uninterrupted one would: with the ``median`` pruner (or none) it
ends with the same trials, choice and outer-fold results. (``successive_halving`` keeps the rung
values the interrupted trial reported, so a resumed search may prune differently.) A trial whose
score is undefined on every inner fold fails and does not count; after ``n_trials`` failures the
search stops.

Example:
    >>> trainer = OptunaSelection(LinearProbe(), Path("runs/ct/search"))   # doctest: +SKIP
    >>> fit = trainer.fit(cfg, data, trn, val, FoldSeeds(0, 0, 3), description="fold3", bar=None)  # doctest: +SKIP
    >>> fit.info["search"]["complete"], fit.info["selected"]                 # doctest: +SKIP
    (14, {'train.strategy.probe_C': [0.0213]})
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from rich.table import Table

from medtl._runtime import FoldSeeds, console
from medtl.config import Config, config_hash
from medtl.config._rules import OPTUNA_MISSING
from medtl.config._schema import search_value
from medtl.data.prepare import PreparedData
from medtl.errors import DataError
from medtl.evaluate.schemes import with_point
from medtl.evaluate.splits import outer_splits
from medtl.training.loop import validation_scores
from medtl.workflows.rundir import epochs_trained

__all__ = ["Choice", "InnerSearch", "OptunaSelection", "config_point", "inner_score", "print_search",
           "search_summary", "study_name"]


class _Trainer(Protocol):
    name: str

    def fit(self, cfg: Config, data: PreparedData, trn: np.ndarray, val: np.ndarray, seeds: FoldSeeds, *,
            description: str, bar) -> Any: ...


@dataclass
class Choice:
    """What a fold's inner search chose.

    Attributes:
        point: ``{dotted key: config value}`` the wrapped trainer is refitted with.
        info: kept in the fold record: ``search`` (the cost block) and the trials or grid scores.
        images: images (or volumes) the inner trainings processed (training cases x epochs run).
    """

    point: dict
    info: dict = field(default_factory=dict)
    images: int = 0


class InnerSearch:
    """Nested CV around any fold trainer; subclasses choose the setting (:meth:`select`)."""

    def __init__(self, inner: _Trainer) -> None:
        self.inner = inner
        self.name = f"nested({inner.name})"
        self._choices: dict[tuple, Choice] = {}

    def search(self, cfg: Config, data: PreparedData, trn: np.ndarray, val: np.ndarray, seeds: FoldSeeds, *,
               description: str, bar) -> int:
        """Run the fold's inner search now (kept for :meth:`fit`); returns the images its trainings processed."""
        choice = self._search(cfg, data, trn, val, seeds, description=description, bar=bar)
        self._choices[_fold_key(seeds, trn, val)] = choice
        return choice.images

    def fit(self, cfg: Config, data: PreparedData, trn: np.ndarray, val: np.ndarray, seeds: FoldSeeds, *,
            description: str, bar):
        """The wrapped trainer's fit on ``trn``/``val`` at the chosen setting (searched now unless
        :meth:`search` ran for this fold); ``info`` gains ``selected`` and the search's record."""
        choice = self._choices.pop(_fold_key(seeds, trn, val), None)
        if choice is None:
            choice = self._search(cfg, data, trn, val, seeds, description=description, bar=bar)
        console.print(f"{description}: inner CV selected {choice.point}")
        final = self.inner.fit(with_point(cfg, choice.point), data, trn, val, seeds, description=description,
                               bar=bar)
        final.info.update({"selected": choice.point, **choice.info})
        final.meta.update({"selected": choice.point})
        return final

    def _search(self, cfg: Config, data: PreparedData, trn: np.ndarray, val: np.ndarray, seeds: FoldSeeds, *,
                description: str, bar) -> Choice:
        tr = np.concatenate([trn, val])
        splits = outer_splits(data.y[tr], data.groups[tr], n_splits=cfg.cv.inner_splits,
                              seed=seeds.int("nested_split"))
        return self.select(cfg, data, tr, splits, seeds, description=description, bar=bar)

    def select(self, cfg: Config, data: PreparedData, tr: np.ndarray, splits: list, seeds: FoldSeeds, *,
               description: str, bar) -> Choice:
        """Choose the setting: ``tr`` holds the fold's training patients' cases, ``splits`` the inner
        ``(train, held-out)`` positions into ``tr``."""
        raise NotImplementedError

    def score_folds(self, cfg: Config, data: PreparedData, tr: np.ndarray, splits: list, seeds: FoldSeeds, *,
                    description: str, bar):
        """Train ``cfg`` (a candidate applied) on each inner fold; yields ``(score, images)`` per fold.

        Inner fold ``j`` trains with ``seeds.child(j)``, the same for every candidate, so candidates
        differ only in their setting. Stop iterating to skip the remaining folds (pruning).
        """
        metric, k = cfg.train.select_metric, len(data.class_names)
        for j, (itr, ite) in enumerate(splits):
            res = self.inner.fit(cfg, data, tr[itr], tr[ite], seeds.child(j),
                                 description=f"{description} inner {j + 1}/{len(splits)}", bar=bar)
            epochs = epochs_trained(res.info)
            yield (inner_score(data.y[tr[ite]], res.predict_val(), metric, k),
                   len(itr) * epochs if epochs else len(itr) + len(ite))


def inner_score(y: np.ndarray, proba: np.ndarray, metric: str, k: int) -> float:
    """``train.select_metric`` of ``(n, k)`` probabilities: ``loss`` (NLL, lower is better) or a
    :func:`~medtl.training.loop.validation_scores` score (``nan`` when undefined)."""
    if metric == "loss":
        p = np.clip(proba[np.arange(len(y)), y], 1e-8, 1.0)
        return float(-np.mean(np.log(p)))
    return float(validation_scores(y, proba, k)[metric])


def config_point(point: dict) -> dict:
    """A grid point or trial as config values: a list-valued key (``train.strategy.probe_C``) gets
    a one-value list (:func:`medtl.config._schema.search_value`)."""
    return {k: search_value(k, v) for k, v in point.items()}


def _fold_key(seeds: FoldSeeds, trn: np.ndarray, val: np.ndarray) -> tuple:
    return seeds, np.asarray(trn).tobytes(), np.asarray(val).tobytes()


def _mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


# -- Optuna ------------------------------------------------------------------------------------
def _optuna():
    """The ``optuna`` module, or a ConfigError with the install hint."""
    try:
        import optuna
    except ImportError:
        from medtl.errors import ConfigError

        raise ConfigError(OPTUNA_MISSING) from None
    return optuna


def study_name(cfg: Config, seeds: FoldSeeds, case_ids: list[str]) -> str:
    """``fold_<repeat>_<fold>-<hash>``: the fold, and the hash of the config without ``cv.n_trials``
    and ``cv.search_timeout`` (how long to search, not what) and of the fold's training cases, so a
    changed config or changed data starts a new study."""
    what = cfg.model_copy(update={"cv": cfg.cv.model_copy(update={"n_trials": 1, "search_timeout": None})})
    blob = json.dumps([config_hash(what), sorted(case_ids)]).encode()
    return f"fold_{seeds.repeat}_{seeds.fold}-{hashlib.sha256(blob).hexdigest()[:12]}"


class OptunaSelection(InnerSearch):
    """Nested CV with an Optuna search per outer fold (``cv.search: optuna``; see the module docstring).

    Args:
        inner: the wrapped fold trainer (fine-tune or linear probe).
        folder: where each fold's SQLite study is kept (``<run>/search``); ``None``: in memory (no resume).
        resume: reopen a study an earlier run of the same config left there; ``False`` starts it afresh.
    """

    def __init__(self, inner: _Trainer, folder: str | Path | None = None, *, resume: bool = True) -> None:
        super().__init__(inner)
        self.folder = Path(folder) if folder is not None else None
        self.resume = resume
        self._memory = None  # the in-memory storage when there is no folder

    def select(self, cfg: Config, data: PreparedData, tr: np.ndarray, splits: list, seeds: FoldSeeds, *,
               description: str, bar) -> Choice:
        optuna = _optuna()
        from optuna.trial import TrialState

        cv, metric = cfg.cv, cfg.train.select_metric
        t0 = time.perf_counter()
        name = study_name(cfg, seeds, [data.cases[i].case_id for i in tr])
        storage, where = self._storage(optuna, seeds)
        if not self.resume:
            try:
                optuna.delete_study(study_name=name, storage=storage)
            except KeyError:  # no such study yet
                pass
        verbosity = optuna.logging.get_verbosity()
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # medtl prints one line per fold instead
        try:
            study = self._study(optuna, storage, name, cfg, seeds, 0)
            retried = _retry_interrupted(study, TrialState)
            earlier = {t.number for t in study.get_trials(deepcopy=False) if t.state.is_finished()}  # by others
            if retried:
                console.print(f"{description}: resumed the Optuna study; trial(s) {retried} were interrupted and "
                              "are tried again")
            stopped = "n_trials"
            while True:
                trials = study.get_trials(deepcopy=False)
                counted = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
                if counted >= cv.n_trials:
                    break
                if cv.search_timeout is not None and _wall(trials) >= cv.search_timeout:
                    stopped = "search_timeout"
                    break
                finished = [t for t in trials if t.state.is_finished() and not _interrupted(t, trials)]
                if len(finished) - counted >= cv.n_trials:
                    stopped = "failures"
                    break
                # the sampler of the i-th trial (i: the finished ones before it, interrupted ones left out) is
                # seeded by (fold, i): a resumed search proposes what an uninterrupted one would
                started = time.perf_counter()
                study = self._study(optuna, storage, name, cfg, seeds, len(finished))
                self._trial(study, cfg, data, tr, splits, seeds, TrialState, started,
                            description=f"{description} trial {counted + 1}/{cv.n_trials}", bar=bar)
            here = time.perf_counter() - t0
        finally:
            optuna.logging.set_verbosity(verbosity)
        trials = study.get_trials(deepcopy=False)
        done = [t for t in trials if t.state == TrialState.COMPLETE]
        if not done:
            hint = ("The loss is NaN when training diverges: narrow the searched range (e.g. lower train.lr)."
                    if metric == "loss" else f"{metric} is undefined when an inner held-out fold misses a class: use "
                    "fewer cv.inner_splits, train.select_metric=loss, or more patients.")
            if stopped == "search_timeout":
                hint += " Or raise cv.search_timeout."
            raise DataError(f"{description}: none of the {len(trials)} Optuna trial(s) gave a defined inner score "
                            f"(train.select_metric={metric}; stopped by {stopped}). {hint}")
        best = study.best_trial
        point = config_point({p.key: best.params[p.key] for p in cv.search_space})
        states = [t.state for t in trials]
        n_interrupted = sum(_interrupted(t, trials) for t in trials)
        cost = {"method": "optuna", "study": name, "storage": where, "n_trials": cv.n_trials, "trials": len(trials),
                "complete": len(done), "pruned": states.count(TrialState.PRUNED),
                "failed": states.count(TrialState.FAIL) - n_interrupted, "interrupted": n_interrupted,
                "stopped_by": stopped, "wall_s": round(_wall(trials), 3), "wall_s_here": round(here, 3),
                "images": int(sum(_attr(t, "images") or 0 for t in trials)), "metric": metric,
                "direction": "minimize" if metric == "loss" else "maximize", "pruner": cv.pruner,
                "best_value": float(best.value), "best_params": point, "best_trial": best.number}
        console.print(f"{description}: Optuna ran {cost['complete']} complete + {cost['pruned']} pruned trial(s) "
                      f"({cost['failed']} failed, {n_interrupted} interrupted) in {cost['wall_s']:.1f} s; best inner "
                      f"{metric} {best.value:.4f}")
        record = [{"number": t.number, "state": t.state.name.lower(), "point": _attr(t, "point"), "value": t.value,
                   "inner": _attr(t, "inner"), "wall_s": _attr(t, "wall_s")} for t in trials]
        here_images = sum(_attr(t, "images") or 0 for t in trials if t.number not in earlier)
        return Choice(point, {"search": cost, "trials": record}, images=int(here_images))

    def _storage(self, optuna, seeds: FoldSeeds):
        """``(storage, path relative to the run)`` of the fold's study: SQLite in ``folder``, else memory."""
        if self.folder is None:
            if self._memory is None:
                self._memory = optuna.storages.InMemoryStorage()
            return self._memory, None
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"fold_{seeds.repeat}_{seeds.fold}.db"
        return optuna.storages.RDBStorage(f"sqlite:///{path.resolve()}"), f"{self.folder.name}/{path.name}"

    @staticmethod
    def _study(optuna, storage, name: str, cfg: Config, seeds: FoldSeeds, index: int):
        """The fold's study with the sampler of its ``index``-th trial (created when new)."""
        cv = cfg.cv
        seed = int(np.random.SeedSequence([seeds.int("search"), index]).generate_state(1)[0] % (2**31 - 1))
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=cv.n_startup_trials)
        pruner = {"median": lambda: optuna.pruners.MedianPruner(n_startup_trials=cv.n_startup_trials),
                  "successive_halving": lambda: optuna.pruners.SuccessiveHalvingPruner(min_resource=1),
                  "none": optuna.pruners.NopPruner}[cv.pruner]()
        return optuna.create_study(storage=storage, study_name=name, sampler=sampler, pruner=pruner,
                                   direction="minimize" if cfg.train.select_metric == "loss" else "maximize",
                                   load_if_exists=True)

    def _trial(self, study, cfg: Config, data: PreparedData, tr: np.ndarray, splits: list, seeds: FoldSeeds,
               TrialState, started: float, *, description: str, bar) -> None:
        """Ask one trial, score it fold by fold (reporting the running mean, pruned when told), tell it.
        Its ``wall_s`` counts from ``started`` (Optuna's own bookkeeping included)."""
        trial = study.ask()
        point = config_point({p.key: _suggest(trial, p) for p in cfg.cv.search_space})
        values, images, pruned = [], 0, False
        folds = self.score_folds(with_point(cfg, point), data, tr, splits, seeds, description=description, bar=bar)
        for j, (value, n) in enumerate(folds):
            values.append(value)
            images += n
            mean = _mean(values)
            if j + 1 < len(splits) and math.isfinite(mean):
                trial.report(mean, step=j + 1)
                if trial.should_prune():
                    pruned = True
                    break
        trial.set_user_attr("medtl", {"point": point, "inner": [v if math.isfinite(v) else None for v in values],
                                      "wall_s": round(time.perf_counter() - started, 3), "images": int(images)})
        mean = _mean(values)
        if pruned:
            study.tell(trial, state=TrialState.PRUNED)
        elif not math.isfinite(mean):
            study.tell(trial, state=TrialState.FAIL)  # the score was undefined on every inner fold
        else:
            study.tell(trial, mean)


def _suggest(trial, p) -> Any:
    if p.kind == "categorical":
        return trial.suggest_categorical(p.key, list(p.choices))
    if p.kind == "int":
        return trial.suggest_int(p.key, int(p.low), int(p.high), log=p.log)
    return trial.suggest_float(p.key, float(p.low), float(p.high), log=p.log)


def _retry_interrupted(study, TrialState) -> list[int]:
    """Trials a killed process left running: marked failed, their parameters queued to run first."""
    stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for t in stale:
        study.tell(t.number, state=TrialState.FAIL)
        study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
    return [t.number for t in stale]


def _interrupted(t, trials) -> bool:
    return any(o.user_attrs.get("retry_of") == t.number for o in trials)


def _wall(trials) -> float:
    """Seconds the finished trials took (recorded per trial, so trials of earlier processes count)."""
    return float(sum(_attr(t, "wall_s") or 0.0 for t in trials))


def _attr(t, key: str):
    """What medtl recorded of a finished trial (one user attribute, ``medtl``: one write per trial)."""
    return (t.user_attrs.get("medtl") or {}).get(key)


# -- the run's summary ------------------------------------------------------------------------
def search_summary(records) -> dict:
    """``metrics.json["search"]``: the inner search's cost over the outer folds.

    ``records``: the run's :class:`~medtl.workflows.rundir.FoldRecord` s. Returns ``{"method",
    "trials", "complete", "pruned", "failed", "interrupted", "images", "wall_s", "wall_s_here",
    "folds": [{"fold", ...the fold's search block}]}``: ``wall_s`` adds up the trials (those of an
    earlier, killed process included), ``wall_s_here`` the searches' time in the processes that
    finished them, storage included; the fold blocks hold ``best_params`` and ``best_value``.
    """
    folds = [{"fold": r.fold, **r.info["search"]} for r in records if (r.info or {}).get("search")]
    out: dict = {"method": folds[0]["method"] if folds else None}
    for k in ("trials", "complete", "pruned", "failed", "interrupted", "images"):
        out[k] = int(sum(f.get(k) or 0 for f in folds))
    for k in ("wall_s", "wall_s_here"):
        out[k] = round(float(sum(f.get(k) or 0.0 for f in folds)), 3)
    out["folds"] = folds
    return out


def print_search(block: dict) -> None:
    """The search's cost per outer fold, as a table on the console."""
    t = Table(title=f"Inner search ({block['method']}): {block['trials']} trials, {block['complete']} complete, "
                    f"{block['pruned']} pruned, {block['failed']} failed, {block['wall_s']:.1f} s")
    for col in ("fold", "trials", "complete", "pruned", "failed", "wall (s)", "best inner", "selected"):
        t.add_column(col, justify="left" if col in ("fold", "selected") else "right")
    for f in block["folds"]:
        best = f.get("best_value")
        t.add_row(f["fold"], str(f.get("trials")), str(f.get("complete")), str(f.get("pruned")), str(f.get("failed")),
                  f"{f.get('wall_s') or 0:.1f}", "n/a" if best is None else f"{best:.4f}",
                  ", ".join(f"{k}={v}" for k, v in (f.get("best_params") or {}).items()))
    console.print(t)
