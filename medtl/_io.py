"""Ground floor: files written so that a killed run never leaves half of one, strict JSON, sha256.

Every stage may use these (they import nothing of medtl but the errors).

Example:
    >>> write_json("runs/x/metrics.json", {"auc": float("nan")})   # doctest: +SKIP
    PosixPath('runs/x/metrics.json')                               # holds {"auc": null}
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np

__all__ = ["atomic_write_bytes", "atomic_write_text", "json_safe", "read_json", "sha256_file", "write_json"]


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically: temp file in the same folder, fsync, ``os.replace``.

    Readers see either the previous content or the complete new content, never a partial
    file, even when the process is killed (SIGKILL) mid-write. Parent folders are created.

    Example:
        >>> atomic_write_bytes("runs/x/predictions.csv", b"id,label\\n")   # doctest: +SKIP
        PosixPath('runs/x/predictions.csv')
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """:func:`atomic_write_bytes` for text (``encoding`` default UTF-8).

    Example:
        >>> atomic_write_text("runs/x/metrics.json", "{}")   # doctest: +SKIP
        PosixPath('runs/x/metrics.json')
    """
    return atomic_write_bytes(path, text.encode(encoding))


def fsync_dir(folder: Path) -> None:
    """Persist the rename itself (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()




def json_safe(obj):
    """JSON-safe copy: NaN/Inf become null (valid JSON for every reader), numpy values plain."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path: str | Path, obj) -> Path:
    """Strict JSON (undefined values as ``null``, never ``NaN``), written atomically."""
    return atomic_write_text(path, json.dumps(json_safe(obj), indent=2, allow_nan=False))


def read_json(path: str | Path):
    """The JSON document at ``path`` (``json.JSONDecodeError``/``OSError`` propagate to the caller)."""
    return json.loads(Path(path).read_text(encoding="utf-8"))
