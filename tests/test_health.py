"""Training-health alarms: for each alarm a constructed run (hand-built metric rows) that raises it at the step
worked out by hand, and one just inside the limit that does not; then real tiny runs, one that cannot learn
(lr 1e-12: the float32 weights never move) and one that learns, read back from metrics.jsonl."""

from __future__ import annotations

import math

import pytest

from conftest import build_tiny_llama
from dpokit.config import Config
from dpokit.data.tokenization import TokenizedPair
from dpokit.health import (LENGTH_GAP, DataStats, HealthMonitor, Limits, NullMonitor, append_summary, row_keys,
                           summary_section)
from dpokit.report import read_metrics

BETA = 0.1
# Completions of 10 tokens; chosen 1 token longer than rejected on average, 4 tokens apart on average.
DATA = DataStats(chosen_length=10.5, rejected_length=9.5, length_gap=1.0, abs_length_gap=4.0)


def monitor(**kwargs) -> HealthMonitor:
    settings = {"beta": BETA, "reference_is_start": True, **kwargs}
    return HealthMonitor(DATA, **settings)


def healthy(step: int, **changes: float) -> dict[str, float]:
    """A row of a run that learns: loss falls, accuracy rises, rejected pushed down, chosen up a little."""
    chosen, rejected = 0.002 * step, -0.01 * step
    row = {"step": step, "epoch": step / 100, "loss": LOG2 - 0.004 * step, "rewards/chosen": chosen,
           "rewards/rejected": rejected, "rewards/accuracies": min(0.55 + 0.01 * step, 0.95),
           "rewards/margins": chosen - rejected, "logps/chosen": -21.0 + 0.02 * step,
           "logps/rejected": -19.0 - 0.1 * step, "grad_norm": 1.0 + 0.1 * (step % 3), "bad_steps": 0.0, "lr": 1e-4}
    row.update(changes)
    return row


LOG2 = math.log(2)


def run(mon, rows) -> list[tuple[str, int]]:
    """Feed every row; (name, step) of each alarm raised, in order."""
    return [(a.name, a.step) for row in rows for a in mon.check(row)]


def test_a_healthy_run_raises_nothing():
    assert run(monitor(), [healthy(s) for s in range(1, 61)]) == []


# ---- no learning --------------------------------------------------------------------------------------------


def flat(step: int, **changes: float) -> dict[str, float]:
    """A row of a run whose policy is the reference: every reward 0, so the loss is log 2 and no pair is won."""
    return healthy(step, **{"loss": LOG2, "rewards/chosen": 0.0, "rewards/rejected": 0.0, "rewards/margins": 0.0,
                            "rewards/accuracies": 0.0, "lr": 1e-12, **changes})


def test_no_learning_fires_after_ten_flat_rows_and_says_what_it_checked():
    mon = monitor()
    assert run(mon, [flat(s) for s in range(1, 15)]) == [("no_learning", 10)]
    message = mon.alarms[0].message
    assert "exactly as the reference" in message and "lr 1e-12" in message and "gradient is not zero" in message


def test_no_learning_names_a_zero_gradient():
    mon = monitor()
    run(mon, [flat(s, grad_norm=0.0) for s in range(1, 11)])
    assert "gradient norm is 0" in mon.alarms[0].message


def test_no_learning_stays_quiet_when_the_streak_breaks_or_the_loss_moves():
    broken = [flat(s) for s in range(1, 10)] + [healthy(10)] + [flat(s) for s in range(11, 20)]  # 9 + 9 flat
    assert run(monitor(), broken) == []
    assert run(monitor(), [flat(s, loss=LOG2 - 2e-3) for s in range(1, 30)]) == []      # just past the tolerance
    assert run(monitor(), [flat(s, **{"rewards/accuracies": 0.6}) for s in range(1, 30)]) == []  # above chance


# ---- reference mismatch at step 1 ---------------------------------------------------------------------------


def test_reference_mismatch_at_step_one():
    # rewards 0.5 and -0.5 with beta 0.1: |log-ratio| 5 nats per sequence over 10 tokens = 0.5 per token > 0.05
    step1 = healthy(1, **{"rewards/chosen": 0.5, "rewards/rejected": -0.5, "rewards/margins": 1.0})
    assert run(monitor(), [step1]) == [("reference_mismatch", 1)]


def test_no_reference_mismatch_when_they_agree_or_when_the_reference_is_another_model_on_purpose():
    step1 = healthy(1, **{"rewards/chosen": 0.004, "rewards/rejected": -0.004})  # 0.04 nats/seq: rounding
    assert run(monitor(), [step1]) == []
    far = healthy(1, **{"rewards/chosen": 0.5, "rewards/rejected": -0.5})
    assert run(monitor(reference_is_start=False), [far]) == []          # --ref-model: expected to differ
    assert run(monitor(), [healthy(2, **{"rewards/chosen": 0.5, "rewards/rejected": -0.5})]) == []  # not step 1


# ---- likelihood displacement ------------------------------------------------------------------------------


def displaced(step: int, chosen_ratio: float) -> dict[str, float]:
    """The chosen log-ratio falls to `chosen_ratio` x step / 40 while the rejected one falls four times faster."""
    chosen = BETA * chosen_ratio * step / 40
    return healthy(step, **{"rewards/chosen": chosen, "rewards/rejected": 4 * chosen, "rewards/margins": -3 * chosen})


def test_likelihood_displacement_fires_when_chosen_falls_past_the_limit_while_the_margin_grows():
    # chosen log-ratio -2 s/40 nats; its mean over steps s-9..s is -2 (s - 4.5)/40, past 0.1 nats per token
    # (1.05 nats over 10.5 tokens) once s - 4.5 > 21: step 26
    mon = monitor()
    assert run(mon, [displaced(s, -2.0) for s in range(1, 41)]) == [("likelihood_displacement", 26)]
    assert "--rpo-alpha" in mon.alarms[0].message and "--loss dpop" in mon.alarms[0].message


def test_no_displacement_within_the_limit_or_without_a_growing_margin():
    assert run(monitor(), [displaced(s, -1.0) for s in range(1, 41)]) == []  # under 1 nat over 10.5 tokens
    shrinking = [healthy(s, **{"rewards/chosen": -0.01 * s, "rewards/rejected": -0.005 * s,
                               "rewards/margins": -0.005 * s}) for s in range(1, 41)]
    assert run(monitor(), shrinking) == []


def test_displacement_without_a_reference_reads_the_fall_of_the_chosen_log_probs():
    # reference-free (SimPO-like): logps/chosen -20 - 0.1 (s - 1); the first 10 rows average -20.45, steps
    # s-9..s average -20 - 0.1 (s - 5.5): a fall of 0.1 s - 1, past 10.5 * 0.1 = 1.05 nats at step 21
    rows = [healthy(s, **{"logps/chosen": -20.0 - 0.1 * (s - 1)}) for s in range(1, 40)]
    assert run(monitor(beta=None, reference_is_start=False), rows) == [("likelihood_displacement", 21)]


# ---- length hacking -------------------------------------------------------------------------------------------


def test_length_hacking_fires_when_the_preferred_gap_drifts_longer_than_the_data():
    # data gap +1 of 4 tokens mean |gap|: a preferred gap of +3.5 drifts (3.5 - 1) / 4 = 0.625 > 0.5
    rows = [healthy(s, **{LENGTH_GAP: 3.5}) for s in range(1, 20)]
    mon = monitor()
    assert run(mon, rows) == [("length_hacking", 10)]   # averaged over the first 10 rows
    assert "longer" in mon.alarms[0].message


def test_length_hacking_quiet_inside_the_limit_at_the_tied_start_and_without_the_metric():
    assert run(monitor(), [healthy(s, **{LENGTH_GAP: 2.5}) for s in range(1, 30)]) == []  # drift 0.375
    tied_start = HealthMonitor(DataStats(10, 7, 3.0, 4.0), beta=BETA)
    assert run(tied_start, [healthy(s, **{LENGTH_GAP: 0.0}) for s in range(1, 30)]) == []  # drift -0.75, gap 0
    assert run(monitor(), [healthy(s) for s in range(1, 30)]) == []


def test_length_hacking_toward_shorter_completions():
    rows = [healthy(s, **{LENGTH_GAP: -2.0}) for s in range(1, 12)]  # drift (-2 - 1) / 4 = -0.75, gap below 0
    assert run(monitor(), rows) == [("length_hacking", 10)]


# ---- exploding KL -------------------------------------------------------------------------------------------------


def test_kl_explosion_fires_past_one_nat_per_token():
    # |rewards| 1.2 and 1.0 with beta 0.1: (12 + 10) / 2 = 11 nats per sequence of 10 tokens = 1.1 > 1
    rows = [healthy(1), healthy(2), healthy(3, **{"rewards/chosen": 1.2, "rewards/rejected": -1.0,
                                                  "rewards/margins": 2.2})]
    assert run(monitor(), rows) == [("kl_explosion", 3)]


def test_no_kl_alarm_below_the_limit_or_without_a_reference():
    below = healthy(3, **{"rewards/chosen": 0.9, "rewards/rejected": -0.9, "rewards/margins": 1.8})  # 9 nats: 0.9
    assert run(monitor(), [healthy(1), healthy(2), below]) == []
    far = healthy(3, **{"rewards/chosen": 5.0, "rewards/rejected": -5.0})
    assert run(monitor(beta=None, reference_is_start=False), [healthy(1), healthy(2), far]) == []


# ---- gradient-norm spikes -----------------------------------------------------------------------------------


def test_grad_norm_spike_fires_at_ten_times_the_median():
    norms = [1.0, 1.1, 0.9, 1.0, 1.2, 10.5]  # median of the first five is 1.0
    assert run(monitor(), [healthy(s + 1, grad_norm=n) for s, n in enumerate(norms)]) == [("grad_norm_spike", 6)]


def test_no_spike_below_ten_times_or_before_five_norms_are_known():
    norms = [1.0, 1.1, 0.9, 1.0, 1.2, 9.5]
    assert run(monitor(), [healthy(s + 1, grad_norm=n) for s, n in enumerate(norms)]) == []
    early = [1.0, 1.0, 50.0, 1.0, 1.0, 1.0]  # a large norm among the first ones is not a spike yet
    assert run(monitor(), [healthy(s + 1, grad_norm=n) for s, n in enumerate(early)]) == []


# ---- non-finite values ----------------------------------------------------------------------------------------


def test_non_finite_names_the_first_culprit_in_the_order_the_step_computes_them():
    nan = float("nan")
    row = healthy(3, **{"loss": nan, "rewards/chosen": nan, "logps/rejected": float("inf")})
    mon = monitor()
    assert run(mon, [healthy(1), healthy(2), row, healthy(4, loss=nan)]) == [("non_finite", 3)]  # once only
    message = mon.alarms[0].message
    assert message.startswith("first non-finite value: logps/rejected (the policy's forward pass)")
    assert "rewards/chosen, loss" in message


def test_non_finite_gradient_shows_as_skipped_steps():
    mon = monitor()
    assert run(mon, [healthy(1), healthy(2, bad_steps=1.0)]) == [("non_finite", 2)]
    assert "non-finite gradient" in mon.alarms[0].message


# ---- what the alarms become ---------------------------------------------------------------------------------


def test_eval_rows_are_ignored_and_each_alarm_is_raised_once():
    eval_row = {"step": 5, "epoch": 0.1, "eval/loss": float("nan")}
    mon = monitor()
    rows = [eval_row] + [flat(s) for s in range(1, 31)]
    assert run(mon, rows) == [("no_learning", 10)]


def test_replay_after_a_resume_raises_nothing_twice_and_keeps_the_alarms():
    mon = monitor()
    mon.replay([flat(s) for s in range(1, 13)])
    assert [a.name for a in mon.alarms] == ["no_learning"]
    assert run(mon, [flat(s) for s in range(13, 30)]) == []


def test_row_keys_log_line_and_summary(tmp_path):
    mon = monitor()
    alarms = [a for s in range(1, 11) for a in mon.check(flat(s))]
    assert row_keys(alarms) == {"health/no_learning": 1.0}
    assert alarms[0].line.startswith("health: no_learning at step 10: loss within 0.001 of log 2")
    summary = tmp_path / "summary.md"
    summary.write_text("# Run report\n", encoding="utf-8")
    append_summary(summary, alarms)
    text = summary.read_text(encoding="utf-8")
    assert text.startswith("# Run report\n") and "## Training health" in text
    assert "- step 10: **no_learning**: loss within" in text
    assert "No alarm fired." in summary_section([])


def test_data_stats_of_pairs():
    pairs = [TokenizedPair([1], [5] * 12, [6] * 8), TokenizedPair([1], [5] * 6, [6] * 10)]
    assert DataStats.of_pairs(pairs) == DataStats(chosen_length=9.0, rejected_length=9.0, length_gap=0.0,
                                                  abs_length_gap=4.0)


def test_from_config_picks_the_checks_the_loss_allows():
    pairs = [TokenizedPair([1], [5] * 4, [6] * 4)]
    dpo = HealthMonitor.from_config(Config(), pairs)
    assert isinstance(dpo, HealthMonitor) and dpo.beta == 0.1 and dpo.reference_is_start
    simpo = HealthMonitor.from_config(Config(loss="simpo"), pairs)
    assert simpo.beta is None and not simpo.reference_is_start
    assert not HealthMonitor.from_config(Config(ref_model="some/model"), pairs).reference_is_start
    assert isinstance(HealthMonitor.from_config(Config(health_checks=False), pairs), NullMonitor)
    assert Config.from_args(["--no-health-checks"]).health_checks is False


def test_limits_can_be_tightened():
    mon = monitor(limits=Limits(window=3))
    assert run(mon, [flat(s) for s in range(1, 5)]) == [("no_learning", 3)]


# ---- real tiny runs -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    """A hidden-32 Llama over the synthetic task's 32-token vocabulary: a 12-step run takes a few seconds."""
    path = tmp_path_factory.mktemp("synthetic-llama")
    build_tiny_llama(path, vocab_size=32, tokenizer=tokenizer)
    return path


def tiny_config(model_dir, output, lr: float) -> Config:
    return Config.from_args(["--model", str(model_dir), "--max-pairs", "96", "--batch-size", "8", "--max-steps", "12",
                             "--lr", str(lr), "--eval-fraction", "0", "--no-progress", "--no-cache", "--output",
                             str(output)])


def alarms_of_real_run(model_dir, output, lr: float) -> list[tuple[str, int]]:
    """Train, then feed the run's metrics.jsonl rows to the monitor `dpo train` would build."""
    from dpokit.loop import prepare_data, train
    from dpokit.objective import Objective

    cfg = tiny_config(model_dir, output, lr)
    train(cfg)
    mon = HealthMonitor.from_config(cfg, prepare_data(cfg, Objective.from_config(cfg))[1].train)
    return run(mon, read_metrics(output / "metrics.jsonl"))


def test_a_real_run_that_cannot_learn_raises_no_learning_from_its_rows(model_dir, tmp_path, one_thread):
    # lr 1e-12: each update is far below float32's resolution of the weights, so the policy stays the reference
    assert alarms_of_real_run(model_dir, tmp_path / "frozen", 1e-12) == [("no_learning", 10)]


@pytest.mark.parametrize("lr", [1e-4, 1e-3])
def test_a_real_run_that_learns_raises_nothing(model_dir, tmp_path, one_thread, lr):
    assert alarms_of_real_run(model_dir, tmp_path / "learning", lr) == []


def test_dpo_train_reports_no_learning_in_metrics_and_summary(model_dir, tmp_path, one_thread):
    from dpokit.loop import train

    output = tmp_path / "run"
    train(tiny_config(model_dir, output, 1e-12))
    flagged = [row["step"] for row in read_metrics(output / "metrics.jsonl") if "health/no_learning" in row]
    assert flagged == [10]
    assert "**no_learning**" in (output / "summary.md").read_text(encoding="utf-8")


def test_no_kl_alarm_for_a_random_init_preset():
    far = healthy(3, **{"rewards/chosen": 5.0, "rewards/rejected": -5.0, "rewards/margins": 10.0})
    assert run(monitor(), [healthy(1), healthy(2), far]) == [("kl_explosion", 3)]
    preset = monitor()
    preset.pretrained = False
    assert run(preset, [healthy(1), healthy(2), far]) == []
