"""Paired losses with a reference that treat each side's log-ratio on its own (anchored to zero, squared toward
a target, or sorted across the batch) rather than only through the chosen-minus-rejected difference, or that add
a term on one side's log-ratio to that difference (DPOP).

With u_w = log pi(y_w)/pi_ref(y_w) and u_l likewise; rewards are beta * u (detached), as TRL logs them.
The beta*log Z(x) term of the f-DPO reparameterisation does not cancel here, so, as TRL 1.16 does, these losses
refuse `--f-divergence` other than reverse_kl.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from ..logprobs import PairLogps
from .paired import pair_margin
from .registry import LossOutput, register
from .terms import log_ratios, reverse_kl_only, smoothed_logistic


def _check_sorted(settings: Mapping[str, Any], extras: frozenset[str] | None) -> Iterator[str]:
    yield from reverse_kl_only(settings)
    if settings.get("use_weighting"):
        yield "--use-weighting (WPO) cannot be combined with AOT: sorting the batch misaligns per-pair weights"


def _output(losses: torch.Tensor, beta: float, chosen: torch.Tensor, rejected: torch.Tensor) -> LossOutput:
    return LossOutput(losses, beta * chosen.detach(), beta * rejected.detach())


@register("nca_pair", check=reverse_kl_only, pairwise=True)
def nca_pair(policy: PairLogps, reference: PairLogps | None, extras: dict[str, torch.Tensor], *,
             beta: float = 0.1) -> LossOutput:
    """NCA, pairwise (Chen et al. 2024, "Noise Contrastive Alignment", arXiv 2402.05369, the NCA loss for K = 2).

    L = -log s(beta u_w) - 1/2 log s(-beta u_w) - 1/2 log s(-beta u_l).
    Optimises absolute likelihoods: it pushes u_w up against zero (not only above u_l), so the chosen
    completion's likelihood does not fall as it can under DPO.
    """
    chosen, rejected = log_ratios(policy, reference)
    zw, zl = beta * chosen, beta * rejected                                          # [pairs]
    losses = -F.logsigmoid(zw) - 0.5 * F.logsigmoid(-zw) - 0.5 * F.logsigmoid(-zl)
    return _output(losses, beta, chosen, rejected)


@register("bco_pair", check=reverse_kl_only, pairwise=True)
def bco_pair(policy: PairLogps, reference: PairLogps | None, extras: dict[str, torch.Tensor], *,
             beta: float = 0.1) -> LossOutput:
    """BCO on pairs (Jung et al. 2024, "Binary Classifier Optimization", arXiv 2404.04656), TRL's version.

    L = -log s(beta u_w) - log s(-beta u_l): a binary classifier with chosen as class 1, rejected as class 0.
    The paper shifts both rewards by delta, a running mean of the batch rewards (L = -log s(beta u_w - delta)
    - log s(-(beta u_l - delta))); TRL 1.16's `bco_pair` drops delta, and so do we, so results carry over.
    """
    chosen, rejected = log_ratios(policy, reference)
    losses = -F.logsigmoid(beta * chosen) - F.logsigmoid(-beta * rejected)
    return _output(losses, beta, chosen, rejected)


@register("sppo_hard", check=reverse_kl_only, pairwise=True)
def sppo_hard(policy: PairLogps, reference: PairLogps | None, extras: dict[str, torch.Tensor], *,
              beta: float = 0.1) -> LossOutput:
    """SPPO with hard probabilities (Wu et al. 2024, arXiv 2405.00675, Eq. 4.7 in Algorithm 1).

    L = (u_w - 1/(2 beta))^2 + (u_l + 1/(2 beta))^2.
    The paper regresses u toward eta (P(y wins) - 1/2) with P estimated by a preference model (PairRM); here
    P = 1 for the chosen and 0 for the rejected completion and eta = 1/beta, as TRL does.
    """
    chosen, rejected = log_ratios(policy, reference)
    losses = (chosen - 0.5 / beta) ** 2 + (rejected + 0.5 / beta) ** 2
    return _output(losses, beta, chosen, rejected)


@register("aot", check=_check_sorted)
def aot(policy: PairLogps, reference: PairLogps | None, extras: dict[str, torch.Tensor], *,
        beta: float = 0.1, label_smoothing: float = 0.0) -> LossOutput:
    """AOT, paired (Melnyk et al. 2024, "Distributional Preference Alignment via Optimal Transport",
    arXiv 2406.05882): first-order stochastic dominance of the policy's log-odds over the reference's.

    With v = log pi(y_w) - log pi(y_l) and v_ref likewise, sorted separately over the batch (the 1-D optimal
    transport plan between the two empirical distributions): L_i = -(1-e) log s(beta d_i) - e log s(-beta d_i),
    d = sort(v) - sort(v_ref). Depends on the whole batch: larger batches estimate the quantiles better.
    `label_smoothing` (e) as in cDPO. WPO weighting is refused (sorting breaks the pair alignment).
    """
    chosen, rejected = log_ratios(policy, reference)
    policy_margin = policy.chosen - policy.rejected                                  # [pairs]
    reference_margin = (reference.chosen - reference.rejected if reference is not None
                        else torch.zeros_like(policy_margin))
    policy_sorted, _ = torch.sort(policy_margin, dim=0)
    reference_sorted, _ = torch.sort(reference_margin, dim=0)
    losses = smoothed_logistic(beta * (policy_sorted - reference_sorted), label_smoothing)
    return _output(losses, beta, chosen, rejected)


@register("aot_unpaired", check=_check_sorted)
def aot_unpaired(policy: PairLogps, reference: PairLogps | None, extras: dict[str, torch.Tensor], *,
                 beta: float = 0.1, label_smoothing: float = 0.0) -> LossOutput:
    """AOT, unpaired (Melnyk et al. 2024, arXiv 2406.05882): the distribution of chosen log-ratios u_w should
    dominate that of rejected log-ratios u_l, without using which completions were paired.

    L_i = -(1-e) log s(beta d_i) - e log s(-beta d_i),  d = sort(u_w) - sort(u_l) over the batch.
    """
    chosen, rejected = log_ratios(policy, reference)
    chosen_sorted, _ = torch.sort(chosen, dim=0)                                      # [pairs]
    rejected_sorted, _ = torch.sort(rejected, dim=0)
    losses = smoothed_logistic(beta * (chosen_sorted - rejected_sorted), label_smoothing)
    return _output(losses, beta, chosen, rejected)


@register("apo_zero", check=reverse_kl_only, pairwise=True)
def apo_zero(policy: PairLogps, reference: PairLogps | None, extras: dict[str, torch.Tensor], *,
             beta: float = 0.1) -> LossOutput:
    """APO-zero (D'Oosterlinck et al. 2024, "Anchored Preference Optimization", arXiv 2408.06266, Eq. 7).

    L = (1 - s(beta u_w)) + s(beta u_l): raise the chosen and lower the rejected likelihood, each anchored at the
    reference. For chosen completions better than what the model already writes.
    """
    chosen, rejected = log_ratios(policy, reference)
    losses = (1 - torch.sigmoid(beta * chosen)) + torch.sigmoid(beta * rejected)
    return _output(losses, beta, chosen, rejected)


@register("apo_down", check=reverse_kl_only, pairwise=True)
def apo_down(policy: PairLogps, reference: PairLogps | None, extras: dict[str, torch.Tensor], *,
             beta: float = 0.1) -> LossOutput:
    """APO-down (D'Oosterlinck et al. 2024, arXiv 2408.06266, Eq. 8).

    L = s(beta u_w) + (1 - s(beta (u_w - u_l))): lower both likelihoods, the rejected one more. For chosen
    completions worse than what the model already writes.
    """
    chosen, rejected = log_ratios(policy, reference)
    losses = torch.sigmoid(beta * chosen) + (1 - torch.sigmoid(beta * (chosen - rejected)))
    return _output(losses, beta, chosen, rejected)


def _check_dpop(settings: Mapping[str, Any], extras: frozenset[str] | None) -> Iterator[str]:
    yield from reverse_kl_only(settings)
    if not 0 <= settings.get("dpop_lambda", 50.0) < math.inf:
        yield f"--dpop-lambda must be a non-negative number (the paper uses 50), got {settings['dpop_lambda']}"


@register("dpop", check=_check_dpop, pairwise=True)
def dpop(policy: PairLogps, reference: PairLogps | None, extras: dict[str, torch.Tensor], *,
         beta: float = 0.1, dpop_lambda: float = 50.0) -> LossOutput:
    """DPO-Positive (Pal et al. 2024, "Smaug", arXiv 2402.13228, the DPOP loss).

    L = -log s(beta * (u_w - u_l - lambda * max(0, log pi_ref(y_w)/pi(y_w)))),  max(0, .) = max(0, -u_w).
    DPO can widen the margin u_w - u_l while the chosen completion's likelihood falls (likelihood displacement);
    the penalty, inside the sigmoid as the paper writes it, is zero while pi(y_w) >= pi_ref(y_w) and otherwise
    pulls the chosen log-ratio back up with weight `dpop_lambda` (lambda, 50 in the paper). lambda = 0 is DPO.
    Metric: dpop_penalty (mean max(0, -u_w): how far, in nats, chosen completions fell below the reference).
    """
    chosen, rejected = log_ratios(policy, reference)
    penalty = torch.relu(-chosen)                                                    # [pairs]
    losses = -F.logsigmoid(beta * (chosen - rejected - dpop_lambda * penalty))
    return LossOutput(losses, beta * chosen.detach(), beta * rejected.detach(),
                      {"dpop_penalty": penalty.detach().mean()})


def _check_astar_po(settings: Mapping[str, Any], extras: frozenset[str] | None) -> Iterator[str]:
    yield from reverse_kl_only(settings)
    if not 0 < settings.get("astar_po_beta1", 0.5) < math.inf:
        yield f"--astar-po-beta1 must be a positive number (the authors use 0.5), got {settings['astar_po_beta1']}"


def _reward_gap(extras: Mapping[str, torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """r(y_w) - r(y_l) per pair `[pairs]`: the data's margin or score difference (`pair_margin`), and 1 where a
    pair has neither (rewards 1 for the chosen and 0 for the rejected completion, a binary correctness reward)."""
    if "margin" not in extras and not {"score_chosen", "score_rejected"} <= extras.keys():
        return torch.ones_like(like)
    gap = pair_margin(extras).to(like)
    return torch.where(torch.isnan(gap), torch.ones_like(gap), gap)


@register("astar_po", check=_check_astar_po, pairwise=True)
def astar_po(policy: PairLogps, reference: PairLogps | None, extras: dict[str, torch.Tensor], *,
             beta: float = 0.1, astar_po_beta1: float = 0.5) -> LossOutput:
    """Least-squares optimal-advantage regression in the form of A*-PO (Brantley et al. 2025, "Accelerating RL
    for LLM Reasoning with Optimal Advantage Regression", arXiv 2505.20686), on the two completions of each pair.

    A*-PO's stage 1 estimates the optimal value V*(x) = beta1 log E_{y~pi_ref} exp(r(x, y)/beta1) from rewards of
    reference samples; its stage 2 regresses (beta log pi(y|x)/pi_ref(y|x) - (r(x, y) - V(x)))^2. Here both
    stages use the pair: V(x) = beta1 log((exp(r_w/beta1) + exp(r_l/beta1)) / 2), and
        L = 1/2 [(beta u_w - (r_w - V(x)))^2 + (beta u_l - (r_l - V(x)))^2]
    (the mean over the two completions, the scale of the paper's per-sample loss). The targets depend on the
    reward gap d = r_w - r_l only: r_w - V = beta1 (log 2 - softplus(-d/beta1)), r_l - V = beta1 (log 2 -
    softplus(d/beta1)), computed so; they differ by d, so at the minimum beta (u_w - u_l) = d. d is the data's
    `margin`, else score_chosen - score_rejected (as `--use-margin` reads them), else 1 (rewards 1 and 0, the
    paper's binary correctness reward).
    Departures from the paper: its y is sampled on-policy and V from N reference samples; here both are the
    data's completions, so this is an offline, pairwise use of the A*-PO objective. `beta` is the paper's
    beta2, `astar_po_beta1` its beta1 (0.5 in the authors' configuration).
    """
    chosen, rejected = log_ratios(policy, reference)
    gap = _reward_gap(extras, chosen) / astar_po_beta1                                # [pairs]
    chosen_target = astar_po_beta1 * (math.log(2) - F.softplus(-gap))               # r_w - V(x)
    rejected_target = astar_po_beta1 * (math.log(2) - F.softplus(gap))              # r_l - V(x)
    losses = 0.5 * ((beta * chosen - chosen_target) ** 2 + (beta * rejected - rejected_target) ** 2)
    return _output(losses, beta, chosen, rejected)
