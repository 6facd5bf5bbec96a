"""What a run optimises: the selected losses, their weights and parameters, and which reference they need.

`Objective.from_config` resolves `--loss`, `--loss-weights` and `--rpo-alpha` against the registry and refuses
bad settings before any model loads; `Objective.batch_loss` scores one batch with the policy (and the reference)
and returns the weighted loss to backpropagate with everything the metrics need.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

from . import losses
from .batching import Batch
from .config import Config
from .errors import DPOError
from .fused_head import fused_sequence_loss
from .logprobs import PairLogps, pair_logps, select_pair_logps, sequence_logps, token_scores
from .losses.triple import GOLD_LENGTHS, GOLD_LOGPS
from .reference import Reference, reference_strategy


@dataclass(frozen=True)
class BatchLoss:
    """One batch scored: `total` (summed over its pairs, with the graph when training), `per_pair` `[pairs]`, the
    policy's log-probs and each loss's output (rewards, extra metrics)."""

    total: torch.Tensor
    per_pair: torch.Tensor
    policy_logps: PairLogps
    outputs: list[losses.LossOutput]


@dataclass(frozen=True)
class Objective:
    """The weighted sum of registered losses (`specs[i]` weighted by `weights[i]`), with each loss's parameters
    read from the config, the reference strategy they need ("none", "copy", "model" or "adapter", see
    `reference.reference_strategy`), and how log-probs are taken (LD-DPO's alpha, WPO's weights)."""

    specs: list[losses.LossSpec]
    weights: list[float]
    params: dict[str, Any]
    strategy: str
    ld_alpha: float | None = None
    use_wpo: bool = False
    chunk_size: int = 512

    @classmethod
    def from_config(cls, cfg: Config) -> Objective:
        specs = resolve_losses(cfg.loss_names)
        weights = parse_loss_weights(cfg.loss_weights, len(specs))
        if cfg.rpo_alpha is not None:  # RPO's NLL term is the `sft` loss, as TRL 1.16's loss_type=[..., "sft"]
            specs, weights = specs + [losses.get("sft")], weights + [cfg.rpo_alpha]
        check_losses(specs, cfg)
        strategy = reference_strategy(loss_names=cfg.loss_names,
                                      needs_reference=any(spec.needs_reference for spec in specs),
                                      lora=bool(cfg.lora_r or cfg.lora_adapter), ref_model=cfg.ref_model,
                                      precompute_ref=cfg.precompute_ref, ref_sync_every=cfg.ref_sync_every,
                                      ref_update=cfg.ref_update)
        return cls(specs, weights, {name: getattr(cfg, name) for spec in specs for name in spec.params}, strategy,
                   ld_alpha=cfg.ld_alpha, use_wpo=cfg.use_weighting, chunk_size=cfg.logprob_chunk_size)

    @property
    def paired(self) -> bool:
        return all(spec.paired for spec in self.specs)

    @property
    def python_losses(self) -> list[str]:
        """The selected losses registered from Python code outside dpokit: no `dpo train` command can name them."""
        return [spec.name for spec in self.specs if not spec.function.__module__.startswith("dpokit.")]

    @property
    def fused(self) -> bool:
        """Every loss scores each pair on its own, so the LM head and the loss can run fused in training."""
        return all(spec.pairwise for spec in self.specs)

    @property
    def token_accuracy(self) -> bool:
        """An SFT term is optimised: the policy's pass also counts argmax hits, for TRL's `mean_token_accuracy`."""
        return any(spec.name == "sft" for spec in self.specs)

    @property
    def headline(self) -> tuple[str, str]:
        """(metric, its name for people) that the run reports before and after training. SFT alone has no
        rewards to rank: its held-out number is the NLL per token."""
        if all(spec.name == "sft" for spec in self.specs):
            return "loss", "held-out NLL per token"
        return "rewards/accuracies", "held-out reward accuracy"

    def check_data(self, cfg: Config, extras: frozenset[str]) -> None:
        """Refuse losses whose data fields (scores, margins, labels) the loaded pairs do not all have."""
        check_losses(self.specs, cfg, extras=extras)

    def weighted(self, policy_logps: PairLogps, reference_logps: PairLogps | None, extras: dict[str, torch.Tensor],
                 ) -> tuple[torch.Tensor, list[losses.LossOutput]]:
        """Per-pair weighted loss `[pairs]` and each loss's output."""
        outputs = [spec.function(policy_logps, reference_logps, extras,
                                 **{k: self.params[k] for k in spec.params}) for spec in self.specs]
        per_pair = sum(w * out.losses for w, out in zip(self.weights, outputs))
        if self.use_wpo:  # WPO (Zhou et al. 2024, arXiv 2406.11827, Eq. 2) as TRL 1.16: w(y_w) w(y_l), no grad
            assert policy_logps.chosen_wpo is not None and policy_logps.rejected_wpo is not None
            per_pair = per_pair * torch.exp(policy_logps.chosen_wpo + policy_logps.rejected_wpo)
        return per_pair, outputs  # type: ignore[return-value]

    def batch_loss(self, model: torch.nn.Module, reference: Reference, batch: Batch, *, train: bool = False,
                   autocast: contextlib.AbstractContextManager[Any] | None = None) -> BatchLoss:
        """Score `batch` with `model` (the wrapped policy scorer) and `reference`; in training with pairwise
        losses the LM head and the loss run fused (one head matmul less, no logits kept for backward)."""
        extras = batch.extras
        with autocast or contextlib.nullcontext():
            # The reference first: its transient activations are gone before the policy's are kept for backward.
            reference_logps = reference.logps(batch)
            if train and self.fused:
                def loss_of_pairs(policy_logps: PairLogps, pairs: torch.Tensor) -> torch.Tensor:
                    selected = None if reference_logps is None else reference_logps.select(pairs)
                    return self.weighted(policy_logps, selected, {k: v[pairs] for k, v in batch.extras.items()})[0]

                total, policy_logps = fused_sequence_loss(model, batch, loss_of_pairs, self.chunk_size,
                                                          ld_alpha=self.ld_alpha, with_wpo=self.use_wpo)
            elif batch.gold_index is None:
                policy_logps = sequence_logps(model, batch, ld_alpha=self.ld_alpha, with_wpo=self.use_wpo,
                                              with_accuracy=self.token_accuracy)
            else:  # the gold responses' log-probs from the same scored tokens as chosen and rejected
                token_logps, token_wpo, token_correct = token_scores(model, batch, with_wpo=self.use_wpo,
                                                                     with_accuracy=self.token_accuracy)
                policy_logps = pair_logps(batch, token_logps, token_wpo, self.ld_alpha, token_correct)
                extras = {**batch.extras, **gold_logps(batch, token_logps)}
        if train and self.fused:
            with torch.no_grad():  # the metrics, from the log-probs that the fused pass returned
                per_pair, outputs = self.weighted(policy_logps, reference_logps, batch.extras)
            return BatchLoss(total, per_pair, policy_logps, outputs)
        per_pair, outputs = self.weighted(policy_logps, reference_logps, extras)
        return BatchLoss(per_pair.sum(), per_pair, policy_logps, outputs)


def gold_logps(batch: Batch, token_logps: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each pair's gold response's summed log-prob and length (`GOLD_LOGPS`, `GOLD_LENGTHS`, `[pairs]`; NaN for a
    pair without one) from the batch's scored token log-probs `[scored]`, where the gold is one more completion."""
    assert batch.gold_index is not None
    index = batch.gold_index.clamp(min=0)
    gold = select_pair_logps(token_logps, batch.sequence_index, batch.token_position, index, index,
                             batch.num_sequences)
    missing = batch.gold_index < 0
    return {GOLD_LOGPS: gold.chosen.masked_fill(missing, float("nan")),
            GOLD_LENGTHS: gold.chosen_lengths.masked_fill(missing, float("nan"))}


def resolve_losses(loss_names: list[str]) -> list[losses.LossSpec]:
    specs = []
    for name in loss_names:
        try:
            specs.append(losses.get(name))
        except KeyError:
            raise DPOError(f"--loss: unknown loss {name!r}; choose from {', '.join(losses.names())}") from None
    if not specs:
        raise DPOError("--loss: give at least one loss name")
    return specs


def check_losses(specs: list[losses.LossSpec], cfg: Config, extras: frozenset[str] | None = None) -> None:
    """Every problem with the selected losses' settings (and, once loaded, the data's extra fields), at once."""
    settings = cfg.to_dict()
    problems = [f"--loss {spec.name}: parameter {name!r} is not a setting (a Config field)"
                for spec in specs for name in spec.params if name not in settings]
    if len({spec.paired for spec in specs}) > 1:
        problems.append(f"--loss {cfg.loss}: paired and unpaired (kto) losses cannot be combined")
    problems += [problem for spec in specs for problem in spec.problems(settings, extras)]
    if problems:
        raise DPOError("; ".join(dict.fromkeys(problems)))


def parse_loss_weights(text: str | None, count: int) -> list[float]:
    if text is None:
        return [1.0] * count
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        raise DPOError(f"--loss-weights: expected comma-separated numbers, got {text!r}") from None
    if len(weights) != count:
        raise DPOError(f"--loss-weights: {len(weights)} weights for {count} losses")
    return weights
