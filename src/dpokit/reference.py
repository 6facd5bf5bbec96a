"""The reference model, whatever the strategy: it answers `logps(batch)` with the reference's `PairLogps`.

- `ModelReference`: a frozen, eval-mode model (a copy of the starting policy, or `--ref-model`), run under
  `torch.no_grad()` with the same layout as the policy (prefix sharing and packing included).
- `NoReference`: for reference-free losses (SimPO, ORPO, CPO); nothing is loaded, kept or run.
"""

from __future__ import annotations

from typing import Protocol

import torch

from .batching import Batch
from .logprobs import PairLogps, SequenceScorer, sequence_logps


class Reference(Protocol):
    def logps(self, batch: Batch) -> PairLogps | None: ...


class NoReference:
    """Reference-free losses get `None`."""

    def logps(self, batch: Batch) -> PairLogps | None:
        return None


class ModelReference:
    """A frozen model scored like the policy, without gradients."""

    def __init__(self, model: torch.nn.Module, *, chunk_size: int = 1024, ld_alpha: float | None = None) -> None:
        model.eval()
        model.requires_grad_(False)
        self.model = model
        self.scorer = SequenceScorer(model, chunk_size)
        self.ld_alpha = ld_alpha

    @torch.no_grad()
    def logps(self, batch: Batch) -> PairLogps | None:
        return sequence_logps(self.scorer, batch, ld_alpha=self.ld_alpha).detach()
