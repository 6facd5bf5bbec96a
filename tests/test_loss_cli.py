"""Every loss through the real training loop on the synthetic task: a finite loss at the end, its metrics logged,
no reference model for reference-free losses, and settings refused before any model is built.

To stay within the test budget, the losses that share a setting train together in one run (`--loss a,b,...`):
the summed loss is finite only if every term is, and each term's own values are checked in test_losses.py.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math

import pytest

from dpokit import cli, loop, losses, models, report
from dpokit.config import Config
from dpokit.errors import DPOError

WITH_REFERENCE = ["sigmoid", "robust", "ipo", "hinge", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm", "dpop", "astar_po"]
REFERENCE_FREE = ["simpo", "alphapo", "orpo", "cpo", "sft"]
GOLD = ["tpo", "tpo-l"]  # they need data with a gold response: through the loop in test_tpo.py


@pytest.fixture(autouse=True)
def small_and_quick(monkeypatch):
    """The `tiny` preset at hidden size 32, and no PNG (matplotlib dominates a 2-step run's time)."""
    monkeypatch.setitem(models.PRESETS, "tiny", {**models.PRESETS["tiny"], "hidden_size": 32,
                                                 "intermediate_size": 64, "num_attention_heads": 2,
                                                 "num_key_value_heads": 2})
    monkeypatch.setattr(report, "plot_curves", lambda *args, **kwargs: None)


def run(tmp_path, **settings):
    cfg = Config(max_pairs=32, batch_size=8, max_steps=2, eval_fraction=0, output=str(tmp_path), progress=False,
                 **settings)
    loop.train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r][-1]


def test_every_loss_with_a_reference_trains(tmp_path):
    assert set(WITH_REFERENCE + REFERENCE_FREE + GOLD + ["kto"]) == set(losses.names())
    last = run(tmp_path, loss=",".join(WITH_REFERENCE), loss_weights=",".join(["0.5"] * len(WITH_REFERENCE)),
               label_smoothing=0.1, rpo_alpha=0.5)
    assert math.isfinite(last["loss"]) and last["nll_loss"] > 0   # --rpo-alpha logs its NLL term


def test_f_divergence_wpo_and_ld_dpo_through_the_cli(tmp_path, capsys):
    cli.main(["train", "--loss", "sigmoid,ipo,hinge", "--f-divergence", "js_divergence", "--use-weighting",
              "--ld-alpha", "0.5", "--max-pairs", "32", "--batch-size", "8", "--max-steps", "2",
              "--eval-fraction", "0", "--output", str(tmp_path), "--no-progress"])
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert math.isfinite(rows[-1]["loss"])


def test_reference_free_losses_build_no_reference(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a reference model was built for a reference-free loss")

    monkeypatch.setattr(models, "frozen_copy", refuse)
    monkeypatch.setattr(losses.registry, "_REGISTRY", dict(losses.registry._REGISTRY))

    @losses.register("user_sft", needs_reference=False)  # a user's own loss, registered without editing dpokit
    def user_sft(policy, reference, extras, *, beta: float) -> losses.LossOutput:
        assert reference is None
        return losses.LossOutput(-policy.chosen / policy.chosen_lengths, policy.chosen.detach(),
                                 policy.rejected.detach())

    last = run(tmp_path, loss=",".join(REFERENCE_FREE + ["user_sft"]), loss_weights="1,1,1,1,0.2,0.1",
               alphapo_alpha=0.25)
    assert math.isfinite(last["loss"])
    assert {"nll_loss", "log_odds_ratio", "log_odds_chosen"} <= set(last)


def test_pairs_scores_reach_astar_po_through_the_loop(tmp_path, monkeypatch, tiny_model_dir):
    """A file with score_chosen/score_rejected: A*-PO's regression targets come from them, in the fused pass and
    the metrics pass alike; DPOP trains alongside (its penalty logged), against a precomputed reference."""
    data = tmp_path / "scored.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Human: {i} plus {i}?\n\nAssistant:", "chosen": f" {2 * i}.",
                                        "rejected": f" maybe {i + 3}?", "score_chosen": float(i % 4),
                                        "score_rejected": -1.0}) + "\n" for i in range(16)), encoding="utf-8")
    monkeypatch.setattr(losses.registry, "_REGISTRY", dict(losses.registry._REGISTRY))
    spec, seen = losses.get("astar_po"), []

    @functools.wraps(spec.function)
    def spy(policy, reference, extras, **params):
        seen.append({k: v.tolist() for k, v in extras.items()})
        return spec.function(policy, reference, extras, **params)

    losses.registry._REGISTRY["astar_po"] = dataclasses.replace(spec, function=spy)
    last = run(tmp_path / "out", model=str(tiny_model_dir), data=str(data), loss="astar_po,dpop", precompute_ref=True)
    assert math.isfinite(last["loss"]) and last["dpop_penalty"] >= 0
    assert seen and all(set(extras) == {"score_chosen", "score_rejected"} for extras in seen)
    assert {s for extras in seen for s in extras["score_chosen"]} <= {0.0, 1.0, 2.0, 3.0}
    assert all(s == -1.0 for extras in seen for s in extras["score_rejected"])


@pytest.mark.parametrize("reference", [dict(lora_r=4), dict(ref_sync_every=1)], ids=["adapter", "tr-dpo"])
def test_dpop_with_the_adapter_and_synced_references(tmp_path, reference):
    last = run(tmp_path, loss="dpop", dpop_lambda=5.0, **reference)
    assert math.isfinite(last["loss"]) and last["dpop_penalty"] >= 0


def test_new_losses_are_listed_in_train_help(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = capsys.readouterr().out
    for flag, loss in (("--dpop-lambda", "dpop"), ("--alphapo-alpha", "alphapo"), ("--astar-po-beta1", "astar_po"),
                       ("--tpo-alpha", "tpo"), ("--tpo-l-gamma", "tpo-l")):
        assert flag in text and f"--loss {loss}" in text


def test_kto_trains_on_unpaired_examples(tmp_path):
    last = run(tmp_path, loss="kto", kto_undesirable_weight=1.2)
    assert math.isfinite(last["loss"]) and last["kl"] >= 0


@pytest.mark.parametrize("settings,fragment", [
    (dict(loss="robust", label_smoothing=0.5), "--loss robust: --label-smoothing"),
    (dict(loss="exo_pair"), "--loss exo_pair: --label-smoothing must be in (0, 1)"),
    (dict(loss="kto,sigmoid"), "cannot be combined"),
    (dict(loss="aot", use_weighting=True), "--use-weighting"),
    (dict(loss="cpo", f_divergence="forward_kl"), "--f-divergence forward_kl"),
    (dict(loss="sigmoid", use_margin=True), "needs a `margin` field"),  # the synthetic task has no scores
    (dict(loss="dpop", dpop_lambda=-1.0), "--loss dpop: --dpop-lambda"),
    (dict(loss="alphapo", alphapo_alpha=float("inf")), "--loss alphapo: --alphapo-alpha"),
    (dict(loss="astar_po", astar_po_beta1=0.0), "--loss astar_po: --astar-po-beta1"),
])
def test_bad_settings_fail_before_training(tmp_path, monkeypatch, settings, fragment):
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(DPOError, match=None) as error:
        run(tmp_path, **settings)
    assert fragment in str(error.value)
