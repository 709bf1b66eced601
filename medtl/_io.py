"""Ground floor: files written so that a killed run never leaves half of one, strict JSON, sha256,
and a full disk or a read-only folder reported as the user's :class:`~medtl.errors.OutputError`.

Every stage may use these (they import nothing of medtl but the errors).

Example:
    >>> write_json("runs/x/metrics.json", {"auc": float("nan")})   # doctest: +SKIP
    PosixPath('runs/x/metrics.json')                               # holds {"auc": null}
    >>> ensure_free_space("runs/x/checkpoints/fold0", 40_000_000, "model.safetensors")  # doctest: +SKIP
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from medtl.errors import OutputError

__all__ = ["OUTPUT_ERRNOS", "atomic_write_bytes", "atomic_write_text", "ensure_free_space", "free_bytes",
           "json_safe", "output_error", "read_json", "sha256_file", "write_json"]

# errno values that mean "this output cannot be written here" (the user's disk or folder, not a medtl bug)
_NO_SPACE = {errno.ENOSPC, *([errno.EDQUOT] if hasattr(errno, "EDQUOT") else [])}
_NO_ACCESS = {errno.EACCES, errno.EPERM, errno.EROFS}
OUTPUT_ERRNOS = frozenset(_NO_SPACE | _NO_ACCESS)

# what a checkpoint needs besides its weights (meta.json, directory entries)
_SPACE_MARGIN = 1 << 16


def free_bytes(path: str | Path) -> int | None:
    """Bytes free on the filesystem holding ``path`` (its nearest existing ancestor); ``None`` if unknown."""
    p = Path(path).absolute()
    for candidate in (p, *p.parents):
        if candidate.exists():
            try:
                return int(shutil.disk_usage(candidate).free)
            except OSError:
                return None
    return None


def output_error(exc: OSError, path: str | Path, needed: int | None = None) -> OutputError | None:
    """The :class:`OutputError` for an ``OSError`` raised while writing ``path``, or ``None`` when
    the errno is not a full disk, a quota or a permission problem (then it is a medtl bug).

    The error names the folder, the bytes ``needed`` (when known) and the bytes free.

    Example:
        >>> err = output_error(OSError(errno.ENOSPC, "No space left on device"), "/tmp/run/metrics.json", 10)
        >>> err.folder, err.needed
        ('/tmp/run', 10)
    """
    if exc.errno not in OUTPUT_ERRNOS:
        return None
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    what = f" while writing {path.name}" if path != folder else ""
    if exc.errno in _NO_SPACE:
        kind = "disk quota exceeded" if exc.errno != errno.ENOSPC else "no space left on device"
        return OutputError(folder, kind + what, needed=needed, free=free_bytes(folder))
    kind = "read-only file system" if exc.errno == errno.EROFS else "permission denied"
    return OutputError(folder, kind + what, hint="Choose an --out folder you can write to, or fix its permissions.")


def ensure_free_space(folder: str | Path, needed: int, what: str) -> None:
    """Refuse, before writing anything, an output of ``needed`` bytes that does not fit.

    Raises:
        OutputError: the filesystem of ``folder`` has fewer than ``needed`` bytes (plus a
            small margin for metadata) free; the message gives both numbers.
    """
    free = free_bytes(folder)
    if free is not None and free < needed + _SPACE_MARGIN:
        raise OutputError(folder, f"not enough free space for {what}", needed=needed + _SPACE_MARGIN, free=free)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically: temp file in the same folder, fsync, ``os.replace``.

    Readers see either the previous content or the complete new content, never a partial
    file, even when the process is killed (SIGKILL) mid-write. Parent folders are created.
    On any failure the temporary file is removed and the previous file is left as it was.

    Raises:
        OutputError: the disk or quota is full, or the folder is not writable (named, with
            the bytes needed and free).

    Example:
        >>> atomic_write_bytes("runs/x/predictions.csv", b"id,label\\n")   # doctest: +SKIP
        PosixPath('runs/x/predictions.csv')
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        if isinstance(exc, OSError) and (err := output_error(exc, path, needed=len(data))) is not None:
            raise err from None
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
