"""Losses without a reference model (SimPO, AlphaPO, ORPO, CPO) and the NLL term (SFT, RPO's regulariser).

They read only the policy's log-probs: with only these selected, the loop builds no reference model at all.
Rewards are beta * (policy log-probs), the quantity each loss treats as the implicit reward (TRL's convention).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from ..logprobs import PairLogps
from .registry import LossOutput, register
from .terms import EXP_CLAMP, batch_nll, non_negative, per_token, reverse_kl_only, smoothed_logistic

# ORPO's odds need log(1 - p); a per-token average log-prob of exactly 0 (p = 1, reachable in float32) would
# make it -inf and the gradient NaN, so averages are capped just below 0 (p <= 1 - 1e-6).
MAX_MEAN_LOGP = -1e-6


@register("simpo", needs_reference=False, check=reverse_kl_only, pairwise=True)
def simpo(policy: PairLogps, reference: PairLogps | None, extras: dict[str, torch.Tensor], *,
          beta: float = 0.1, simpo_gamma: float = 0.5, label_smoothing: float = 0.0) -> LossOutput:
    """SimPO (Meng et al. 2024, arXiv 2405.14734, Eq. 6).

    L = -log s(beta/|y_w| log pi(y_w) - beta/|y_l| log pi(y_l) - gamma): the length-normalised log-likelihood is
    the reward, and `simpo_gamma` (gamma) is the target reward margin (gamma itself, not gamma/beta; TRL's
    CPOTrainer computes beta*(D - gamma/beta), the same). `beta`: the reward scale (the paper uses 2 to 2.5; the
    shared default is TRL's 0.1). `label_smoothing` as in cDPO (TRL applies it to SimPO too). TRL's
    CPOTrainer(loss_type="simpo") also adds `cpo_alpha` (default 1) times the NLL of chosen: for that, use
    `--loss simpo,sft --loss-weights 1,CPO_ALPHA`; SimPO itself has no NLL term.
    """
    chosen = per_token(policy.chosen, policy.chosen_lengths)                          # [pairs]
    rejected = per_token(policy.rejected, policy.rejected_lengths)
    losses = smoothed_logistic(beta * (chosen - rejected) - simpo_gamma, label_smoothing)
    return LossOutput(losses, beta * chosen.detach(), beta * rejected.detach())


def _check_alphapo(settings: Mapping[str, Any], extras: frozenset[str] | None) -> Iterator[str]:
    yield from reverse_kl_only(settings)
    if not math.isfinite(settings.get("alphapo_alpha", 0.0)):
        yield f"--alphapo-alpha must be a finite number (0 is SimPO), got {settings['alphapo_alpha']}"


def _alpha_reward(mean_logps: torch.Tensor, alpha: float) -> torch.Tensor:
    """AlphaPO's reward shape (1 - p^-alpha) / alpha of p = exp(mean log-prob), `[pairs]`; alpha = 0 is its limit,
    the mean log-prob itself (SimPO's reward).

    Computed as -expm1(-alpha m) / alpha, accurate for small alpha m; the exponent is capped at EXP_CLAMP (a mean
    log-prob below -80/alpha per token, far past any real completion) so that it stays finite.
    """
    if alpha == 0:
        return mean_logps
    return -torch.expm1((-alpha * mean_logps).clamp(max=EXP_CLAMP)) / alpha


@register("alphapo", needs_reference=False, check=_check_alphapo, pairwise=True)
def alphapo(policy: PairLogps, reference: PairLogps | None, extras: dict[str, torch.Tensor], *,
            beta: float = 0.1, simpo_gamma: float = 0.5, label_smoothing: float = 0.0, alphapo_alpha: float = 0.0,
            ) -> LossOutput:
    """AlphaPO (Gupta et al. 2025, "AlphaPO: Reward Shape Matters for LLM Alignment", arXiv 2501.03884).

    L = -log s(r(y_w) - r(y_l) - gamma),  r(y) = -(beta/alpha) (pi(y|x)^(-alpha/|y|) - 1),
    SimPO with the length-normalised reward reshaped by alpha: alpha = 0 is SimPO exactly (the limit of r is
    beta/|y| log pi(y|x)); the larger alpha, the less aggressive the likelihood displacement (chosen completions'
    likelihood falling) that the paper analyses. `alphapo_alpha` is TRL's experimental CPOConfig `alpha`
    (default 0, as TRL; TRL's recipe for Mistral-Instruct uses alpha 0.25, beta 2.5, gamma 0.1); `beta`,
    `simpo_gamma` and `label_smoothing` as in SimPO. TRL's CPOTrainer(loss_type="alphapo") sets cpo_alpha 0: no
    NLL term here either. Rewards are r (TRL's beta times its transformed reward).
    """
    chosen = _alpha_reward(per_token(policy.chosen, policy.chosen_lengths), alphapo_alpha)            # [pairs]
    rejected = _alpha_reward(per_token(policy.rejected, policy.rejected_lengths), alphapo_alpha)
    losses = smoothed_logistic(beta * (chosen - rejected) - simpo_gamma, label_smoothing)
    return LossOutput(losses, beta * chosen.detach(), beta * rejected.detach())


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate on both sides of -log 2 (Maechler 2012)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def _check_orpo(settings: Mapping[str, Any], extras: frozenset[str] | None) -> Iterator[str]:
    yield from reverse_kl_only(settings)
    yield from non_negative(settings, "orpo_lambda", 0.1)


@register("orpo", needs_reference=False, check=_check_orpo)
def orpo(policy: PairLogps, reference: PairLogps | None, extras: dict[str, torch.Tensor], *,
         orpo_lambda: float = 0.1) -> LossOutput:
    """ORPO (Hong et al. 2024, arXiv 2403.07691, Eqs. 4, 6 and 7).

    L = L_SFT + lambda * L_OR,  L_OR = -log s(log odds(y_w) - log odds(y_l)),  odds(y) = p / (1 - p),
    with p = exp(per-token mean log-prob) and L_SFT the NLL per chosen token (over the micro-batch).
    `orpo_lambda` (lambda) weighs the odds-ratio term (TRL's ORPOConfig calls it `beta`; same default 0.1).
    Departure: TRL's NLL also covers the prompt tokens; the paper's L_SFT is on the response, and so is ours (the
    prompt is never scored here). Metrics: nll_loss, log_odds_ratio (mean log s(log odds ratio), TRL's name) and
    log_odds_chosen (mean log odds ratio).
    """
    chosen = per_token(policy.chosen, policy.chosen_lengths).clamp(max=MAX_MEAN_LOGP)              # [pairs]
    rejected = per_token(policy.rejected, policy.rejected_lengths).clamp(max=MAX_MEAN_LOGP)
    log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))      # Eq. 4, in log space
    ratio = F.logsigmoid(log_odds)                                                   # -L_OR, Eq. 7
    nll = batch_nll(policy)
    metrics = {"nll_loss": nll[0].detach(), "log_odds_ratio": ratio.detach().mean(),
               "log_odds_chosen": log_odds.detach().mean()}
    return LossOutput(nll - orpo_lambda * ratio, orpo_lambda * chosen.detach(), orpo_lambda * rejected.detach(),
                      metrics)


def _check_cpo(settings: Mapping[str, Any], extras: frozenset[str] | None) -> Iterator[str]:
    yield from reverse_kl_only(settings)
    yield from non_negative(settings, "cpo_alpha", 1.0)


@register("cpo", needs_reference=False, check=_check_cpo)
def cpo(policy: PairLogps, reference: PairLogps | None, extras: dict[str, torch.Tensor], *,
        beta: float = 0.1, label_smoothing: float = 0.0, cpo_alpha: float = 1.0) -> LossOutput:
    """CPO (Xu et al. 2024, arXiv 2401.08417, Eq. 3 for L_prefer and the full objective L_prefer + L_NLL).

    L = -(1-e) log s(beta D) - e log s(-beta D) + alpha * NLL,  D = log pi(y_w) - log pi(y_l) (summed log-probs):
    DPO with a uniform reference (dropped as beta -> 0) plus a behaviour-cloning NLL term on the chosen
    completion (per token, over the micro-batch, as TRL). `cpo_alpha` (alpha) weighs the NLL term (the paper
    uses 1); `label_smoothing` (e) as in cDPO. Metric: nll_loss.
    """
    nll = batch_nll(policy)
    losses = smoothed_logistic(beta * (policy.chosen - policy.rejected), label_smoothing) + cpo_alpha * nll
    return LossOutput(losses, beta * policy.chosen.detach(), beta * policy.rejected.detach(),
                      {"nll_loss": nll[0].detach()})


@register("sft", needs_reference=False)
def sft(policy: PairLogps, reference: PairLogps | None, extras: dict[str, torch.Tensor]) -> LossOutput:
    """Supervised fine-tuning: the NLL of the chosen completions, per token over the micro-batch (TRL's `sft`).

    Used by `dpo sft` (where chosen == rejected) and as RPO's regulariser (Pang et al. 2024, "Iterative Reasoning
    Preference Optimization", arXiv 2404.19733, L_DPO + alpha L_NLL): `--rpo-alpha A` adds this loss with weight
    A, which is what TRL 1.16 does with loss_type=["sigmoid", "sft"], loss_weights=[1, A]. (The paper normalises
    the NLL per sequence; TRL and we take the mean over every chosen token in the batch.) Rewards are the mean
    per-token log-probs of each side, logged only beside a preference loss (`has_rewards=False`). Metric: nll_loss.
    """
    nll = batch_nll(policy)
    chosen = per_token(policy.chosen, policy.chosen_lengths).detach()
    rejected = per_token(policy.rejected, policy.rejected_lengths).detach()
    return LossOutput(nll, chosen, rejected, {"nll_loss": nll[0].detach()}, has_rewards=False)
