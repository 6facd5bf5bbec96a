"""The torchrun seam: the same code path for one process and for N.

`init()` reads the usual launcher variables (RANK, WORLD_SIZE, LOCAL_RANK); without them it is a world of one
and every collective below is skipped. Nothing else in dpokit talks to `torch.distributed` directly.

Two ways to spread a model over ranks (PyTorch's own, no layer in between):

- DDP (default): every rank holds the whole model and optimizer; gradients are averaged in backward.
- FSDP2 (`fully_shard`, `--fsdp`): each decoder layer is one communication group and the root (embeddings, final
  norm, LM head) another; parameters, gradients and AdamW states live sharded 1/N per rank, a layer's weights
  are all-gathered just before it runs and freed after. With `param_dtype=bfloat16` the sharded master weights
  stay float32 and only the gathered copies used for compute are bfloat16; gradients are reduced in float32.

Both average gradients over ranks, so a loss scaled by `world_size / pairs in the step` gives the gradient of
the mean over all the step's pairs (see `loop.train`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as td

from .errors import DPOError

if TYPE_CHECKING:
    from torch.distributed.checkpoint.state_dict import StateDictOptions


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool = False  # `init` created the process group, so `cleanup` destroys it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init(device: str = "auto") -> Dist:
    """Join the process group when launched by torchrun (or anything setting WORLD_SIZE); pick the device.

    Under a launcher `auto` and a bare `cuda` both mean `cuda:LOCAL_RANK`, one GPU per process. A process
    group that the caller already set up (a larger program, a test harness) is used as it is and left alive.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    chosen = resolve_device(device)
    if chosen.type == "cuda":
        if chosen.index is None:
            chosen = torch.device("cuda", local_rank)
        torch.cuda.set_device(chosen)
    owns_group = world_size > 1 and not td.is_initialized()
    if owns_group:
        store = _store_of_this_restart(rank, world_size)
        td.init_process_group(backend="nccl" if chosen.type == "cuda" else "gloo",
                              **({"store": store, "rank": rank, "world_size": world_size} if store else {}))
    return Dist(rank, world_size, local_rank, chosen, owns_group)


def _store_of_this_restart(rank: int, world_size: int) -> td.Store | None:
    """The process group's store under `torchrun --max-restarts` on one node: torchrun's own store, which outlives
    the workers, with keys prefixed by the restart count. Without the prefix a restarted group reads the keys the
    dead one left there (its ranks' addresses) and fails to connect (pytorch/pytorch#135712). Across nodes each
    torchrun counts restarts alone (a node whose workers did not fail does not count one), so the count is not a
    shared key there: None, and torch's default store (set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for restarts)."""
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    one_node = os.environ.get("LOCAL_WORLD_SIZE") == str(world_size)
    if restart is None or not one_node or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    from torch.distributed.constants import default_pg_timeout

    shared = td.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False,
                         timeout=default_pg_timeout)
    return td.PrefixStore(f"dpokit/restart_{restart}", shared)


def resolve_device(device: str) -> torch.device:
    """`auto` -> the first GPU when there is one, else the CPU; anything else as torch spells it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise DPOError(f"--device: unknown device {device!r} (auto, cpu, cuda, cuda:N)") from None


def cleanup(dist: Dist) -> None:
    """Destroy the process group `init` created, once every rank is done with it: a rank tearing gloo down while
    another is still in its last collective can abort the other at exit ("terminate called without an active
    exception"), which torchrun counts as a failed worker."""
    if dist.owns_group and td.is_initialized():
        td.barrier()
        td.destroy_process_group()


def wrap(module: torch.nn.Module, dist: Dist, *, fsdp: bool = False,
         param_dtype: torch.dtype | None = None) -> torch.nn.Module:
    """DDP (or FSDP2 when `fsdp`) over `module` when there are several processes; the module itself otherwise."""
    if not dist.enabled:
        return module
    if fsdp:
        return shard(module, dist, param_dtype=param_dtype)
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [dist.device.index] if dist.device.type == "cuda" else None
    # Causal LMs keep only constant buffers (rotary inv_freq): broadcasting them before every forward would
    # cost a collective per forward and hang evaluation whenever ranks run different numbers of batches.
    return DistributedDataParallel(module, device_ids=device_ids, broadcast_buffers=False)


def shard(module: torch.nn.Module, dist: Dist, *, param_dtype: torch.dtype | None = None) -> torch.nn.Module:
    """FSDP2 in place: `fully_shard` each decoder layer, then `module` as the root; returns `module`.

    Frozen modules (the reference model) are sharded the same way; their forward gathers weights layer by
    layer too. Decoder layers are the classes the Hugging Face model names in `_no_split_modules` (what
    accelerate uses for its auto-wrap policy); a model without that list is sharded as one group.
    `module.forward` must run every parameter it owns, which is why the loop shards `SequenceScorer` (backbone
    and LM head) rather than the Hugging Face model, whose own `forward` the scorer never calls.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(dist.device.type, (dist.world_size,))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else None
    kwargs = {"mesh": mesh, **({"mp_policy": policy} if policy else {})}
    for layer in decoder_layers(module):
        fully_shard(layer, **kwargs)
    fully_shard(module, **kwargs)
    return module


def fill_from_rank0(module: torch.nn.Module, state: dict[str, torch.Tensor], dist: Dist) -> None:
    """Give an FSDP2-sharded `module` its weights from rank 0: ranks > 0 built it on the meta device (no
    full copy of the model in their memory); rank 0 passes its full `state` (`module.state_dict()` taken before
    sharding), and every rank keeps only its shards. Buffers, which state dicts may leave out (rotary
    `inv_freq` is not persistent), are broadcast as well."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if not dist.is_main:
        module.to_empty(device=dist.device)
    set_model_state_dict(module, state if dist.is_main else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for buffer in module.buffers():
        td.broadcast(buffer, src=0)


def decoder_layers(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The submodules whose class is listed in some submodule's `_no_split_modules` (e.g. LlamaDecoderLayer)."""
    names: set[str] = set()
    for sub in module.modules():
        names.update(getattr(sub, "_no_split_modules", None) or ())
    return [sub for sub in module.modules() if type(sub).__name__ in names]


def is_sharded(module: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(sub, FSDPModule) for sub in module.modules())


@contextlib.contextmanager
def no_sync(module: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Skip DDP's gradient all-reduce on accumulation micro-steps (all but the last).

    FSDP2 modules are left alone: skipping their reduce-scatter would keep a full unsharded gradient on every
    rank until the last micro-step, which is the memory FSDP exists to save; reducing each micro-step instead
    sums into the sharded gradient and gives the same result.
    """
    if enabled and isinstance(module, torch.nn.parallel.DistributedDataParallel):
        with module.no_sync():
            yield
    else:
        yield


def clip_grad_norm(parameters: Iterable[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """`clip_grad_norm_` that returns a plain scalar tensor: under FSDP2 the norm is a replicated DTensor."""
    norm = torch.nn.utils.clip_grad_norm_(list(parameters), max_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def reduce_sums(values: torch.Tensor, dist: Dist) -> torch.Tensor:
    """All-reduce (sum) a tensor of sums across ranks (a copy); identity for one process."""
    if dist.enabled:
        values = values.clone()
        td.all_reduce(values, op=td.ReduceOp.SUM)
    return values


def any_rank(flag: bool, dist: Dist) -> bool:
    """True on every rank when `flag` is true on any of them (a collective under torchrun)."""
    if not dist.enabled:
        return flag
    return bool(reduce_sums(torch.tensor([float(flag)], device=dist.device), dist).item())


def gather_to_main(value: Any, dist: Dist) -> list[Any] | None:
    """Every rank's picklable `value`, in rank order, on rank 0 (None elsewhere); `[value]` in one process."""
    if not dist.enabled:
        return [value]
    gathered: list[Any] | None = [None] * dist.world_size if dist.is_main else None
    td.gather_object(value, gathered, dst=0)
    return gathered


def gather_to_all(value: Any, dist: Dist) -> list[Any]:
    """Every rank's picklable `value`, in rank order, on every rank; `[value]` in one process."""
    if not dist.enabled:
        return [value]
    gathered: list[Any] = [None] * dist.world_size
    td.all_gather_object(gathered, value)
    return gathered


def barrier(dist: Dist) -> None:
    """Wait until every rank gets here (what rank 0 wrote is then there for all); nothing in one process."""
    if dist.enabled:
        td.barrier()


def reduce_max(value: int, dist: Dist) -> int:
    """The largest of each rank's `value` (`value` itself in one process)."""
    if not dist.enabled:
        return value
    tensor = torch.tensor([value], device=dist.device)
    td.all_reduce(tensor, op=td.ReduceOp.MAX)
    return int(tensor.item())


def full_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole `module.state_dict()` as ordinary CPU tensors: what `save_pretrained(state_dict=...)` wants.

    For an FSDP2-sharded module every rank must call this (each parameter is all-gathered); only rank 0 keeps
    the gathered tensors, the other ranks get an empty dict.
    """
    if not is_sharded(module):
        return {name: tensor.detach().cpu() for name, tensor in module.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _trainable_only() -> StateDictOptions:
    """State-dict options for checkpoints: trainable parameters only; `strict=False` lets `set_state_dict`
    skip the frozen ones left out on purpose (`dcp.load` still fails on a key the folder lacks)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, strict=False)


def save_sharded(path: str | Path, module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Write the trainable parameters and the optimizer state with `torch.distributed.checkpoint`: each rank
    writes its own shards (one `.distcp` file per rank plus a `.metadata` index).

    Keys are the parameters' names without any FSDP prefix, so `load_sharded` can read the folder back on any
    number of ranks (DCP reshards on load), sharded or not. Frozen parameters (a LoRA model's base) are left
    out, as in the single-process checkpoint. Every rank must call it. A failed write on any rank raises
    `OSError` on every rank.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(module, optimizer, options=_trainable_only())
    try:
        with _one_process_quietly():
            dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(path))
    except CheckpointException as err:  # a BaseException carrying each failed rank's exception
        raise OSError(_first_failure(err)) from None


def load_sharded(path: str | Path, module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Read a `save_sharded` folder into `module` and `optimizer` in place, whatever the number of ranks now.

    A fresh optimizer is fine: `get_state_dict` first creates its (zero) state, so DCP knows the shapes. A
    folder lacking a key this model asks for (another model, other LoRA settings) raises `ValueError`.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(module, optimizer, options=_trainable_only())
    state = {"model": model_state, "optimizer": optim_state}
    try:
        with _one_process_quietly():
            dcp.load(state, checkpoint_id=str(path))
    except CheckpointException as err:
        raise ValueError(_first_failure(err)) from None
    set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=_trainable_only())


def _first_failure(err: BaseException) -> str:
    """One line from DCP's `CheckpointException` (a BaseException holding each failed rank's exception)."""
    rank, (first, _) = next(iter(err.failures.items()))  # type: ignore[attr-defined]
    return f"rank {rank}: {getattr(first, 'strerror', None) or first}"


@contextlib.contextmanager
def _one_process_quietly() -> Iterator[None]:
    """DCP warns that it runs without a process group; for one process that is the intended use."""
    import warnings

    with warnings.catch_warnings():
        if not td.is_initialized():
            warnings.filterwarnings("ignore", "torch.distributed is disabled")
        yield


def sharded_metadata_problem(path: str | Path) -> str | None:
    """Why the DCP index (`.metadata`) of a `save_sharded` folder cannot be read, or None."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        FileSystemReader(str(path)).read_metadata()
    except Exception as err:  # pickle and the file system raise many unrelated types for a bad file
        return f"{Path(path).name}/.metadata is unreadable ({type(err).__name__})"
    return None
