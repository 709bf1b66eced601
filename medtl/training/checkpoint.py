"""Checkpoints: ``model.safetensors`` plus ``meta.json`` (record, preprocessing, labels, config hash).

Loading rebuilds the network from the stored weight record without fetching pretrained
weights again, so a checkpoint is usable offline and on another machine.

Crash safety: every file is written to a temporary name in the same folder, flushed to
disk and moved into place with :func:`os.replace` (atomic on POSIX and Windows), so a run
killed at any moment leaves either the old file or the new one, never half of one.
``meta.json`` stores the sha256 of ``model.safetensors``; :func:`load_checkpoint` and
:func:`verify_checkpoint` recompute it and raise :class:`CorruptCheckpointError` on a
truncated, corrupt or mismatched file, so a resuming run can retrain that fold instead.

Checkpoints are always verified: one whose ``meta.json`` records no sha256, or whose
weights do not match it, is refused (:class:`UnverifiedCheckpointError`) unless the caller
passes ``trust_unverified=True`` (``--trust-unverified`` on the command line); the returned
meta then says why it was not verified (``meta["unverified"]``), for the run to record.
Free space is checked before a checkpoint is written (:class:`~medtl.errors.OutputError`).

An ensemble checkpoint (:func:`save_ensemble_checkpoint`) is a folder whose ``meta.json``
names member checkpoints in its subfolders (``FOLDER/member0/``, ...) and pins each member's
sha256; every member is verified like a single checkpoint, and loading gives one
:class:`~medtl.models.ensemble.EnsembleClassifier`.

Example:
    >>> atomic_write_text("runs/cv/metrics.json", json.dumps(metrics))   # doctest: +SKIP
    >>> save_checkpoint(model, "runs/cv/checkpoints/fold0", {"class_names": ["a", "b"]})  # doctest: +SKIP
    >>> verify_checkpoint("runs/cv/checkpoints/fold0")["model_sha256"][:8]  # doctest: +SKIP
    '3fa81c02'
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from medtl._io import atomic_write_bytes, atomic_write_text, ensure_free_space, sha256_file
from medtl.errors import MedtlError

__all__ = [
    "CorruptCheckpointError", "ModelSpec", "UnverifiedCheckpointError", "atomic_write_bytes", "atomic_write_text",
    "load_checkpoint", "read_meta", "save_checkpoint", "save_ensemble_checkpoint", "sha256_file", "verify_checkpoint",
]

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
META_FILE = "meta.json"
ENSEMBLE = "ensemble"  # the meta.json block of an ensemble checkpoint
_MEMBER_NAME = re.compile(r"^[A-Za-z0-9_-]+$")  # a member is a subfolder: a plain name, never a path


class CorruptCheckpointError(MedtlError):
    """A checkpoint folder is incomplete, truncated or does not match its recorded sha256.

    Attributes:
        folder: the checkpoint folder.
        reason: what is wrong, e.g. ``"model.safetensors sha256 mismatch"``.
    """

    hint = "Delete the folder and rerun (a resumed `medtl cv` retrains that fold)."

    def __init__(self, folder: str | Path, reason: str) -> None:
        self.folder = str(folder)
        self.reason = reason
        super().__init__(f"Checkpoint '{self.folder}' is unusable: {reason}. {self.hint}")


class UnverifiedCheckpointError(CorruptCheckpointError):
    """The weights of a checkpoint cannot be verified: ``meta.json`` records no sha256, or the
    file's size or sha256 differs from the recorded one. Loading it anyway takes an explicit
    ``trust_unverified=True`` (``--trust-unverified``), which the run records."""

    hint = ("Delete the folder and rerun (a resumed `medtl cv` retrains that fold), or, only if you trust "
            "this file, pass --trust-unverified (Python: trust_unverified=True); the outputs then record "
            "that the checkpoint was not verified.")


@dataclass(frozen=True)
class ModelSpec:
    """Everything :func:`medtl.create_encoder` needs to build a run's network: the one place a
    model is described, both when a run first builds it and when a checkpoint rebuilds it.

    Stored as ``meta.json["build"]``; rebuilding never fetches pretrained weights again (the
    checkpoint holds the trained ones) and keeps the weight record the run started from.

    Example:
        >>> spec = ModelSpec("tf_efficientnet_lite0", num_classes=2, in_chans=1)
        >>> model = spec.build(pretrained=True)                     # doctest: +SKIP
        >>> ModelSpec.from_dict(spec.to_dict()) == spec
        True
    """

    name: str
    num_classes: int
    in_chans: int = 1
    spatial_dims: int = 2
    channel_mapping: str = "auto"
    drop_rate: float = 0.0
    conversion_3d: str = "inflate"
    layout: str = "auto"
    depth: int | None = None

    @classmethod
    def from_config(cls, cfg, num_classes: int) -> ModelSpec:
        """The spec of ``cfg.model`` for ``num_classes`` classes and the data's channels."""
        it = cfg.data.intensity
        return cls(name=cfg.model.name, num_classes=int(num_classes),
                   in_chans=len(it.windows) if it.mode == "multiwindow" else 1,
                   spatial_dims=int(cfg.data.spatial_dims), channel_mapping=cfg.model.channel_mapping,
                   drop_rate=float(cfg.model.drop_rate), conversion_3d=cfg.model.conversion_3d,
                   layout=cfg.model.layout,
                   depth=int(cfg.data.image_size[0]) if cfg.data.spatial_dims == 3 else None)

    @classmethod
    def from_dict(cls, d: dict) -> ModelSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def build(self, *, pretrained: bool, weights_path: str | Path | None = None, **override):
        """The network, with pretrained weights (``pretrained=True``) or randomly initialised."""
        from medtl.models.encoders import create_encoder

        kw = {**self.to_dict(), **override}
        name, layout = kw.pop("name"), kw.pop("layout")
        return create_encoder(name, pretrained=pretrained, weights_path=weights_path,
                              layout=layout if pretrained else "auto", **kw)


def save_checkpoint(model, folder: str | Path, meta: dict) -> Path:
    """Write ``folder/model.safetensors`` and ``folder/meta.json``; returns the folder.

    ``meta`` should hold ``class_names``, ``data`` (intensity/image size), ``config_hash``
    and anything else useful; the weight record, the channel mapping and the sha256 of the
    weights file (``model_sha256``) are added. Both files are written atomically, weights
    first and ``meta.json`` last, so a checkpoint whose ``meta.json`` names the sha256 of
    its weights is complete.

    Raises:
        OutputError: the filesystem has less free space than the checkpoint needs (checked
            before anything is written), or it is read-only.
    """
    from safetensors.torch import save

    folder = Path(folder)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    blob = save(state)
    meta = dict(meta)
    meta["weights_record"] = model.weights_record.to_dict()
    meta.setdefault("channel_mapping", model.channel_mapping)
    meta.setdefault("in_chans", model.in_chans)
    meta.setdefault("num_classes", model.num_classes)
    meta["model_sha256"] = hashlib.sha256(blob).hexdigest()
    meta["model_bytes"] = len(blob)
    meta.pop("unverified", None)
    ensure_free_space(folder, len(blob), f"checkpoint {folder.name}/{WEIGHTS_FILE}")
    atomic_write_bytes(folder / WEIGHTS_FILE, blob)
    atomic_write_text(folder / META_FILE, json.dumps(meta, indent=2, default=str))
    return folder


def read_meta(folder: str | Path) -> dict:
    """``meta.json`` of a checkpoint folder as a dict.

    Raises:
        MedtlError: no ``meta.json`` (the run did not finish this checkpoint).
        CorruptCheckpointError: ``meta.json`` is not valid JSON.
    """
    path = Path(folder) / META_FILE
    if not path.is_file():
        raise MedtlError(f"No checkpoint at '{folder}' (meta.json missing). Was the run finished?")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptCheckpointError(folder, f"meta.json is not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise CorruptCheckpointError(folder, "meta.json does not hold a JSON object")
    return meta


def verify_checkpoint(folder: str | Path, *, trust_unverified: bool = False) -> dict:
    """Check that ``folder`` holds a complete checkpoint whose weights match ``meta.json``.

    Returns the meta dict. A checkpoint whose weights cannot be verified (no ``model_sha256``
    recorded, or a size or sha256 that differs from it) is refused unless
    ``trust_unverified``: then a warning is logged and ``meta["unverified"]`` holds the reason.

    Raises:
        CorruptCheckpointError: meta.json or model.safetensors missing or unreadable.
        UnverifiedCheckpointError: (a subclass) no sha256 recorded, or the weights file has
            the wrong size or a different sha256 than recorded, without ``trust_unverified``.

    Example:
        >>> try:                                                   # doctest: +SKIP
        ...     verify_checkpoint(ckpt)
        ... except CorruptCheckpointError:
        ...     retrain_fold()
    """
    folder = Path(folder)
    if not (folder / META_FILE).is_file():
        raise CorruptCheckpointError(folder, "meta.json is missing (the run stopped before finishing it)")
    meta = read_meta(folder)
    if meta.get(ENSEMBLE) is not None:  # an ensemble: every member verified, and pinned by the ensemble
        return _verify_ensemble(folder, meta, trust_unverified)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise CorruptCheckpointError(folder, "model.safetensors is missing")
    reason = _unverified_reason(meta, weights)
    if reason is None:
        meta.pop("unverified", None)
        return meta
    if not trust_unverified:
        raise UnverifiedCheckpointError(folder, reason)
    log.warning("checkpoint %s is NOT verified (%s); loaded because trust_unverified was given", folder, reason)
    meta["unverified"] = reason
    return meta


def _unverified_reason(meta: dict, weights: Path) -> str | None:
    """Why ``weights`` does not verify against ``meta`` (``None`` when it does)."""
    expected = meta.get("model_sha256")
    if not isinstance(expected, str) or not expected:
        return ("meta.json records no model_sha256, so model.safetensors cannot be verified (the hash was removed, "
                "or the checkpoint was written by an older medtl)")
    size = weights.stat().st_size
    if meta.get("model_bytes") not in (None, size):
        return f"model.safetensors has {size} bytes but {meta['model_bytes']} were written (truncated or replaced)"
    actual = sha256_file(weights)
    if actual != expected:
        return (f"model.safetensors sha256 mismatch (recorded {expected[:12]}…, file {actual[:12]}…): "
                "the file is corrupt, was modified, or is from another run")
    return None


def load_checkpoint(folder: str | Path, *, trust_unverified: bool = False):
    """Rebuild the model saved in ``folder``; returns ``(model, meta)`` with the model in eval mode.

    The weights' size and sha256 are always checked first (:func:`verify_checkpoint`); with
    ``trust_unverified`` a checkpoint that does not verify is loaded anyway, with a warning,
    and ``meta["unverified"]`` says why (record it in the outputs). An ensemble checkpoint
    (:func:`save_ensemble_checkpoint`) gives one :class:`~medtl.models.ensemble.EnsembleClassifier`
    over its verified members.

    Raises:
        CorruptCheckpointError: incomplete, truncated or corrupt checkpoint.
        UnverifiedCheckpointError: no sha256 recorded or a mismatch, without ``trust_unverified``.

    Example:
        >>> model, meta = load_checkpoint("runs/cv/checkpoints/fold0")   # doctest: +SKIP
        >>> meta["class_names"]                                        # doctest: +SKIP
        ['lesion', 'normal']
    """
    import timm
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from medtl.models.encoders import MedtlClassifier
    from medtl.models.records import WeightRecord

    if (Path(folder) / META_FILE).is_file() and read_meta(folder).get(ENSEMBLE) is not None:
        return _load_ensemble(Path(folder), trust_unverified)
    meta = verify_checkpoint(folder, trust_unverified=trust_unverified)
    try:
        rec_dict = dict(meta["weights_record"])
        for k in ("mean", "std", "input_size", "tags"):
            rec_dict[k] = tuple(rec_dict[k])
        record = WeightRecord(**rec_dict)
        mapping = meta["channel_mapping"]
        in_chans = int(meta["in_chans"])
        num_classes = int(meta["num_classes"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptCheckpointError(folder, f"meta.json lacks or garbles a field ({type(exc).__name__}: {exc})") from None
    build = meta.get("build")
    if build:  # written by the run drivers: rebuild exactly as trained (3D conversion, layouts, ...)
        try:
            model = ModelSpec.from_dict(build).build(pretrained=False, num_classes=num_classes, in_chans=in_chans,
                                                     channel_mapping=mapping)
        except (MedtlError, TypeError) as exc:
            raise CorruptCheckpointError(folder, f"cannot rebuild the network from meta.json ({exc})") from None
        # provenance: the weights the run started from, not the random init the rebuild used
        model.weights_record = record
    else:  # older checkpoints: a 2D timm network described by its weight record
        net_chans = record.in_chans if mapping == "repeat" else in_chans
        net = timm.create_model(record.architecture, pretrained=False, num_classes=num_classes, in_chans=net_chans)
        model = MedtlClassifier(net, dataclasses.replace(record), in_chans=in_chans, channel_mapping=mapping)
    try:
        state = load_file(str(Path(folder) / WEIGHTS_FILE))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CorruptCheckpointError(folder, f"model.safetensors cannot be read ({exc})") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CorruptCheckpointError(folder, f"weights do not fit {record.architecture}: {str(exc)[:300]}") from None
    return model.eval(), meta


# -- ensembles: one checkpoint folder over member checkpoints in its subfolders -------------------
def save_ensemble_checkpoint(folder: str | Path, members: list[str], meta: dict, *, tta: bool) -> Path:
    """Write ``folder/meta.json`` of an ensemble over the finished member checkpoints
    ``folder/<member>/`` (each written by :func:`save_checkpoint`); returns the folder.

    Every member is verified first, and its sha256 and size are pinned in
    ``meta["ensemble"] = {"members": [{"key", "model_sha256", "model_bytes"}], "tta", "combine"}``,
    so a member replaced afterwards is refused like a corrupt file. ``meta.json`` is written
    last and atomically: a folder without it (a run killed while training members) holds no
    loadable ensemble. :func:`load_checkpoint` rebuilds it as one
    :class:`~medtl.models.ensemble.EnsembleClassifier` (``tta``: flip TTA inside).

    Raises:
        CorruptCheckpointError, UnverifiedCheckpointError: a member does not verify.
    """
    folder = Path(folder)
    bad = [k for k in members if not _MEMBER_NAME.match(str(k))]
    if not members or bad:
        raise MedtlError(f"An ensemble checkpoint needs at least one member, each a plain subfolder name "
                         f"(letters, digits, _ and -). Got {list(members)} instead.")
    pinned, first = [], None
    for key in members:
        m = verify_checkpoint(folder / key)
        first = first or m
        pinned.append({"key": str(key), "model_sha256": m["model_sha256"], "model_bytes": m.get("model_bytes")})
    meta = dict(meta)
    for k in ("weights_record", "channel_mapping", "in_chans", "num_classes"):  # as a single checkpoint's
        if k in first:
            meta.setdefault(k, first[k])
    meta[ENSEMBLE] = {"members": pinned, "tta": bool(tta),
                      "combine": ("mean of every head's output over the members (class and label probabilities, "
                                  "regression values), each member with its own head and flip-averaged when tta"
                                  if meta.get("tasks") else
                                  "mean of the members' softmax probabilities (each flip-averaged when tta)")}
    meta.pop("unverified", None)
    atomic_write_text(folder / META_FILE, json.dumps(meta, indent=2, default=str))
    return folder


def _members(folder: Path, meta: dict) -> list[tuple[str, dict]]:
    """``[(member key, its pinned record)]`` of an ensemble's ``meta.json``."""
    try:
        members = [(str(m["key"]), m) for m in meta[ENSEMBLE]["members"]]
    except (KeyError, TypeError) as exc:
        raise CorruptCheckpointError(folder, f"meta.json's ensemble block lacks or garbles its members "
                                             f"({type(exc).__name__}: {exc})") from None
    if not members:
        raise CorruptCheckpointError(folder, "meta.json's ensemble block names no members")
    bad = [k for k, _ in members if not _MEMBER_NAME.match(k)]
    if bad:
        raise CorruptCheckpointError(folder, f"ensemble members must be plain subfolder names; got {bad}")
    return members


def _pin_reason(key: str, pinned: dict, member_meta: dict) -> str | None:
    want, got = pinned.get("model_sha256"), member_meta.get("model_sha256")
    if want != got:
        return (f"member {key} is not the checkpoint the ensemble was built from (sha256 pinned "
                f"{str(want)[:12]}…, member {str(got)[:12]}…)")
    return None


def _verdict(folder: Path, meta: dict, reasons: list[str], trust_unverified: bool) -> dict:
    meta.pop("unverified", None)
    if not reasons:
        return meta
    reason = "; ".join(reasons)
    if not trust_unverified:
        raise UnverifiedCheckpointError(folder, reason)
    log.warning("ensemble checkpoint %s is NOT verified (%s); loaded because trust_unverified was given", folder,
                reason)
    meta["unverified"] = reason
    return meta


def _verify_ensemble(folder: Path, meta: dict, trust_unverified: bool) -> dict:
    reasons = []
    for key, pinned in _members(folder, meta):
        m = verify_checkpoint(folder / key, trust_unverified=trust_unverified)
        if m.get("unverified"):
            reasons.append(f"{key}: {m['unverified']}")
        if (pin := _pin_reason(key, pinned, m)) is not None:
            reasons.append(pin)
    return _verdict(folder, meta, reasons, trust_unverified)


def _load_ensemble(folder: Path, trust_unverified: bool):
    from medtl.models.ensemble import EnsembleClassifier

    meta = read_meta(folder)
    models, heads, reasons = [], [], []
    for key, pinned in _members(folder, meta):
        model, m = load_checkpoint(folder / key, trust_unverified=trust_unverified)
        if m.get("unverified"):
            reasons.append(f"{key}: {m['unverified']}")
        if (pin := _pin_reason(key, pinned, m)) is not None:
            reasons.append(pin)
        models.append(model)
        heads.append(m.get("tasks"))
    meta = _verdict(folder, meta, reasons, trust_unverified)
    tta = bool(meta[ENSEMBLE].get("tta", False))
    if meta.get("tasks") is None:
        return EnsembleClassifier(models, tta=tta).eval(), meta
    from medtl.models.heads import MultiTaskHead

    if any(h is None for h in heads):
        raise CorruptCheckpointError(folder, "a multi-task ensemble's members must each record their tasks")
    return EnsembleClassifier(models, tta=tta, heads=[MultiTaskHead.from_dict(h) for h in heads],
                              head=MultiTaskHead.from_dict(meta["tasks"])).eval(), meta
