"""Experiment trackers: the rows of `metrics.jsonl`, also sent to TensorBoard and/or Weights & Biases.

    dpo train --report-to tensorboard        # OUTPUT/tensorboard/  ->  tensorboard --logdir OUTPUT/tensorboard
    dpo train --report-to wandb              # project $WANDB_PROJECT (default "dpokit"); WANDB_MODE=offline works
    dpo train --report-to tensorboard,wandb  # both

Both are optional extras (`pip install dpokit[tensorboard]`, `dpokit[wandb]`), imported only when asked for.
`--report-to none` gives a `NullTracker`, so the loop logs unconditionally. Metric names are exactly the
`metrics.jsonl` keys (`loss`, `rewards/margins`, `eval/rewards/accuracies`, ...), the step is the row's `step`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

from .errors import DPOError
from .report import Sink as Tracker

# tracker name -> (module to import, pip extra that installs it)
EXTRAS = {"tensorboard": ("torch.utils.tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}
NAMES = ("none", *EXTRAS)


def parse_report_to(report_to: str) -> list[str]:
    """`"tensorboard,wandb"` -> `["tensorboard", "wandb"]`; `"none"` -> `[]`. Checks names and installed extras.

    Called before training starts, so a missing extra fails in a second, not after loading the model.
    """
    names = [name.strip() for name in report_to.split(",") if name.strip() and name.strip() != "none"]
    for name in names:
        if name not in EXTRAS:
            raise DPOError(f"--report-to: unknown tracker {name!r}; choose from {', '.join(NAMES)}")
        _import(name)
    return list(dict.fromkeys(names))


def build_tracker(names: list[str], out_dir: str | Path, *, config: Mapping[str, Any]) -> Tracker:
    """One tracker that fans out to every name in `names` (from `parse_report_to`); `NullTracker` for none."""
    trackers: list[Tracker] = []
    for name in names:
        trackers.append(TensorBoardTracker(Path(out_dir) / "tensorboard", config) if name == "tensorboard"
                        else WandbTracker(Path(out_dir), config))
    if not trackers:
        return NullTracker()
    return trackers[0] if len(trackers) == 1 else MultiTracker(trackers)


def scalars(row: Mapping[str, Any]) -> dict[str, float]:
    """The finite numeric metrics of a row, without its `step` (bools and texts are not metrics)."""
    return {k: float(v) for k, v in row.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class NullTracker:
    """`--report-to none`: accepts everything, does nothing."""

    def log(self, row: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


class MultiTracker:
    def __init__(self, trackers: list[Tracker]) -> None:
        self.trackers = trackers

    def log(self, row: Mapping[str, Any]) -> None:
        for tracker in self.trackers:
            tracker.log(row)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()


class TensorBoardTracker:
    """Scalars through `torch.utils.tensorboard.SummaryWriter`; the run's settings as a text summary."""

    def __init__(self, log_dir: Path, config: Mapping[str, Any]) -> None:
        self.writer = _import("tensorboard").SummaryWriter(log_dir=str(log_dir))
        settings = "\n".join(f"    {k}: {v}" for k, v in config.items())  # indented: markdown code block
        self.writer.add_text("config", settings, global_step=0)
        self.log_dir = log_dir

    def log(self, row: Mapping[str, Any]) -> None:
        for name, value in scalars(row).items():
            self.writer.add_scalar(name, value, global_step=int(row["step"]))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """A Weights & Biases run in `out_dir/wandb` (override with WANDB_DIR); project from WANDB_PROJECT."""

    def __init__(self, out_dir: Path, config: Mapping[str, Any]) -> None:
        wandb = _import("wandb")
        directory = Path(os.environ.get("WANDB_DIR") or out_dir)
        directory.mkdir(parents=True, exist_ok=True)
        try:
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "dpokit"), name=Path(out_dir).name,
                                  dir=str(directory), config=dict(config))
        except wandb.errors.Error as err:  # typically no API key: say how to log in or go offline
            raise DPOError(f"--report-to wandb: {err} (run `wandb login`, or set WANDB_MODE=offline)") from None

    def log(self, row: Mapping[str, Any]) -> None:
        # Eval rows share the step of the train row before them; wandb merges both into that step.
        self.run.log(scalars(row), step=int(row["step"]))

    def close(self) -> None:
        self.run.finish()


def _import(name: str) -> ModuleType:
    import importlib

    module, extra = EXTRAS[name]
    try:
        return importlib.import_module(module)
    except ImportError:
        raise DPOError(f"--report-to {name} needs the {name} package: pip install 'dpokit[{extra}]'") from None
