"""checkpoint.py on its own: atomic layout, rotation, fallback past broken checkpoints, failed writes, RNG
round trips, `--resume` path forms and signal handling. No training here (see test_resume.py for that)."""

from __future__ import annotations

import errno
import random
import signal

import numpy as np
import pytest
import torch

from dpokit import checkpoint
from dpokit.errors import DPOError, TrainingFailure


def trained_parts(seed: int = 0):
    """A model with a frozen part (like LoRA's base weights), one AdamW step taken, and its parts to save."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    model[0].weight.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(torch.randn(5, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def save_step(root, step, seed=0, **kwargs):
    model, optimizer = trained_parts(seed)
    return checkpoint.save(root, step, weights=checkpoint.trainable_state(model), optimizer=optimizer.state_dict(),
                           trainer={"step": step}, **kwargs)


def test_round_trip_saves_only_trainable_parameters_and_restores_them_exactly(tmp_path):
    model, optimizer = trained_parts()
    path = checkpoint.save(tmp_path, 3, weights=checkpoint.trainable_state(model), optimizer=optimizer.state_dict(),
                           trainer={"step": 3, "sums": torch.tensor([1.5, 2.5], dtype=torch.float64)})
    assert path == tmp_path / "step-3" and (path / checkpoint.MARKER).is_file()
    assert not list(tmp_path.glob(".tmp-*"))
    loaded = checkpoint.load(str(path), tmp_path, warn=pytest.fail)
    assert set(loaded.weights) == {"0.bias", "1.weight", "1.bias"}  # the frozen 0.weight is not saved

    fresh, fresh_optimizer = trained_parts(seed=1)
    checkpoint.restore_trainable(fresh, loaded.weights, path)
    fresh_optimizer.load_state_dict(loaded.optimizer)
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert torch.equal(param, dict(fresh.named_parameters())[name])
    saved_state = optimizer.state_dict()["state"]
    for index, state in fresh_optimizer.state_dict()["state"].items():
        assert torch.equal(state["exp_avg_sq"], saved_state[index]["exp_avg_sq"])
    assert torch.equal(loaded.trainer["sums"], torch.tensor([1.5, 2.5], dtype=torch.float64))


def test_save_total_limit_keeps_the_newest_complete_checkpoints(tmp_path):
    for step in (2, 4, 6, 8):
        save_step(tmp_path, step, keep=2)
    assert [p.name for p in checkpoint.checkpoints(tmp_path)] == ["step-8", "step-6"]


@pytest.mark.parametrize("damage", ["truncate", "missing", "no_marker", "garbage"])
def test_a_broken_newest_checkpoint_falls_back_to_the_previous_one_with_a_warning(tmp_path, damage):
    save_step(tmp_path / "checkpoints", 2, seed=2)
    newest = save_step(tmp_path / "checkpoints", 4, seed=4)
    model_file = newest / checkpoint.MODEL
    if damage == "truncate":
        model_file.write_bytes(model_file.read_bytes()[:50])
    elif damage == "missing":
        (newest / checkpoint.OPTIMIZER).unlink()
    elif damage == "no_marker":  # what a save killed before its rename would look like, had it been renamed
        (newest / checkpoint.MARKER).unlink()
    else:  # same size, unreadable content: only reading it shows the problem
        model_file.write_bytes(b"\xff" * model_file.stat().st_size)
    warnings: list[str] = []
    loaded = checkpoint.load("latest", tmp_path, warn=warnings.append)
    assert loaded.path.name == "step-2"
    assert len(warnings) == 1 and str(newest) in warnings[0] and str(loaded.path) in warnings[0]
    expected = dict(trained_parts(seed=2)[0].named_parameters())["1.weight"]
    assert torch.equal(loaded.weights["1.weight"], expected)


def test_no_usable_checkpoint_is_one_error_and_no_checkpoint_at_all_starts_fresh(tmp_path):
    assert checkpoint.load("latest", tmp_path, warn=pytest.fail) is None
    only = save_step(tmp_path / "checkpoints", 1)
    (only / checkpoint.TRAINER).write_bytes(b"")
    with pytest.raises(DPOError, match="no usable checkpoint.*trainer.pt"):
        checkpoint.load("latest", tmp_path, warn=pytest.fail)
    with pytest.raises(DPOError, match="no such folder"):
        checkpoint.load(str(tmp_path / "nowhere"), tmp_path, warn=pytest.fail)


def test_resume_accepts_a_run_folder_a_checkpoints_folder_or_one_checkpoint(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    save_step(root, 1)
    save_step(root, 2)
    assert checkpoint.load(str(tmp_path / "run"), tmp_path, warn=pytest.fail).path.name == "step-2"
    assert checkpoint.load(str(root), tmp_path, warn=pytest.fail).path.name == "step-2"
    assert checkpoint.load(str(root / "step-1"), tmp_path, warn=pytest.fail).path.name == "step-1"


def test_a_failed_write_is_one_error_and_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    previous = save_step(tmp_path, 1)

    def disk_full(obj, path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "_torch_save", disk_full)
    with pytest.raises(TrainingFailure, match=f"No space left on device.*{previous} is intact"):
        save_step(tmp_path, 2)
    assert [p.name for p in tmp_path.iterdir()] == ["step-1"]  # no step-2, no temporary folder
    assert checkpoint.problem(previous) is None


def test_restoring_into_a_different_model_is_a_clear_error(tmp_path):
    path = save_step(tmp_path, 1)
    other = torch.nn.Linear(4, 2)
    with pytest.raises(DPOError, match="does not match this model"):
        checkpoint.restore_trainable(other, checkpoint.read(path).weights, path)


def test_rng_states_survive_a_save_and_load(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    path = checkpoint.save(tmp_path, 1, weights={}, optimizer={}, trainer={"rng": checkpoint.capture_rng()})
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    checkpoint.restore_rng(checkpoint.read(path).trainer["rng"])
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert expected[:2] == again[:2] and torch.equal(expected[2], again[2])


def test_first_signal_requests_a_stop_and_the_second_exits_at_once():
    exits: list[int] = []
    stop = checkpoint.StopSignals(exit=exits.append)
    with stop:
        assert signal.getsignal(signal.SIGTERM) == stop.handle
        stop.handle(signal.SIGTERM)
        assert stop.received == signal.SIGTERM and exits == []
        stop.handle(signal.SIGINT)
        assert exits == [128 + signal.SIGINT]
    assert signal.getsignal(signal.SIGTERM) != stop.handle  # the previous handlers are back
