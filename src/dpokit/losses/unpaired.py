"""Unpaired losses: each example is one completion y for a prompt x with a desirable/undesirable label.

Representation (agreed with the data pipeline, `formats.to_unpaired`): an example is a "pair" whose `chosen` is
the completion y, whose `rejected` is a MISMATCHED completion y' (another example's, for the same prompt x),
and whose `extras["label"]` is 1.0 (desirable) or 0.0 (undesirable). The mismatched pairs (x, y') are what
KTO's KL estimate z0 is computed on.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch

from ..logprobs import PairLogps
from .registry import LossOutput, register
from .terms import log_ratios, reverse_kl_only


def _check_kto(settings: Mapping[str, Any], extras: frozenset[str] | None) -> Iterator[str]:
    yield from reverse_kl_only(settings)
    for name in ("kto_desirable_weight", "kto_undesirable_weight"):
        if settings.get(name, 1.0) <= 0:
            yield f"--{name.replace('_', '-')} must be positive, got {settings[name]}"
    if settings.get("use_weighting"):
        yield "--use-weighting (WPO) weighs pairs; KTO examples are not pairs"
    if settings.get("rpo_alpha") is not None:
        yield "--rpo-alpha adds the NLL of every example's completion, undesirable ones included; drop it for KTO"
    if extras is not None and "label" not in extras:
        yield ("needs a desirable/undesirable `label` on every example (data with prompt, completion, label, or "
               "paired data, which is split into labelled examples)")


@register("kto", paired=False, check=_check_kto)
def kto(policy: PairLogps, reference: PairLogps | None, extras: dict[str, torch.Tensor], *,
        beta: float = 0.1, kto_desirable_weight: float = 1.0, kto_undesirable_weight: float = 1.0) -> LossOutput:
    """KTO (Ethayarajh et al. 2024, arXiv 2402.01306, Eq. 7, as in TRL 1.16's KTOTrainer).

    r = log pi(y|x)/pi_ref(y|x),  z0 = max(0, mean over the batch of log pi(y'|x)/pi_ref(y'|x)) (no gradient),
    L = lambda_D (1 - s(beta (r - z0)))  for desirable y,   lambda_U (1 - s(beta (z0 - r)))  for undesirable y,
    i.e. lambda_y - v(x, y) of the paper. `beta`: risk aversion / distance from the reference.
    `kto_desirable_weight`, `kto_undesirable_weight` (lambda_D, lambda_U; TRL's `desirable_weight`,
    `undesirable_weight`): the paper advises lambda_D n_D / (lambda_U n_U) in [1, 4/3] for n_D desirable and n_U
    undesirable examples. z0 is estimated over this micro-batch on this process (TRL also averages it across
    processes), so use batches of several examples.

    Logged rewards: the reward beta*r goes on the side its label wants above the reference point beta*z0
    (rewards/chosen = beta*r and rewards/rejected = beta*z0 for desirable examples, the other way round for
    undesirable ones), so rewards/accuracies is the share of examples on the right side of z0 and
    rewards/margins the mean label-signed beta*(r - z0). Metrics: kl (z0), and as TRL's KTOTrainer the number of
    desirable and undesirable examples (count/desirable, count/undesirable) and the mean reward beta*r of each
    kind (rewards/desirable, rewards/undesirable; see `metrics.per_kind_means`).
    """
    reward, mismatched = log_ratios(policy, reference)                               # [examples]
    z0 = mismatched.detach().mean().clamp(min=0)
    desirable = extras["label"] > 0.5                                                # [examples]
    losses = torch.where(desirable,
                         kto_desirable_weight * (1 - torch.sigmoid(beta * (reward - z0))),
                         kto_undesirable_weight * (1 - torch.sigmoid(beta * (z0 - reward))))
    scaled, point = beta * reward.detach(), (beta * z0).expand_as(reward)
    undesirable = ~desirable
    kinds = {"count/desirable": desirable.float().mean(), "count/undesirable": undesirable.float().mean(),
             "rewards/desirable_sum": (scaled * desirable).mean(),
             "rewards/undesirable_sum": (scaled * undesirable).mean()}
    return LossOutput(losses, torch.where(desirable, scaled, point), torch.where(desirable, point, scaled),
                      {"kl": z0, **kinds})
