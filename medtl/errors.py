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


def did_you_mean(name: str, valid: Iterable[str]) -> str:
    """Return ``" Did you mean 'x'?"`` for the closest valid name, or ``""``."""
    matches = difflib.get_close_matches(str(name), [str(v) for v in valid], n=1, cutoff=0.6)
    return f" Did you mean '{matches[0]}'?" if matches else ""
