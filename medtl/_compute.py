"""Ground floor: the compute bill of a run (device, wall time per stage, images/s, peak memory, energy).

A :class:`ComputeBill` starts its wall clock when it is made. Each stage of a workflow (``decode``,
``features``, ``training``, ``evaluation``, ``explanation``, ``prediction``, ``search``; other names
are allowed) is timed with ``with bill.stage(name):``; re-entering a stage adds to it. The images a
stage processed are counted with :meth:`ComputeBill.add_images`, which gives images per second.

Energy is measured where the machine lets a process read it, else estimated, and the bill says which:

* CPU: the Linux RAPL counters (``/sys/class/powercap/intel-rapl:N/energy_uj``, package domains)
  when readable. They measure the whole socket, other processes included.
* GPU: NVML's total energy counter (``pynvml``, Volta and newer) when ``pynvml`` is installed.
* Otherwise: the process CPU time (user + sys, DataLoader workers included) times a power figure
  per busy core, :data:`DEFAULT_CPU_WATTS_PER_CORE` unless configured (``runtime.cpu_watts_per_core``).

Nothing polls in the background: the bill reads clocks and counters when a stage opens and closes.

Example:
    >>> bill = ComputeBill(device="cpu")
    >>> with bill.stage("training"):
    ...     bill.add_images("training", 64)
    >>> d = bill.as_dict()
    >>> sorted(d["stages"]) == ["training"] and d["stages"]["training"]["images"] == 64
    True
"""

from __future__ import annotations

import os
import resource
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_CPU_WATTS_PER_CORE", "STAGES", "ComputeBill", "bill_rows", "cpu_model_name",
           "peak_rss_bytes", "sum_bills"]

#: The power drawn by one fully busy CPU core, in watts, when energy is estimated rather than measured:
#: the TDP per core of an Intel Xeon Gold 6248 (150 W / 20 cores), a common server CPU.
DEFAULT_CPU_WATTS_PER_CORE = 7.5

#: The usual stage names, in the order a report lists them (other names follow in the order first seen).
STAGES = ("decode", "features", "search", "training", "evaluation", "explanation", "prediction")

_RAPL_ROOT = Path("/sys/class/powercap")


@lru_cache(maxsize=1)
def cpu_model_name() -> str:
    """The CPU model from ``/proc/cpuinfo`` (``"AMD EPYC 7763 64-Core Processor"``), else the platform's name."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.lower().startswith(("model name", "hardware")) and ":" in line:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "unknown CPU"


def peak_rss_bytes() -> int:
    """The peak resident memory of this process so far, in bytes (``getrusage``; kB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _cpu_seconds() -> float:
    """User + sys CPU time of this process and its finished children (DataLoader workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _rapl_domains() -> list[Path]:
    """Readable RAPL package counters (``intel-rapl:0``, ``intel-rapl:1``; sub-domains excluded)."""
    if not _RAPL_ROOT.is_dir():
        return []
    found = []
    for d in sorted(_RAPL_ROOT.glob("intel-rapl:*")):
        if d.name.count(":") != 1:        # intel-rapl:0:0 is a sub-domain of package 0
            continue
        f = d / "energy_uj"
        try:
            int(f.read_text())
        except (OSError, ValueError):
            return []                     # one unreadable package: do not report half a socket pair
        found.append(d)
    return found


def _rapl_read(domains: list[Path]) -> list[int]:
    return [int((d / "energy_uj").read_text()) for d in domains]


def _rapl_wh(domains: list[Path], start: list[int], end: list[int]) -> float:
    total = 0
    for d, a, b in zip(domains, start, end, strict=True):
        if b < a:                         # the counter wrapped
            try:
                b += int((d / "max_energy_range_uj").read_text())
            except (OSError, ValueError):
                continue
        total += b - a
    return total / 1e6 / 3600.0


def _nvml_handle(index: int) -> Any | None:
    """An NVML handle of GPU ``index`` whose energy counter works, or None (no pynvml, old GPU)."""
    try:
        import pynvml  # optional: pip install nvidia-ml-py
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
        return handle
    except Exception:  # noqa: BLE001 - any NVML failure only means "not measured"; the method says so
        return None


def _nvml_mj(handle: Any) -> int:
    import pynvml

    return int(pynvml.nvmlDeviceGetTotalEnergyConsumption(handle))


class ComputeBill:
    """The compute bill of one run: wall time per stage, images/s, peak memory, energy.

    Args:
        device: a torch device string (``"cpu"``, ``"cuda"``, ``"cuda:1"``) or ``torch.device``.
        cpu_watts_per_core: power of one busy core for the estimate (default
            :data:`DEFAULT_CPU_WATTS_PER_CORE`).
    """

    def __init__(self, device: Any = "cpu", cpu_watts_per_core: float | None = None) -> None:
        self.device = str(device)
        self.cpu_watts_per_core = float(cpu_watts_per_core or DEFAULT_CPU_WATTS_PER_CORE)
        self._stages: dict[str, dict[str, float]] = {}
        self._open: dict[str, tuple[int, float, float]] = {}  # name -> (depth, wall start, CPU start)
        self._here: set[str] = set()                   # stages that ran in this process
        self._earlier: list[dict[str, Any]] = []      # bills of work done before this process (resume)
        self._merged_peaks: list[tuple[int, int | None]] = []
        self._gpu_index = self._cuda_index()
        self._rapl = _rapl_domains()
        self._nvml = _nvml_handle(self._gpu_index) if self._gpu_index is not None else None
        if self._gpu_index is not None:
            import torch

            torch.cuda.reset_peak_memory_stats(self._gpu_index)
        self._t0 = time.perf_counter()
        self._cpu0 = _cpu_seconds()
        self._rapl0 = _rapl_read(self._rapl) if self._rapl else []
        self._nvml0 = _nvml_mj(self._nvml) if self._nvml is not None else 0

    def _cuda_index(self) -> int | None:
        if not self.device.startswith("cuda"):
            return None
        import torch

        if not torch.cuda.is_available():
            return None
        return int(self.device.split(":", 1)[1]) if ":" in self.device else torch.cuda.current_device()

    # ---------------------------------------------------------------- recording
    def _entry(self, name: str, here: bool = True) -> dict[str, float]:
        if here:
            self._here.add(name)
        return self._stages.setdefault(name, {"wall_s": 0.0, "cpu_s": 0.0, "images": 0})

    @contextmanager
    def stage(self, name: str) -> Iterator[ComputeBill]:
        """Time one stage; re-entering a stage adds to it. Entering a stage already open is a no-op,
        so nested calls (a fold helper inside a timed training) never count twice."""
        self.begin(name)
        try:
            yield self
        finally:
            self.end(name)

    def begin(self, name: str) -> None:
        """Open ``name`` (as ``with stage(name)`` does, for code too long to indent); close it with :meth:`end`."""
        depth = self._open.get(name, (0, 0.0, 0.0))[0]
        start = self._open[name][1:] if depth else (time.perf_counter(), _cpu_seconds())
        self._open[name] = (depth + 1, *start)

    def end(self, name: str) -> None:
        """Close a stage opened with :meth:`begin`; its time is added when the outermost opening closes."""
        if name not in self._open or self._open[name][0] == 0:
            raise ValueError(f"Stage '{name}' is not open; open stages: {[n for n, o in self._open.items() if o[0]]}. "
                             "Call begin(name) before end(name), or use `with bill.stage(name):`.")
        depth, t0, c0 = self._open[name]
        self._open[name] = (depth - 1, t0, c0)
        if depth == 1:
            entry = self._entry(name)
            entry["wall_s"] += time.perf_counter() - t0
            entry["cpu_s"] += _cpu_seconds() - c0

    def add_images(self, stage: str, n: int) -> None:
        """Count ``n`` images (or volumes) processed in ``stage``."""
        self._entry(stage)["images"] += int(n)

    def add_time(self, stage: str, wall_s: float, images: int = 0) -> None:
        """Add time measured elsewhere (a stage that timed itself) to ``stage``."""
        entry = self._entry(stage)
        entry["wall_s"] += float(wall_s)
        entry["images"] += int(images)

    def merge(self, other: Mapping[str, Any] | ComputeBill, *, earlier: bool = False) -> None:
        """Add another bill's stages (its ``as_dict()`` or the bill itself).

        ``earlier=False`` (default): ``other`` ran inside this bill's clock (a fold, a curve point):
        its stage times and images are added, while wall time, CPU time and energy stay this bill's
        own, so nothing counts twice.
        ``earlier=True``: ``other`` ran before this process (folds of a resumed run): its wall time,
        CPU time and energy are added to the totals as well, and ``stages_run_here`` leaves its stages out.
        """
        d = other.as_dict() if isinstance(other, ComputeBill) else dict(other)
        for name, s in (d.get("stages") or {}).items():
            entry = self._entry(name, here=not earlier)
            entry["wall_s"] += float(s.get("wall_s") or 0.0)
            entry["cpu_s"] += float(s.get("cpu_s") or 0.0)
            entry["images"] += int(s.get("images") or 0)
        self._merged_peaks.append((int(d.get("peak_rss_bytes") or 0), d.get("peak_gpu_bytes")))
        if earlier:
            self._earlier.append(d)

    # ---------------------------------------------------------------- reading
    def _energy(self, cpu_s: float) -> tuple[float, str]:
        parts, methods = 0.0, []
        if self._rapl:
            parts += _rapl_wh(self._rapl, self._rapl0, _rapl_read(self._rapl))
            methods.append("CPU measured by the RAPL package counters (whole socket, other processes included)")
        else:
            parts += cpu_s * self.cpu_watts_per_core / 3600.0
            methods.append(f"CPU estimated as process CPU time ({cpu_s:.1f} s user+sys) x "
                           f"{self.cpu_watts_per_core:g} W per busy core (RAPL not readable)")
        if self._gpu_index is not None:
            if self._nvml is not None:
                parts += (_nvml_mj(self._nvml) - self._nvml0) / 1000.0 / 3600.0
                methods.append("GPU measured by NVML's energy counter (whole device)")
            else:
                methods.append("GPU not included (install nvidia-ml-py for NVML's energy counter)")
        return parts, "; ".join(methods) + "."

    def as_dict(self) -> dict[str, Any]:
        """The bill as plain JSON values (see the module docstring); safe to call more than once."""
        wall = time.perf_counter() - self._t0
        cpu = _cpu_seconds() - self._cpu0
        energy, method = self._energy(cpu)
        peak_gpu = None
        if self._gpu_index is not None:
            import torch

            peak_gpu = int(torch.cuda.max_memory_allocated(self._gpu_index))
        peak_rss = peak_rss_bytes()
        for rss, gpu in self._merged_peaks:
            peak_rss = max(peak_rss, rss)
            if gpu is not None:
                peak_gpu = max(peak_gpu or 0, int(gpu))
        for e in self._earlier:
            wall += float(e.get("wall_s") or 0.0)
            cpu += float(e.get("cpu_s") or 0.0)
            energy += float(e.get("energy_wh") or 0.0)
        if self._earlier:
            method += (f" Includes the recorded bills of {len(self._earlier)} unit(s) run by an earlier "
                       "process (resume).")
        return {
            "device": self.device,
            "device_name": self.device_name(),
            "wall_s": round(wall, 3),
            "cpu_s": round(cpu, 3),
            "stages": {n: self._stage_dict(n) for n in self._ordered()},
            "stages_run_here": [n for n in self._ordered() if n in self._here],
            "peak_rss_bytes": int(peak_rss),
            "peak_gpu_bytes": peak_gpu,
            "energy_wh": round(energy, 6),
            "energy_method": method,
            "cpu_watts_per_core": self.cpu_watts_per_core,
            "resumed_units": len(self._earlier),
        }

    def _ordered(self) -> list[str]:
        return [s for s in STAGES if s in self._stages] + [s for s in self._stages if s not in STAGES]

    def _stage_dict(self, name: str) -> dict[str, Any]:
        s = self._stages[name]
        wall, n = float(s["wall_s"]), int(s["images"])
        return {"wall_s": round(wall, 3), "cpu_s": round(float(s["cpu_s"]), 3), "images": n,
                "images_per_s": round(n / wall, 2) if n and wall > 0 else None}

    def device_name(self) -> str:
        """``"NVIDIA H200"`` for a GPU, else the CPU model with its usable cores."""
        if self._gpu_index is not None:
            import torch

            return torch.cuda.get_device_name(self._gpu_index)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        return f"{cpu_model_name()} ({cores} cores)"


def sum_bills(bills: list[Mapping[str, Any]]) -> dict[str, Any]:
    """Add bills of separate runs (wall, CPU time, energy and stages add; peaks take the maximum)."""
    if not bills:
        raise ValueError("sum_bills needs at least one bill; got an empty list.")
    out: dict[str, Any] = {k: bills[0].get(k) for k in ("device", "device_name", "cpu_watts_per_core")}
    out.update(wall_s=0.0, cpu_s=0.0, energy_wh=0.0, stages={}, peak_rss_bytes=0, peak_gpu_bytes=None)
    methods = []
    for b in bills:
        out["wall_s"] += float(b.get("wall_s") or 0.0)
        out["cpu_s"] += float(b.get("cpu_s") or 0.0)
        out["energy_wh"] += float(b.get("energy_wh") or 0.0)
        out["peak_rss_bytes"] = max(out["peak_rss_bytes"], int(b.get("peak_rss_bytes") or 0))
        if b.get("peak_gpu_bytes") is not None:
            out["peak_gpu_bytes"] = max(out["peak_gpu_bytes"] or 0, int(b["peak_gpu_bytes"]))
        for name, s in (b.get("stages") or {}).items():
            e = out["stages"].setdefault(name, {"wall_s": 0.0, "cpu_s": 0.0, "images": 0})
            e["wall_s"] += float(s.get("wall_s") or 0.0)
            e["cpu_s"] += float(s.get("cpu_s") or 0.0)
            e["images"] += int(s.get("images") or 0)
        if b.get("energy_method") and b["energy_method"] not in methods:
            methods.append(b["energy_method"])
    for e in out["stages"].values():
        e["images_per_s"] = round(e["images"] / e["wall_s"], 2) if e["images"] and e["wall_s"] > 0 else None
    out["energy_method"] = " | ".join(methods)
    return out


def bill_rows(bill: Mapping[str, Any] | None) -> list[tuple[str, str, str, str]]:
    """Table rows ``(stage, wall, images, images/s)`` of a bill, ending with a ``total`` row; for reports."""
    if not bill:
        return []
    rows = []
    for name, s in (bill.get("stages") or {}).items():
        ips = s.get("images_per_s")
        rows.append((name, f"{float(s.get('wall_s') or 0):.1f} s", str(s.get("images") or 0),
                     f"{ips:.3g}" if ips else "–"))
    rows.append(("total", f"{float(bill.get('wall_s') or 0):.1f} s", "", ""))
    return rows
