"""How much memory medtl may use for decoded images: parsing ``data.memory_budget`` and reading what the machine has."""

from __future__ import annotations

import os
import re
import time

# -- memory: how much medtl may use for decoded images --------------------------------------
#: the largest config file (bytes) and YAML document (nodes, aliases expanded) that is read
MAX_CONFIG_BYTES = 1 << 20
MAX_YAML_NODES = 100_000
#: the largest `data.image_size` entry and `evaluate.n_bootstrap`
MAX_IMAGE_SIDE = 4096
MAX_BOOTSTRAP = 100_000
_MIN_BUDGET = 16 << 20
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
_BYTES = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*)\s*$")
_AVAILABLE: list[float] = []  # [monotonic time, bytes]: available_memory() caches for a second
_FALLBACK_AVAILABLE = 8 << 30  # when the platform cannot say (no /proc, no sysconf)


def parse_bytes(value: float | str) -> int:
    """A memory size in bytes from an int or a string such as ``"4GB"``, ``"512 MiB"``, ``"2e9"``.

    Units: B, KB/MB/GB/TB (powers of 1000; K/M/G/T too) and KiB/MiB/GiB/TiB (powers of 1024),
    in any letter case.

    Raises:
        ValueError: not a size, negative, or an unknown unit.
        TypeError: neither a number nor a string.

    Example:
        >>> parse_bytes("4GB"), parse_bytes("1.5 GiB"), parse_bytes(1024)
        (4000000000, 1610612736, 1024)
    """
    if isinstance(value, bool):
        raise TypeError(f"expected a size in bytes or a string such as '4GB'; got {value!r}")
    if isinstance(value, (int, float)):
        number, unit = float(value), ""
    elif isinstance(value, str):
        m = _BYTES.match(value)
        try:
            number, unit = (float(m.group(1)), m.group(2).lower()) if m else (float(value), "")
        except ValueError:
            raise ValueError(f"expected a size such as '4GB', '512MiB' or a number of bytes; got {value!r}") from None
    else:
        raise TypeError(f"expected a size in bytes or a string such as '4GB'; got {type(value).__name__}")
    if unit not in _UNITS:
        raise ValueError(f"unknown unit {unit!r} in {value!r}; use B, KB, MB, GB, TB or KiB, MiB, GiB, TiB")
    if not (number >= 0 and number * _UNITS[unit] < 2**63):  # also refuses NaN and infinity
        raise ValueError(f"expected a size between 0 and 9.2 EB; got {value!r}")
    return int(number * _UNITS[unit])


def format_bytes(n: float) -> str:
    """``1234567890`` -> ``"1.23 GB"`` (powers of 1000, three significant digits).

    Example:
        >>> format_bytes(4_294_967_296), format_bytes(512)
        ('4.29 GB', '512 B')
    """
    n = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} EB"  # pragma: no cover


def _proc_value(path: str, key: str) -> int | None:
    """A ``kB`` value from ``/proc/meminfo`` or ``/proc/self/status`` in bytes, or ``None``."""
    try:
        with open(path, encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _free_ram() -> int:
    value = _proc_value("/proc/meminfo", "MemAvailable")
    if value is not None:
        return value
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return _FALLBACK_AVAILABLE


def _limit_headroom() -> int | None:
    """Bytes left under the address-space and data-segment limits (``ulimit -v``/``-d``), if any."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    out = None
    for name, used_key in (("RLIMIT_AS", "VmSize"), ("RLIMIT_DATA", "VmData")):
        try:
            soft, _ = resource.getrlimit(getattr(resource, name))
        except (AttributeError, ValueError, OSError):
            continue
        if soft == resource.RLIM_INFINITY or soft < 0:
            continue
        used = _proc_value("/proc/self/status", used_key) or 0
        left = max(0, soft - used)
        out = left if out is None else min(out, left)
    return out


def available_memory() -> int:
    """Bytes this process can still allocate: free RAM (``MemAvailable``), capped by the
    address-space and data limits (``ulimit -v``, ``prlimit --as``) when they are set.

    Read at most once a second (decoding asks for every file).

    Example:
        >>> available_memory() > 0
        True
    """
    now = time.monotonic()
    if _AVAILABLE and now - _AVAILABLE[0] < 1.0:
        return int(_AVAILABLE[1])
    value = _free_ram()
    headroom = _limit_headroom()
    if headroom is not None:
        value = min(value, headroom)
    _AVAILABLE[:] = [now, value]
    return value


def memory_budget_bytes(budget: int | None = None) -> int:
    """The memory medtl may use for decoded images: ``data.memory_budget`` when set, else half of
    :func:`available_memory` (read now).

    Example:
        >>> memory_budget_bytes(4_000_000_000)
        4000000000
    """
    return int(budget) if budget is not None else available_memory() // 2


def _budget_text(budget: int | None) -> str:
    """Where the budget comes from, for messages: ``"data.memory_budget=4 GB"`` or the default."""
    if budget is not None:
        return f"data.memory_budget={format_bytes(budget)}"
    return (f"{format_bytes(memory_budget_bytes(None))}: half of the {format_bytes(available_memory())} "
            "available; set data.memory_budget to change it")
