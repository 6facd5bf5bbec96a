"""Training metrics as TRL names them, summed on device between log steps and reduced across ranks at once.

`MetricMeter.add` takes each micro-batch's per-pair losses, the policy's log-probs and the losses' outputs;
`reduce` does one all-reduce and one host sync per log step and returns means weighted by pairs.

Each kind of run reports in its own terms. SFT alone (every loss without rewards, `LossOutput.has_rewards`) logs
what TRL's SFTTrainer logs, `loss` and `nll_loss` (and `logps/chosen`), with no `rewards/*`, `logps/rejected` or
length gap: those would be 0 or a copy of the chosen side; and, as TRL's SFTTrainer, `mean_token_accuracy`, the
fraction of completion tokens whose argmax under the policy is the target (any run with an SFT term, from the
argmax hits that the log-probs' pass counted, `PairLogps.chosen_correct`): over all tokens since the last row,
where TRL averages each batch's fraction (the same when batches hold as many tokens). Unpaired losses (KTO) add
TRL's KTOTrainer counts and per-kind means: a loss metric `count/<kind>` is logged as the number of examples of
that kind since the last row, and `<name>/<kind>_sum` as `<name>/<kind>`, the mean over those examples.
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
# TRL's SFT token accuracy, kept as two sums (argmax hits, and the tokens they were counted over) until `reduce`.
ACCURACY, ACCURACY_TOKENS = "mean_token_accuracy", "mean_token_accuracy/tokens"
PAIRED_ONLY = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/rejected",
               "lengths/preferred_gap")  # left out of the rows of a run whose losses have no rewards (SFT)


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
        self.has_rewards = False  # some loss gave implicit rewards since the last log step

    def add(self, per_pair: torch.Tensor, policy: PairLogps, outputs: list[LossOutput], tokens: int,
            counted: bool = True) -> None:
        """Add a micro-batch's metrics. `counted=False` (a rank's stand-in batch in a spare round) adds nothing
        but the metric names, so that every rank reduces the same keys in the same order."""
        first = next((out for out in outputs if out.has_rewards), outputs[0])  # sft beside DPO: DPO's rewards
        self.has_rewards = self.has_rewards or first.has_rewards
        chosen, rejected = first.chosen_rewards, first.rejected_rewards
        preferred_gap = (chosen - rejected).sign() * (policy.chosen_lengths - policy.rejected_lengths)
        values = torch.stack([per_pair.detach().sum(), chosen.sum(), rejected.sum(),
                              (chosen > rejected).float().sum(), (chosen - rejected).sum(),
                              policy.chosen.detach().sum(), policy.rejected.detach().sum(),
                              preferred_gap.sum().to(chosen.dtype)])
        self.sums += values.double() * counted
        n = per_pair.numel() * counted
        for out in outputs:
            for name, value in out.metrics.items():  # loss-specific means, weighted by pairs
                self.extra[name] = self.extra.get(name, 0.0) + value.detach().double() * n
        if policy.chosen_correct is not None:  # sums of hits and tokens, divided in `reduce`
            for name, value in ((ACCURACY, policy.chosen_correct), (ACCURACY_TOKENS, policy.chosen_lengths)):
                self.extra[name] = self.extra.get(name, 0.0) + value.detach().double().sum() * counted
        self.pairs += n
        self.tokens += tokens * counted

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
        if not self.has_rewards:
            out = {name: value for name, value in out.items() if name not in PAIRED_ONLY}
        per_kind_means(out, pairs)
        if ACCURACY in out:  # both sums were divided by the pairs: their ratio is hits per token
            hits, scored = out.pop(ACCURACY), out.pop(ACCURACY_TOKENS)
            if scored:
                out[ACCURACY] = hits / scored
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


def per_kind_means(out: dict[str, float], pairs: float) -> None:
    """In place: `count/<kind>` (a mean over all examples, as summed) becomes the number of such examples, and
    `<name>/<kind>_sum` becomes `<name>/<kind>`, the mean over them (left out when there were none)."""
    for name in [n for n in out if n.startswith("count/")]:
        out[name] = round(out[name] * pairs)
    for name in [n for n in out if n.endswith("_sum")]:
        base, kind = name.removesuffix("_sum").rsplit("/", 1)
        total, count = out.pop(name) * pairs, out.get(f"count/{kind}", 0)
        if count:
            out[f"{base}/{kind}"] = total / count
