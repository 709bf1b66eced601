"""Data-parallel training with ``torch.distributed``, launched by ``torchrun``.

    torchrun --nproc_per_node 4 -m medtl cv configs/ct_contrast.yaml --out runs/ct   # one node, 4 GPUs
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_endpoint HOST:29500 -m medtl cv ... # two nodes

Every process runs the same fold loop in lockstep. Inside :func:`medtl.training.loop.fit` each
process draws the *same* global batch (same seed, same augmentation) and trains on its own
contiguous share of it; DistributedDataParallel averages the gradients, so one optimiser
step sees the whole global batch, as a single process would. ``train.batch_size`` stays the
global batch size: results do not depend on the number of processes beyond floating-point
summation order, which the CPU test (gloo, 2 processes) checks.

Batch norm: on CUDA, BatchNorm layers are converted to SyncBatchNorm so batch statistics
are global. PyTorch's SyncBatchNorm has no CPU implementation, so on CPU (gloo) batch
statistics are per process; models without batch norm (e.g. ConvNeXt, ViT) are unaffected.

Only rank 0 writes the run directory; the other ranks write into a throw-away folder.
Validation and prediction run on every rank over the full data (identical results), which
keeps the ranks in lockstep without collective calls outside the gradient all-reduce.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["init_from_env", "is_distributed", "rank", "world_size", "is_main", "local_share", "wrap",
           "local_device"]

log = logging.getLogger("medtl.training")


def init_from_env() -> bool:
    """Join the process group described by torchrun's environment (``WORLD_SIZE`` > 1).

    Uses NCCL when CUDA is available, gloo otherwise. Returns whether training is distributed.
    Idempotent: later calls return the existing state.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    log.info("distributed: rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(), backend)
    return dist.get_world_size() > 1


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def local_device(device: torch.device) -> torch.device:
    """The device of this process: ``cuda:LOCAL_RANK`` when training on CUDA across processes."""
    if device.type == "cuda" and is_distributed():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def local_share(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """This rank's contiguous share of a global batch (``torch.tensor_split`` along dim 0)."""
    if not is_distributed():
        return tensors
    r, w = rank(), world_size()
    return tuple(torch.tensor_split(t, w)[r] for t in tensors)


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel around ``model`` (SyncBatchNorm on CUDA); identity when not distributed."""
    if not is_distributed():
        return model
    if device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return nn.parallel.DistributedDataParallel(model, device_ids=[device.index])
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()) and is_main():
        log.warning("distributed CPU training: batch-norm statistics are per process (PyTorch has no CPU "
                    "SyncBatchNorm); results can differ slightly from a single process")
    return nn.parallel.DistributedDataParallel(model)
