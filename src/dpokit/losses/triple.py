"""Losses on triples: a preference pair plus a gold response y_g to clone (TPO, TPO-L; reference-free).

The gold response is a third completion of the pair's prompt, scored in the same forward pass as chosen and
rejected (`batching`: one prompt block, three responses). Its summed log-prob and length reach a loss as the
per-pair `extras` GOLD_LOGPS and GOLD_LENGTHS (`objective` adds them when the batch has gold responses), so a
loss here needs data with a gold column (`reference` or `gold`), which its check asks for.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from ..errors import DPOError
from ..logprobs import PairLogps
from .registry import LossOutput, register
from .terms import non_negative, per_token, reverse_kl_only, smoothed_logistic

GOLD_LOGPS = "gold_logps"      # [pairs] the policy's summed log-prob of each pair's gold response
GOLD_LENGTHS = "gold_lengths"  # [pairs] its completion tokens


def _check_tpo(settings: Mapping[str, Any], extras: frozenset[str] | None) -> Iterator[str]:
    yield from reverse_kl_only(settings)
    yield from non_negative(settings, "tpo_alpha", 1.0)
    if not 0.0 <= settings.get("label_smoothing", 0.0) < 0.5:
        yield f"--label-smoothing (the label-flip rate) must be in [0, 0.5), got {settings['label_smoothing']}"
    if settings.get("stream_data"):
        yield "--stream-data does not carry the gold response yet; drop --stream-data"
    if extras is not None and "gold" not in extras:
        yield ("needs a gold response on every pair: a `reference` (or `gold`) column beside prompt/chosen/rejected, "
               "in the form of chosen (string or message list)")


def _check_tpo_l(settings: Mapping[str, Any], extras: frozenset[str] | None) -> Iterator[str]:
    yield from _check_tpo(settings, extras)
    if not math.isfinite(settings.get("tpo_l_gamma", 0.5)):
        yield f"--tpo-l-gamma must be a finite number (the authors' default 0.5), got {settings['tpo_l_gamma']}"


def gold_nll(extras: Mapping[str, torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """NLL per gold-response token over the whole micro-batch, repeated for each pair `[pairs]` (as `batch_nll`
    does for chosen): the authors' code and TRL's take the cross-entropy mean over every gold token of the batch."""
    if GOLD_LOGPS not in extras:
        raise DPOError("--loss tpo: the batch has no gold responses (give the data a `reference` or `gold` column)")
    nll = -extras[GOLD_LOGPS].sum() / extras[GOLD_LENGTHS].sum().clamp(min=1)
    return nll.expand_as(like)


@register("tpo", needs_reference=False, check=_check_tpo, needs_gold=True)
def tpo(policy: PairLogps, reference: PairLogps | None, extras: dict[str, torch.Tensor], *,
        beta: float = 0.1, label_smoothing: float = 0.0, tpo_alpha: float = 1.0) -> LossOutput:
    """TPO, Triple Preference Optimization (Saeidi et al. 2024, arXiv 2405.16681; the preference term is its
    Eq. 3): a reference-free contrastive term on (y_w, y_l) plus behaviour cloning of the gold response y_g,

        L = -log s(beta log pi(y_w|x) - beta log pi(y_l|x)) - alpha log pi(y_g|x),

    on summed log-probs, in one step from a base or instruct model (no SFT stage, no reference model).
    Implemented as the authors' code and TRL's experimental TPOTrainer compute it: the alpha term is the NLL per
    gold token over the micro-batch (`gold_nll`), not a per-sequence sum; `label_smoothing` (e) as in cDPO, which
    both also apply. Defaults: `tpo_alpha` (alpha) 1.0, the authors' and TRL's; `beta` is the shared --beta
    (0.1): the paper and TRL train TPO with beta 0.01, so pass --beta 0.01 to follow them.
    Rewards are beta log pi(y) (TRL's); metric gold_nll (the NLL term before alpha).
    """
    nll = gold_nll(extras, policy.chosen)
    losses = smoothed_logistic(beta * (policy.chosen - policy.rejected), label_smoothing) + tpo_alpha * nll
    return LossOutput(losses, beta * policy.chosen.detach(), beta * policy.rejected.detach(),
                      {"gold_nll": nll[0].detach()})


@register("tpo-l", needs_reference=False, check=_check_tpo_l, needs_gold=True)
def tpo_l(policy: PairLogps, reference: PairLogps | None, extras: dict[str, torch.Tensor], *,
          beta: float = 0.1, label_smoothing: float = 0.0, tpo_alpha: float = 1.0, tpo_l_gamma: float = 0.5,
          ) -> LossOutput:
    """TPO-L, TPO's length-controlled variant (Saeidi et al. 2024, arXiv 2405.16681): the contrastive term on
    per-token average log-probs with a target reward margin gamma, as SimPO's,

        L = -log s(beta/|y_w| log pi(y_w|x) - beta/|y_l| log pi(y_l|x) - gamma) - alpha log pi(y_g|x),

    the alpha term as in `tpo` (NLL per gold token over the micro-batch). The authors' code and TRL write
    beta (D - gamma/beta) on the averages, the same. `tpo_l_gamma` (gamma) 0.5 (the authors' and TRL's default;
    their runs use 0.3 to 10), `tpo_alpha` 1.0; the paper and TRL pair it with beta 2 to 10 (--beta).
    Rewards are beta times the average log-prob; metric gold_nll.
    """
    chosen = per_token(policy.chosen, policy.chosen_lengths)                          # [pairs]
    rejected = per_token(policy.rejected, policy.rejected_lengths)
    nll = gold_nll(extras, chosen)
    losses = smoothed_logistic(beta * (chosen - rejected) - tpo_l_gamma, label_smoothing) + tpo_alpha * nll
    return LossOutput(losses, beta * chosen.detach(), beta * rejected.detach(), {"gold_nll": nll[0].detach()})
