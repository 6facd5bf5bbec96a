"""The starting weights kept for the end-of-run report of how far the weights moved (`placement.SpilledWeights`):
in a temporary file, not in the process's memory; read back as they were; a disk that cannot take them leaves
the movement out of the report with a warning, not the run."""

from __future__ import annotations

import errno
import sys

import pytest
import torch

from dpokit import placement
from dpokit.loop import parameter_movement
from dpokit.placement import SpilledWeights, snapshot_parameters


def resident_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_the_start_copy_is_read_back_as_it_was_and_not_held_in_memory():
    big = torch.randn(2048, 4096)                         # 32 MiB
    small = torch.randn(3, 5).bfloat16()
    want_big, want_small = big.clone(), small.float()
    before = resident_mib()
    start = SpilledWeights([("big", big), ("small", small)])
    assert resident_mib() - before < 8                    # a copy in memory would be 32 MiB more

    big.add_(1.0)                                         # training moves the weights
    small.zero_()
    assert list(start) == ["big", "small"] and len(start) == 2
    assert torch.equal(start["big"], want_big)
    assert start["small"].dtype == torch.float32 and torch.equal(start["small"], want_small)


def test_movement_from_the_spilled_start_is_the_relative_change_per_group():
    model = torch.nn.ModuleDict({"layers": torch.nn.ModuleList([torch.nn.Linear(4, 4, bias=False)]),
                                 "norm": torch.nn.LayerNorm(4, bias=False)})
    start = snapshot_parameters(model)
    assert start is not None
    with torch.no_grad():
        model["layers"][0].weight.mul_(1.5)               # ||w - w0|| = 0.5 ||w0||
        model["norm"].weight.add_(1.0)                    # w0 = ones(4): ||w - w0|| = 2, ||w0|| = 2
    moved = parameter_movement(dict(model.named_parameters()), start)
    assert moved == pytest.approx({"layers.0": 0.5, "norm": 1.0})


def test_a_disk_that_cannot_take_the_start_copy_leaves_the_movement_out(monkeypatch, capsys):
    def full_disk(**_):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(placement.tempfile, "TemporaryFile", full_disk)
    assert snapshot_parameters(torch.nn.Linear(4, 4)) is None
    assert capsys.readouterr().err.strip() == (
        "warning: could not keep the starting weights in a temporary file ([Errno 28] No space left on device); "
        "the end-of-run report leaves out how far the weights moved")
