"""Memory checks before decoding (private): a header's declared image size against what may be held.

Every reader compares the size a file's header declares (DICOM rows x columns x frames x
samples; the NIfTI shape; a Pillow image's size and bands) with :func:`image_limit` before any
pixel is decoded, so a 1 MB file claiming a petabyte image is refused by name instead of
crashing the run. The limit follows ``data.memory_budget`` (how much memory medtl may use for
decoded images) and the memory available now, whichever is smaller.

Example:
    >>> check_declared("huge.nii.gz", (32000, 32000, 32000), 4, limit=2**30)  # doctest: +SKIP
    Traceback (most recent call last):
    UnreadableFileError: huge.nii.gz: image too large to decode: ...
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from medtl.config import available_memory, format_bytes, memory_budget_bytes
from medtl.errors import UnreadableFileError

__all__ = ["image_limit", "declared_bytes", "check_declared", "out_of_memory_reason", "FLOAT32"]

#: bytes per decoded value: medtl holds pixels as float32
FLOAT32 = 4


def image_limit(budget: int | None = None) -> int:
    """The largest decoded image (bytes, float32) one file may declare.

    ``budget`` is ``data.memory_budget`` in bytes (``None``: half the available memory).
    The limit is the budget, but never more than half of what is available now: decoding
    needs room for a copy or two besides the image itself.

    Example:
        >>> image_limit(2**30) <= 2**30
        True
    """
    return max(0, min(memory_budget_bytes(budget), available_memory() // 2))


def declared_bytes(shape: Sequence[int], bytes_per_value: int = FLOAT32) -> int:
    """``prod(shape) * bytes_per_value`` as an exact int (never overflows)."""
    return math.prod(int(s) for s in shape) * int(bytes_per_value)


def check_declared(path: str | Path, shape: Sequence[int], bytes_per_value: int, *, limit: int | None,
                   what: str | None = None, budget: int | None = None) -> None:
    """Refuse ``path`` when its declared image of ``shape`` is over ``limit`` bytes.

    Args:
        shape: the declared extents, e.g. ``(frames, rows, columns, samples)``.
        bytes_per_value: bytes per decoded value (``FLOAT32``, or more for float64 data).
        limit: from :func:`image_limit`; ``None`` computes it with ``budget``.
        what: how the shape reads, e.g. ``"60000 frames of 65535 x 65535 pixels x 1 sample"``.

    Raises:
        UnreadableFileError: ``image too large to decode: ...`` with the declared size and the limit.
    """
    limit = image_limit(budget) if limit is None else limit
    need = declared_bytes(shape, bytes_per_value)
    if need <= limit:
        return
    desc = what or " x ".join(str(int(s)) for s in shape)
    raise UnreadableFileError(path, (
        f"image too large to decode: its header declares {desc} = {format_bytes(need)} as float32, over the "
        f"per-image memory limit of {format_bytes(limit)} (the smaller of data.memory_budget and half the "
        "available memory); the header is probably corrupt. If the image is real, crop or downsample it, or "
        "raise data.memory_budget on a machine with more memory"))


def out_of_memory_reason(during: str = "decoding") -> str:
    """The reason recorded for a file whose decoding raised ``MemoryError``."""
    return (f"out of memory while {during} this file (MemoryError; {format_bytes(available_memory())} "
            "available now): its header or pixel data asks for more memory than this process may use, "
            "so the file is probably corrupt; if it is real, crop or downsample it, or free memory")
