"""Losses against formulas written out independently here (scalar `math`, one pair at a time), known identities,
gradient directions, finiteness at extreme log-probs, and the parameter checks."""

from __future__ import annotations

import math

import pytest
import torch

from dpokit import losses
from dpokit.config import Config
from dpokit.logprobs import PairLogps
from dpokit.losses.triple import GOLD_LENGTHS, GOLD_LOGPS

BETA = 0.1
# Three pairs: summed completion log-probs and lengths for the policy and the reference.
POLICY = dict(chosen=[-10.0, -20.0, -5.0], rejected=[-12.0, -15.0, -9.0], chosen_lengths=[5.0, 10.0, 2.0],
              rejected_lengths=[6.0, 5.0, 3.0])
REFERENCE = dict(chosen=[-11.0, -18.0, -6.0], rejected=[-11.0, -16.0, -8.0])


def logps(chosen, rejected, chosen_lengths=(1.0, 1.0, 1.0), rejected_lengths=(1.0, 1.0, 1.0), grad=False):
    t = lambda v: torch.tensor(v, dtype=torch.float64, requires_grad=grad)  # noqa: E731
    return PairLogps(t(chosen), t(rejected), t(chosen_lengths).detach(), t(rejected_lengths).detach())


def extras_for(name, pairs):
    """The extras a loss reads beyond the data's: TPO's gold responses (log-prob -3 over 2 tokens, every pair)."""
    if name not in ("tpo", "tpo-l"):
        return {}
    return {GOLD_LOGPS: torch.full((pairs,), -3.0, dtype=torch.float64),
            GOLD_LENGTHS: torch.full((pairs,), 2.0, dtype=torch.float64)}


def policy_ref():
    return logps(**POLICY), logps(REFERENCE["chosen"], REFERENCE["rejected"],
                                  POLICY["chosen_lengths"], POLICY["rejected_lengths"])


# ---- independent scalar formulas ---------------------------------------------------------------------------------

def ls(x):  # log sigmoid
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


def sig(x):
    return 1 / (1 + math.exp(-x))


def pairs():
    """Per pair: (u_w, u_l, policy chosen, policy rejected, chosen length, rejected length)."""
    for i in range(3):
        pc, pr = POLICY["chosen"][i], POLICY["rejected"][i]
        yield (pc - REFERENCE["chosen"][i], pr - REFERENCE["rejected"][i], pc, pr,
               POLICY["chosen_lengths"][i], POLICY["rejected_lengths"][i])


def batch_nll():
    return -sum(POLICY["chosen"]) / sum(POLICY["chosen_lengths"])


def alpha_reward(mean_logp, beta, alpha):
    """AlphaPO's reward -(beta/alpha) (pi^(-alpha/|y|) - 1), with pi^(1/|y|) = exp(mean log-prob)."""
    return -(beta / alpha) * (math.exp(mean_logp) ** (-alpha) - 1)


def astar_po_loss(scaled_uw, scaled_ul, rw, rl, beta1):
    """A*-PO's squared error, V(x) = beta1 log mean exp(r/beta1) over the pair's two rewards, averaged over both."""
    v = beta1 * math.log((math.exp(rw / beta1) + math.exp(rl / beta1)) / 2)
    return 0.5 * ((scaled_uw - (rw - v)) ** 2 + (scaled_ul - (rl - v)) ** 2)


def expected(name, p):
    """Per-pair expected losses for loss `name` with params `p`, written from the papers / TRL 1.16's formulas."""
    b, e = p.get("beta", BETA), p.get("label_smoothing", 0.0)
    out = []
    rows = list(pairs())
    for uw, ul, pc, pr, lc, lr in rows:
        d = uw - ul
        if name == "sigmoid":
            z = b * d - p.get("margin", 0.0)
            out.append(-(1 - e) * ls(z) - e * ls(-z))
        elif name == "robust":
            out.append(((1 - e) * -ls(b * d) - e * -ls(-b * d)) / (1 - 2 * e))
        elif name == "ipo":
            out.append((uw / lc - ul / lr - 1 / (2 * b)) ** 2)
        elif name == "hinge":
            out.append(max(0.0, 1 - b * d))
        elif name == "exo_pair":
            q = sig(b * d)
            out.append(q * math.log(q / (1 - e)) + (1 - q) * math.log((1 - q) / e))
        elif name == "nca_pair":
            out.append(-ls(b * uw) - 0.5 * ls(-b * uw) - 0.5 * ls(-b * ul))
        elif name == "bco_pair":
            out.append(-ls(b * uw) - ls(-b * ul))
        elif name == "sppo_hard":
            out.append((uw - 1 / (2 * b)) ** 2 + (ul + 1 / (2 * b)) ** 2)
        elif name == "apo_zero":
            out.append(1 - sig(b * uw) + sig(b * ul))
        elif name == "apo_down":
            out.append(sig(b * uw) + 1 - sig(b * d))
        elif name == "discopop":
            z, tau = b * d, p["discopop_tau"]
            m = sig(z / tau)
            out.append(-ls(z) * (1 - m) + math.exp(-z) * m)
        elif name == "sigmoid_norm":
            out.append(-ls(b * (uw / lc - ul / lr)))
        elif name == "dpop":
            out.append(-ls(b * (uw - ul - p["dpop_lambda"] * max(0.0, -uw))))
        elif name == "astar_po":  # no scores in extras: rewards 1 (chosen) and 0 (rejected)
            out.append(astar_po_loss(b * uw, b * ul, 1.0, 0.0, p["astar_po_beta1"]))
        elif name == "simpo":
            z = b * (pc / lc - pr / lr) - p["simpo_gamma"]
            out.append(-(1 - e) * ls(z) - e * ls(-z))
        elif name == "alphapo":
            z = alpha_reward(pc / lc, b, p["alphapo_alpha"]) - alpha_reward(pr / lr, b, p["alphapo_alpha"]) \
                - p["simpo_gamma"]
            out.append(-(1 - e) * ls(z) - e * ls(-z))
        elif name == "cpo":
            z = b * (pc - pr)
            out.append(-(1 - e) * ls(z) - e * ls(-z) + p["cpo_alpha"] * batch_nll())
        elif name == "orpo":
            mc, mr = pc / lc, pr / lr
            odds = lambda m: m - math.log(1 - math.exp(m))  # noqa: E731  log(p / (1 - p))
            out.append(batch_nll() - p["orpo_lambda"] * ls(odds(mc) - odds(mr)))
        elif name == "sft":
            out.append(batch_nll())
    if name in ("aot", "aot_unpaired"):
        if name == "aot":
            v = sorted(r[2] - r[3] for r in rows)
            vref = sorted((r[2] - r[0]) - (r[3] - r[1]) for r in rows)
        else:
            v, vref = sorted(r[0] for r in rows), sorted(r[1] for r in rows)
        out = [-(1 - e) * ls(b * (a - c)) - e * ls(-b * (a - c)) for a, c in zip(v, vref)]
    return out


CASES = [
    ("sigmoid", {"beta": BETA}), ("sigmoid", {"beta": 0.5, "label_smoothing": 0.2}),
    ("robust", {"beta": BETA, "label_smoothing": 0.1}), ("ipo", {"beta": BETA}), ("hinge", {"beta": 0.3}),
    ("exo_pair", {"beta": BETA, "label_smoothing": 1e-3}), ("nca_pair", {"beta": BETA}),
    ("bco_pair", {"beta": BETA}), ("sppo_hard", {"beta": BETA}), ("aot", {"beta": BETA, "label_smoothing": 0.1}),
    ("aot_unpaired", {"beta": BETA}), ("apo_zero", {"beta": BETA}), ("apo_down", {"beta": BETA}),
    ("discopop", {"beta": BETA, "discopop_tau": 0.05}), ("discopop", {"beta": 2.0, "discopop_tau": 0.5}),
    ("sigmoid_norm", {"beta": 2.0}), ("simpo", {"beta": 2.0, "simpo_gamma": 0.5, "label_smoothing": 0.1}),
    ("cpo", {"beta": BETA, "cpo_alpha": 1.0, "label_smoothing": 0.0}), ("orpo", {"orpo_lambda": 0.1}), ("sft", {}),
    ("dpop", {"beta": BETA, "dpop_lambda": 50.0}), ("dpop", {"beta": 0.5, "dpop_lambda": 5.0}),
    ("alphapo", {"beta": 2.5, "simpo_gamma": 0.1, "alphapo_alpha": 0.25, "label_smoothing": 0.1}),
    ("alphapo", {"beta": 2.0, "simpo_gamma": 0.5, "alphapo_alpha": -0.5}),
    ("astar_po", {"beta": BETA, "astar_po_beta1": 0.5}), ("astar_po", {"beta": 0.5, "astar_po_beta1": 2.0}),
]


@pytest.mark.parametrize("name,params", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_loss_values_match_independent_formulas(name, params):
    policy, reference = policy_ref()
    spec = losses.get(name)
    out = spec.function(policy, reference if spec.needs_reference else None, {}, **params)
    assert out.losses.shape == (3,)
    assert out.losses.tolist() == pytest.approx(expected(name, params), rel=1e-9, abs=1e-12)
    if spec.needs_reference:  # TRL's rewards: beta * log pi/pi_ref, whatever the loss
        assert out.chosen_rewards.tolist() == pytest.approx([params["beta"] * r[0] for r in pairs()])
        assert out.rejected_rewards.tolist() == pytest.approx([params["beta"] * r[1] for r in pairs()])


def test_margin_offset_uses_margin_field_else_score_difference():
    policy, reference = policy_ref()
    margin = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    out = losses.get("sigmoid").function(policy, reference, {"margin": margin}, beta=BETA, use_margin=True)
    want = [-ls(BETA * (r[0] - r[1]) - m) for r, m in zip(pairs(), margin.tolist())]
    assert out.losses.tolist() == pytest.approx(want)
    scores = {"score_chosen": margin + 3.0, "score_rejected": torch.full_like(margin, 3.0)}
    assert losses.get("sigmoid").function(policy, reference, scores, beta=BETA, use_margin=True).losses.tolist() \
        == pytest.approx(want)
    ignored = losses.get("sigmoid").function(policy, reference, {"margin": margin}, beta=BETA)
    assert ignored.losses.tolist() == pytest.approx(expected("sigmoid", {"beta": BETA}))


@pytest.mark.parametrize("divergence,coef", [("forward_kl", 0.5), ("js_divergence", 0.5), ("alpha_divergence", 0.5),
                                             ("alpha_divergence", 2.0)])
def test_f_divergence_scores(divergence, coef):
    """f'(t) from Wang et al. 2023 Table 1 (alpha-divergence in TRL's parameterisation), t = pi/pi_ref."""
    f = {"forward_kl": lambda t: 1 - 1 / t, "js_divergence": lambda t: math.log(2 * t / (1 + t)),
         "alpha_divergence": lambda t: (t ** (coef - 1) - 1) / (coef - 1)}[divergence]
    policy, reference = policy_ref()
    out = losses.get("sigmoid").function(policy, reference, {}, beta=BETA, f_divergence=divergence,
                                         f_alpha_divergence_coef=coef)
    want = [-ls(BETA * (f(math.exp(uw)) - f(math.exp(ul)))) for uw, ul, *_ in pairs()]
    assert out.losses.tolist() == pytest.approx(want, rel=1e-9)


def test_kto_against_formula():
    # Four examples: completion y (chosen) and a mismatched completion y' (rejected) each; labels 1, 0, 1, 0.
    policy = logps([-5.0, -7.0, -3.0, -9.0], [-6.0, -4.0, -8.0, -5.0], (1.0,) * 4, (1.0,) * 4)
    reference = logps([-6.0, -6.5, -3.5, -8.0], [-7.0, -5.0, -8.0, -6.5], (1.0,) * 4, (1.0,) * 4)
    label = torch.tensor([1.0, 0.0, 1.0, 0.0])
    out = losses.get("kto").function(policy, reference, {"label": label}, beta=0.5, kto_desirable_weight=1.5,
                                     kto_undesirable_weight=0.7)
    z0 = max(0.0, sum([1.0, 1.0, 0.0, 1.5]) / 4)
    r = [1.0, -0.5, 0.5, -1.0]
    want = [1.5 * (1 - sig(0.5 * (r[0] - z0))), 0.7 * (1 - sig(0.5 * (z0 - r[1]))),
            1.5 * (1 - sig(0.5 * (r[2] - z0))), 0.7 * (1 - sig(0.5 * (z0 - r[3])))]
    assert out.losses.tolist() == pytest.approx(want)
    assert float(out.metrics["kl"]) == pytest.approx(z0)
    # the reward sits on the side of the reference point its label asks for
    assert out.chosen_rewards.tolist() == pytest.approx([0.5, 0.5 * z0, 0.25, 0.5 * z0])
    assert out.rejected_rewards.tolist() == pytest.approx([0.5 * z0, -0.25, 0.5 * z0, -0.5])
    # z0 is clamped at 0 when the mismatched completions are less likely under the policy
    low = losses.get("kto").function(policy, logps([-6.0] * 4, [0.0] * 4), {"label": label}, beta=0.5)
    assert float(low.metrics["kl"]) == 0.0


def test_orpo_and_cpo_metrics():
    policy, _ = policy_ref()
    out = losses.get("orpo").function(policy, None, {}, orpo_lambda=0.1)
    assert float(out.metrics["nll_loss"]) == pytest.approx(batch_nll())
    odds = lambda m: m - math.log(1 - math.exp(m))  # noqa: E731
    log_odds = [odds(pc / lc) - odds(pr / lr) for _, _, pc, pr, lc, lr in pairs()]
    assert float(out.metrics["log_odds_chosen"]) == pytest.approx(sum(log_odds) / 3)
    assert float(out.metrics["log_odds_ratio"]) == pytest.approx(sum(ls(x) for x in log_odds) / 3)
    assert float(losses.get("cpo").function(policy, None, {}).metrics["nll_loss"]) == pytest.approx(batch_nll())


# ---- identities ----------------------------------------------------------------------------------------------------

def test_robust_and_cdpo_with_zero_smoothing_equal_dpo():
    policy, reference = policy_ref()
    dpo = losses.get("sigmoid").function(policy, reference, {}, beta=BETA).losses
    for name in ("robust", "sigmoid"):
        out = losses.get(name).function(policy, reference, {}, beta=BETA, label_smoothing=0.0).losses
        torch.testing.assert_close(out, dpo)
    assert dpo.tolist() == pytest.approx([-ls(BETA * (uw - ul)) for uw, ul, *_ in pairs()])


def test_robust_is_unbiased_under_label_flips():
    """rDPO's point: averaging its loss over flips with probability e recovers the clean DPO loss."""
    policy, reference = policy_ref()
    flipped = PairLogps(policy.rejected, policy.chosen, policy.rejected_lengths, policy.chosen_lengths)
    flipped_ref = PairLogps(reference.rejected, reference.chosen, reference.rejected_lengths,
                            reference.chosen_lengths)
    e = 0.2
    robust = losses.get("robust").function
    mean = (1 - e) * robust(policy, reference, {}, beta=BETA, label_smoothing=e).losses \
        + e * robust(flipped, flipped_ref, {}, beta=BETA, label_smoothing=e).losses
    torch.testing.assert_close(mean, losses.get("sigmoid").function(policy, reference, {}, beta=BETA).losses)


def test_ipo_minimum_at_margin_one_over_two_beta():
    beta = 0.25
    target = 1 / (2 * beta)  # per-token log-ratio margin at the minimum
    reference = logps([-10.0], [-10.0], [4.0], [2.0])
    for shift in (-0.3, 0.0, 0.3):
        # chosen log-ratio 4 * (target + shift) over 4 tokens, rejected 0: per-token margin = target + shift
        policy = logps([-10.0 + 4 * (target + shift)], [-10.0], [4.0], [2.0], grad=True)
        loss = losses.get("ipo").function(policy, reference, {}, beta=beta).losses.sum()
        loss.backward()
        assert loss.item() == pytest.approx(shift ** 2, abs=1e-12)
        assert math.copysign(1, float(policy.chosen.grad[0])) == math.copysign(1, shift) or shift == 0
        if shift == 0:
            assert float(policy.chosen.grad[0]) == pytest.approx(0.0, abs=1e-12)


def test_simpo_without_length_normalisation_and_gamma_zero_is_reference_free_dpo():
    policy = logps(POLICY["chosen"], POLICY["rejected"])  # lengths 1: no normalisation
    simpo = losses.get("simpo").function(policy, None, {}, beta=BETA, simpo_gamma=0.0).losses
    dpo = losses.get("sigmoid").function(policy, None, {}, beta=BETA).losses
    torch.testing.assert_close(simpo, dpo)


def test_alphapo_with_alpha_zero_is_simpo_exactly_and_continuous_in_alpha():
    policy, _ = policy_ref()
    params = dict(beta=2.0, simpo_gamma=0.3, label_smoothing=0.1)
    simpo = losses.get("simpo").function(policy, None, {}, **params)
    alpha_zero = losses.get("alphapo").function(policy, None, {}, alphapo_alpha=0.0, **params)
    for got, want in [(alpha_zero.losses, simpo.losses), (alpha_zero.chosen_rewards, simpo.chosen_rewards),
                      (alpha_zero.rejected_rewards, simpo.rejected_rewards)]:
        assert torch.equal(got, want)
    for alpha in (1e-7, -1e-7):   # (1 - p^-a)/a -> log p as a -> 0, from both sides
        near = losses.get("alphapo").function(policy, None, {}, alphapo_alpha=alpha, **params)
        torch.testing.assert_close(near.losses, simpo.losses, rtol=1e-5, atol=0)


def test_alphapo_rewards_are_the_shaped_rewards():
    policy, _ = policy_ref()
    out = losses.get("alphapo").function(policy, None, {}, beta=2.5, alphapo_alpha=0.25)
    assert out.chosen_rewards.tolist() == pytest.approx([alpha_reward(pc / lc, 2.5, 0.25)
                                                         for _, _, pc, _, lc, _ in pairs()], rel=1e-12)
    assert out.rejected_rewards.tolist() == pytest.approx([alpha_reward(pr / lr, 2.5, 0.25)
                                                           for _, _, _, pr, _, lr in pairs()], rel=1e-12)


def test_dpop_is_dpo_while_chosen_stays_above_the_reference_and_pulls_it_up_below():
    policy, reference = policy_ref()   # pair 1's chosen log-ratio is -2 (below the reference); pairs 0, 2: +1
    dpo = losses.get("sigmoid").function(policy, reference, {}, beta=BETA).losses
    out = losses.get("dpop").function(policy, reference, {}, beta=BETA, dpop_lambda=50.0)
    torch.testing.assert_close(out.losses[[0, 2]], dpo[[0, 2]])
    assert out.losses[1] > dpo[1]
    assert float(out.metrics["dpop_penalty"]) == pytest.approx(2.0 / 3)
    torch.testing.assert_close(losses.get("dpop").function(policy, reference, {}, beta=BETA, dpop_lambda=0.0).losses,
                               dpo)
    # The remedy: below the reference, the chosen log-prob is pushed up harder than DPO pushes it.
    grads = []
    for name, params in (("sigmoid", {}), ("dpop", {"dpop_lambda": 50.0})):
        p = logps(POLICY["chosen"], POLICY["rejected"], POLICY["chosen_lengths"], POLICY["rejected_lengths"], grad=True)
        losses.get(name).function(p, reference, {}, beta=BETA, **params).losses.sum().backward()
        grads.append(p.chosen.grad)
    assert grads[1][1] < grads[0][1] < 0


def test_astar_po_regresses_onto_the_pairs_scores_else_binary_rewards():
    policy, reference = policy_ref()
    beta, beta1 = 0.2, 0.5
    nan = float("nan")
    scores = {"score_chosen": torch.tensor([103.0, nan, 2.0]), "score_rejected": torch.tensor([101.5, 0.0, 2.5])}
    out = losses.get("astar_po").function(policy, reference, scores, beta=beta, astar_po_beta1=beta1)
    rewards = [(103.0, 101.5), (1.0, 0.0), (2.0, 2.5)]   # pair 1 lacks a score: binary rewards
    want = [astar_po_loss(beta * uw, beta * ul, rw, rl, beta1) for (uw, ul, *_), (rw, rl) in zip(pairs(), rewards)]
    assert out.losses.tolist() == pytest.approx(want, rel=1e-6)
    margin = {"margin": torch.tensor([1.5, -0.5, 4.0])}   # a margin is read as r_w - r_l
    out = losses.get("astar_po").function(policy, reference, margin, beta=beta, astar_po_beta1=beta1)
    want = [astar_po_loss(beta * uw, beta * ul, m, 0.0, beta1) for (uw, ul, *_), m in zip(pairs(), [1.5, -0.5, 4.0])]
    assert out.losses.tolist() == pytest.approx(want, rel=1e-6)


def test_astar_po_minimum_is_at_the_optimal_advantages():
    """Zero loss and gradient where beta u = r - V(x) on both sides (so beta (u_w - u_l) = r_w - r_l there)."""
    beta, beta1, rw, rl = 0.1, 0.5, 2.0, -1.0
    v = beta1 * math.log((math.exp(rw / beta1) + math.exp(rl / beta1)) / 2)
    reference = logps([-30.0], [-40.0])
    policy = logps([-30.0 + (rw - v) / beta], [-40.0 + (rl - v) / beta], grad=True)
    extras = {"score_chosen": torch.tensor([rw]), "score_rejected": torch.tensor([rl])}
    loss = losses.get("astar_po").function(policy, reference, extras, beta=beta, astar_po_beta1=beta1).losses.sum()
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-20)
    assert float(policy.chosen.grad[0]) == pytest.approx(0.0, abs=1e-9)
    assert float(policy.rejected.grad[0]) == pytest.approx(0.0, abs=1e-9)


def test_reverse_kl_and_alpha_one_are_plain_dpo():
    policy, reference = policy_ref()
    dpo = losses.get("sigmoid").function(policy, reference, {}, beta=BETA).losses
    alpha_one = losses.get("sigmoid").function(policy, reference, {}, beta=BETA, f_divergence="alpha_divergence",
                                               f_alpha_divergence_coef=1.0).losses
    torch.testing.assert_close(alpha_one, dpo)


def test_aot_is_invariant_to_batch_order_and_single_pair_is_cdpo():
    policy, reference = policy_ref()
    order = [2, 0, 1]
    shuffle = lambda p: PairLogps(p.chosen[order], p.rejected[order], p.chosen_lengths[order],  # noqa: E731
                                  p.rejected_lengths[order])
    for name in ("aot", "aot_unpaired"):
        fn = losses.get(name).function
        torch.testing.assert_close(fn(shuffle(policy), shuffle(reference), {}, beta=BETA).losses,
                                   fn(policy, reference, {}, beta=BETA).losses)
    one = lambda p: PairLogps(p.chosen[:1], p.rejected[:1], p.chosen_lengths[:1], p.rejected_lengths[:1])  # noqa
    torch.testing.assert_close(losses.get("aot").function(one(policy), one(reference), {}, beta=BETA,
                                                          label_smoothing=0.1).losses,
                               losses.get("sigmoid").function(one(policy), one(reference), {}, beta=BETA,
                                                              label_smoothing=0.1).losses)


# ---- gradients and extremes ---------------------------------------------------------------------------------------

PAIRED = [n for n in losses.names() if losses.get(n).paired and n not in ("sft",)]
PARAMS = {"exo_pair": {"label_smoothing": 1e-3}, "robust": {"label_smoothing": 0.1}}


@pytest.mark.parametrize("name", PAIRED)
def test_gradient_raises_chosen_and_lowers_rejected(name):
    # The policy starts slightly on the wrong side: chosen log-ratio -2, rejected +2 (DiscoPOP is non-convex
    # near a zero margin, where its gradient may point the other way).
    reference = logps([-20.0] * 3, [-20.0] * 3, (4.0,) * 3, (4.0,) * 3)
    policy = logps([-22.0] * 3, [-18.0] * 3, (4.0,) * 3, (4.0,) * 3, grad=True)
    spec = losses.get(name)
    params = {k: v for k, v in {"beta": BETA, **PARAMS.get(name, {})}.items() if k in spec.params}
    spec.function(policy, reference, extras_for(name, 3), **params).losses.sum().backward()
    chosen_grad, rejected_grad = policy.chosen.grad, policy.rejected.grad
    if name == "apo_down":  # APO-down lowers both likelihoods, the rejected one more (paper, Eq. 8)
        assert (chosen_grad > 0).all() and (rejected_grad > chosen_grad).all()
    else:  # gradient descent moves against the gradient: chosen up, rejected down
        assert (chosen_grad < 0).all() and (rejected_grad > 0).all()


def test_sft_and_kto_gradients():
    policy = logps([-5.0, -6.0], [-7.0, -8.0], (2.0, 2.0), (2.0, 2.0), grad=True)
    losses.get("sft").function(policy, None, {}).losses.mean().backward()
    assert (policy.chosen.grad < 0).all() and policy.rejected.grad is None   # rejected is not used
    policy = logps([-5.0, -6.0], [-7.0, -8.0], grad=True)
    reference = logps([-5.0, -6.0], [-7.0, -8.0])
    losses.get("kto").function(policy, reference, {"label": torch.tensor([1.0, 0.0])}).losses.sum().backward()
    assert policy.chosen.grad[0] < 0 < policy.chosen.grad[1]   # desirable up, undesirable down
    assert policy.rejected.grad is None                         # z0 carries no gradient


EXTREME_CASES = [(n, {}) for n in losses.names() if n != "kto"] + [
    ("alphapo", {"alphapo_alpha": a}) for a in (0.25, -0.25)] + [
    ("sigmoid", {"f_divergence": d}) for d in ("forward_kl", "js_divergence", "alpha_divergence")] + [
    ("sigmoid", {"f_divergence": "alpha_divergence", "f_alpha_divergence_coef": 3.0})]


@pytest.mark.parametrize("name,extra", EXTREME_CASES, ids=[f"{n}-{e}" for n, e in EXTREME_CASES])
def test_finite_at_extreme_log_probs(name, extra):
    big = 1e4
    # log-probs -1e4 and about 0 on either side, so log-ratios reach +-1e4
    policy = logps([-big, -1e-3, -big, -1e-3], [-1e-3, -big, -big, -1e-3], (1.0, 50.0, 3.0, 1.0),
                   (50.0, 1.0, 3.0, 1.0), grad=True)
    reference = logps([-1e-3, -big, -1e-3, -big], [-big, -1e-3, -1e-3, -big], (1.0, 50.0, 3.0, 1.0),
                      (50.0, 1.0, 3.0, 1.0))
    spec = losses.get(name)
    params = {**PARAMS.get(name, {}), **extra}
    out = spec.function(policy, reference if spec.needs_reference else None, extras_for(name, 4), **params)
    out.losses.sum().backward()
    assert torch.isfinite(out.losses).all(), out.losses
    for grad in (policy.chosen.grad, policy.rejected.grad):
        assert grad is None or torch.isfinite(grad).all()
    assert policy.chosen.grad is not None


def test_kto_finite_at_extreme_log_probs():
    policy = logps([-1e4, -1e-3], [-1e-3, -1e4], grad=True)
    reference = logps([-1e-3, -1e4], [-1e4, -1e-3])
    out = losses.get("kto").function(policy, reference, {"label": torch.tensor([1.0, 0.0])})
    out.losses.sum().backward()
    assert torch.isfinite(out.losses).all() and torch.isfinite(policy.chosen.grad).all()


# ---- parameter checks and the registry ----------------------------------------------------------------------------

SETTINGS = Config().to_dict()


@pytest.mark.parametrize("name,changes,extras,fragment", [
    ("robust", {"label_smoothing": 0.5}, None, "[0, 0.5)"),
    ("exo_pair", {"label_smoothing": 0.0}, None, "(0, 1)"),
    ("sigmoid", {"use_margin": True}, frozenset({"score_chosen"}), "needs a `margin` field"),
    ("kto", {}, frozenset({"margin"}), "`label`"),
    ("kto", {"kto_desirable_weight": 0.0}, None, "--kto-desirable-weight must be positive"),
    ("kto", {"rpo_alpha": 1.0}, None, "--rpo-alpha"),
    ("nca_pair", {"f_divergence": "js_divergence"}, None, "--f-divergence js_divergence"),
    ("simpo", {"f_divergence": "forward_kl"}, None, "--f-divergence forward_kl"),
    ("aot", {"use_weighting": True}, None, "--use-weighting"),
    ("orpo", {"orpo_lambda": -1.0}, None, "--orpo-lambda"),
    ("cpo", {"cpo_alpha": -1.0}, None, "--cpo-alpha"),
    ("discopop", {"discopop_tau": 0.0}, None, "--discopop-tau"),
    ("dpop", {"dpop_lambda": -1.0}, None, "--dpop-lambda"),
    ("dpop", {"f_divergence": "forward_kl"}, None, "--f-divergence forward_kl"),
    ("alphapo", {"alphapo_alpha": float("nan")}, None, "--alphapo-alpha"),
    ("astar_po", {"astar_po_beta1": 0.0}, None, "--astar-po-beta1"),
    ("astar_po", {"astar_po_beta1": float("inf")}, None, "--astar-po-beta1"),
    ("tpo", {}, frozenset({"margin"}), "needs a gold response"),
    ("tpo", {"tpo_alpha": -0.5}, None, "--tpo-alpha"),
    ("tpo", {"stream_data": True}, None, "--stream-data"),
    ("tpo-l", {"tpo_l_gamma": float("nan")}, None, "--tpo-l-gamma"),
    ("tpo-l", {"label_smoothing": 0.5}, None, "--label-smoothing"),
])
def test_invalid_settings_are_named(name, changes, extras, fragment):
    problems = losses.get(name).problems({**SETTINGS, **changes}, extras)
    assert len(problems) == 1 and fragment in problems[0] and problems[0].startswith(f"--loss {name}:")


def test_valid_settings_pass():
    assert losses.get("sigmoid").problems({**SETTINGS, "use_margin": True}, frozenset({"margin"})) == []
    assert losses.get("sigmoid").problems({**SETTINGS, "use_margin": True},
                                          frozenset({"score_chosen", "score_rejected"})) == []
    assert losses.get("kto").problems(SETTINGS, frozenset({"label"})) == []
    for name in losses.names():
        assert losses.get(name).problems({**SETTINGS, "label_smoothing": 0.1}, frozenset({"label", "gold"})) == [], name


def test_registry_metadata_and_user_registration(monkeypatch):
    monkeypatch.setattr(losses.registry, "_REGISTRY", dict(losses.registry._REGISTRY))
    reference_free = {"simpo", "alphapo", "orpo", "cpo", "sft", "tpo", "tpo-l"}
    assert {n for n in losses.names() if not losses.get(n).needs_reference} == reference_free
    assert [n for n in losses.names() if not losses.get(n).paired] == ["kto"]

    @losses.register("doubled", needs_reference=False, check=lambda s, e: ["nope"] if s["beta"] > 1 else [])
    def doubled(policy, reference, extras, *, beta: float) -> losses.LossOutput:
        return losses.LossOutput(2 * beta * policy.chosen, policy.chosen, policy.rejected)

    spec = losses.get("doubled")
    assert spec.params == ("beta",) and not spec.needs_reference and spec.paired
    assert spec.problems({"beta": 2.0}) == ["--loss doubled: nope"]
    assert "doubled" in losses.names()
    with pytest.raises(KeyError):
        losses.get("no_such_loss")
