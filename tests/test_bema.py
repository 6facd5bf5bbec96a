"""BEMA reference updates (Block & Zhang 2025, arXiv 2508.00180): the reference follows the policy's bias-corrected
moving average exactly as the paper's Algorithm 1 (with TRL's schedules) says, survives a checkpoint, and is
refused where it cannot work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import build_tiny_llama
from dpokit.config import Config
from dpokit.errors import DPOError
from dpokit.loop import train
from dpokit.objective import Objective
from dpokit.reference import BemaSchedule, ModelReference


def linear(weight: list[float]) -> torch.nn.Module:
    layer = torch.nn.Linear(len(weight), 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([weight]))
    return layer


def test_the_reference_is_the_bias_corrected_ema_of_the_policy_computed_by_hand():
    schedule = BemaSchedule(update_every=2, ema_power=0.5, bias_power=0.2, lag=10.0, multiplier=1.0)
    start = [1.0, -2.0]
    reference = ModelReference(linear(start), bema=schedule)
    policy = linear(start)
    iterates = {1: [1.5, -2.5], 2: [2.0, -1.0], 3: [0.0, 0.0], 4: [3.0, 1.0]}
    ema = list(start)
    for step, weights in iterates.items():
        with torch.no_grad():
            policy.weight.copy_(torch.tensor([weights]))
        reference.after_step(step, policy)
        if step % 2 == 0:  # beta_t = (rho + gamma t)^-kappa, alpha_t = (rho + gamma t)^-eta
            beta, alpha = (10.0 + step) ** -0.5, (10.0 + step) ** -0.2
            ema = [(1 - beta) * e + beta * w for e, w in zip(ema, weights)]
            expected = [e + alpha * (w - s) for e, w, s in zip(ema, weights, start)]
        else:
            expected = expected if step > 1 else start            # no move between updates
        assert reference.model.weight[0].tolist() == pytest.approx(expected, rel=1e-6), step


def test_a_moved_reference_resumes_from_its_saved_state_to_the_same_weights():
    schedule = BemaSchedule(update_every=1)
    first, policy = ModelReference(linear([0.5, 0.5]), bema=schedule), linear([0.5, 0.5])
    for step, weights in enumerate([[1.0, 0.0], [2.0, -1.0]], start=1):
        with torch.no_grad():
            policy.weight.copy_(torch.tensor([weights]))
        first.after_step(step, policy)
    saved = first.state_dict()
    resumed = ModelReference(linear([9.0, 9.0]), bema=schedule)  # other weights: all of it comes from the state
    resumed.load_state_dict(saved)
    with torch.no_grad():
        policy.weight.copy_(torch.tensor([[4.0, 2.0]]))
    first.after_step(3, policy)
    resumed.after_step(3, policy)
    assert torch.equal(first.model.weight, resumed.model.weight)


@pytest.mark.parametrize("flags,message", [
    ({"ref_update": "bema", "lora_r": 4}, "cannot be combined with LoRA"),
    ({"ref_update": "bema", "ref_model": "tiny"}, "cannot be combined with --ref-model"),
    ({"ref_update": "bema", "precompute_ref": True}, "cannot be combined with --precompute-ref"),
    ({"ref_update": "bema", "ref_sync_every": 2}, "cannot be combined with --ref-sync-every"),
    ({"ref_update": "bema", "loss": "simpo"}, "reference-free"),
    ({"ref_update": "round"}, "dpo online's"),
])
def test_bema_is_refused_where_it_cannot_work(flags, message):
    with pytest.raises(DPOError, match=message):
        Objective.from_config(Config(**flags))


def test_training_with_a_bema_reference_resumes_exactly(tmp_path, tokenizer):
    model_dir = tmp_path / "model"
    build_tiny_llama(model_dir, vocab_size=32, tokenizer=tokenizer)

    def run(output: Path, *extra: str) -> None:
        train(Config.from_args(["--model", str(model_dir), "--max-pairs", "40", "--batch-size", "4", "--max-steps",
                                "6", "--eval-fraction", "0", "--no-progress", "--no-cache", "--report-to", "none",
                                "--ref-update", "bema", "--bema-update-every", "2", "--lr", "1e-3", "--output",
                                str(output), *extra]))

    run(tmp_path / "whole", "--save-every", "3")
    run(tmp_path / "halves", "--resume", str(tmp_path / "whole" / "checkpoints" / "step-3"))
    rows = [[{k: v for k, v in json.loads(line).items() if k not in ("pairs_per_s", "tokens_per_s", "elapsed_s")}
             for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()] for name in ("whole", "halves")]
    assert rows[0] == rows[1] and len(rows[0]) >= 2
    whole, halves = (load_file(tmp_path / name / "model" / "model.safetensors") for name in ("whole", "halves"))
    assert all(torch.equal(whole[k], halves[k]) for k in whole)
