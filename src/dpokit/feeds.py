"""The seam between the step loop and where its pairs come from.

`loop.train` asks a `PairSource` for the tokenizer and the pairs known up front, then opens its `PairFeed` and
takes each optimizer step's micro-batches from it. `dpo train`'s source is the data file (`loop.FilePairs`);
`dpo online --on-policy`'s samples the policy as it trains (`on_policy.OnPolicy`). Either way the step loop is one
loop: one optimizer, schedule, reference and metrics stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from . import distributed
from .batching import Batch
from .config import Config
from .data import preparation as pipeline
from .objective import Objective


@dataclass(frozen=True)
class StepPairs:
    """One optimizer step's pairs, as this rank trains on them."""

    batches: list[Batch]                # this rank's micro-batches, in order (none when the step has no pairs)
    pairs: int                          # the step's pairs on all ranks together: its loss is their mean
    stand_ins: int = 0                  # the last batches, which only keep this rank in DDP's all-reduce (the step
                                        # had too few pairs to give it its own): trained with weight 0, not counted


class PairFeed(Protocol):
    """Where the step loop takes each step's pairs from, step after step. Resumable: its state (with the loop's
    counters) continues a run exactly, and `metrics` reports what it did since the last metrics row."""

    def next_step(self, step: int) -> StepPairs: ...
    def metrics(self, dist: distributed.Dist) -> dict[str, float]: ...  # since the last call, over all ranks
    def state_dict(self) -> dict[str, Any]: ...  # this rank's part, saved with its metric sums
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class PairSource(Protocol):
    """Where a run's pairs come from: a data file (`loop.FilePairs`, `dpo train`) or the policy's own samples, judged
    as it trains (`on_policy.OnPolicy`, `dpo online --on-policy`). A step takes `batch_size x grad_accum x ranks`
    of its units (pairs, or prompts), an epoch `epoch_size` of them."""

    def prepare(self, cfg: Config, objective: Objective) -> tuple[Any, pipeline.PreparedData]:
        """The tokenizer and the pairs known before training (the held-out ones are evaluated)."""
        ...

    def epoch_size(self, data: pipeline.PreparedData) -> int: ...

    def open(self, cfg: Config, data: pipeline.PreparedData, policy: torch.nn.Module, consumed: int,
             dist: distributed.Dist) -> PairFeed:
        """The feed from the step after `consumed` units (all ranks together); `policy` as it trains."""
        ...
