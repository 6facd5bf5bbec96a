"""Exact resume, end to end: a run killed with SIGKILL (or stopped with SIGTERM) at a random step and resumed
ends with the same float32 weights, bit for bit, and the same metrics.jsonl rows as the run left alone; a
streak of non-finite steps stops the run after saving a checkpoint; dataloader workers change nothing.

The uninterrupted run is trained in this process; the interrupted ones are real `python -m dpokit` processes.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import build_tiny_llama
from dpokit import checkpoint, distributed
from dpokit.config import Config
from dpokit.errors import TrainingFailure
from dpokit.loop import train

TIMING = {"pairs_per_s", "tokens_per_s", "elapsed_s"}
STEPS = 12


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    """A hidden-32 Llama over the synthetic task's 32-token vocabulary: milliseconds per step."""
    path = tmp_path_factory.mktemp("synthetic-llama")
    build_tiny_llama(path, vocab_size=32, tokenizer=tokenizer)
    return path


def args(model_dir: Path, output: Path, *extra: str) -> list[str]:
    return ["--model", str(model_dir), "--max-pairs", "40", "--batch-size", "4", "--max-steps", str(STEPS),
            "--eval-fraction", "0", "--no-progress", "--no-cache", "--report-to", "none", "--output", str(output),
            *extra]


@pytest.fixture(scope="module")
def uninterrupted(model_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp("uninterrupted")
    train(Config.from_args(args(model_dir, output)))
    return output


def final_weights(output: Path) -> dict[str, torch.Tensor]:
    return load_file(next((output / "model").glob("*.safetensors")))


def metric_rows(output: Path) -> list[dict]:
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def assert_same_run(output: Path, reference: Path) -> None:
    expected, got = final_weights(reference), final_weights(output)
    assert expected.keys() == got.keys()
    different = [name for name in expected if not torch.equal(expected[name], got[name])]
    assert not different, f"weights differ from the uninterrupted run: {different}"
    assert metric_rows(output) == metric_rows(reference)


def start(model_dir: Path, output: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dpokit", "train", *args(model_dir, output, *extra)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_step(process: subprocess.Popen, output: Path, step: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        metrics = output / "metrics.jsonl"
        if metrics.is_file() and any(json.loads(line).get("step", 0) >= step
                                     for line in metrics.read_text().splitlines() if line.endswith("}")):
            return
        time.sleep(0.02)
    raise AssertionError(f"the run never reached step {step}: {process.communicate()[1][-2000:]}")


def test_stopped_by_sigterm_then_killed_by_sigkill_at_a_random_step_then_resumed_is_the_same_run(
        model_dir, uninterrupted, tmp_path):
    # 1. SIGTERM, with no --save-every: the signal alone makes a checkpoint, at the end of the step it came in.
    process = start(model_dir, tmp_path)
    wait_for_step(process, tmp_path, 2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "Traceback" not in stderr and "stopped by SIGTERM" in stderr and "--resume" in stderr
    saved = checkpoint.complete_checkpoints(tmp_path / "checkpoints")
    assert len(saved) == 1 and 2 <= checkpoint.step_of(saved[0]) < STEPS - 4, stderr[-2000:]

    # 2. Resumed, then SIGKILLed at a random later step (possibly while writing a checkpoint).
    kill_at = random.randint(checkpoint.step_of(saved[0]) + 1, STEPS - 3)
    process = start(model_dir, tmp_path, "--save-every", "1", "--resume")
    wait_for_step(process, tmp_path, kill_at)
    process.kill()
    process.communicate()
    assert not (tmp_path / "model").exists(), "the run finished before it could be killed"

    # 3. Resumed again (in this process), to the end: the same weights and rows as never stopping.
    train(Config.from_args(args(model_dir, tmp_path, "--save-every", "1", "--resume")))
    assert_same_run(tmp_path, uninterrupted)


def test_non_finite_steps_are_skipped_counted_and_stop_the_run_after_a_checkpoint(model_dir, tmp_path,
                                                                                  monkeypatch):
    real_clip = distributed.clip_grad_norm
    calls = []

    def clip_then_fail(parameters, max_norm):  # steps 3 and later see a NaN gradient norm
        calls.append(1)
        norm = real_clip(parameters, max_norm)
        return norm * float("nan") if len(calls) >= 3 else norm

    monkeypatch.setattr(distributed, "clip_grad_norm", clip_then_fail)
    with pytest.raises(TrainingFailure, match=r"step 4: 2 consecutive.*step-4.*--lr.*float32"):
        train(Config.from_args(args(model_dir, tmp_path, "--save-every", "2", "--max-bad-steps", "2")))
    rows = {row["step"]: row for row in metric_rows(tmp_path)}
    assert [rows[s]["bad_steps"] for s in (1, 2, 3, 4)] == [0, 0, 1, 1]
    before, stopped = (load_file(tmp_path / "checkpoints" / f"step-{s}" / checkpoint.MODEL) for s in (2, 4))
    assert all(torch.equal(before[name], stopped[name]) for name in before)  # skipped steps left weights alone


def test_the_number_of_dataloader_workers_does_not_change_the_weights(model_dir, uninterrupted, tmp_path):
    train(Config.from_args(args(model_dir, tmp_path, "--num-workers", "2")))
    assert_same_run(tmp_path, uninterrupted)


def test_resume_with_tr_dpo_continues_from_the_synced_reference(model_dir, tmp_path):
    """TR-DPO moves the reference during training; a resumed run must start from the moved one, not the initial."""
    tr_dpo = ("--ref-sync-every", "2", "--ref-sync-alpha", "0.5", "--lr", "1e-2", "--save-every", "4")
    whole = tmp_path / "whole"
    train(Config.from_args(args(model_dir, whole, *tr_dpo)))
    resumed = tmp_path / "resumed"
    train(Config.from_args(args(model_dir, resumed, *tr_dpo, "--resume", str(whole / "checkpoints" / "step-4"))))
    for name, tensor in final_weights(whole).items():
        assert torch.equal(tensor, final_weights(resumed)[name]), name
    assert metric_rows(whole)[4:] == metric_rows(resumed)[4:]
