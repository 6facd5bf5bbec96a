"""Paired losses with a reference, built on the score difference D = s(y_w) - s(y_l), s = f'(pi/pi_ref).

With the default `--f-divergence reverse_kl`, s is the log-ratio log pi(y)/pi_ref(y) and D is DPO's implicit
reward margin over beta. These are the losses that accept the other f-divergences (f-DPO), as in TRL 1.16.
Rewards are beta * log pi/pi_ref (detached), whatever the loss, as TRL logs them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from ..logprobs import PairLogps
from .registry import LossOutput, register
from .terms import f_scores, log_ratios, per_token, smoothed_logistic


def _scores(policy: PairLogps, reference: PairLogps | None, f_divergence: str, coef: float,
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(chosen log-ratios, rejected log-ratios, chosen scores, rejected scores), all `[pairs]`."""
    chosen, rejected = log_ratios(policy, reference)
    return chosen, rejected, f_scores(chosen, f_divergence, coef), f_scores(rejected, f_divergence, coef)


def _output(losses: torch.Tensor, beta: float, chosen: torch.Tensor, rejected: torch.Tensor) -> LossOutput:
    return LossOutput(losses, beta * chosen.detach(), beta * rejected.detach())


def pair_margin(extras: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The per-pair offset `[pairs]`: the data's `margin`, else score_chosen - score_rejected."""
    if "margin" in extras:
        return extras["margin"]
    return extras["score_chosen"] - extras["score_rejected"]


def _check_sigmoid(settings: Mapping[str, Any], extras: frozenset[str] | None) -> Iterator[str]:
    if settings.get("use_margin") and extras is not None and not (
            "margin" in extras or {"score_chosen", "score_rejected"} <= extras):
        yield ("--use-margin needs a `margin` field, or `score_chosen` and `score_rejected`, on every pair; "
               f"the data has {', '.join(sorted(extras)) or 'no extra fields'}")


@register("sigmoid", check=_check_sigmoid, pairwise=True)
def sigmoid(policy: PairLogps, reference: PairLogps | None, extras: dict[str, torch.Tensor], *,
            beta: float = 0.1, label_smoothing: float = 0.0, use_margin: bool = False,
            f_divergence: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5) -> LossOutput:
    """DPO (Rafailov et al. 2023, arXiv 2305.18290, Eq. 7), with conservative DPO and a per-pair offset.

    L = -(1 - e) log s(z) - e log s(-z),  z = beta * D - m.
    `beta`: how far the policy may move from the reference. `label_smoothing` (e): assumed rate of flipped labels,
    conservative DPO (cDPO, Mitchell 2023, "A note on DPO with noisy preferences"); e = 0 is plain DPO. TRL 1.16
    no longer applies label smoothing to `sigmoid`; we keep cDPO. `use_margin`: subtract the pair's offset m (the
    `margin` field, else score_chosen - score_rejected, in reward units) as DPO with an offset does (ODPO, Amini
    et al. 2024, arXiv 2402.10571; Llama 2's margin loss, arXiv 2307.09288, Eq. 2, for reward models); ODPO's
    alpha * log(score difference) scaling is left to the data. m = 0 without `use_margin`.
    """
    chosen, rejected, chosen_s, rejected_s = _scores(policy, reference, f_divergence, f_alpha_divergence_coef)
    logits = beta * (chosen_s - rejected_s)                                          # [pairs]
    if use_margin:
        logits = logits - pair_margin(extras)
    return _output(smoothed_logistic(logits, label_smoothing), beta, chosen, rejected)


def _check_robust(settings: Mapping[str, Any], extras: frozenset[str] | None) -> Iterator[str]:
    if not 0.0 <= settings.get("label_smoothing", 0.0) < 0.5:
        yield f"--label-smoothing (the label-flip rate) must be in [0, 0.5), got {settings['label_smoothing']}"


@register("robust", check=_check_robust, pairwise=True)
def robust(policy: PairLogps, reference: PairLogps | None, extras: dict[str, torch.Tensor], *,
           beta: float = 0.1, label_smoothing: float = 0.0,
           f_divergence: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5) -> LossOutput:
    """Robust DPO (rDPO, Chowdhury et al. 2024, arXiv 2403.00409: the de-biased loss for noisy labels).

    L = [(1 - e) l(z) - e l(-z)] / (1 - 2e),  l(z) = -log s(z),  z = beta * D.
    An unbiased estimate of the clean-label DPO loss when each label is flipped with probability
    `label_smoothing` (e, in [0, 0.5); the paper suggests 0.1). e = 0 is DPO. Unlike cDPO it can go negative.
    """
    chosen, rejected, chosen_s, rejected_s = _scores(policy, reference, f_divergence, f_alpha_divergence_coef)
    z = beta * (chosen_s - rejected_s)                                               # [pairs]
    e = label_smoothing
    losses = (-(1 - e) * F.logsigmoid(z) + e * F.logsigmoid(-z)) / (1 - 2 * e)
    return _output(losses, beta, chosen, rejected)


@register("ipo", pairwise=True)
def ipo(policy: PairLogps, reference: PairLogps | None, extras: dict[str, torch.Tensor], *,
        beta: float = 0.1, f_divergence: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5) -> LossOutput:
    """IPO (Azar et al. 2023, arXiv 2310.12036, Eq. 17): L = (D_tok - 1/(2 beta))^2.

    `beta` is the paper's regulariser tau. D_tok is D with each side's score divided by its completion length
    (per-token average): TRL does this and the IPO authors confirmed it is what the paper's results used, though
    the paper writes sequence-level log-ratios. The minimum is at D_tok = 1/(2 beta).
    """
    chosen, rejected, chosen_s, rejected_s = _scores(policy, reference, f_divergence, f_alpha_divergence_coef)
    delta = per_token(chosen_s, policy.chosen_lengths) - per_token(rejected_s, policy.rejected_lengths)
    return _output((delta - 1 / (2 * beta)) ** 2, beta, chosen, rejected)


@register("hinge", pairwise=True)
def hinge(policy: PairLogps, reference: PairLogps | None, extras: dict[str, torch.Tensor], *,
          beta: float = 0.1, f_divergence: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5) -> LossOutput:
    """SLiC's rank-calibration hinge loss (Zhao et al. 2023, arXiv 2305.10425) on reference-normalised
    likelihoods, as RSO writes it (Liu et al. 2023, arXiv 2309.06657): L = max(0, 1 - beta * D).

    `beta` is 1/margin: the loss is zero once D exceeds 1/beta. (SLiC itself uses the unnormalised likelihood
    and a margin delta; TRL and RSO use the log-ratio, which we follow.)
    """
    chosen, rejected, chosen_s, rejected_s = _scores(policy, reference, f_divergence, f_alpha_divergence_coef)
    return _output(torch.relu(1 - beta * (chosen_s - rejected_s)), beta, chosen, rejected)


def _check_exo(settings: Mapping[str, Any], extras: frozenset[str] | None) -> Iterator[str]:
    if not 0.0 < settings.get("label_smoothing", 0.0) < 1.0:
        yield (f"--label-smoothing must be in (0, 1) for exo_pair (the paper suggests 1e-3), "
               f"got {settings.get('label_smoothing', 0.0)}")


@register("exo_pair", check=_check_exo, pairwise=True)
def exo_pair(policy: PairLogps, reference: PairLogps | None, extras: dict[str, torch.Tensor], *,
             beta: float = 0.1, label_smoothing: float = 1e-3,
             f_divergence: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5) -> LossOutput:
    """EXO, pairwise (Ji et al. 2024, arXiv 2402.00856, Eq. 16, K = 2): L = KL(q || p).

    q = softmax over {y_w, y_l} of beta * log pi/pi_ref, i.e. (s(z), s(-z)) with z = beta * D; p = (1 - e, e) is
    the label distribution smoothed by `label_smoothing` (e, required > 0; the paper suggests 1e-3).
    L = s(z) [log s(z) - log(1 - e)] + s(-z) [log s(-z) - log e]: reverse KL, mode-seeking, unlike DPO's forward KL.
    """
    chosen, rejected, chosen_s, rejected_s = _scores(policy, reference, f_divergence, f_alpha_divergence_coef)
    z = beta * (chosen_s - rejected_s)                                               # [pairs]
    e = torch.tensor(label_smoothing, dtype=z.dtype, device=z.device)
    losses = (torch.sigmoid(z) * (F.logsigmoid(z) - torch.log1p(-e))
              + torch.sigmoid(-z) * (F.logsigmoid(-z) - torch.log(e)))
    return _output(losses, beta, chosen, rejected)


def _check_discopop(settings: Mapping[str, Any], extras: frozenset[str] | None) -> Iterator[str]:
    if settings.get("discopop_tau", 0.05) <= 0:
        yield f"--discopop-tau must be positive, got {settings['discopop_tau']}"


@register("discopop", check=_check_discopop, pairwise=True)
def discopop(policy: PairLogps, reference: PairLogps | None, extras: dict[str, torch.Tensor], *,
             beta: float = 0.1, discopop_tau: float = 0.05,
             f_divergence: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5) -> LossOutput:
    """DiscoPOP, the log-ratio modulated loss (Lu et al. 2024, arXiv 2406.08414, Eq. 5).

    L = (1 - m) * (-log s(z)) + m * exp(-z),  m = s(z / tau),  z = beta * D.
    A blend of the logistic (DPO) and exponential losses, switched by the sign of z at temperature `discopop_tau`
    (tau, 0.05 in the paper). m * exp(-z) is computed as exp(-z + log s(z/tau)), equal but finite at large |z|
    (TRL's exp(-z) overflows there and gives 0 * inf).
    """
    chosen, rejected, chosen_s, rejected_s = _scores(policy, reference, f_divergence, f_alpha_divergence_coef)
    z = beta * (chosen_s - rejected_s)                                               # [pairs]
    losses = -F.logsigmoid(z) * torch.sigmoid(-z / discopop_tau) + torch.exp(-z + F.logsigmoid(z / discopop_tau))
    return _output(losses, beta, chosen, rejected)


@register("sigmoid_norm", pairwise=True)
def sigmoid_norm(policy: PairLogps, reference: PairLogps | None, extras: dict[str, torch.Tensor], *,
                 beta: float = 0.1, f_divergence: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5,
                 ) -> LossOutput:
    """Length-normalised DPO (the DPO variant Tulu 3 trains with, Lambert et al. 2024, arXiv 2411.15124).

    L = -log s(beta * (s_w/|y_w| - s_l/|y_l|)): DPO on per-token average log-ratios, which removes DPO's pull
    toward long completions; `beta` is then per token (Tulu 3 uses a larger beta, e.g. 5).
    """
    chosen, rejected, chosen_s, rejected_s = _scores(policy, reference, f_divergence, f_alpha_divergence_coef)
    delta = per_token(chosen_s, policy.chosen_lengths) - per_token(rejected_s, policy.rejected_lengths)
    return _output(-F.logsigmoid(beta * delta), beta, chosen, rejected)
