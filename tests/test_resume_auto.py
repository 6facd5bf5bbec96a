"""`--resume auto`: one command line for the first start and every restart. It resumes from the newest complete
checkpoint in --output when there is one and starts fresh when there is none; a run killed with SIGKILL and
started again with the very same command ends with the weights and rows of the run left alone."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import build_tiny_llama
from dpokit import checkpoint
from dpokit.config import Config
from dpokit.errors import DPOError
from dpokit.loop import train
from dpokit.report import read_metrics
from dpokit.run_folder import check_fresh_output

TIMING = {"pairs_per_s", "tokens_per_s", "elapsed_s"}


def save_step(root, step):
    model = torch.nn.Linear(2, 2)
    return checkpoint.save(root, step, weights=checkpoint.trainable_state(model), optimizer={}, trainer={"step": step})


def test_auto_resumes_the_newest_complete_checkpoint_or_starts_fresh(tmp_path):
    assert checkpoint.load("auto", tmp_path, warn=pytest.fail) is None     # nothing yet: a fresh start
    save_step(tmp_path / "checkpoints", 2)
    newest = save_step(tmp_path / "checkpoints", 4)
    (newest / checkpoint.MARKER).unlink()                                  # step-4 never completed
    warnings: list[str] = []
    assert checkpoint.load("auto", tmp_path, warn=warnings.append).path.name == "step-2"
    assert len(warnings) == 1 and "step-4" in warnings[0]


def test_auto_passes_the_output_check_like_latest(tmp_path):
    check_fresh_output(tmp_path / "first-start", "auto", False)
    (tmp_path / "run" / "checkpoints" / "step-3").mkdir(parents=True)
    check_fresh_output(tmp_path / "run", "auto", False)
    (tmp_path / "finished" / "model").mkdir(parents=True)
    (tmp_path / "finished" / "model" / "model.safetensors").write_bytes(b"x")
    with pytest.raises(DPOError, match="no checkpoint to continue from"):   # never a silent overwrite
        check_fresh_output(tmp_path / "finished", "auto", False)


def test_auto_needs_save_every():
    with pytest.raises(DPOError, match="--resume auto needs --save-every"):
        Config(resume="auto")
    assert Config.from_args(["--resume", "auto", "--save-every", "5"]).resume == "auto"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("synthetic-llama")
    build_tiny_llama(path, vocab_size=32, tokenizer=tokenizer)
    return path


def command(model_dir, output) -> list[str]:
    return ["--model", str(model_dir), "--max-pairs", "40", "--batch-size", "4", "--max-steps", "10",
            "--eval-fraction", "0", "--no-progress", "--no-cache", "--output", str(output), "--save-every", "2",
            "--save-total-limit", "2", "--resume", "auto"]


def test_the_same_command_after_sigkill_ends_as_the_run_left_alone(model_dir, tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    train(Config.from_args(command(model_dir, whole)))                      # first start: nothing to resume
    process = subprocess.Popen([sys.executable, "-m", "dpokit", "train", *command(model_dir, killed)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while not checkpoint.complete_checkpoints(killed / "checkpoints") and process.poll() is None:
            time.sleep(0.02)
    finally:
        process.kill()
        process.communicate()
    assert not (killed / "model").exists(), "the run finished before it could be killed"
    train(Config.from_args(command(model_dir, killed)))                     # the restart: the same command
    expected, got = (load_file(next((o / "model").glob("*.safetensors"))) for o in (whole, killed))
    assert all(torch.equal(expected[name], got[name]) for name in expected)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING} for r in rows]  # noqa: E731
    assert strip(read_metrics(killed / "metrics.jsonl")) == strip(read_metrics(whole / "metrics.jsonl"))
