"""Checkpoints written before `TrainerState` existed still resume.

`fixtures/checkpoint_v0/` was written by the trainer of commit 04cf4d9 (the last before the typed state): the
tiny Llama of `conftest.build_tiny_llama(vocab_size=32, seed=0)`
(with the conftest tokenizer saved beside it) on the synthetic task, `--max-pairs 40
--batch-size 4 --max-steps 8 --save-every 4 --log-every 3`. It holds that run's step-4 checkpoint (saved between
two log steps, so it carries metric sums) and, beside it, the run's final weights and metrics rows. Resuming the
checkpoint with today's code must reach the same final weights and rows as that old uninterrupted run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from conftest import build_tiny_llama
from dpokit.config import Config
from dpokit.loop import train

FIXTURE = Path(__file__).parent / "fixtures" / "checkpoint_v0"
TIMING = {"pairs_per_s", "tokens_per_s", "elapsed_s"}


def rows(path: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in path.read_text().splitlines() if line.strip()]


def test_a_checkpoint_from_before_the_typed_trainer_state_resumes_to_the_same_run(tmp_path, tokenizer):
    model_dir = tmp_path / "model"
    build_tiny_llama(model_dir, vocab_size=32, seed=0, tokenizer=tokenizer)
    output = tmp_path / "run"
    shutil.copytree(FIXTURE / "step-4", output / "checkpoints" / "step-4")
    train(Config.from_args(["--model", str(model_dir), "--max-pairs", "40", "--batch-size", "4", "--max-steps", "8",
                            "--save-every", "4", "--log-every", "3", "--eval-fraction", "0", "--no-progress",
                            "--no-cache", "--report-to", "none", "--output", str(output), "--resume", "latest"]))
    final = load_file(next((output / "model").glob("*.safetensors")))
    expected = load_file(FIXTURE / "final_model.safetensors")
    assert final.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(final[name], tensor, rtol=0, atol=1e-6, msg=name)
    got, want = rows(output / "metrics.jsonl"), rows(FIXTURE / "final_metrics.jsonl")
    assert [r["step"] for r in got] == [r["step"] for r in want] == [3, 6, 8]
    for g, w in zip(got, want):
        assert g.keys() >= w.keys()  # rows may carry metrics added since
        for key in w:
            assert abs(g[key] - w[key]) <= 1e-6 * max(1.0, abs(w[key])), (g["step"], key)
