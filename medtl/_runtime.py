"""Ground floor: devices, seeds, the console and progress bars. Every stage may use these.

Seeds. A run has two seeds in its config: ``cv.seed`` decides which patients fall in which
outer fold, ``train.seed`` everything random inside a fold. Every random stream of a fold
(its inner validation split, the new head's initialisation, augmentation and batch order,
nested-CV inner folds) is drawn from **one** :class:`numpy.random.SeedSequence` keyed by
``(train.seed, repeat, fold)``, so folds are independent of the order they run in and a
resumed run draws exactly what an uninterrupted one would.

Example:
    >>> s = FoldSeeds(0, repeat=0, fold=3)
    >>> s.int("init") == FoldSeeds(0, 0, 3).int("init")      # stable
    True
    >>> s.int("init") != s.int("fit")                        # independent streams
    True
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from medtl.errors import ConfigError

__all__ = ["FoldSeeds", "console", "device_name", "progress_bar", "resolve_device", "seed_everything", "split_seed"]

console = Console(stderr=True)

# the named random streams of one fold; the position in this tuple is part of the seed scheme,
# so append new names at the end
_STREAMS = ("inner_split", "init", "fit", "nested_split", "probe", "search")


@dataclass(frozen=True)
class FoldSeeds:
    """The random streams of one fold: ``SeedSequence([seed, repeat, fold, *path])``.

    ``child(j)`` gives the streams of the j-th inner training of that fold (nested CV).
    The official train/val/test split is ``repeat=0, fold=0``.
    """

    seed: int
    repeat: int = 0
    fold: int = 0
    path: tuple[int, ...] = ()

    def _sequence(self) -> np.random.SeedSequence:
        return np.random.SeedSequence([int(self.seed), int(self.repeat), int(self.fold), *self.path])

    def int(self, stream: str) -> int:
        """A 31-bit seed for the named stream (``inner_split``, ``init``, ``fit``, ...)."""
        if stream not in _STREAMS:
            raise ValueError(f"Unknown seed stream {stream!r}; valid: {_STREAMS}.")
        state = self._sequence().generate_state(len(_STREAMS))
        return int(state[_STREAMS.index(stream)] % (2**31 - 1))

    def child(self, index: int) -> FoldSeeds:
        return FoldSeeds(self.seed, self.repeat, self.fold, (*self.path, int(index) + 1))


def split_seed(seed: int, repeat: int) -> int:
    """The seed of the outer fold assignment of one repeat (``cv.seed``, repeat)."""
    return int(np.random.SeedSequence([int(seed), int(repeat)]).generate_state(1)[0] % (2**31 - 1))


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's global and torch's generators."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def resolve_device(name: str, setting: str = "train.device") -> torch.device:
    """``auto`` -> CUDA when available, else the CPU; ``cuda`` without a GPU is an error, never a fallback."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{setting}=cuda but no CUDA device is visible. Use {setting}=auto or cpu.")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def device_name(device: torch.device) -> str:
    """``"cuda (NVIDIA H200)"`` or ``"cpu (2 threads)"``: the device as a figure should name it."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def progress_bar() -> Progress:
    """The one progress-bar style of medtl (on stderr, removed when done)."""
    return Progress(TextColumn("[progress.description]{task.description}"), BarColumn(),
                    TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(), console=console,
                    transient=True)
