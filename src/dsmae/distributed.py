"""Running under ``torchrun``: one process per device, DistributedDataParallel.

Without torchrun (no ``WORLD_SIZE`` in the environment) everything here is a no-op and
the run is a plain single process. With it, :func:`setup` joins the process group
(NCCL on GPUs, gloo on CPUs) and picks this rank's device; only rank 0 writes files.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from dsmae.runtime import resolve_device

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Process:
    """This process's place in the run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(device_name: str = "auto", timeout_minutes: float = 30.0) -> tuple[Process, torch.device]:
    """Join the process group when launched by torchrun; return this process and its device.

    Under torchrun with CUDA, each process takes the GPU of its ``LOCAL_RANK``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Process(), resolve_device(device_name)
    proc = Process(
        rank=int(os.environ["RANK"]),
        world_size=world,
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", proc.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    log.info("rank %d of %d on %s", proc.rank, proc.world_size, device)
    return proc, device


def teardown() -> None:
    """Leave the process group (if any)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def mean_over_processes(values: dict[str, torch.Tensor], proc: Process) -> dict[str, torch.Tensor]:
    """Average 0-d tensors over all processes (one all-reduce); unchanged in a single process."""
    if not proc.distributed or not values:
        return values
    keys = sorted(values)
    stacked = torch.stack([values[k].float() for k in keys])
    dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
    stacked /= proc.world_size
    return dict(zip(keys, stacked.unbind(), strict=True))


def local_share(batch_size: int, proc: Process) -> slice:
    """This process's rows of a global batch of ``batch_size``:
    ``[rank * B // W, (rank + 1) * B // W)``."""
    b, w = batch_size, proc.world_size
    return slice(proc.rank * b // w, (proc.rank + 1) * b // w)


def wrap(model: torch.nn.Module, proc: Process, device: torch.device) -> torch.nn.Module:
    """``model`` in DistributedDataParallel under torchrun (on this rank's GPU, if any);
    ``model`` itself in a single process."""
    if not proc.distributed:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def barrier(proc: Process) -> None:
    """Wait for every process (no-op in a single process)."""
    if proc.distributed:
        dist.barrier()


def any_process(flag: bool, proc: Process, device: torch.device) -> bool:
    """Whether ``flag`` is True on any process (one all-reduce; ``flag`` alone without
    torchrun)."""
    if not proc.distributed:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def min_over_processes(value: int, proc: Process, device: torch.device) -> int:
    """The smallest of every process's ``value`` (one all-reduce; ``value`` alone without
    torchrun)."""
    if not proc.distributed:
        return value
    tensor = torch.tensor([value], device=device, dtype=torch.int64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return int(tensor.item())
