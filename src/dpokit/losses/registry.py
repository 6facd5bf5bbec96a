"""The loss registry: `LossOutput`, `LossSpec`, `register`, `get`, `names`.

Every loss has the signature

    loss(policy: PairLogps, reference: PairLogps | None, extras: dict[str, Tensor], *, <params>) -> LossOutput

where `policy` and `reference` hold per-pair summed completion log-probs and lengths (`[pairs]`), `extras` the
optional per-pair fields of the data (score_chosen, score_rejected, margin, label; NaN where a pair lacks one;
and for data with gold responses, their policy log-probs and lengths, `triple.GOLD_LOGPS` / `GOLD_LENGTHS`),
and the keyword-only `<params>` are named like `Config` fields (beta, label_smoothing, ...): that is how the loop
fills them, so a parameter is also a `dpo train` flag (`--label-smoothing`). A loss returns per-pair losses, the
implicit rewards that are logged as `rewards/*`, and any loss-specific scalars to log next to them.

Register your own loss without editing the package, in a module you import before training:

    import torch.nn.functional as F
    from dpokit.losses import LossOutput, register

    def _check(settings, extras):                  # optional: problems to report before training starts
        return [] if settings["beta"] < 10 else ["--beta must be below 10 for my_loss"]

    @register("my_loss", needs_reference=True, check=_check, pairwise=True)  # pair p's loss uses pair p only
    def my_loss(policy, reference, extras, *, beta: float) -> LossOutput:
        chosen = policy.chosen - reference.chosen                                    # [pairs]
        rejected = policy.rejected - reference.rejected                              # [pairs]
        return LossOutput(-F.logsigmoid(beta * (chosen - rejected)), beta * chosen.detach(), beta * rejected.detach())

    from dpokit import Config, train
    train(Config(loss="my_loss,sigmoid", loss_weights="1,0.5"))   # my_loss + 0.5 * DPO
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

LossFunction = Callable[..., "LossOutput"]
# `check(settings, extras) -> problems`: `settings` maps every Config field name to its value; `extras` is the set
# of extra fields that every pair of the data has (`gold` for a gold response), or None when the data is not loaded
# yet.
Check = Callable[[Mapping[str, Any], "frozenset[str] | None"], Iterable[str]]


@dataclass
class LossOutput:
    """`losses`, `chosen_rewards`, `rejected_rewards`: `[pairs]`; `metrics`: extra scalars to log by name (the
    mean over the micro-batch; a `count/<kind>` metric is logged as a count, see `metrics.MetricMeter`).
    `has_rewards`: False for a loss with no implicit reward and no rejected side (SFT): a run of such losses only
    logs no `rewards/*` and no `logps/rejected`."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    has_rewards: bool = True


@dataclass(frozen=True)
class LossSpec:
    """A registered loss and what it needs from the loop.

    `needs_reference`: the loop builds and runs a reference model only when some selected loss needs one.
    `paired`: False for losses on single labelled completions (KTO); the loop then asks for unpaired examples.
    `pairwise`: each pair's loss depends on that pair's log-probs only (not on the rest of the batch), so the
    loop may compute it chunk by chunk inside the LM head (`fused_loss`): True only when that holds.
    `needs_gold`: the loss reads each pair's gold response (TPO); without such a loss a gold column in the data
    is not forwarded at all.
    """

    name: str
    function: LossFunction
    needs_reference: bool
    paired: bool
    check: Check | None = None
    pairwise: bool = False
    needs_gold: bool = False

    @property
    def params(self) -> tuple[str, ...]:
        """The loss's keyword-only parameter names (each a `Config` field)."""
        signature = inspect.signature(self.function)
        return tuple(p.name for p in signature.parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY)

    def problems(self, settings: Mapping[str, Any], extras: frozenset[str] | None = None) -> list[str]:
        """What is wrong with these settings (and data extras) for this loss, one message each; [] when fine."""
        return [f"--loss {self.name}: {p}" for p in (self.check(settings, extras) if self.check else ())]


_REGISTRY: dict[str, LossSpec] = {}


def register(name: str, *, needs_reference: bool = True, paired: bool = True, check: Check | None = None,
             pairwise: bool = False, needs_gold: bool = False) -> Callable[[LossFunction], LossFunction]:
    """Decorator: make `function` available as `--loss name` (re-registering a name replaces it).

    `pairwise=True` promises that pair p's loss depends on pair p's inputs only, which lets training skip one
    LM-head matmul per token (see `LossSpec`); leave it False when unsure: the result is the same, only slower.
    """

    def decorate(function: LossFunction) -> LossFunction:
        _REGISTRY[name] = LossSpec(name, function, needs_reference, paired, check, pairwise, needs_gold)
        return function

    return decorate


def get(name: str) -> LossSpec:
    if name not in _REGISTRY:
        raise KeyError(name)
    return _REGISTRY[name]


def names() -> list[str]:
    return sorted(_REGISTRY)
