"""The torchrun seam: the same code path for one process and for N.

`init()` reads the usual launcher variables (RANK, WORLD_SIZE, LOCAL_RANK); without them it is a world of one
and every collective below is skipped. Nothing else in dpokit talks to `torch.distributed` directly.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as td


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init(device: str = "auto") -> Dist:
    """Join the process group when launched by torchrun (or anything setting WORLD_SIZE); pick the device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    chosen = torch.device(device)
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)
    if world_size > 1 and not td.is_initialized():
        td.init_process_group(backend="nccl" if chosen.type == "cuda" else "gloo")
    return Dist(rank, world_size, local_rank, chosen)


def cleanup() -> None:
    if td.is_initialized():
        td.destroy_process_group()


def wrap(module: torch.nn.Module, dist: Dist) -> torch.nn.Module:
    """DDP over `module` when there are several processes; the module itself otherwise."""
    if not dist.enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [dist.device.index] if dist.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids)


@contextlib.contextmanager
def no_sync(module: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Skip DDP's gradient all-reduce on accumulation micro-steps (all but the last)."""
    if enabled and hasattr(module, "no_sync"):
        with module.no_sync():
            yield
    else:
        yield


def reduce_sums(values: torch.Tensor, dist: Dist) -> torch.Tensor:
    """All-reduce (sum) a 1-D tensor of metric sums across ranks; identity for one process."""
    if dist.enabled:
        values = values.clone()
        td.all_reduce(values, op=td.ReduceOp.SUM)
    return values


def broadcast_int(value: int, dist: Dist) -> int:
    if not dist.enabled:
        return value
    tensor = torch.tensor([value], device=dist.device if dist.device.type == "cuda" else "cpu")
    td.broadcast(tensor, src=0)
    return int(tensor.item())
