"""Data-parallel training under `torchrun` / `accelerate launch`: the few torch.distributed calls the trainer needs.

The launchers start one process per GPU (or CPU worker) and describe the run in the environment: RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT. Without them (WORLD_SIZE unset or 1) every function here is
a no-op, and the trainer runs as one process. Plain torch.distributed + DistributedDataParallel rather than
accelerate's Accelerator: the loop already does its own device placement, autocast, accumulation and atomic
checkpoints, and DDP adds only the gradient averaging (overlapped with the backward pass) it lacks.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from datetime import timedelta

import torch
import torch.distributed as dist

# A collective that waits longer than this fails instead of hanging (a rank that died mid-run, say);
# torchrun's own agent usually notices a dead worker sooner and stops the others.
TIMEOUT = timedelta(minutes=10)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """The process that writes files and prints (rank 0; the only one without a launcher)."""
    return rank() == 0


def local_device(device: torch.device) -> torch.device:
    """This rank's own GPU (LOCAL_RANK) when the run is distributed over CUDA; `device` otherwise."""
    if world_size() > 1 and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    return device


def init(device: torch.device) -> bool:
    """Join the launcher's process group (NCCL on CUDA, gloo on the CPU); True when this call created it."""
    if world_size() == 1 or dist.is_initialized():
        return False
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT,
                            device_id=device if device.type == "cuda" else None)
    return True


def wrap(model, device: torch.device):
    """`model` in DistributedDataParallel (gradients averaged over the ranks in the backward pass), or as is."""
    if world_size() == 1:
        return model
    # Only the adapter's parameters have gradients, and every one is used in each forward pass; the buffers
    # (rotary frequencies) are the same on every rank, so they need no broadcast per forward.
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=False, broadcast_buffers=False)


def no_sync(model, last_micro_batch: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulated step."""
    return model.no_sync() if world_size() > 1 and not last_micro_batch else nullcontext()


def shard(batch: list[int]) -> list[int]:
    """This rank's share of a global batch (strided: the batch is sorted by length, so each share gets
    long and short examples alike)."""
    return batch[rank()::world_size()]


def mean(value: torch.Tensor) -> torch.Tensor:
    """The mean of `value` over the ranks (the logged loss: each rank holds its share's)."""
    if world_size() > 1:
        value = value.clone()
        dist.all_reduce(value)
        value /= world_size()
    return value


def gather(obj) -> list:
    """Every rank's `obj` (e.g. RNG states), in rank order, on every rank."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if world_size() > 1 and dist.is_initialized():
        dist.barrier()


def cleanup(created: bool) -> None:
    """Leave the process group if `init` created it."""
    if created and dist.is_initialized():
        dist.destroy_process_group()
