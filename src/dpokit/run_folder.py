"""Whether a run may write into `--output`: a fresh run never lands silently on another run's files, and
`--resume` continues only the run that was started there.

    dpo train --output runs/dpo ...                     # runs/dpo holds checkpoints or model/: stops and says
                                                        # to pass --resume or --overwrite-output
    dpo train --output runs/dpo --overwrite-output ...  # removes the old run's outputs, then starts
    dpo train --output runs/dpo --resume ...            # stops if the run would not be the same run

A run is its model, data (by content), loss and its parameters, optimiser and schedule, global batch and sequence
limits. What only changes how it runs (how often it saves, logs and evaluates, where it reports, how memory is
laid out) may change on resume (`RESUME_MAY_CHANGE`), and so may its length, as long as it grows.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .config import FIELDS
from .data import cache as data_cache
from .errors import DPOError

# What a training run writes into --output besides config.yaml (which the new run rewrites).
RUN_OUTPUTS = ("checkpoints", "model", "adapter", "metrics.jsonl", "training_curves.png", "summary.md", "tensorboard")

RESUME_MAY_CHANGE = frozenset({
    # when and where the run reports and saves
    "save_every", "save_total_limit", "log_every", "eval_every", "eval_batch_size", "report_to", "progress",
    "max_bad_steps", "merge_lora", "cache", "cache_dir", "health_checks",
    # how the same steps are computed: layout, kernels, memory, workers, device
    "device", "num_workers", "compile", "gradient_checkpointing", "attn_implementation", "lean_layers",
    "lean_host_memory", "logprob_chunk_size", "prefix_sharing", "packing", "max_tokens_per_batch",
    "micro_batch_tokens",
    # resuming itself
    "output", "resume", "overwrite_output",
})

# Compared on their own terms by `resume_differences`, not for equality.
_LENGTH = ("max_steps", "epochs")
_BATCH = ("batch_size", "grad_accum")
_DATA = ("data", "data_split", "eval_data", "eval_split")
_PLACES = ("model", "tokenizer", "ref_model", "lora_adapter")

_STEP_DIR = re.compile(r"step-(\d+)")


def check_fresh_output(output: Path, resume: str | None, overwrite: bool) -> None:
    """Stop a run that would write over another run in `output` (its step-N checkpoints or its model/), with one
    line saying to pass --resume to continue it or --overwrite-output to replace it; with `overwrite`, remove
    that run's outputs (`RUN_OUTPUTS`) first. A `resume` with a checkpoint to continue passes (the settings are
    then `resume_differences`' business); `--resume` where only a finished run's model/ is would start a fresh
    run over it, so it stops too. Call it on one process only (rank 0), before anything is written.

    First of all it stops a run that could not write into `output` (a read-only disk or folder), so that the
    user learns it in one line before the model loads and the data is prepared, not at the first save.
    """
    output = Path(output)
    check_writable(output)
    steps = sorted((int(m.group(1)) for p in _children(output / "checkpoints")
                    if p.is_dir() and (m := _STEP_DIR.fullmatch(p.name))), reverse=True)
    has_model = any(_children(output / "model"))
    if not steps and not has_model:
        return
    if resume is not None and (steps or resume not in ("latest", "auto")):
        return
    if overwrite:
        for name in RUN_OUTPUTS:
            path = output / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        return
    found = ([f"checkpoints up to step-{steps[0]}"] if steps else []) + (["a trained model/"] if has_model else [])
    if resume is not None:
        raise DPOError(f"--resume: {output} holds {' and '.join(found)} but no checkpoint to continue from (it ran "
                       "without --save-every); pass --overwrite-output to replace that run, or choose another --output")
    raise DPOError(f"{output} holds another run ({' and '.join(found)}); pass --resume to continue it, or "
                   "--overwrite-output to replace it (or choose another --output)")


def check_writable(output: Path) -> None:
    """A one-line `DPOError` unless a file can be created in `output`, or (when it does not exist yet) in the
    nearest folder above it, where it would be made. A real probe (a temporary file, removed at once): the
    permission bits alone would let root through on a read-only mount."""
    place = output
    while not place.exists() and place != place.parent:
        place = place.parent
    if not place.is_dir():
        raise DPOError(f"--output {output}: {place} is a file, not a folder; choose another --output")
    try:
        with tempfile.TemporaryFile(dir=place, prefix=".dpokit-write-probe-"):
            pass
    except OSError as err:
        raise DPOError(f"--output {output}: cannot write into {place} ({err.strerror or err}); choose another "
                       "--output, or make that folder writable") from None


def resume_differences(saved: dict[str, Any], new: dict[str, Any], *, saved_world_size: int = 1,
                       world_size: int = 1) -> list[str]:
    """What makes `new` (a Config's `to_dict()`) another run than `saved` (the `config.yaml` of the run being
    resumed), one line per difference, e.g. "--beta 0.1 -> 0.2"; empty when `new` may resume it.

    Every setting outside `RESUME_MAY_CHANGE` must be equal (a setting missing from an older `config.yaml` counts
    as its default), except: the length may grow (--max-steps, or --epochs without it); the global batch
    (`batch_size` x `grad_accum` x processes) must stay, however it is split; the data must have the same
    content (`data_key`), wherever it now lives; model folders are compared by where they resolve.

    `saved["data_key"]`, when given, is the data's key taken when the run started; without it the saved paths'
    content now is used, which tells another file apart but not the same file edited since.
    """
    def old(name: str) -> Any:
        return saved.get(name, FIELDS[name].default)

    lines = []
    for name in FIELDS:
        if name in RESUME_MAY_CHANGE or name in _LENGTH + _BATCH + _DATA:
            continue
        same = _same_place(old(name), new[name]) if name in _PLACES else old(name) == new[name]
        if not same:
            lines.append(f"--{_flag(name)} {_text(old(name))} -> {_text(new[name])}")
    lines += _length_difference(old("max_steps"), new["max_steps"], old("epochs"), new["epochs"])
    saved_batch = old("batch_size") * old("grad_accum") * saved_world_size
    new_batch = new["batch_size"] * new["grad_accum"] * world_size
    if saved_batch != new_batch:
        lines.append(f"global batch (--batch-size x --grad-accum x processes) {saved_batch} -> {new_batch} pairs")
    if not _same_data({name: old(name) for name in _DATA}, {name: new[name] for name in _DATA},
                      saved.get("data_key")):
        lines.append(f"--data {_text(old('data'))} -> {_text(new['data'])} (other content)"
                     + (f", --eval-data {_text(old('eval_data'))} -> {_text(new['eval_data'])}"
                        if old("eval_data") or new["eval_data"] else ""))
    return lines


def data_key(settings: dict[str, Any]) -> str:
    """The content key of a run's data (`data`, `data_split`, `eval_data`, `eval_split` of a config dict): equal
    for the same bytes under another path, different once a file changed."""
    if settings["data"] == "synthetic":
        return "synthetic"
    sources = [(settings["data"], settings["data_split"])]
    if settings.get("eval_data"):
        sources.append((settings["eval_data"], settings.get("eval_split") or "test"))
    return data_cache.content_key(sources)


def _same_data(saved: dict[str, Any], new: dict[str, Any], saved_key: str | None) -> bool:
    if saved_key is None:
        try:
            saved_key = data_key(saved)
        except DPOError:  # the old data is gone or moved: all there is to compare is where it was
            return saved == new
    return saved_key == data_key(new)


def _length_difference(saved_steps: int | None, new_steps: int | None, saved_epochs: float, new_epochs: float,
                       ) -> list[str]:
    if saved_steps is not None and new_steps is not None:
        shorter = new_steps < saved_steps
    elif saved_steps is None and new_steps is None:
        shorter = new_epochs < saved_epochs
    else:
        return [f"--max-steps {_text(saved_steps)} -> {_text(new_steps)} (the length must be given the same way)"]
    if not shorter:
        return []
    if saved_steps is not None:
        return [f"--max-steps {saved_steps} -> {new_steps} (a resumed run may run longer, not shorter)"]
    return [f"--epochs {saved_epochs} -> {new_epochs} (a resumed run may run longer, not shorter)"]


def _same_place(a: Any, b: Any) -> bool:
    """Two model arguments name the same thing: equal text, or local paths that resolve to one folder."""
    if a == b:
        return True
    if isinstance(a, str) and isinstance(b, str) and Path(a).exists() and Path(b).exists():
        return Path(a).resolve() == Path(b).resolve()
    return False


def _children(folder: Path) -> list[Path]:
    return list(folder.iterdir()) if folder.is_dir() else []


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _text(value: Any) -> str:
    return "none" if value is None else str(value)
