"""Distributed training equals single-process training: 2 CPU processes (gloo) x batch 4 against 1 process x
batch 4 x grad-accum 2, same seed, same global batch: same loss curve, same eval metrics, same final weights
(within 1e-5), with DDP and with FSDP2; an FSDP2 checkpoint written by 2 ranks loads on 1.

The 2 processes are forked from the test process (`distributed_helpers.fork_ranks`). Each trains with DDP,
then with FSDP2, then writes a sharded checkpoint, all in one process group.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from distributed_helpers import fork_ranks
from safetensors.torch import load_file

from dpokit import distributed
from dpokit.config import Config
from dpokit.pair_sampler import micro_batches

# fsdp-tokens: micro-batches by a token budget, as many on each rank; ddp-precompute: --precompute-ref, each rank
# scoring half of the reference batches; fsdp-ref-model: the reference read from --ref-model (the same weights).
STRATEGIES = ("ddp", "fsdp", "fsdp-tokens", "ddp-precompute", "fsdp-ref-model")
LORA_STRATEGIES = ("ddp-lora", "fsdp-lora")  # against a one-process LoRA run


def run_config(model_dir: str, output: Path, *, grad_accum: int, fsdp: bool = False,
               micro_batch_tokens: int | None = None, precompute_ref: bool = False, lora: bool = False,
               ref_model: str | None = None) -> Config:
    """The synthetic task on the 2-layer hidden-32 Llama: 12 train pairs (2 steps of 8 cross an epoch
    boundary) and 3 held-out pairs (uneven over 2 ranks, eval batch 1: rank 1 runs a spare round)."""
    return Config(model=model_dir, data="synthetic", max_pairs=15, eval_fraction=0.2, max_steps=2,
                  batch_size=4, grad_accum=grad_accum, eval_batch_size=1, lr=1e-3, seed=0, fsdp=fsdp,
                  micro_batch_tokens=micro_batch_tokens, precompute_ref=precompute_ref, cache=False,
                  lora_r=4 if lora else 0, ref_model=ref_model, output=str(output), progress=False)


def tiny_batch(vocab: int) -> torch.Tensor:
    return torch.arange(24).reshape(2, 12) % vocab


# ---- data sharding -------------------------------------------------------------------------------------------


def test_every_pair_seen_once_per_epoch_and_split_like_one_process():
    num_pairs, batch, world, steps = 10, 3, 2, 7                      # 42 pairs drawn: 4 epochs and 2 pairs
    ranks = [micro_batches(num_pairs, batch, seed=5, rank=r, world_size=world) for r in range(world)]
    single = micro_batches(num_pairs, batch * world, seed=5, rank=0, world_size=1)
    drawn = []
    for _ in range(steps):
        shards = [next(it)[1] for it in ranks]
        assert sum(shards, []) == next(single)[1]                     # ranks' slices = the 1-process batch
        drawn += sum(shards, [])
    for epoch in range(len(drawn) // num_pairs):                      # each epoch is a permutation of all pairs
        assert sorted(drawn[epoch * num_pairs:(epoch + 1) * num_pairs]) == list(range(num_pairs))
    resumed = micro_batches(num_pairs, batch, seed=5, rank=1, world_size=world, consumed=5 * batch * world)
    assert [next(resumed)[1] for _ in range(2)] == [drawn[33:36], drawn[39:42]]


# ---- 2 processes against 1 -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    """Outputs of the single-process run and of the 2-process worker (one torchrun launch)."""
    from dpokit.loop import train

    root = tmp_path_factory.mktemp("distributed")
    train(run_config(str(tiny_model_dir), root / "single", grad_accum=2))
    train(run_config(str(tiny_model_dir), root / "single-lora", grad_accum=2, lora=True))
    fork_ranks(worker, 2, str(tiny_model_dir), root)
    return root


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_two_processes_match_one(runs, tiny_model_dir, strategy):
    single, multi = read_rows(runs / "single" / "metrics.jsonl"), read_rows(runs / strategy / "metrics.jsonl")
    assert [r["step"] for r in multi] == [r["step"] for r in single] == [0, 1, 2, 2]
    for one, two in zip(single, multi):
        for key in [k for k in one if not k.endswith("_s")]:          # all but timings (pairs_per_s, ...)
            assert two[key] == pytest.approx(one[key], abs=1e-5), (one["step"], key)
    assert len(single[-1]) > 5 and "eval/rewards/accuracies" in single[-1]   # eval rows compared too

    before = load_file(tiny_model_dir / "model.safetensors")
    after_single = load_file(runs / "single" / "model" / "model.safetensors")
    after_multi = load_file(runs / strategy / "model" / "model.safetensors")
    assert after_multi.keys() == after_single.keys()
    assert max((after_single[k] - before[k]).abs().max() for k in before) > 1e-3  # training moved the weights
    for name in after_single:
        torch.testing.assert_close(after_multi[name], after_single[name], atol=1e-5, rtol=0, msg=name)


@pytest.mark.parametrize("strategy", LORA_STRATEGIES)
def test_two_processes_match_one_with_lora(runs, strategy):
    single, multi = (read_rows(runs / name / "metrics.jsonl") for name in ("single-lora", strategy))
    assert [r["step"] for r in multi] == [r["step"] for r in single] == [0, 1, 2, 2]
    for one, two in zip(single, multi):
        for key in [k for k in one if not k.endswith("_s")]:
            assert two[key] == pytest.approx(one[key], abs=1e-5), (one["step"], key)
    after_single, after_multi = (load_file(runs / name / "model" / "adapter_model.safetensors")
                                 for name in ("single-lora", strategy))
    assert after_multi.keys() == after_single.keys() and any("lora_B" in k for k in after_single)
    assert max(v.abs().max() for k, v in after_single.items() if "lora_B" in k) > 1e-4   # B moved from 0
    for name in after_single:
        torch.testing.assert_close(after_multi[name], after_single[name], atol=1e-5, rtol=0, msg=name)


def test_with_fsdp2_only_rank_0_reads_the_weights(runs):
    """Full fine-tuning, a --ref-model or a new LoRA adapter under FSDP2: ranks > 0 build the models on the meta
    device and get their shards (and rank 0's adapter initialisation) from rank 0 (the runs above match one process, so the
    shards they got were right)."""
    loads = {rank: json.loads((runs / f"loads-rank{rank}.json").read_text()) for rank in (0, 1)}
    assert loads[0] == ["cpu"] * (len(STRATEGIES + LORA_STRATEGIES) + 1)
    # ddp, fsdp, fsdp-tokens, ddp-precompute, fsdp-ref-model (policy, reference), ddp-lora, fsdp-lora
    assert loads[1] == ["cpu", "meta", "meta", "cpu", "meta", "meta", "cpu", "meta"]


def test_fsdp2_with_bfloat16_compute_trains_and_saves_bfloat16(runs):
    from transformers import AutoModelForCausalLM

    rows = read_rows(runs / "fsdp-bf16" / "metrics.jsonl")
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 2 and all(0 < loss < 1 for loss in losses)
    saved = load_file(runs / "fsdp-bf16" / "model" / "model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}      # float32 master weights, saved as asked
    config = json.loads((runs / "fsdp-bf16" / "model" / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    assert next(AutoModelForCausalLM.from_pretrained(runs / "fsdp-bf16" / "model").parameters()).dtype == torch.bfloat16


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # DCP's note that it loads in one process
def test_fsdp_checkpoint_written_by_two_ranks_loads_on_one(runs, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    expected = torch.load(runs / "dcp-full.pt")                       # gathered on rank 0 from the 2 shards
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    distributed.load_sharded(runs / "dcp", model, optimizer)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, expected["model"][name], atol=0, rtol=0, msg=name)
    state = optimizer.state_dict()["state"]
    for index, (name, _) in enumerate(model.named_parameters()):
        torch.testing.assert_close(state[index]["exp_avg"], expected["optimizer"][name]["exp_avg"], atol=0, rtol=0)
    assert any(state[i]["exp_avg"].abs().max() > 0 for i in state)   # a real, non-zero state came back


# ---- the worker: one rank ------------------------------------------------------------------------------------


def worker(rank: int, world_size: int, model_dir: str, root: Path) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    from transformers import AutoModelForCausalLM

    from dpokit import models
    from dpokit.loop import train

    load_model, loads = models.load_model, []

    def recording_load_model(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        model = load_model(*args, **kwargs)
        loads.append(next(model.parameters()).device.type)
        return model

    models.load_model = recording_load_model
    for strategy in STRATEGIES:
        train(run_config(model_dir, root / strategy, grad_accum=1, fsdp=strategy.startswith("fsdp"),
                         micro_batch_tokens=40 + 25 * rank if strategy == "fsdp-tokens" else None,
                         precompute_ref=strategy == "ddp-precompute",
                         ref_model=model_dir if strategy == "fsdp-ref-model" else None))
    for strategy in LORA_STRATEGIES:
        train(run_config(model_dir, root / strategy, grad_accum=1, fsdp=strategy.startswith("fsdp"), lora=True))
    models.load_model = load_model
    (root / f"loads-rank{rank}.json").write_text(json.dumps(loads))
    # bfloat16 compute: FSDP2's MixedPrecisionPolicy casts (and so copies) the forward's keyword arguments,
    # the block layout included, on their way to attention.
    config = run_config(model_dir, root / "fsdp-bf16", grad_accum=1, fsdp=True)
    config.dtype = "bfloat16"
    train(config)

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    dist = distributed.init("cpu")
    distributed.shard(model, dist)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(input_ids=tiny_batch(model.config.vocab_size)[rank:rank + 1]).logits.float().pow(2).mean().backward()
    optimizer.step()
    distributed.save_sharded(root / "dcp", model, optimizer)
    full_model, full_optimizer = get_state_dict(
        model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        torch.save({"model": full_model, "optimizer": full_optimizer["state"]}, root / "dcp-full.pt")
