"""The training loop's set-up phases, each on its own: the objective, the placement plan, the evaluation shares,
the trainer record a checkpoint holds, the metric sums it carries, and the step batches cut by a token budget."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from dpokit import checkpoint, pair_sampler
from dpokit.config import Config
from dpokit.data import synthetic
from dpokit.distributed import Dist
from dpokit.errors import DPOError
from dpokit.logprobs import PairLogps
from dpokit.losses import LossOutput
from dpokit.metrics import MetricMeter
from dpokit.objective import Objective
from dpokit.pair_sampler import StepBatches, even_shares, micro_batches, split_by_tokens
from dpokit.placement import Placement
from dpokit.run_files import RunFiles

CPU = torch.device("cpu")


@pytest.mark.parametrize("flags,strategy", [
    ({}, "copy"),
    ({"lora_r": 8}, "adapter"),
    ({"ref_model": "tiny"}, "model"),
    ({"lora_r": 8, "ref_model": "tiny"}, "model"),
    ({"loss": "simpo"}, "none"),
    ({"loss": "orpo,simpo", "loss_weights": "1,1"}, "none"),
    ({"loss": "sigmoid,simpo", "loss_weights": "1,0.5"}, "copy"),
])
def test_the_objective_asks_for_the_reference_its_losses_need(flags, strategy):
    assert Objective.from_config(Config(**flags)).strategy == strategy


def test_rpo_alpha_adds_the_nll_term_with_its_weight_and_sft_reports_nll():
    objective = Objective.from_config(Config(loss="sigmoid", rpo_alpha=0.3))
    assert [spec.name for spec in objective.specs] == ["sigmoid", "sft"] and objective.weights == [1.0, 0.3]
    assert objective.headline[0] == "rewards/accuracies"
    assert Objective.from_config(Config(loss="sft")).headline == ("loss", "held-out NLL per token")


@pytest.mark.parametrize("flags,message", [
    ({"loss": "nosuch"}, "unknown loss 'nosuch'"),
    ({"loss": "sigmoid,ipo", "loss_weights": "1"}, "1 weights for 2 losses"),
    ({"loss": "sigmoid", "loss_weights": "one"}, "comma-separated numbers"),
    ({"loss": "sigmoid,kto"}, "paired and unpaired"),
    ({"loss": "simpo", "precompute_ref": True}, "reference-free"),
])
def test_the_objective_refuses_bad_settings_before_anything_loads(flags, message):
    with pytest.raises(DPOError, match=message):
        Objective.from_config(Config(**flags))


def test_the_weighted_loss_is_the_weighted_sum_of_each_loss():
    """sigmoid + 0.5 x ipo, against the papers' formulas computed here."""
    objective = Objective.from_config(Config(loss="sigmoid,ipo", loss_weights="1,0.5", beta=0.2))
    policy = PairLogps(torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -4.5]), torch.tensor([3.0, 5.0]),
                       torch.tensor([4.0, 4.0]))
    reference = PairLogps(torch.tensor([-3.5, -5.0]), torch.tensor([-3.5, -5.0]), torch.tensor([3.0, 5.0]),
                          torch.tensor([4.0, 4.0]))
    per_pair, outputs = objective.weighted(policy, reference, {})
    for i in range(2):
        chosen = float(policy.chosen[i] - reference.chosen[i])
        rejected = float(policy.rejected[i] - reference.rejected[i])
        dpo = -math.log(1 / (1 + math.exp(-0.2 * (chosen - rejected))))       # Rafailov et al. Eq. 7
        per_token = chosen / float(policy.chosen_lengths[i]) - rejected / float(policy.rejected_lengths[i])
        ipo = (per_token - 1 / (2 * 0.2)) ** 2                                 # Azar et al. Eq. 17, per token (TRL)
        assert float(per_pair[i]) == pytest.approx(dpo + 0.5 * ipo, rel=1e-6)
    assert len(outputs) == 2


def fake_dist(rank: int, world_size: int) -> Dist:
    return Dist(rank=rank, world_size=world_size, local_rank=rank, device=CPU)


def test_the_placement_plan_reads_weights_on_rank_0_only_when_it_may():
    sharded = Config(fsdp=True, dtype="bfloat16")
    main, other = Placement.from_config(sharded, fake_dist(0, 2)), Placement.from_config(sharded, fake_dist(1, 2))
    assert main.sharded and main.from_rank0 and not main.on_meta and other.on_meta
    assert main.load_dtype == "float32" and main.compute_dtype is torch.bfloat16   # float32 master weights
    adapter = Placement.from_config(Config(fsdp=True, lora_adapter="some/adapter"), fake_dist(1, 2))
    assert adapter.sharded and not adapter.from_rank0 and not adapter.on_meta   # every rank reads the adapter
    alone = Placement.from_config(Config(fsdp=True), fake_dist(0, 1))
    assert not alone.sharded and not alone.on_meta
    assert Placement.from_config(Config(compile=True), fake_dist(0, 1)).lean is False


def test_the_placement_plan_refuses_what_sharding_cannot_do():
    with pytest.raises(DPOError, match="--merge-lora is not supported with --fsdp"):
        Placement.from_config(Config(fsdp=True, lora_r=4, merge_lora=True), fake_dist(0, 2))
    with pytest.raises(DPOError, match="--ref-sync-every / --ref-update bema with --fsdp"):
        Placement.from_config(Config(fsdp=True, ref_sync_every=2, save_every=5), fake_dist(0, 2))


@pytest.mark.parametrize("items,batch,world", [(0, 4, 2), (1, 4, 3), (10, 3, 1), (10, 3, 2), (17, 4, 3), (8, 4, 2)])
def test_even_shares_give_every_item_once_and_every_rank_as_many_forwards(items, batch, world):
    shares = [even_shares(items, batch, rank, world) for rank in range(world)]
    assert len({len(s) for s in shares}) == 1                                  # the same number of forwards
    seen = sorted(i for s in shares for ids in s for i in ids)
    assert seen == list(range(items))                                          # each item exactly once
    assert all(len(ids) <= batch for s in shares for ids in s)


def test_a_trainer_record_reads_back_what_it_wrote_and_refuses_what_it_cannot_read(tmp_path):
    state = checkpoint.TrainerState(step=7, pairs_consumed=56, bad_steps=1, eval_before={"loss": 0.69},
                                    since_log_s=2.5)
    rank = checkpoint.RankState({"torch": torch.tensor([1, 2])}, {"pairs": 3})
    record = checkpoint.TrainerRecord(state, {"last_epoch": 7}, {"torch": torch.tensor([1])}, {"pairs": 3}, 2,
                                      ranks=[rank, rank])
    written = record.to_dict()
    assert written["format"] == checkpoint.TRAINER_FORMAT and written["step"] == 7   # the keys of older files too
    again = checkpoint.TrainerRecord.from_dict(written, tmp_path)
    assert again.state == state and again.world_size == 2 and again.ranks[1].meter == {"pairs": 3}
    assert again.reference is None
    with pytest.raises(DPOError, match="newer dpokit"):
        checkpoint.TrainerRecord.from_dict({**written, "format": checkpoint.TRAINER_FORMAT + 1}, tmp_path)
    del written["scheduler"]
    with pytest.raises(DPOError, match="trainer.pt lacks 'scheduler'"):
        checkpoint.TrainerRecord.from_dict(written, tmp_path)


def test_metric_sums_saved_between_log_steps_give_the_same_row():
    def add(meter: MetricMeter, scale: float) -> None:
        policy = PairLogps(torch.tensor([-1.0, -2.0]) * scale, torch.tensor([-1.5, -1.0]) * scale,
                           torch.tensor([2.0, 2.0]), torch.tensor([2.0, 2.0]))
        out = LossOutput(torch.tensor([0.5, 0.7]) * scale, torch.tensor([0.1, -0.2]), torch.tensor([0.0, 0.1]),
                         {"extra/metric": torch.tensor(scale)})
        meter.add(out.losses, policy, [out], tokens=10)
        meter.end_step(torch.tensor(scale), skipped=False)

    whole = MetricMeter(CPU)
    add(whole, 1.0)
    add(whole, 2.0)
    first = MetricMeter(CPU)
    add(first, 1.0)
    resumed = MetricMeter(CPU)
    resumed.load_state_dict(first.state_dict())
    add(resumed, 2.0)
    single = fake_dist(0, 1)
    assert resumed.reduce(single) == whole.reduce(single)
    assert whole.reduce(single)["extra/metric"] == pytest.approx(1.5) and whole.reduce(single)["grad_norm"] == 1.5


def test_a_token_budget_builds_each_micro_batch_once_from_the_steps_pairs(monkeypatch):
    pairs = synthetic.make_pairs(16, 0)
    built = []
    make_batch = pair_sampler.make_batch
    monkeypatch.setattr(pair_sampler, "make_batch",
                        lambda ps, **kw: built.append(list(kw["pair_ids"])) or make_batch(ps, **kw))
    order = micro_batches(len(pairs), 4, seed=0, rank=0, world_size=1)
    steps = StepBatches(order, pairs, grad_accum=2, num_workers=0, token_budget=40, common_count=lambda n: n,
                        layout="blocks", pad_id=synthetic.EOS, row_capacity=None)
    micro = next(steps)
    expected_ids = [j for _, ids in zip(range(2), micro_batches(len(pairs), 4, seed=0, rank=0, world_size=1))
                    for j in ids[1]]
    cuts = split_by_tokens([pairs[j] for j in expected_ids], 40)
    assert len(cuts) > 1 and built == [[expected_ids[k] for k in cut] for cut in cuts]   # built once, no more
    assert [b.pair_ids.tolist() for b in micro] == built


def test_run_files_name_a_runs_outputs():
    files = RunFiles(Path("runs/x"))
    assert (files.metrics.name, files.config.name, files.checkpoints.name, files.model.name) == \
        ("metrics.jsonl", "config.yaml", "checkpoints", "model")


def test_a_rank_without_held_out_pairs_reduces_the_same_keys_and_adds_nothing():
    """Every rank must all-reduce tensors of one length with the same names: a rank whose spare evaluation round
    scores a stand-in batch registers that batch's metric names and nothing else."""
    policy = PairLogps(torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([2.0]), torch.tensor([2.0]))
    out = LossOutput(torch.tensor([0.5]), torch.tensor([0.1]), torch.tensor([0.0]), {"extra/metric": torch.tensor(3.0)})
    with_pairs, spare = MetricMeter(CPU), MetricMeter(CPU)
    with_pairs.add(out.losses, policy, [out], tokens=10)
    spare.add(out.losses, policy, [out], tokens=10, counted=False)
    single = fake_dist(0, 1)
    assert spare.reduce(single).keys() == with_pairs.reduce(single).keys()
    assert spare.pairs == spare.tokens == 0 and not spare.sums.any() and not any(spare.extra.values())


def test_an_unknown_device_is_one_line():
    from dpokit.distributed import resolve_device

    assert resolve_device("cpu") == CPU
    with pytest.raises(DPOError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")
