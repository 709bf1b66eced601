"""Cross-validation schemes: which outer folds a run trains, and the nested-CV grid.

* ``kfold``: patient-grouped stratified k-fold (:func:`~medtl.evaluate.splits.outer_splits`);
* ``repeated``: ``n_repeats`` x k-fold, each repeat shuffled with its own seed
  (:func:`medtl._runtime.split_seed` of ``cv.seed`` and the repeat);
* ``nested``: k-fold outer folds; inside each, an inner grouped k-fold over the training
  patients picks one point of ``cv.grid`` (the outer test fold is never seen);
* ``leave_one_site_out``: one fold per site (manifest ``site`` column): train on the other
  sites, test on the held-out one, as a new hospital would be.

Example:
    >>> plan = fold_plan(cfg, y, groups, sites)      # doctest: +SKIP
    >>> [f.key for f in plan]                         # doctest: +SKIP
    ['fold0', 'fold1', 'fold2', 'fold3', 'fold4']
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from medtl._runtime import split_seed
from medtl.config import Config, apply_overrides, load_config
from medtl.errors import ConfigError, DataError
from medtl.evaluate.splits import check_disjoint_groups, outer_splits

__all__ = ["FoldSpec", "fold_plan", "grid_points", "with_point", "leave_one_site_out"]


@dataclass(frozen=True)
class FoldSpec:
    """One outer fold: ``key`` names its files (``folds/<key>.json``, ``checkpoints/<key>``)."""

    key: str
    index: int
    repeat: int
    train: np.ndarray
    test: np.ndarray
    site: str | None = None


def leave_one_site_out(sites: np.ndarray, groups: np.ndarray) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """``[(site, train_idx, test_idx)]``, one per site, sorted by site name.

    Raises DataError when a case has no site, there are fewer than two sites, or a patient
    appears at two sites (its cases would leak across folds).
    """
    s = np.asarray(sites, dtype=object)
    missing = [i for i, v in enumerate(s) if v in (None, "")]
    if missing:
        raise DataError(f"cv.scheme=leave_one_site_out needs a site for every case; {len(missing)} case(s) have "
                        "none. Add a 'site' column to the manifest (or data.labels.site_column).")
    names = sorted(set(s.tolist()))
    if len(names) < 2:
        raise DataError(f"cv.scheme=leave_one_site_out needs >= 2 sites; found {names}. Use cv.scheme=kfold.")
    g = np.asarray(groups)
    for pid in set(g.tolist()):
        at = set(s[g == pid].tolist())
        if len(at) > 1:
            raise DataError(f"A patient has cases at {len(at)} sites ({sorted(at)}); leave-one-site-out would put "
                            "the same patient in training and test. Fix the site column.")
    idx = np.arange(len(s))
    return [(name, idx[s != name], idx[s == name]) for name in names]


def fold_plan(cfg: Config, y: np.ndarray, groups: np.ndarray, sites: np.ndarray | None = None,
              class_names: list[str] | None = None) -> list[FoldSpec]:
    """The outer folds of ``cfg.cv.scheme``; the same config gives the same folds.

    The config was checked when it was loaded (``n_repeats`` only with ``repeated``, a grid for
    ``nested``); what is checked here needs the data (sites, groups).
    """
    cv = cfg.cv
    if cv.scheme == "leave_one_site_out":
        plan = [FoldSpec(f"site{i}", i, 0, tr, te, site=name)
                for i, (name, tr, te) in enumerate(leave_one_site_out(sites if sites is not None else
                                                                      np.full(len(y), None), groups))]
    else:
        repeats = cv.n_repeats if cv.scheme == "repeated" else 1
        plan = []
        for r in range(repeats):
            folds = outer_splits(y, groups, n_splits=cv.n_splits, seed=split_seed(cv.seed, r), class_names=class_names)
            for k, (tr, te) in enumerate(folds):
                key = f"fold{k}" if repeats == 1 else f"r{r}fold{k}"
                plan.append(FoldSpec(key, k, r, tr, te))
    for r in sorted({f.repeat for f in plan}):
        check_disjoint_groups({f.key: groups[f.test] for f in plan if f.repeat == r})
    return plan


def grid_points(grid: dict[str, list]) -> list[dict]:
    """Cartesian product of a ``{"dotted.key": [values]}`` grid, in a stable order."""
    keys = sorted(grid)
    for k in keys:
        if not isinstance(grid[k], list) or not grid[k]:
            raise ConfigError(f"cv.grid['{k}'] must be a non-empty list of values. Got {grid[k]!r} instead.")
    return [dict(zip(keys, vals)) for vals in itertools.product(*(grid[k] for k in keys))]


def with_point(cfg: Config, point: dict) -> Config:
    """``cfg`` with a grid point's dotted overrides applied (validated like ``--set``)."""
    raw = cfg.model_dump(mode="json")
    raw = apply_overrides(raw, [f"{k}={_yaml(v)}" for k, v in point.items()])
    return load_config(raw)


def _yaml(v) -> str:
    import json

    return json.dumps(v)
