"""Elastic restarts: under `torchrun --max-restarts 1`, a rank SIGKILLed mid-run takes the group down, torchrun
starts it again with the same command, and `--resume auto` continues from the newest complete checkpoint: the
run ends with the weights and metric rows of the run left alone (2 gloo processes on CPU, DDP and FSDP2), with
torchrun's defaults (no TORCH_DISABLE_SHARE_RDZV_TCP_STORE: `distributed.init` keys the restarted group apart).

The kill comes from a test-only `sitecustomize` on PYTHONPATH (tests/fixtures/kill_rank): rank 1 kills itself
after its 5th optimizer step, once. The run left alone is the same training on 2 ranks forked from this process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distributed_helpers import fork_ranks
from safetensors.torch import load_file

from conftest import build_tiny_llama
from dpokit import report
from dpokit.config import Config
from dpokit.loop import train

TIMING = {"pairs_per_s", "tokens_per_s", "elapsed_s"}
SHIM = Path(__file__).parent / "fixtures" / "kill_rank"


def args(model_dir: Path, output: Path, layout: list[str]) -> list[str]:
    return ["--model", str(model_dir), "--max-pairs", "40", "--batch-size", "2", "--max-steps", "8",
            "--eval-fraction", "0", "--no-progress", "--no-cache", "--report-to", "none", "--output", str(output),
            "--save-every", "2", "--resume", "auto", *layout]


def left_alone(rank: int, world_size: int, model_dir: Path, output: Path, layout: list[str]) -> None:
    train(Config.from_args(args(model_dir, output, layout)))


def rows(output: Path) -> list[dict]:
    lines = (output / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines]


@pytest.mark.parametrize("layout", [[], ["--fsdp"]], ids=["ddp", "fsdp2"])
def test_a_rank_killed_under_torchrun_restarts_and_ends_as_the_run_left_alone(tmp_path, tokenizer, layout):
    model_dir = tmp_path / "model"
    build_tiny_llama(model_dir, vocab_size=32, tokenizer=tokenizer)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(report, "plot_curves", lambda *a, **k: None)
        fork_ranks(left_alone, 2, model_dir, tmp_path / "alone", layout)

    marker = tmp_path / "killed-once"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SHIM), os.environ.get("PYTHONPATH", "")]),
           "DPOKIT_KILL_AT": f"5,1,{marker}", "OMP_NUM_THREADS": "1"}
    env.pop("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", None)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "--max-restarts", "1", "-m", "dpokit", "train",
                          *args(model_dir, tmp_path / "elastic", layout)],
                         capture_output=True, text=True, env=env, timeout=280)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert marker.exists(), "rank 1 was never killed"
    assert "resuming from" in run.stdout + run.stderr

    expected = load_file(tmp_path / "alone" / "model" / "model.safetensors")
    got = load_file(tmp_path / "elastic" / "model" / "model.safetensors")
    assert all(torch.equal(got[name], expected[name]) for name in expected)
    assert rows(tmp_path / "elastic") == rows(tmp_path / "alone")
