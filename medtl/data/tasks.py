"""Multi-task targets: the label columns of a ``tasks`` config as arrays with missing labels marked.

Each task becomes a :class:`TaskTargets` holding ``values``, float64 with ``nan`` where the
label is missing (an empty cell, ``nan``, ``na``, ``none``, ``null``):

* ``binary`` / ``multiclass``: ``(N,)`` class indices into ``class_names``;
* ``multilabel``: ``(N, L)`` 0/1, one column per label (``class_names`` are the label columns);
* ``regression``: ``(N,)`` the value as written.

A regression task also carries how its head is trained (``loss``, default ``huber``) and whether
it is refitted on the fine-tuned encoder's frozen features afterwards (``refit``, default ``ridge``);
a config's ``null`` resolves to these defaults here, in one place (:data:`REGRESSION_DEFAULTS`).

The first task is the primary one; its labels are the run's ``y`` (never missing). Nothing is
dropped: a case with a missing label stays in the data and is only masked out of that task's
loss and metrics; :func:`label_counts` says how many cases each task has labels for.

Example:
    >>> from medtl.config import TaskConfig
    >>> from medtl.data.manifest import Case
    >>> cases = [Case("a", None, "x", "P1", targets={"Age": "61"}), Case("b", None, "y", "P2", targets={"Age": ""})]
    >>> t = encode_tasks([TaskConfig(name="kind", kind="binary", column="label"),
    ...                   TaskConfig(name="age", kind="regression", column="Age")], cases, np.array([0, 1]), ["x", "y"])
    >>> t[1].values.tolist(), label_counts(t)["age"]["n_labelled"]
    ([61.0, nan], 1)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from medtl.data.manifest import Case, canonical_labels
from medtl.errors import DataError

__all__ = ["REGRESSION_DEFAULTS", "TaskTargets", "encode_tasks", "label_counts", "target_columns", "target_matrix"]

#: what a regression task's ``loss`` and ``refit`` are when the config leaves them ``null``: a loss
#: that stops an outlying target from dominating the shared encoder's gradient, and a ridge head
#: chosen by grouped CV on the training patients (see :mod:`medtl.workflows.trainers`)
REGRESSION_DEFAULTS = {"loss": "huber", "refit": "ridge"}


@dataclass
class TaskTargets:
    """One task's targets over the N prepared cases.

    Attributes:
        name, kind, weight: as configured (``kind``: binary, multiclass, multilabel, regression).
        values: float64 ``(N,)`` (``(N, L)`` for multilabel); ``nan`` = missing label.
        class_names: the classes (binary, multiclass), the label columns (multilabel), ``[]`` (regression).
        columns: the manifest column(s) the task was read from.
        loss: regression: the head's training loss (``mse`` or ``huber``); ``None`` for the other kinds.
        refit: regression: ``ridge`` (refit the head on the frozen fine-tuned features) or ``none``;
            ``None`` for the other kinds.
    """

    name: str
    kind: str
    values: np.ndarray
    class_names: list[str]
    weight: float = 1.0
    columns: tuple[str, ...] = ()
    loss: str | None = None
    refit: str | None = None

    @property
    def labelled(self) -> np.ndarray:
        """bool ``(N,)`` (``(N, L)`` for multilabel): where a label is present."""
        return ~np.isnan(self.values)

    @property
    def n_outputs(self) -> int:
        """Outputs of this task's head: K classes, L labels, or 1 value."""
        return {"regression": 1}.get(self.kind, len(self.class_names))

    def subset(self, idx: np.ndarray) -> TaskTargets:
        return TaskTargets(self.name, self.kind, self.values[idx], list(self.class_names), self.weight, self.columns,
                           self.loss, self.refit)


def target_columns(tasks) -> tuple[str, list[str]]:
    """``(primary label column, the other tasks' columns)`` of a ``tasks`` config list."""
    cols: list[str] = []
    for t in tasks[1:]:
        cols += list(t.columns) if t.kind == "multilabel" else [t.column]
    return tasks[0].column, list(dict.fromkeys(cols))


def target_matrix(targets: Sequence[TaskTargets], idx: np.ndarray) -> np.ndarray:
    """float ``(n, T)`` targets of cases ``idx``, one column per task (one per label of a multilabel
    task), in task order; ``nan`` = missing. The layout :class:`medtl.training.loop.MultiTaskLoss` takes."""
    cols = [t.values[idx].reshape(len(idx), -1) for t in targets]
    return np.concatenate(cols, axis=1).astype(np.float64)


def encode_tasks(tasks, cases: Sequence[Case], y: np.ndarray, class_names: list[str], *,
                 require_labels: bool = True) -> list[TaskTargets]:
    """Every configured task as :class:`TaskTargets`; the primary one from ``y``/``class_names``.

    Raises:
        DataError: a label that cannot be read as the task's kind (listing the cases), a binary task
            without exactly two classes, or (with ``require_labels``, as training needs) a task with
            no labelled case.
    """
    first = tasks[0]
    out = [TaskTargets(first.name, first.kind, np.asarray(y, dtype=np.float64), list(class_names), first.weight,
                       (first.column,))]
    for t in tasks[1:]:
        if t.kind == "multilabel":
            vals = np.column_stack([_binary_column(t.name, c, cases) for c in t.columns])
            out.append(TaskTargets(t.name, t.kind, vals, list(t.columns), t.weight, tuple(t.columns)))
        elif t.kind == "regression":
            out.append(TaskTargets(t.name, t.kind, _numeric_column(t.name, t.column, cases), [], t.weight,
                                   (t.column,), _setting(t, "loss"), _setting(t, "refit")))
        else:
            vals, names = _class_column(t, cases)
            out.append(TaskTargets(t.name, t.kind, vals, names, t.weight, (t.column,)))
    for task in out if require_labels else []:
        if not task.labelled.any():
            raise DataError(f"Task '{task.name}' has no labelled case (column(s) {list(task.columns)} are empty for "
                            f"all {len(cases)} cases). Check the column names in `tasks`, or remove the task.")
    return out


def _setting(task, key: str) -> str:
    """A regression task's ``loss``/``refit``: as configured, or :data:`REGRESSION_DEFAULTS` when ``null``
    (or absent, for a task config object without the field)."""
    value = getattr(task, key, None)
    return REGRESSION_DEFAULTS[key] if value is None else str(value)


def label_counts(targets: Sequence[TaskTargets]) -> dict[str, dict]:
    """``{task: {"n_labelled", "n_missing"[, "per_label": {label: n_labelled}]}}``: what each task learns from."""
    out = {}
    for t in targets:
        lab = t.labelled
        row = {"n_labelled": int(lab.any(axis=1).sum() if lab.ndim == 2 else lab.sum()),
               "n_missing": int((~lab).all(axis=1).sum() if lab.ndim == 2 else (~lab).sum())}
        if lab.ndim == 2:
            row["per_label"] = {n: int(lab[:, j].sum()) for j, n in enumerate(t.class_names)}
        out[t.name] = row
    return out


def _cells(column: str, cases: Sequence[Case]) -> list[str]:
    return [(c.targets or {}).get(column, "") for c in cases]


def _bad(task: str, column: str, what: str, bad: list[tuple[str, str]]) -> DataError:
    shown = ", ".join(f"{cid} {v!r}" for cid, v in bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
    return DataError(f"Task '{task}': column '{column}' holds {len(bad)} value(s) that are not {what}: {shown}. Fix "
                     "them, or leave the cell empty to mark a missing label.")


def _numeric_column(task: str, column: str, cases: Sequence[Case]) -> np.ndarray:
    vals, bad = np.full(len(cases), np.nan), []
    for i, (c, v) in enumerate(zip(cases, _cells(column, cases))):
        if not v:
            continue
        try:
            vals[i] = float(v)
        except ValueError:
            bad.append((c.case_id, v))
            continue
        if not np.isfinite(vals[i]):
            bad.append((c.case_id, v))
    if bad:
        raise _bad(task, column, "finite numbers", bad)
    return vals


def _encode(cases: Sequence[Case], cells: list[str], mapping: dict[str, str],
            code: dict[str, float]) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """Each non-empty cell's code (through its canonical label); empty cells stay NaN.

    Returns ``(values, bad)``: ``bad`` lists ``(case_id, cell)`` for cells whose label has no code.
    """
    vals, bad = np.full(len(cases), np.nan), []
    for i, (c, v) in enumerate(zip(cases, cells)):
        if v:
            k = code.get(mapping[v])
            if k is None:
                bad.append((c.case_id, v))
            else:
                vals[i] = k
    return vals, bad


def _binary_column(task: str, column: str, cases: Sequence[Case]) -> np.ndarray:
    cells = _cells(column, cases)
    mapping = canonical_labels([v for v in cells if v], f"Task '{task}' column '{column}'")
    code = {"0": 0.0, "1": 1.0, "False": 0.0, "True": 1.0}
    vals, bad = _encode(cases, cells, mapping, code)
    if bad:
        raise _bad(task, column, "0/1 or false/true (multilabel columns are binary)", bad)
    return vals


def _class_column(t, cases: Sequence[Case]) -> tuple[np.ndarray, list[str]]:
    cells = _cells(t.column, cases)
    what = f"Task '{t.name}' column '{t.column}'"
    mapping = canonical_labels([v for v in cells if v], what)
    if t.class_names:
        named = canonical_labels(t.class_names, f"tasks '{t.name}' class_names")
        names = [named[n] for n in t.class_names]
    else:
        names = sorted(set(mapping.values()), key=_natural)
    index = {n: i for i, n in enumerate(names)}
    vals, bad = _encode(cases, cells, mapping, index)
    if bad:
        raise _bad(t.name, t.column, f"one of its classes {names}", bad)
    if t.kind == "binary" and len(names) != 2:
        raise DataError(f"{what} is binary but has {len(names)} class(es) {names}. Use kind multiclass, or fix "
                        "the labels.")
    if len(names) < 2:
        raise DataError(f"{what} has one class {names}; a classification head needs two or more.")
    return vals, names


def _natural(s: str):
    try:
        return (0, float(s), "")
    except ValueError:
        return (1, 0.0, s)
