"""Where a training run writes its files, named once. A run folder (`--output`) holds:

    config.yaml            the run's settings (what `--resume` and `dpo eval --run` read back)
    metrics.jsonl          one row per log step and per evaluation
    training_curves.png    the curves, redrawn at the end of the run
    summary.md             the run's table of results
    checkpoints/step-N/    with --save-every (see checkpoint.py)
    model/                 the trained policy (or LoRA adapter) with its tokenizer and model card
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

METRICS = "metrics.jsonl"


@dataclass(frozen=True)
class RunFiles:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.root / METRICS

    @property
    def curves(self) -> Path:
        return self.root / "training_curves.png"

    @property
    def summary(self) -> Path:
        return self.root / "summary.md"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def model(self) -> Path:
        return self.root / "model"
