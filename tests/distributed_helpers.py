"""Run a function on N gloo ranks forked from the test process, as torchrun would launch them.

Forking reuses the test process's imports (torch, transformers): a fresh interpreter per rank costs more than
the tiny trainings these tests run. Each rank gets the variables torchrun sets and a process group that
`dpokit.distributed.init` finds and leaves alive between trainings.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

import torch


def fork_ranks(worker: Callable[..., None], world_size: int, *args: Any) -> None:
    """Call `worker(rank, world_size, *args)` on `world_size` forked processes; raises if any rank fails."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    torch.multiprocessing.start_processes(_rank, args=(world_size, port, worker, args), nprocs=world_size,
                                          start_method="fork")


def _rank(rank: int, world_size: int, port: int, worker: Callable[..., None], args: tuple[Any, ...]) -> None:
    import torch.distributed as td

    torch.set_num_threads(1)  # as DataLoader workers do: a forked child must not reuse the parent's OpenMP pool
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    td.init_process_group("gloo")
    try:
        worker(rank, world_size, *args)
    finally:
        td.destroy_process_group()
