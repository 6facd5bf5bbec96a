"""Training metrics as TRL names them, summed on device between log steps and reduced across ranks at once.

`MetricMeter.add` takes each micro-batch's per-pair losses, the policy's log-probs and the losses' outputs;
`reduce` does one all-reduce and one host sync per log step and returns means weighted by pairs.
"""

from __future__ import annotations

from typing import Any

import torch

from . import distributed
from .logprobs import PairLogps
from .losses import LossOutput

# Order of the summed metrics kept on device between log steps; reduced across ranks in one call.
# `lengths/preferred_gap`: the length gap (tokens) of the completion the policy's rewards prefer over the other,
# for the health alarm on length hacking (`health.preferred_length_gap` is the same formula).
SUMMED = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
          "logps/chosen", "logps/rejected", "lengths/preferred_gap")


class MetricMeter:
    """Sums metrics on device between log steps; one reduction and one host sync when read."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.sums = torch.zeros(len(SUMMED), device=device, dtype=torch.float64)
        self.extra: dict[str, torch.Tensor] = {}
        self.pairs = 0
        self.tokens = 0
        self.steps = 0
        self.bad_steps = 0
        self.grad_norm_sum: torch.Tensor | float = 0.0

    def add(self, per_pair: torch.Tensor, policy: PairLogps, outputs: list[LossOutput], tokens: int) -> None:
        first = outputs[0]
        chosen, rejected = first.chosen_rewards, first.rejected_rewards
        preferred_gap = (chosen - rejected).sign() * (policy.chosen_lengths - policy.rejected_lengths)
        values = torch.stack([per_pair.detach().sum(), chosen.sum(), rejected.sum(),
                              (chosen > rejected).float().sum(), (chosen - rejected).sum(),
                              policy.chosen.detach().sum(), policy.rejected.detach().sum(),
                              preferred_gap.sum().to(chosen.dtype)])
        self.sums += values.double()
        n = per_pair.numel()
        for out in outputs:
            for name, value in out.metrics.items():  # loss-specific means, weighted by pairs
                self.extra[name] = self.extra.get(name, 0.0) + value.detach().double() * n
        self.pairs += n
        self.tokens += tokens

    def end_step(self, grad_norm: torch.Tensor, skipped: bool) -> None:
        """Count an optimizer step: its gradient norm (a non-finite norm counts as 0) and whether it was skipped."""
        self.grad_norm_sum += grad_norm.detach().float() if torch.isfinite(grad_norm) else 0.0
        self.steps += 1
        self.bad_steps += int(skipped)

    def reduce(self, dist: distributed.Dist) -> dict[str, float]:
        names = list(SUMMED) + sorted(self.extra)
        counts = torch.tensor([self.pairs, self.tokens, self.bad_steps], device=self.device, dtype=torch.float64)
        packed = torch.cat([self.sums, torch.stack([self.extra[k] for k in sorted(self.extra)]) if self.extra
                            else self.sums.new_zeros(0), counts, torch.as_tensor(
                                self.grad_norm_sum, device=self.device, dtype=torch.float64).reshape(1)])
        packed = distributed.reduce_sums(packed, dist).tolist()            # the one host sync
        pairs, tokens, bad = packed[len(names)], packed[len(names) + 1], packed[len(names) + 2]
        out = {name: value / max(pairs, 1) for name, value in zip(names, packed)}
        out["pairs"], out["tokens"] = pairs, tokens
        if self.steps:
            out["grad_norm"] = packed[-1] / (self.steps * dist.world_size)
            out["bad_steps"] = bad / dist.world_size
        return out

    def state_dict(self) -> dict[str, Any]:
        """The sums since the last log step, so that a run resumed between log steps logs the same row."""
        return {"sums": self.sums, "extra": dict(self.extra), "pairs": self.pairs, "tokens": self.tokens,
                "steps": self.steps, "bad_steps": self.bad_steps, "grad_norm_sum": self.grad_norm_sum}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Sums saved by `state_dict` (an empty dict leaves the meter empty)."""
        if not state:
            return
        move = lambda v: v.to(self.device) if isinstance(v, torch.Tensor) else v  # noqa: E731
        saved = move(state["sums"])  # a checkpoint from before a metric was added lacks its trailing sums
        self.sums = torch.cat([saved, saved.new_zeros(len(SUMMED) - len(saved))])
        self.extra = {name: move(value) for name, value in state["extra"].items()}
        self.pairs, self.tokens = state["pairs"], state["tokens"]
        self.steps, self.bad_steps = state["steps"], state["bad_steps"]
        self.grad_norm_sum = move(state["grad_norm_sum"])
