"""The device-resident fast path shared by training, feature extraction and saliency.

Small medical datasets fit on a GPU many times over: 780 BreastMNIST images at 224² are
78 MB in float16. :func:`resident` decodes nothing and copies once: the cached array
(``(N, C, *S)`` in [0, 1], from :mod:`medtl.data.prepare`) becomes a compact tensor on the
device (float16 on CUDA, or uint8 when the values are exact multiples of 1/255), and every
batch after that is an index into it. When the data do not fit in the memory budget, it stays
on the host in pinned memory and each batch is copied asynchronously. On the CPU the tensor
*is* the numpy array (no copy), so the data are held in memory once.

:func:`batches` is the inference side (prediction, feature extraction, saliency): batches in
``channels_last`` for 2D (oneDNN and cuDNN run depthwise convolutions several times faster in
it), inside bf16 autocast on CUDA (:func:`autocast`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["DiskArray", "Resident", "autocast", "batches", "memory_format", "resident"]

log = logging.getLogger(__name__)

#: fraction of the free device memory the resident data may take (the rest is for the model)
DEVICE_BUDGET = 0.4


def memory_format(x: torch.Tensor) -> torch.Tensor:
    """``channels_last`` for 2D batches ``(B, C, H, W)``; 3D and other shapes pass unchanged."""
    return x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x


def autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast on CUDA (fp16 where bf16 is unsupported); a no-op context on CPU."""
    if device.type == "cuda" and enabled:
        return torch.autocast("cuda", dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    return torch.autocast("cpu", enabled=False)


class DiskArray:
    """Images ``(N, C, *S)`` float32 in a raw C-order file, read a batch at a time.

    The file is memory-mapped only for the time of one read, so the pages read do not stay
    in the process's memory (its RSS) between batches; the operating system's page cache
    keeps recently read data fast without counting against the process.

    Indexing with a slice, a list, an integer array or a boolean mask gives another
    ``DiskArray`` (a view: nothing is read); an integer gives one image ``(C, *S)``;
    ``np.asarray(view)`` and :meth:`read` read the rows into memory.

    Args:
        path: the raw file, ``prod(shape) * 4`` bytes of little-endian float32.
        shape: ``(N, C, *S)`` of the whole file.
        rows: which rows of the file this view holds, in order (default: all).

    Example:
        >>> arr = DiskArray("decoded/images.f32", (100, 1, 32, 64, 64))   # doctest: +SKIP
        >>> arr[[3, 1]].shape, arr[5].shape                                # doctest: +SKIP
        ((2, 1, 32, 64, 64), (1, 32, 64, 64))
    """

    dtype = np.dtype(np.float32)

    def __init__(self, path, shape: tuple[int, ...], rows: np.ndarray | None = None) -> None:
        self.path = path
        self.file_shape = tuple(int(s) for s in shape)
        self.rows = np.arange(self.file_shape[0]) if rows is None else np.asarray(rows, dtype=np.int64)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.rows), *self.file_shape[1:])

    @property
    def ndim(self) -> int:
        return len(self.file_shape)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * 4

    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:
        return f"DiskArray({str(self.path)!r}, shape={self.shape})"

    def __getitem__(self, key):
        if isinstance(key, tuple):
            head, rest = (key[0], key[1:]) if key else (slice(None), ())
            if isinstance(head, (int, np.integer)):
                return self[head][rest]
            return self[head].read()[(slice(None), *rest)]
        if isinstance(key, (int, np.integer)):
            return self.read(np.array([key]))[0]
        return DiskArray(self.path, self.file_shape, self.rows[key])

    def read(self, idx: np.ndarray | None = None) -> np.ndarray:
        """Rows ``idx`` of this view (all when ``None``) as a float32 array ``(len(idx), C, *S)``."""
        rows = self.rows if idx is None else self.rows[np.asarray(idx, dtype=np.int64)]
        out = np.empty((len(rows), *self.file_shape[1:]), dtype=np.float32)
        if len(rows):
            mm = np.memmap(self.path, dtype="<f4", mode="r", shape=self.file_shape)
            np.take(mm, rows, axis=0, out=out)
            del mm  # unmapped now: the pages read leave this process's memory
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        a = self.read()
        return a if dtype is None else a.astype(dtype, copy=False)


@dataclass
class Resident:
    """Images held once, as a compact tensor, ready to be indexed into float32 batches.

    Attributes:
        data: ``(N, C, *S)`` storage tensor (float32, float16 or uint8), or a :class:`DiskArray`
            read a batch at a time.
        device: where batches are returned.
        scale: multiply the storage by this to get [0, 1] values (1/255 for uint8, else 1).
        on_device: whether ``data`` lives on ``device`` (else on the host, pinned on CUDA, or on disk).
    """

    data: torch.Tensor | DiskArray
    device: torch.device
    scale: float = 1.0
    on_device: bool = True

    def __len__(self) -> int:
        return len(self.data)

    def take(self, idx: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Float32 batch ``(len(idx), C, *S)`` on ``device`` (host-side indices are fine)."""
        if isinstance(self.data, DiskArray):
            return self._from_disk(np.asarray(idx.cpu() if isinstance(idx, torch.Tensor) else idx))
        if self.on_device:
            idx = torch.as_tensor(idx).to(self.data.device, non_blocking=True)
            return self._float(self.data.index_select(0, idx))
        chunk = self.data[torch.as_tensor(idx)]
        if self.device.type == "cuda":
            chunk = chunk.pin_memory()
        return self._float(chunk.to(self.device, non_blocking=True))

    def slice(self, lo: int, hi: int) -> torch.Tensor:
        """Float32 batch of images ``lo:hi`` on ``device``."""
        if isinstance(self.data, DiskArray):
            return self._from_disk(np.arange(lo, min(hi, len(self.data))))
        chunk = self.data[lo:hi]
        if not self.on_device:
            chunk = chunk.to(self.device, non_blocking=True)
        return self._float(chunk)

    def _from_disk(self, idx: np.ndarray) -> torch.Tensor:
        chunk = torch.from_numpy(self.data.read(idx))
        if self.device.type == "cuda":
            chunk = chunk.pin_memory()
        return self._float(chunk.to(self.device, non_blocking=True))

    def _float(self, t: torch.Tensor) -> torch.Tensor:
        t = t.float()  # a no-op for float32 storage
        return t * self.scale if self.scale != 1.0 else t


def _uint8_if_exact(images: np.ndarray) -> np.ndarray | None:
    """``images * 255`` as uint8 when every value is k/255 (e.g. MedMNIST at native size), else ``None``."""
    sample = images.reshape(-1)[: 1 << 16]
    if not np.array_equal(np.round(sample * 255) / 255, sample):  # cheap early refusal
        return None
    k = np.round(images * 255)
    if not np.array_equal(k.astype(np.float32) / np.float32(255), images):
        return None
    return k.astype(np.uint8)


def resident(images: np.ndarray | torch.Tensor | Resident, device: torch.device | str, *,
             budget: float = DEVICE_BUDGET) -> Resident:
    """Hold ``images`` ``(N, C, *S)`` (float, in [0, 1]) once, on ``device`` when they fit.

    On CPU the returned tensor shares memory with a float32 numpy input. On CUDA the images are
    stored as uint8 when lossless, else float16 (values in [0, 1] keep ~4 significant digits,
    finer than the 8-12 bit sources), and kept on the GPU if they take at most ``budget`` of
    its free memory; otherwise they stay on the host (pinned) and batches are copied
    asynchronously. A :class:`DiskArray` stays on disk and each batch is read when taken.
    Either way the batches returned are float32.

    Example:
        >>> r = resident(np.random.rand(10, 1, 8, 8).astype("float32"), "cpu")
        >>> r.take(np.array([0, 3])).shape
        torch.Size([2, 1, 8, 8])
    """
    if isinstance(images, Resident):
        return images
    device = torch.device(device)
    if isinstance(images, DiskArray):  # larger than the memory budget: read a batch at a time
        return Resident(images, device, on_device=False)
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    images = np.asarray(images)
    if device.type != "cuda":
        arr = images if images.dtype == np.float32 else images.astype(np.float32)
        return Resident(torch.from_numpy(np.ascontiguousarray(arr)), device)
    exact = _uint8_if_exact(images)
    if exact is not None:
        host, scale = torch.from_numpy(exact), 1.0 / 255
    else:
        host, scale = torch.from_numpy(images.astype(np.float16)), 1.0
    need = host.numel() * host.element_size()
    free, _ = torch.cuda.mem_get_info(device)
    if need <= budget * free:
        return Resident(host.to(device), device, scale, on_device=True)
    log.warning("The data (%.1f GB) do not fit in %.0f %% of the GPU's free memory (%.1f GB); keeping them in "
                "pinned host memory and copying each batch.", need / 1e9, 100 * budget, free / 1e9)
    return Resident(host.pin_memory(), device, scale, on_device=False)


def batches(images: np.ndarray | torch.Tensor | Resident, batch_size: int,
            device: torch.device | str) -> Iterator[torch.Tensor]:
    """Float32 batches of ``images`` in order, on ``device``, in ``channels_last`` for 2D.

    Example:
        >>> [b.shape[0] for b in batches(np.zeros((5, 1, 8, 8), "float32"), 2, "cpu")]
        [2, 2, 1]
    """
    res = resident(images, device)
    for lo in range(0, len(res), batch_size):
        yield memory_format(res.slice(lo, lo + batch_size))
