"""Preference losses as pure functions of log-prob tensors, and the registry that names them.

Every loss has the signature

    loss(policy: PairLogps, reference: PairLogps | None, extras: dict[str, Tensor], *, <params>) -> LossOutput

where `policy` and `reference` hold per-pair summed completion log-probs (`[pairs]`), `extras` the optional
per-pair fields of the data (score_chosen, score_rejected, margin, label), and the keyword-only `<params>` are
named like `Config` fields (beta, label_smoothing, ...), which is how the loop fills them. A loss returns
per-pair losses and the implicit rewards that TRL logs as `rewards/*`.

Register your own without editing the package:

    from dpokit.losses import register, LossOutput

    @register("my_loss", needs_reference=True)
    def my_loss(policy, reference, extras, *, beta: float = 0.1) -> LossOutput: ...

and train with `--loss my_loss` (import your module first, e.g. from your own script that calls `dpokit.train`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .logprobs import PairLogps


@dataclass
class LossOutput:
    """`losses`, `chosen_rewards`, `rejected_rewards`: `[pairs]`; `metrics`: extra scalars to log by name."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


LossFunction = Callable[..., LossOutput]


@dataclass(frozen=True)
class LossSpec:
    """A registered loss and what it needs from the loop."""

    name: str
    function: LossFunction
    needs_reference: bool
    paired: bool

    @property
    def params(self) -> tuple[str, ...]:
        """The loss's keyword-only parameter names (each a `Config` field)."""
        signature = inspect.signature(self.function)
        return tuple(p.name for p in signature.parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY)


_REGISTRY: dict[str, LossSpec] = {}


def register(name: str, *, needs_reference: bool = True, paired: bool = True) -> Callable[[LossFunction], LossFunction]:
    """Decorator: make `function` available as `--loss name`."""

    def decorate(function: LossFunction) -> LossFunction:
        _REGISTRY[name] = LossSpec(name, function, needs_reference, paired)
        return function

    return decorate


def get(name: str) -> LossSpec:
    if name not in _REGISTRY:
        raise KeyError(name)
    return _REGISTRY[name]


def names() -> list[str]:
    return sorted(_REGISTRY)


def _log_ratios(policy: PairLogps, reference: PairLogps | None) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi/pi_ref for chosen and rejected (plain policy log-probs when reference-free)."""
    if reference is None:
        return policy.chosen, policy.rejected
    return policy.chosen - reference.chosen, policy.rejected - reference.rejected


@register("sigmoid")
def sigmoid(policy: PairLogps, reference: PairLogps | None, extras: dict[str, torch.Tensor], *,
            beta: float, label_smoothing: float) -> LossOutput:
    """DPO (Rafailov et al. 2023, arXiv 2305.18290, Eq. 7), with conservative DPO's label smoothing.

    L = -(1 - e) log s(b*D) - e log s(-b*D),  D = log pi(y_w)/pi_ref(y_w) - log pi(y_l)/pi_ref(y_l).
    `beta` (b) sets how far the policy may move from the reference; `label_smoothing` (e) is the assumed rate of
    flipped labels (cDPO, Mitchell 2023, Eq. 3). e = 0 is plain DPO. Rewards are b * log pi/pi_ref.
    """
    chosen_logratios, rejected_logratios = _log_ratios(policy, reference)
    logits = chosen_logratios - rejected_logratios                                  # [pairs]
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * logits) - label_smoothing * F.logsigmoid(-beta * logits)
    return LossOutput(losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach())
