"""User-facing exceptions.

Every error a user can cause derives from :class:`MedtlError`. The CLI prints the
message of a ``MedtlError`` without a traceback and exits with code 2; anything else
is a bug in medtl. Messages follow one template: what was received, what is valid,
and what to do next.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from pathlib import Path

__all__ = [
    "MedtlError",
    "ConfigError",
    "DataError",
    "UnreadableFileError",
    "WeightsError",
    "OutputError",
    "did_you_mean",
]


class MedtlError(Exception):
    """Base class for errors caused by user input (config, data, weights)."""


class ConfigError(MedtlError):
    """An invalid configuration: unknown key, wrong type, bad override."""


class DataError(MedtlError):
    """Invalid or unusable data: malformed manifest, empty class, no readable files."""


class UnreadableFileError(DataError):
    """One input file could not be decoded.

    Attributes:
        path: the file (or series folder) that failed.
        reason: a short, specific reason, e.g. ``"truncated pixel data"``.
    """

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class WeightsError(MedtlError):
    """Pretrained weights are missing, corrupt or do not fit the architecture."""


class OutputError(MedtlError):
    """An output could not be written: the disk (or quota) is full, or the folder is read-only.

    Attributes:
        folder: the output folder that could not be written.
        reason: what the operating system said, e.g. ``"no space left on device"``.
        needed: bytes the write needed, when known.
        free: bytes free on the folder's filesystem, when known.

    Example:
        >>> str(OutputError("runs/x", "no space left on device", needed=2_000_000, free=1_000))
        "Cannot write to 'runs/x': no space left on device (needs 2.0 MB, 1.0 kB free). Free some space or choose another --out folder; files written there earlier are intact."
    """

    def __init__(self, folder: str | Path, reason: str, *, needed: int | None = None, free: int | None = None,
                 hint: str | None = None) -> None:
        self.folder = str(folder)
        self.reason = reason
        self.needed = needed
        self.free = free
        sizes = [f"needs {format_bytes(needed)}" if needed is not None else "",
                 f"{format_bytes(free)} free" if free is not None else ""]
        sizes_text = ", ".join(s for s in sizes if s)
        hint = hint or ("Free some space or choose another --out folder; files written there earlier are intact.")
        super().__init__(f"Cannot write to '{self.folder}': {reason}"
                         f"{f' ({sizes_text})' if sizes_text else ''}. {hint}")


def format_bytes(n: float) -> str:
    """``1234567`` -> ``"1.2 MB"`` (decimal units, as ``df -H`` prints them)."""
    n = float(n)
    for unit in ("bytes", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{int(n)} bytes" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


def did_you_mean(name: str, valid: Iterable[str]) -> str:
    """Return ``" Did you mean 'x'?"`` for the closest valid name, or ``""``."""
    matches = difflib.get_close_matches(str(name), [str(v) for v in valid], n=1, cutoff=0.6)
    return f" Did you mean '{matches[0]}'?" if matches else ""
