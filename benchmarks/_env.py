"""Describe the machine a benchmark ran on: CPU or GPU, library versions, load average.

Shared by ``benchmarks/throughput`` and ``benchmarks/cv_walltime`` so every result file names
its device the same way.

Example:
    >>> env = describe("cpu")                      # doctest: +SKIP
    >>> env["device"], env["tag"]                   # doctest: +SKIP
    ('AMD EPYC, 2 cores, 2 torch threads', 'cpu-2c')
    >>> env = finish(env)                           # adds the load average at the end
"""

from __future__ import annotations

import os
import platform
import re

import torch

__all__ = ["describe", "finish", "load1", "md_header"]


def load1() -> float | None:
    """1-minute load average, or ``None`` where the OS does not report one."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe(device: str) -> dict:
    """A dict naming the device (``"cpu"`` or ``"cuda"``), versions and the load at start.

    ``tag`` is a short file-name-safe name for the device, e.g. ``cpu-2c`` or ``cuda-h100``.
    """
    import monai
    import timm

    cores = os.cpu_count() or 0
    env = {
        "device_type": device,
        "cpu": _cpu_model(),
        "cpu_cores": cores,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "monai": monai.__version__,
        "load1_start": load1(),
    }
    if device == "cuda":
        name = torch.cuda.get_device_name(0)
        env.update(gpu=name, cuda=torch.version.cuda, bf16=torch.cuda.is_bf16_supported(),
                   device=f"{name}, {cores} CPU cores")
        short = re.search(r"(H100|H200|A100|L4|L40S?|A10G?|T4|V100|RTX \w+)", name)
        env["tag"] = "cuda-" + (short.group(1).replace(" ", "").lower() if short else "gpu")
    else:
        env.update(device=f"{env['cpu']}, {cores} cores, {env['torch_threads']} torch threads, no GPU used",
                   tag=f"cpu-{cores}c")
    return env


def finish(env: dict) -> dict:
    """Return ``env`` with the 1-minute load average at the end added."""
    return {**env, "load1_end": load1()}


def md_header(env: dict) -> str:
    """One markdown line naming the device and versions."""
    return (f"Device: **{env['device']}**; torch {env['torch']}, timm {env['timm']}, monai {env['monai']}; "
            f"1-min load {env.get('load1_start')} at start, {env.get('load1_end')} at end.")
