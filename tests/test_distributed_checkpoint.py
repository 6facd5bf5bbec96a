"""FSDP2 checkpoints (torch.distributed.checkpoint) resume exactly, and on another number of processes.

The same 4-step synthetic run (global batch 8, a checkpoint every step, the newest 3 kept, metrics logged every 3
steps so that the step-2 checkpoint holds partial metric sums) is trained:

- `one`: 1 process x batch 8 with --fsdp (unsharded; its checkpoints are DCP folders all the same);
- `two`: 2 gloo ranks x batch 4, FSDP2, uninterrupted;
- `two-resumed`: 2 ranks resumed from `two`'s step-2 checkpoint;
- `two-to-one`: 1 process x batch 8 resumed from `two`'s step-2 checkpoint (written by 2 ranks);
- `one-to-two`: 2 ranks resumed from `one`'s step-2 checkpoint (written by 1 process).

The ranks are forked once (`distributed_helpers.fork_ranks`) and also check TR-DPO's sync on sharded weights.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from distributed_helpers import fork_ranks
from safetensors.torch import load_file

from dpokit import checkpoint, distributed, report
from dpokit.config import Config
from dpokit.loop import train

TIMING = {"pairs_per_s", "tokens_per_s", "elapsed_s"}


def run_config(model_dir: str, output: Path, *, batch_size: int, resume: Path | None = None) -> Config:
    return Config(model=model_dir, data="synthetic", max_pairs=15, eval_fraction=0.2, max_steps=4,
                  batch_size=batch_size, eval_batch_size=4, lr=1e-3, seed=0, fsdp=True, save_every=1,
                  save_total_limit=3, log_every=3, output=str(output), progress=False,
                  resume=None if resume is None else str(resume))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("fsdp-checkpoints")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(report, "plot_curves", lambda *args, **kwargs: None)  # seconds per run; not tested here
        train(run_config(str(tiny_model_dir), root / "one", batch_size=8))
        fork_ranks(worker, 2, str(tiny_model_dir), root)
        train(run_config(str(tiny_model_dir), root / "two-to-one", batch_size=8,
                         resume=root / "two" / "checkpoints" / "step-2"))
    return root


def worker(rank: int, world_size: int, model_dir: str, root: Path) -> None:
    train(run_config(model_dir, root / "two", batch_size=4))
    train(run_config(model_dir, root / "two-resumed", batch_size=4, resume=root / "two" / "checkpoints" / "step-2"))
    train(run_config(model_dir, root / "one-to-two", batch_size=4, resume=root / "one" / "checkpoints" / "step-2"))
    sync_sharded_reference(rank, model_dir, root / "sync.pt")


def rows(output: Path) -> list[dict]:
    lines = (output / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines]


def assert_rows_close(got: list[dict], expected: list[dict]) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in expected]
    for one, two in zip(got, expected):
        assert one.keys() == two.keys(), one["step"]
        for key in one:
            assert one[key] == pytest.approx(two[key], abs=1e-5), (one["step"], key)


def assert_weights_close(output: Path, expected_output: Path) -> None:
    got, expected = (load_file(o / "model" / "model.safetensors") for o in (output, expected_output))
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=0, msg=name)


def test_checkpoints_are_dcp_folders_with_one_state_file_per_rank(runs):
    root = runs / "two" / "checkpoints"
    assert [p.name for p in checkpoint.checkpoints(root)] == ["step-4", "step-3", "step-2"]  # newest 3 kept
    assert not list(root.glob(".tmp-*"))
    step = root / "step-2"
    listed = json.loads((step / checkpoint.MARKER).read_text())["files"]
    assert {"sharded/.metadata", "sharded/__0_0.distcp", "sharded/__1_0.distcp", "rank-0.pt", "rank-1.pt",
            "trainer.pt", "metrics.jsonl"} <= listed.keys()
    assert checkpoint.problem(step) is None
    trainer = torch.load(step / "trainer.pt", weights_only=True)
    assert (trainer["step"], trainer["pairs_consumed"], trainer["world_size"]) == (2, 16, 2)
    own = [torch.load(step / f"rank-{r}.pt", weights_only=True) for r in (0, 1)]
    assert [state["meter"]["steps"] for state in own] == [2, 2]          # sums of steps 1-2, not yet logged
    assert own[0]["meter"]["pairs"] == own[1]["meter"]["pairs"] == 8      # 2 steps x 4 pairs on each rank


def test_resumed_on_two_ranks_equals_the_uninterrupted_run(runs):
    expected = rows(runs / "two")
    assert [r["step"] for r in expected] == [0, 3, 4, 4]                  # eval, train (steps 1-3), train, eval
    assert_rows_close(rows(runs / "two-resumed"), expected)               # step 3's row includes steps 1-2
    assert_weights_close(runs / "two-resumed", runs / "two")


def test_two_rank_checkpoint_resumes_on_one_process(runs):
    """Same global batch, same pairs per step: the weights match. The step-3 row differs by design: partial
    metric sums are per rank and are not carried to another number of ranks (it averages step 3 only)."""
    assert_weights_close(runs / "two-to-one", runs / "two")
    got, expected = rows(runs / "two-to-one"), rows(runs / "two")
    assert_rows_close(got[2:], expected[2:])                              # step 4 and the final eval
    assert got[1]["step"] == 3 and got[1]["loss"] != pytest.approx(expected[1]["loss"], abs=1e-7)


def test_one_process_checkpoint_resumes_on_two_ranks(runs):
    assert_weights_close(runs / "one", runs / "two")                      # 1 x batch 8 == 2 x batch 4
    assert_weights_close(runs / "one-to-two", runs / "two")
    assert_rows_close(rows(runs / "one-to-two")[2:], rows(runs / "two")[2:])


def test_broken_sharded_checkpoints_are_skipped(runs, tmp_path):
    root = tmp_path / "checkpoints"
    shutil.copytree(runs / "two" / "checkpoints", root)
    shard = root / "step-4" / "sharded" / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-10])                           # truncated: caught by its size
    metadata = root / "step-3" / "sharded" / ".metadata"
    metadata.write_bytes(b"\0" * metadata.stat().st_size)                 # same size, unreadable
    warnings: list[str] = []
    loaded = checkpoint.load("latest", tmp_path, warnings.append)
    assert loaded.path == root / "step-2" and loaded.sharded
    assert "step-4" in warnings[0] and "__1_0.distcp is truncated" in warnings[0]
    assert "step-3" in warnings[1] and ".metadata is unreadable" in warnings[1]


def test_tr_dpo_sync_updates_the_sharded_reference(runs):
    """ref <- a * policy + (1 - a) * ref (TR-DPO), checked on the gathered float32 weights, with the reference's
    root group (embeddings, norm, LM head) left gathered in bfloat16 by a no-grad forward just before."""
    result = torch.load(runs / "sync.pt", weights_only=True)
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= set(result["gathered_before_sync"])
    for name, after in result["reference_after"].items():
        expected = 0.25 * result["policy"][name] + 0.75 * result["reference_before"][name]
        torch.testing.assert_close(after, expected, atol=1e-6, rtol=0, msg=name)


def sync_sharded_reference(rank: int, model_dir: str, result: Path) -> None:
    from torch.distributed.tensor import DTensor
    from transformers import AutoModelForCausalLM

    from dpokit.batching import make_batch
    from dpokit.logprobs import SequenceScorer
    from dpokit.reference import ModelReference
    from dpokit.data.tokenization import TokenizedPair

    dist = distributed.init("cpu")
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    reference_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        torch.manual_seed(1)
        for param in policy.parameters():
            param.add_(torch.randn_like(param))
    policy_full, reference_full = dict(policy.state_dict()), dict(reference_model.state_dict())
    distributed.shard(SequenceScorer(policy), dist)
    reference = ModelReference(reference_model)
    distributed.shard(reference.scorer, dist, param_dtype=torch.bfloat16)
    batch = make_batch([TokenizedPair([1, 5, 6], [7, 8, 2], [9, 2]), TokenizedPair([1, 4], [7, 2], [9, 10, 2])],
                       layout="concatenated")
    reference.logps(batch)
    gathered = [n for n, p in reference_model.named_parameters() if not isinstance(p, DTensor)]
    reference.sync(policy, 0.25)
    after = distributed.full_state_dict(reference.scorer)                 # keys of the scorer: "model." + name
    if rank == 0:
        torch.save({"policy": policy_full, "reference_before": reference_full, "gathered_before_sync": gathered,
                    "reference_after": {k.removeprefix("model."): v for k, v in after.items()}}, result)
