"""The run directory: one class owns its layout, in both directions.

Every workflow that writes a run (``cv``, ``train``) and every one that reads it
(``predict``, ``export``, ``compare``, ``explain``, tracking) goes through :class:`RunDir`;
nothing else parses the folder. Layout::

    RUN_DIR/config.yaml        resolved config, then _config_hash and _medtl_version
    RUN_DIR/metrics.json       the run's figures (see docs/run-directory.md); strict JSON, null for undefined
    RUN_DIR/predictions.csv    id, patient_id (pseudonym), site, fold, label, prob_<class>..., pred
    RUN_DIR/folds/<key>.json   one FoldRecord per finished fold (resume)
    RUN_DIR/checkpoints/<key>/ model.safetensors + meta.json (sha256, ModelSpec, preprocessing)
    RUN_DIR/checkpoints/final/member<i>/  an official-split ensemble's members (train.ensemble_folds > 1);
                               checkpoints/final/meta.json then pins them and loads as one model
    RUN_DIR/skipped.json       unreadable inputs: case id and reason (paths only with privacy.reveal_ids)
    RUN_DIR/decoded/<key>/     decoded images over data.memory_budget (medtl.data._diskcache; resume reuses them)
    RUN_DIR/.pseudonym_salt    the per-run key of the patient pseudonyms (never shared)
    PREDICT_DIR/IDENTIFYING_id_map.csv   case id -> scan path, only when asked for (``--write-id-map``)

No output names a scan's path or file name unless ``privacy.reveal_ids`` is set: case ids
are manifest rows (``row00007``), MedMNIST indices or, for ``medtl predict`` on a folder,
``scan-0001`` in sorted path order. Checkpoints are sha256-verified on every load; one that
does not verify is refused unless ``trust_unverified=True``, which the reading workflow records.

Fold keys: ``fold3`` (k-fold), ``r1fold3`` (repeat 1 of repeated CV), ``site0``
(leave-one-site-out), ``final`` (official split), ``member2`` (member 2 of an official-split
ensemble, inside ``final``). A prediction row's ``fold`` column lists every model that never
saw the case, ``|``-separated (repeated CV: one per repeat; an ensemble: every member).

Example:
    >>> run = RunDir("runs/ct")                       # doctest: +SKIP
    >>> cfg = run.read_config()                       # doctest: +SKIP
    >>> rows = run.read_predictions()                 # doctest: +SKIP
    >>> run.model_key(rows[0]), rows[0].proba         # doctest: +SKIP
    ('fold2', {'no_contrast': 0.81, 'contrast': 0.19})
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import yaml

from medtl._io import atomic_write_text, output_error, read_json, write_json
from medtl._version import __version__
from medtl.config import Config, config_hash, config_yaml, load_config
from medtl.data.privacy import Pseudonymizer, make_redactor
from medtl.errors import ConfigError, MedtlError
from medtl.training.checkpoint import (
    CorruptCheckpointError,
    ModelSpec,
    load_checkpoint,
    save_checkpoint,
    save_ensemble_checkpoint,
    verify_checkpoint,
)

__all__ = ["FoldKey", "FoldRecord", "PredictionRow", "RunDir", "RunMetrics", "epochs_trained", "redact_skipped"]

_MEMBER = re.compile(r"^member\d+$")
_KEY = re.compile(r"^(?:r(?P<repeat>\d+))?fold(?P<fold>\d+)$|^site(?P<site>\d+)$|^(?P<final>final)$"
                  r"|^member(?P<member>\d+)$")


def epochs_trained(info: dict) -> int:
    """Epochs a fit trained, for the compute bill's image count: ``info["epochs_trained"]`` where the
    trainer gives it (a seed ensemble trains each member's epochs), else the history's length."""
    if info.get("epochs_trained") is not None:
        return int(info["epochs_trained"])
    return len(info.get("history") or [])


@dataclass(frozen=True)
class FoldKey:
    """A model's key in the run directory (``fold3``, ``r1fold3``, ``site0``, ``final``, ``member2``)."""

    kind: str  # "fold", "site", "final" or "member"
    index: int = 0
    repeat: int | None = None

    @classmethod
    def parse(cls, text: str) -> FoldKey:
        m = _KEY.match(str(text).strip())
        if m is None:
            raise MedtlError(f"'{text}' is not a fold key of a medtl run; valid keys look like fold3, r1fold3, "
                             "site0 or final (an ensemble's member: member2).")
        if m["final"]:
            return cls("final")
        if m["member"] is not None:
            return cls("member", int(m["member"]))
        if m["site"] is not None:
            return cls("site", int(m["site"]))
        return cls("fold", int(m["fold"]), None if m["repeat"] is None else int(m["repeat"]))

    def __str__(self) -> str:
        if self.kind == "final":
            return "final"
        if self.kind == "site":
            return f"site{self.index}"
        if self.kind == "member":
            return f"member{self.index}"
        return f"fold{self.index}" if self.repeat is None else f"r{self.repeat}fold{self.index}"


@dataclass
class FoldRecord:
    """What one finished fold leaves behind (``folds/<key>.json``): enough to resume without retraining.

    ``proba`` is ``(n_test, K)`` as reported (temperature-scaled when the run calibrates),
    ``proba_raw`` the model's own; ``info`` holds what the fold trainer chose (best epoch,
    probe ``C``, nested-CV grid point and inner scores, history). Multi-task runs add ``tasks``:
    ``{task: {"outputs": (n_test, k)[, "train_mean": the training-fold mean (regression)]}}``
    (absent from the file of a single-task run).
    """

    config_hash: str
    fold: str
    test_ids: list[str]
    proba: list[list[float]]
    proba_raw: list[list[float]]
    threshold: float
    temperature: float | None = None
    n_train: int = 0
    n_val: int = 0
    info: dict = field(default_factory=dict)
    tasks: dict | None = None

    @property
    def history(self) -> list[dict]:
        return list(self.info.get("history") or [])

    @classmethod
    def from_dict(cls, d: dict) -> FoldRecord:
        known = {f for f in cls.__dataclass_fields__}
        rec = {k: v for k, v in d.items() if k in known}
        # records written before the info block kept the trainer's choices at top level
        rec.setdefault("info", {k: d[k] for k in ("best_epoch", "history", "selected", "inner_scores", "C")
                                if k in d})
        rec.setdefault("proba_raw", d.get("proba"))
        return cls(**rec)


@dataclass
class PredictionRow:
    """One row of ``predictions.csv``."""

    id: str
    patient_id: str
    site: str
    folds: list[str]
    label: str
    proba: dict[str, float]
    pred: str
    extra: dict[str, str] = field(default_factory=dict)  # multi-task runs: the per-task columns

    @property
    def confidence(self) -> float:
        return float(self.proba[self.pred])

    @property
    def correct(self) -> bool:
        return self.pred == self.label


@dataclass
class RunMetrics:
    """``metrics.json`` with the few fields every reader needs typed; ``raw`` is the whole document."""

    task: str
    name: str
    class_names: list[str]
    headline: dict
    n_cases: int | None
    device: str | None
    raw: dict
    compute: dict | None = None  # the compute bill (medtl._compute.ComputeBill.as_dict), when recorded

    @classmethod
    def from_dict(cls, d: dict) -> RunMetrics:
        task = d.get("task", "cv")
        n = d.get("n_cases", d.get("n_test"))
        return cls(task=task, name=d.get("name", ""), class_names=list(d.get("class_names") or []),
                   headline=d.get("pooled") or d.get("test") or {}, n_cases=None if n is None else int(n),
                   device=d.get("device"), raw=d, compute=d.get("compute"))


class RunDir:
    """A medtl run directory (see the module docstring for its layout).

    Args:
        path: the folder (created by :meth:`start`; readers need it to exist).
    """

    CONFIG, METRICS, PREDICTIONS, SKIPPED = "config.yaml", "metrics.json", "predictions.csv", "skipped.json"
    ID_MAP = "IDENTIFYING_id_map.csv"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._hashes: set[str] = set()

    def __repr__(self) -> str:
        return f"RunDir('{self.path}')"

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    # -- writing -----------------------------------------------------------------------
    def start(self, cfg: Config, *, resume: bool) -> str:
        """Create the folder and write the resolved config; returns its hash.

        With ``resume``, an earlier run in the folder must have the same config. An old
        ``config.yaml`` is re-read with today's schema first, so a config written by an older
        medtl (before a field with a default was added) still counts as the same config and its
        finished folds are reused.
        """
        self.mkdir()
        h = config_hash(cfg)
        self._hashes = {h}
        old = self.path / self.CONFIG
        if old.exists() and resume and (self.path / "folds").exists():
            prev_hash, prev_now = self._previous_hashes(old)
            if prev_now != h:
                raise MedtlError(f"'{self.path}' holds a run made with a different config (hash {prev_hash}, now "
                                 f"{h}). Use a new --out directory, or --no-resume to overwrite it.")
            if prev_hash:
                self._hashes.add(prev_hash)
        # written in one atomic step (no temporary config file to leave behind on a full disk)
        atomic_write_text(old, config_yaml(cfg) + f"_config_hash: {h}\n_medtl_version: {__version__}\n")
        return h

    def mkdir(self) -> Path:
        """Create the folder; a read-only or full filesystem is an :class:`~medtl.errors.OutputError`."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            err = output_error(exc, self.path)
            if err is None:
                raise
            raise err from None
        return self.path

    @staticmethod
    def _previous_hashes(path: Path) -> tuple[str | None, str | None]:
        """(hash recorded in an old config.yaml, hash of that config re-read with today's schema)."""
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
            recorded = raw.get("_config_hash")
            now = config_hash(load_config({k: v for k, v in raw.items() if not str(k).startswith("_")},
                                          check_dependencies=False))
        except (MedtlError, OSError, yaml.YAMLError, AttributeError, UnicodeDecodeError):
            return None, None  # unreadable or no longer valid: a different config
        return recorded, now

    def write_json(self, name: str, obj) -> Path:
        return write_json(self.path / name, obj)

    def write_skipped(self, skipped: list[dict], *, reveal_ids: bool = False) -> Path:
        """``skipped.json``: ``[{"case_id", "reason"}]``; the file's path only with ``reveal_ids``
        (a folder named after a patient must not reach an output), and removed from the reason."""
        return self.write_json(self.SKIPPED, redact_skipped(skipped, reveal_ids=reveal_ids))

    def write_id_map(self, pairs: list[tuple[str, str]], what: str) -> Path:
        """``IDENTIFYING_id_map.csv``: case id -> path, for the user who asked for it.

        Its name and its first line mark it as identifying; no other output holds paths.
        ``what`` says what the paths are relative to."""
        buf = io.StringIO()
        buf.write(f"# IDENTIFYING: links medtl case ids to scan paths ({what}); paths may hold patient names. "
                  "Do not share this file.\n")
        w = csv.writer(buf)
        w.writerow(["id", "path"])
        w.writerows(pairs)
        return atomic_write_text(self.path / self.ID_MAP, buf.getvalue())

    def write_metrics(self, metrics: dict) -> Path:
        return self.write_json(self.METRICS, metrics)

    def write_fold(self, record: FoldRecord) -> Path:
        (self.path / "folds").mkdir(parents=True, exist_ok=True)
        d = asdict(record)
        if d.get("tasks") is None:
            d.pop("tasks", None)
        return write_json(self.path / "folds" / f"{record.fold}.json", d)

    def read_fold_record(self, key: str | FoldKey) -> FoldRecord:
        """The fold record ``folds/<key>.json`` as written (no resume checks)."""
        return FoldRecord.from_dict(read_json(self.path / "folds" / f"{key}.json"))

    def checkpoint(self, key: str | FoldKey) -> Path:
        """The checkpoint folder of ``key``; an ensemble member's lies inside the ensemble's (``final``)."""
        if _MEMBER.match(str(key)):
            return self.path / "checkpoints" / "final" / str(key)
        return self.path / "checkpoints" / str(key)

    def checkpoint_meta(self, cfg: Config, spec: ModelSpec, class_names: list[str], h: str, **extra) -> dict:
        """``meta.json`` of a checkpoint: the ModelSpec that rebuilds it, preprocessing, labels, choices."""
        return {"class_names": list(class_names), "config_hash": h, "medtl_version": __version__,
                "data": {"intensity": cfg.data.intensity.model_dump(), "image_size": list(cfg.data.image_size),
                         "spatial_dims": cfg.data.spatial_dims},
                "build": spec.to_dict(), **extra}

    def save_model(self, key: str | FoldKey, model, meta: dict) -> Path:
        return save_checkpoint(model, self.checkpoint(key), meta)

    def save_ensemble(self, members: list[str], meta: dict, *, tta: bool) -> Path:
        """``checkpoints/final/meta.json`` of the official-split ensemble over its finished members
        (``checkpoints/final/member<i>/``), each verified and pinned by sha256
        (:func:`~medtl.training.checkpoint.save_ensemble_checkpoint`); loads as one model."""
        return save_ensemble_checkpoint(self.checkpoint("final"), list(members), meta, tta=tta)

    def drop_final_model(self) -> None:
        """Remove ``checkpoints/final``'s own ``meta.json`` and weights (member folders stay): an
        ensemble run starting in a folder that holds an earlier final model must not leave that
        model loadable while its members train. The ensemble's ``meta.json`` is written last."""
        folder = self.checkpoint("final")
        for name in ("meta.json", "model.safetensors"):
            (folder / name).unlink(missing_ok=True)

    def write_predictions(self, rows: list[PredictionRow], class_names: list[str]) -> Path:
        buf = io.StringIO()
        w = csv.writer(buf)
        extra = list(rows[0].extra) if rows else []  # multi-task runs: <task>.<column> after pred
        w.writerow(["id", "patient_id", "site", "fold", "label", *[f"prob_{n}" for n in class_names], "pred", *extra])
        for r in rows:
            w.writerow([r.id, r.patient_id, r.site, "|".join(r.folds), r.label,
                        *[f"{r.proba[n]:.6f}" for n in class_names], r.pred, *[r.extra.get(c, "") for c in extra]])
        return atomic_write_text(self.path / self.PREDICTIONS, buf.getvalue())

    def pseudonymizer(self, reveal: bool = False) -> Pseudonymizer:
        return Pseudonymizer.for_run(self.path, reveal=reveal)

    # -- reading -----------------------------------------------------------------------
    def require(self, *names: str) -> None:
        missing = [n for n in names if not (self.path / n).is_file()]
        if missing:
            raise MedtlError(f"'{self.path}' is not a finished medtl run: {', '.join(missing)} missing. Run "
                             "`medtl cv` or `medtl train` first and pass its --out directory.")

    def read_config(self, overrides: list[str] | None = None) -> Config:
        """The run's config, re-read with today's schema (``_`` bookkeeping keys dropped)."""
        self.require(self.CONFIG)
        try:
            raw = yaml.safe_load((self.path / self.CONFIG).read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise ConfigError(f"'{self.path / self.CONFIG}' cannot be read ({exc}).") from None
        # a finished run is read back even where an optional extra it logged to (MLflow) is not installed
        return load_config({k: v for k, v in raw.items() if not str(k).startswith("_")}, overrides,
                           check_dependencies=False)

    def read_metrics(self) -> RunMetrics:
        self.require(self.METRICS)
        try:
            return RunMetrics.from_dict(read_json(self.path / self.METRICS))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise MedtlError(f"'{self.path / self.METRICS}' is not valid JSON ({exc}); rerun the workflow.") from None

    def read_predictions(self) -> list[PredictionRow]:
        self.require(self.PREDICTIONS)
        path = self.path / self.PREDICTIONS
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            cols = reader.fieldnames or []
            if not {"id", "label", "pred"} <= set(cols):
                raise MedtlError(f"'{path}' is not a medtl predictions file (needs id, label, prob_<class>, pred "
                                 f"columns; found {cols}).")
            names = [c[5:] for c in cols if c.startswith("prob_")]
            rows = []
            for r in reader:
                rows.append(PredictionRow(
                    id=r["id"], patient_id=r.get("patient_id", ""), site=r.get("site", ""),
                    folds=[f for f in (r.get("fold") or "").split("|") if f], label=r["label"],
                    proba={n: float(r[f"prob_{n}"]) for n in names}, pred=r["pred"],
                    extra={c: r[c] or "" for c in cols[cols.index("pred") + 1:]}))
        return rows

    def read_fold(self, key: str | FoldKey, test_ids: list[str]) -> FoldRecord | None:
        """A finished fold for resuming, or ``None`` when it must be (re)trained.

        It counts only if it was made with this config (see :meth:`start`), for the same test
        cases, and its checkpoint verifies (a corrupt or partial checkpoint is retrained)."""
        path = self.path / "folds" / f"{key}.json"
        ckpt = self.checkpoint(key)
        if not (path.exists() and (ckpt / "model.safetensors").exists()):
            return None
        try:
            rec = FoldRecord.from_dict(read_json(path))
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError, AttributeError):
            return None
        if rec.config_hash not in self._hashes or rec.test_ids != list(test_ids):
            return None
        try:
            verify_checkpoint(ckpt)
        except CorruptCheckpointError as exc:
            from medtl._runtime import console

            console.print(f"[yellow]{key}: {exc}; retraining this fold[/]")
            return None
        return rec

    def model_keys(self) -> list[str]:
        """The run's models: one key per checkpoint folder (an ensemble's members are inside ``final``)."""
        return sorted(p.parent.name for p in (self.path / "checkpoints").glob("*/meta.json"))

    def load_model(self, key: str | FoldKey, *, trust_unverified: bool = False):
        """``(model in eval mode, meta)`` of one checkpoint, sha256-verified.

        A checkpoint that does not verify (no sha256 recorded, or a mismatch) raises
        :class:`~medtl.training.checkpoint.UnverifiedCheckpointError` unless
        ``trust_unverified``; then ``meta["unverified"]`` holds the reason (see :meth:`trust_record`).
        """
        return load_checkpoint(self.checkpoint(key), trust_unverified=trust_unverified)

    def load_models(self, *, trust_unverified: bool = False) -> list[tuple[str, object, dict]]:
        """``[(key, model, meta)]`` for every checkpoint of the run (the fold ensemble, or the final model;
        an official-split ensemble is one ``final`` model, an :class:`~medtl.models.ensemble.EnsembleClassifier`)."""
        keys = self.model_keys()
        if not keys:
            raise MedtlError(f"No checkpoints under '{self.path / 'checkpoints'}'. The run did not finish any fold; "
                             "rerun it (resuming) first.")
        return [(k, *self.load_model(k, trust_unverified=trust_unverified)) for k in keys]

    @staticmethod
    def trust_record(loaded: list[tuple[str, object, dict]], trust_unverified: bool) -> dict:
        """What a reading workflow records about verification: ``{"trust_unverified", "unverified":
        {key: reason}}``; each unverified checkpoint is also said on the console."""
        unverified = {k: meta["unverified"] for k, _, meta in loaded if meta.get("unverified")}
        if unverified:
            from medtl._runtime import console

            for k, reason in unverified.items():
                console.print(f"warning: checkpoint {k} is NOT verified ({reason}); used because "
                              "--trust-unverified was given, and recorded in the outputs.",
                              markup=False, highlight=False)
        return {"trust_unverified": bool(trust_unverified), "unverified": unverified}

    @staticmethod
    def model_key(row: PredictionRow) -> str:
        """The checkpoint that never trained on this case: its first fold, or ``final``."""
        first = row.folds[0] if row.folds else ""
        if first in ("", "test", "ensemble"):
            return "final"
        return f"fold{first}" if first.isdigit() else str(FoldKey.parse(first))

    def files(self) -> list[Path]:
        """The run's own files and report folders (not checkpoints, fold records or data)."""
        skip = {"checkpoints", "folds", "demo_data", "mlruns"}
        return sorted(p for p in self.path.iterdir() if not p.name.startswith(".") and p.name not in skip)


def redact_skipped(skipped: list[dict], *, reveal_ids: bool = False) -> list[dict]:
    """Skipped-file entries for an output: ``{"case_id", "reason"}``, the path (with
    ``reveal_ids`` only) dropped and removed from the reason text as a whole value.

    Example:
        >>> redact_skipped([{"case_id": "scan-0001", "path": "/d/DOE_JOHN/x.dcm",
        ...                  "reason": "cannot open /d/DOE_JOHN/x.dcm: permission denied"}])
        [{'case_id': 'scan-0001', 'reason': 'cannot open <file>: permission denied'}]
    """
    out = []
    for s in skipped:
        entry = {"case_id": s.get("case_id"), "reason": str(s.get("reason", ""))}
        path = s.get("path")
        if reveal_ids:
            entry["path"] = path
        elif path:
            entry["reason"] = _without_path(entry["reason"], str(path))
        out.append(entry)
    return out


def _without_path(text: str, path: str) -> str:
    """``text`` with every spelling of ``path`` (as given, absolute, resolved, its file name)
    replaced by ``<file>``, as whole values only (:func:`medtl.data.privacy.make_redactor`)."""
    p = Path(path)
    spellings = {path, str(p.absolute()), p.name}
    try:
        spellings.add(str(p.resolve()))
    except (OSError, RuntimeError):  # a symlink loop
        pass
    return make_redactor(spellings, lambda _: "<file>")(text)


def class_counts(y: np.ndarray, class_names: list[str]) -> dict[str, int]:
    return {c: int((y == i).sum()) for i, c in enumerate(class_names)}

