"""Pieces that several losses share: log-ratios, f-divergence scores, the smoothed logistic loss, the batch NLL,
and the parameter checks that go with them. Pure functions of `[pairs]` tensors."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from ..logprobs import PairLogps

# exp() of a float32 overflows past ~88; TRL 1.16 clamps the alpha-divergence exponent at 80, and so do we (for the
# forward KL too, which TRL leaves unclamped), so that extreme log-ratios give a large finite score, not inf.
EXP_CLAMP = 80.0
DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


def log_ratios(policy: PairLogps, reference: PairLogps | None) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(y)/pi_ref(y) for chosen and rejected, `[pairs]` each (plain policy log-probs when reference-free)."""
    if reference is None:
        return policy.chosen, policy.rejected
    return policy.chosen - reference.chosen, policy.rejected - reference.rejected


def f_scores(logratio: torch.Tensor, f_divergence: str, f_alpha_divergence_coef: float) -> torch.Tensor:
    """f'(pi/pi_ref) for f-DPO (Wang et al. 2023, arXiv 2309.16240, Thm. 1 and Table 1), from u = log pi/pi_ref.

    The DPO reward beta*log(pi/pi_ref) becomes beta*f'(pi/pi_ref); only differences of two scores enter a loss,
    which is where the beta*log Z(x) term cancels (so only losses built on that difference accept it):
    reverse KL f'(t) = log t + 1 (the constant cancels: plain DPO); forward KL f'(t) = 1 - 1/t;
    JS f'(t) = log(2t/(1+t)) = log 2 + log sigmoid(u); alpha-divergence f'(t) = (t^(a-1) - 1)/(a-1) (TRL 1.16's
    parameterisation; a -> 1 is the reverse KL, which TRL and we use within 1e-6 of 1).
    """
    if f_divergence == "reverse_kl":
        return logratio
    if f_divergence == "forward_kl":
        return 1 - _clamped_exp(-logratio)
    if f_divergence == "js_divergence":
        return math.log(2) + F.logsigmoid(logratio)
    if f_divergence == "alpha_divergence":
        a = f_alpha_divergence_coef
        if abs(a - 1.0) < 1e-6:
            return logratio
        return (_clamped_exp((a - 1.0) * logratio) - 1.0) / (a - 1.0)
    raise ValueError(f"unknown f-divergence {f_divergence!r}; choose from {', '.join(DIVERGENCES)}")


def _clamped_exp(x: torch.Tensor) -> torch.Tensor:
    """exp(min(x, EXP_CLAMP)), computed in at least float32."""
    wide = x.to(torch.promote_types(x.dtype, torch.float32))
    return torch.exp(wide.clamp(max=EXP_CLAMP)).to(x.dtype)


def smoothed_logistic(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """-(1 - e) log s(z) - e log s(-z): the logistic loss with an assumed label-flip rate e (cDPO); e = 0 is DPO."""
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def per_token(values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Sums over a completion's tokens -> means per token (lengths clamped to 1, as TRL)."""
    return values / lengths.clamp(min=1)


def batch_nll(policy: PairLogps) -> torch.Tensor:
    """NLL per chosen token over the whole micro-batch, repeated for each pair `[pairs]`.

    This is TRL's cross-entropy term (mean over every chosen completion token in the batch, so long completions
    weigh more than in a mean of per-sequence means); repeating it per pair keeps the loop's mean over pairs exact.
    """
    nll = -policy.chosen.sum() / policy.chosen_lengths.sum().clamp(min=1)
    return nll.expand_as(policy.chosen)


def reverse_kl_only(settings: Mapping[str, Any], extras: frozenset[str] | None = None) -> Iterator[str]:
    """TRL 1.16 rejects f-divergences for losses not built on the chosen-minus-rejected score difference.

    Has the signature of a loss `check`, so a loss with no other requirement registers it as its check."""
    if settings.get("f_divergence", "reverse_kl") != "reverse_kl":
        yield (f"--f-divergence {settings['f_divergence']} needs a loss built on the chosen-rejected difference "
               "(sigmoid, sigmoid_norm, hinge, ipo, exo_pair, robust, discopop); use reverse_kl")


def non_negative(settings: Mapping[str, Any], name: str, default: float) -> Iterator[str]:
    """The problem with a loss weight setting that must not be negative, if any."""
    if settings.get(name, default) < 0:
        yield f"--{name.replace('_', '-')} must not be negative, got {settings[name]}"
