"""Save and resume training exactly, and survive kills, signals and bad disks.

A checkpoint is a folder `OUTPUT/checkpoints/step-N/`:

    model.safetensors   the trainable parameters (all of them, or only a LoRA adapter's), by parameter name
    optimizer.pt        `optimizer.state_dict()`
    trainer.pt          scheduler, RNG states (Python, NumPy, torch, CUDA), data position, step, metric sums...
                        (under DDP each rank's generator states and metric sums, in `ranks`)
    metrics.jsonl       the rows of OUTPUT/metrics.jsonl so far (restored on resume, so rows are never doubled)
    complete.json       written last: the step and every file's size; a folder without it is not a checkpoint

With `--fsdp` the weights and optimizer are sharded, and `model.safetensors` + `optimizer.pt` give way to

    sharded/            `torch.distributed.checkpoint` (DCP): `.metadata` + one `__R_0.distcp` per rank; DCP
                        reshards on load, so it resumes on any number of ranks (or on one process, unsharded)
    rank-R.pt           rank R's generator states and metric sums since the last log step (see `rank_state`)

It is written into a temporary folder, each file fsynced, then renamed to `step-N/` in one step by rank 0 (after
every rank has written its part), so a kill at any moment leaves either the old set of checkpoints or the new one.
Resuming takes the newest usable checkpoint: one with a missing marker, a missing file, a truncated file or an
unreadable file is skipped with a warning that names it and the one used instead. Nothing is replayed: the data
order is a pure function of (seed, epoch), so the count of pairs consumed is enough to continue it.

`trainer.pt` holds a `TrainerRecord` as a plain dict of tensors, numbers and strings (`torch.load` with
`weights_only=True` reads it); its `format` key is absent in checkpoints written before the record was typed,
which have the same keys and resume as they are.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import torch

from . import distributed
from .errors import DPOError, TrainingFailure
from .run_files import METRICS, RunFiles

MODEL = "model.safetensors"
OPTIMIZER = "optimizer.pt"
TRAINER = "trainer.pt"
MARKER = "complete.json"
SHARDED = "sharded"
RANK_STATE = "rank-{rank}.pt"
_STEP_DIR = re.compile(r"step-(\d+)")


TRAINER_FORMAT = 1  # trainer.pt's layout; 0 (no `format` key) has the same keys


@dataclass
class TrainerState:
    """What the training loop counts and updates step by step; saved in every checkpoint."""

    step: int = 0                  # optimizer steps done
    pairs_consumed: int = 0        # pairs taken from the sampler, all ranks together (the data position)
    bad_steps: int = 0             # consecutive steps skipped for a non-finite loss or gradient
    eval_before: dict[str, float] = field(default_factory=dict)  # held-out metrics before training
    since_log_s: float = 0.0       # seconds since the last metrics row, so a resumed run's throughput adds up


@dataclass
class RankState:
    """One process's own part of a checkpoint: its generators and its metric sums since the last log step."""

    rng: dict[str, Any]
    meter: dict[str, Any]


@dataclass
class TrainerRecord:
    """Everything in `trainer.pt`: the loop's counters, the LR schedule, the reference where TR-DPO moved it,
    and the ranks' own states (rank 0's alone when one process wrote it; every rank's under DDP)."""

    state: TrainerState
    scheduler: dict[str, Any]
    rng: dict[str, Any]
    meter: dict[str, Any]
    world_size: int | None         # None in checkpoints from before it was saved: the same as the resuming run
    ranks: list[RankState] | None = None
    reference: dict[str, torch.Tensor] | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"format": TRAINER_FORMAT, **vars(self.state), "scheduler": self.scheduler,
                               "rng": self.rng, "meter": self.meter, "world_size": self.world_size}
        if self.ranks is not None:
            out["ranks"] = [vars(rank) for rank in self.ranks]
        if self.reference is not None:
            out["reference"] = self.reference
        return out

    @classmethod
    def from_dict(cls, saved: dict[str, Any], source: Path) -> TrainerRecord:
        """The record in a `trainer.pt`; a `DPOError` for one written by a newer dpokit or missing a part."""
        version = saved.get("format", 0)
        if version > TRAINER_FORMAT:
            raise DPOError(f"--resume: checkpoint {source} was written by a newer dpokit (trainer format {version}, "
                           f"this one reads up to {TRAINER_FORMAT}); upgrade dpokit to resume it")
        try:
            state = TrainerState(step=saved["step"], pairs_consumed=saved["pairs_consumed"],
                                 bad_steps=saved["bad_steps"], eval_before=saved["eval_before"],
                                 since_log_s=saved["since_log_s"])
            ranks = [RankState(r["rng"], r["meter"]) for r in saved["ranks"]] if "ranks" in saved else None
            return cls(state, saved["scheduler"], saved["rng"], saved.get("meter", {}),
                       saved.get("world_size"), ranks, saved.get("reference"))
        except (KeyError, TypeError) as err:
            raise DPOError(f"--resume: checkpoint {source}: {TRAINER} lacks {err}; it was not written by "
                           "`dpo train` (start without --resume)") from None


@dataclass
class Loaded:
    """A checkpoint read back: where it was, and its three parts (tensors on the CPU). A sharded one carries
    only `trainer`: its weights and optimizer go straight into the model with `distributed.load_sharded`."""

    path: Path
    weights: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    trainer: dict[str, Any]
    sharded: bool = False

    @property
    def record(self) -> TrainerRecord:
        return TrainerRecord.from_dict(self.trainer, self.path)


class Interrupted(TrainingFailure):
    """The run stopped on SIGTERM/SIGINT after saving a checkpoint; exit status 128 + signal number."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


# ---- saving ----------------------------------------------------------------------------------------------------


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train, by name, as contiguous CPU tensors (a LoRA model gives only its adapter)."""
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def save(root: Path, step: int, *, weights: dict[str, torch.Tensor], optimizer: dict[str, Any],
         trainer: dict[str, Any], metrics: Path | None = None, keep: int | None = None) -> Path:
    """Write checkpoint `root/step-{step}` atomically; then keep only the newest `keep` complete ones.

    A failed write (disk full, no permission) raises one `TrainingFailure` and leaves earlier checkpoints intact.
    """
    from safetensors.torch import save_file

    target, tmp = root / f"step-{step}", root / f".tmp-step-{step}-{os.getpid()}"
    try:
        _make_temporary(root, tmp)
        save_file(weights, str(tmp / MODEL))
        _fsync(tmp / MODEL)
        _torch_save(optimizer, tmp / OPTIMIZER)
        _commit(tmp, target, step, trainer, metrics)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_failure(root, target, err) from None
    _rotate(root, keep)
    return target


def save_sharded(root: Path, step: int, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 trainer: dict[str, Any], own_meter: dict[str, Any], dist: distributed.Dist,
                 metrics: Path | None = None, keep: int | None = None) -> Path:
    """`save` for FSDP2: every rank calls it with its sharded `model`, `optimizer` and its own metric sums
    (`own_meter`); `trainer` and `metrics` matter on rank 0 only.

    Rank 0 makes the temporary folder; every rank writes its DCP shards and `rank-R.pt`; once all have
    (the all-reduce after each phase is the barrier), rank 0 writes `trainer.pt`, the metrics and the marker,
    renames the folder and rotates. A failure on any rank raises `TrainingFailure` on every rank (none is left
    waiting in a collective) and leaves earlier checkpoints intact.
    """
    target, tmp = root / f"step-{step}", root / f".tmp-step-{step}-sharded"

    def everywhere(main_only: bool, work: Callable[[], None]) -> None:
        error = None
        if dist.is_main or not main_only:
            try:
                work()
            except OSError as err:
                error = err
        failures = distributed.reduce_sums(torch.tensor([float(error is not None)], device=dist.device), dist)
        if failures.item():
            if dist.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise _write_failure(root, target, error or OSError(f"{int(failures.item())} other rank(s) failed"))

    def write_shards() -> None:
        distributed.save_sharded(tmp / SHARDED, model, optimizer)
        _torch_save({"meter": own_meter, "rng": capture_rng()}, tmp / RANK_STATE.format(rank=dist.rank))

    everywhere(True, lambda: _make_temporary(root, tmp))
    everywhere(False, write_shards)
    everywhere(True, lambda: (_commit(tmp, target, step, {**trainer, "world_size": dist.world_size}, metrics),
                              _rotate(root, keep)))
    return target


def _make_temporary(root: Path, tmp: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-step-*"):  # left by a run killed while saving
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir()


def _commit(tmp: Path, target: Path, step: int, trainer: dict[str, Any], metrics: Path | None) -> None:
    """Add the trainer state, the metrics and (last) the marker to `tmp`, then rename it to `target`."""
    _torch_save(trainer, tmp / TRAINER)
    if metrics is not None and metrics.is_file():
        shutil.copyfile(metrics, tmp / METRICS)
        _fsync(tmp / METRICS)
    files = sorted(f for f in tmp.rglob("*") if f.is_file())
    sizes = {f.relative_to(tmp).as_posix(): f.stat().st_size for f in files}
    (tmp / MARKER).write_text(json.dumps({"step": step, "files": sizes}), encoding="utf-8")
    _fsync(tmp / MARKER)
    for folder in {f.parent for f in files} | {tmp}:
        _fsync(folder)
    if target.exists():  # the same step saved before (a resumed run re-reaching it): replace it
        shutil.rmtree(target)
    os.rename(tmp, target)
    _fsync(target.parent)


def _write_failure(root: Path, target: Path, err: OSError) -> TrainingFailure:
    previous = [c for c in complete_checkpoints(root) if c != target]
    kept = f"the previous checkpoint {previous[0]} is intact" if previous else "no earlier checkpoint exists"
    return TrainingFailure(f"could not write checkpoint {target}: {err.strerror or err}; {kept}; "
                           "free disk space or fix the folder's permissions, then resume")


def _rotate(root: Path, keep: int | None) -> None:
    if keep is not None:
        for old in complete_checkpoints(root)[keep:]:
            shutil.rmtree(old, ignore_errors=True)


def _torch_save(obj: Any, path: Path) -> None:
    with path.open("wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync(path: Path) -> None:
    """Flush a file's (or a folder's entries') data to disk, so a rename never points at unwritten bytes."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- finding and loading ---------------------------------------------------------------------------------------


def step_of(path: Path) -> int:
    match = _STEP_DIR.fullmatch(path.name)
    return int(match.group(1)) if match else -1


def checkpoints(root: Path) -> list[Path]:
    """All `step-N` folders under `root`, newest first (complete or not)."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and step_of(p) >= 0), key=step_of, reverse=True)


def problem(path: Path) -> str | None:
    """Why the checkpoint at `path` cannot be used (cheap checks: marker, files, sizes), or None."""
    try:
        marker = json.loads((path / MARKER).read_text(encoding="utf-8"))
        sizes = dict(marker["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return "no completeness marker (the save was interrupted)"
    for name in _required(sizes):
        if name not in sizes:
            return f"{name} is not listed in {MARKER}"
    for name, size in sizes.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} is truncated or changed ({file.stat().st_size} bytes, expected {size})"
    return None


def _required(files: dict[str, int]) -> tuple[str, ...]:
    """The files a checkpoint must have, by its format (sharded when its marker lists DCP files)."""
    if any(name.startswith(f"{SHARDED}/") for name in files):
        return f"{SHARDED}/.metadata", TRAINER
    return MODEL, OPTIMIZER, TRAINER


def complete_checkpoints(root: Path) -> list[Path]:
    """The `step-N` folders under `root` that pass `problem`, newest first."""
    return [p for p in checkpoints(root) if problem(p) is None]


def read(path: Path) -> Loaded:
    """Read every part of a checkpoint; raises `ValueError` naming the part if one cannot be read."""
    from safetensors.torch import load_file

    sharded = (path / SHARDED).is_dir()
    if sharded and (why := distributed.sharded_metadata_problem(path / SHARDED)):
        raise ValueError(why)
    parts: list[Any] = []
    for name in (TRAINER,) if sharded else (MODEL, OPTIMIZER, TRAINER):
        try:
            parts.append(load_file(path / name) if name == MODEL
                         else torch.load(path / name, map_location="cpu", weights_only=True))
        except Exception as err:  # safetensors, zipfile and pickle raise many unrelated types for a bad file
            raise ValueError(f"{name} is unreadable ({type(err).__name__}: {str(err).splitlines()[0][:120]})") from None
    return Loaded(path, {}, {}, parts[0], sharded=True) if sharded else Loaded(path, *parts)


# `--resume` values that look in --output itself rather than at a path.
IN_OUTPUT = ("latest", "auto")


def load(resume: str, output: Path, warn: Callable[[str], None]) -> Loaded | None:
    """The newest usable checkpoint for `--resume` ("latest" or "auto": under `output`; else a run folder, a
    checkpoints folder or one checkpoint), falling back past broken ones with a warning. None: "latest" or "auto"
    and none saved yet, so the run starts fresh (what makes one `--resume auto` command line serve the first start
    and every torchrun restart)."""
    root, newest = _resolve(resume, output)
    candidates = [p for p in checkpoints(root) if newest is None or step_of(p) <= newest]
    skipped: list[tuple[Path, str]] = []
    for path in candidates:
        why = problem(path)
        if why is None:
            try:
                loaded = read(path)
            except ValueError as err:
                why = str(err)
            else:
                for bad, reason in skipped:
                    warn(f"warning: checkpoint {bad} is unusable ({reason}); resuming from {path} instead")
                return loaded
        skipped.append((path, why))
    if skipped:
        details = "; ".join(f"{p}: {why}" for p, why in skipped)
        raise DPOError(f"--resume: no usable checkpoint under {root} ({details})")
    if resume in IN_OUTPUT:
        return None
    raise DPOError(f"--resume {resume}: no checkpoint found there (expected step-N folders from --save-every)")


def _resolve(resume: str, output: Path) -> tuple[Path, int | None]:
    """(folder holding step-N checkpoints, newest step allowed) for a `--resume` value."""
    if resume in IN_OUTPUT:
        return RunFiles(output).checkpoints, None
    path = Path(resume)
    if not path.exists():
        raise DPOError(f"--resume {resume}: no such folder")
    if step_of(path) >= 0:
        return path.parent, step_of(path)
    checkpoints = RunFiles(path).checkpoints
    return (checkpoints if checkpoints.is_dir() else path), None


def restore_trainable(model: torch.nn.Module, weights: dict[str, torch.Tensor], source: Path) -> None:
    """Copy saved trainable parameters into `model` in place; they must match its trainable names and shapes."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if params.keys() != weights.keys():
        missing, unexpected = sorted(params.keys() - weights.keys()), sorted(weights.keys() - params.keys())
        raise DPOError(f"--resume: checkpoint {source} does not match this model's trainable parameters "
                       f"(missing {missing[:3]}, unexpected {unexpected[:3]}); resume with the same --model and "
                       "LoRA flags")
    with torch.no_grad():
        for name, param in params.items():
            if param.shape != weights[name].shape:
                raise DPOError(f"--resume: checkpoint {source}: {name} has shape {tuple(weights[name].shape)}, "
                               f"the model has {tuple(param.shape)}")
            param.copy_(weights[name])


def restore_metrics(checkpoint: Path, metrics: Path) -> None:
    """Put back the metrics rows saved with the checkpoint, dropping those logged after it."""
    saved = checkpoint / METRICS
    if saved.is_file():
        metrics.parent.mkdir(parents=True, exist_ok=True)  # `--resume PATH` into a new --output
        shutil.copyfile(saved, metrics)
    else:
        metrics.unlink(missing_ok=True)


# ---- random number generators ----------------------------------------------------------------------------------


def capture_rng() -> dict[str, Any]:
    """Python, NumPy, torch (and CUDA) generator states, in types that `torch.load(weights_only=True)` reads."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()  # type: ignore[misc]
    return {"python": random.getstate(), "numpy": (kind, keys.tolist(), pos, has_gauss, gauss),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def rank_payload(meter_state: dict[str, Any]) -> RankState:
    """What a rank hands rank 0 for the checkpoint: its generator states and metric sums (on the CPU)."""
    cpu = lambda v: v.detach().cpu() if isinstance(v, torch.Tensor) else v  # noqa: E731
    meter = {k: {n: cpu(x) for n, x in v.items()} if isinstance(v, dict) else cpu(v) for k, v in meter_state.items()}
    return RankState(capture_rng(), meter)


def rank_state(loaded: Loaded, rank: int, world_size: int) -> RankState:
    """The generator states and metric sums (since the last log step) that rank `rank` resumes with.

    - A checkpoint written by as many ranks: the rank's own (exact resume), from `rank-R.pt` (FSDP2) or from
      trainer.pt's `ranks` (DDP; one process: its own state).
    - A checkpoint written by another number of ranks: rank 0's generators for every rank (as every rank shares
      the seed at the start of a run) and no metric sums, so a row logged after the resume covers only the
      steps since it. Only dropout draws from the generators (off in the policy, on with LoRA's
      `--lora-dropout`); on another number of ranks the batch is split differently, so masks differ anyway.
    """
    record = loaded.record
    if record.world_size not in (None, world_size):
        return RankState(record.rng, {})
    if loaded.sharded:
        own = loaded.path / RANK_STATE.format(rank=rank)
        if not own.is_file():
            return RankState(record.rng, {})
        state = torch.load(own, map_location="cpu", weights_only=True)
        return RankState(state["rng"], state["meter"])
    if record.ranks is not None:
        return record.ranks[rank]
    return RankState(record.rng, record.meter)


def restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- signals ---------------------------------------------------------------------------------------------------


class StopSignals:
    """Turn the first SIGTERM/SIGINT into a request the loop honours at the next step boundary (checkpoint, then
    exit); a second one exits at once. Checkpoint writes are atomic, so exiting mid-save loses nothing saved."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, exit: Callable[[int], Any] = os._exit) -> None:
        self.received: int | None = None
        self._exit = exit
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        try:
            self._previous = {s: signal.signal(s, self.handle) for s in self.SIGNALS}
        except ValueError:  # not the main thread: leave signals alone
            self._previous = {}
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def handle(self, signum: int, frame: FrameType | None = None) -> None:
        name = signal_name(signum)
        if self.received is not None:
            _say(f"\n{name} again: exiting now, without a checkpoint\n")
            self._exit(128 + signum)
            return
        self.received = signum
        _say(f"\n{name}: saving a checkpoint at the end of this step, then stopping (send it again to exit now)\n")


def signal_name(signum: int | None) -> str:
    return signal.Signals(signum).name if signum else "a signal"


def _say(message: str) -> None:
    """Write to stderr without Python's buffered streams (a signal may arrive in the middle of a print)."""
    try:
        os.write(sys.stderr.fileno(), message.encode())
    except (OSError, ValueError, AttributeError):
        pass
