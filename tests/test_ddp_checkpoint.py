"""DDP checkpoints carry each rank's own generator states and metric sums, so a resumed run logs the same rows.

The same 4-step synthetic run as test_distributed_checkpoint.py (a checkpoint every step, metrics every 3 steps,
so the step-2 checkpoint holds partial sums), on 2 gloo ranks with DDP, with LoRA dropout on (the one place
training draws from the generators, restored per rank): uninterrupted, then resumed from its step-2 checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from distributed_helpers import fork_ranks
from safetensors.torch import load_file

from dpokit import report
from dpokit.config import Config
from dpokit.loop import train

TIMING = {"pairs_per_s", "tokens_per_s", "elapsed_s"}


def run_config(model_dir: str, output: Path, resume: Path | None = None) -> Config:
    return Config(model=model_dir, data="synthetic", max_pairs=15, eval_fraction=0.2, max_steps=4, batch_size=4,
                  eval_batch_size=4, lr=1e-3, seed=0, save_every=1, log_every=3, lora_r=4, lora_dropout=0.3,
                  output=str(output), progress=False, resume=None if resume is None else str(resume))


def worker(rank: int, world_size: int, model_dir: str, root: Path) -> None:
    train(run_config(model_dir, root / "two"))
    train(run_config(model_dir, root / "two-resumed", resume=root / "two" / "checkpoints" / "step-2"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("ddp-checkpoints")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(report, "plot_curves", lambda *args, **kwargs: None)
        fork_ranks(worker, 2, str(tiny_model_dir), root)
    return root


def rows(output: Path) -> list[dict]:
    lines = (output / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines]


def test_a_ddp_checkpoint_holds_every_ranks_state(runs):
    trainer = torch.load(runs / "two" / "checkpoints" / "step-2" / "trainer.pt", weights_only=True)
    assert trainer["world_size"] == 2 and len(trainer["ranks"]) == 2
    assert [state["meter"]["steps"] for state in trainer["ranks"]] == [2, 2]   # steps 1-2, not yet logged
    assert [state["meter"]["pairs"] for state in trainer["ranks"]] == [8, 8]   # 2 steps x 4 pairs on each rank
    # each rank's own pairs: their sums differ (rank 0's alone for both, the old way, skewed the step-3 row)
    assert not torch.equal(trainer["ranks"][0]["meter"]["sums"], trainer["ranks"][1]["meter"]["sums"])


def test_resumed_ddp_run_equals_the_uninterrupted_run(runs):
    expected, got = rows(runs / "two"), rows(runs / "two-resumed")
    assert [r["step"] for r in got] == [r["step"] for r in expected] == [0, 3, 4, 4]
    for one, two in zip(got, expected):
        assert one.keys() == two.keys()
        for key in one:                                  # step 3's row includes both ranks' steps 1-2
            assert one[key] == pytest.approx(two[key], abs=1e-6), (one["step"], key)
    resumed, uninterrupted = (load_file(runs / o / "model" / "adapter_model.safetensors")
                              for o in ("two-resumed", "two"))
    for name in uninterrupted:
        torch.testing.assert_close(resumed[name], uninterrupted[name], atol=1e-6, rtol=0, msg=name)
