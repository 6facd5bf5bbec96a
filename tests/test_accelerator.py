"""The attention kernel chosen by device and by what is installed, and the one-line refusals of a device or dtype
the machine cannot run."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from dpokit import accelerator
from dpokit.errors import DPOError


@pytest.fixture
def triton(monkeypatch):
    """A machine where triton is installed (whatever this one has)."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "triton" else find_spec(name, *a))


@pytest.mark.parametrize("device,requested,want", [
    ("cpu", None, "sdpa"),
    ("cpu", "auto", "sdpa"),
    ("cuda", "auto", "flex_attention"),
    ("cuda:1", None, "flex_attention"),
    ("cuda", "sdpa", "sdpa"),                 # an explicit --attn-implementation wins
    ("cuda", "eager", "eager"),
    ("cpu", "eager", "eager"),
])
def test_auto_picks_flex_on_cuda_and_sdpa_on_cpu(triton, device, requested, want):
    assert accelerator.choose_attention(torch.device(device), requested) == want


def test_cuda_without_triton_stays_with_sdpa(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else find_spec(name, *a))
    assert accelerator.choose_attention("cuda", "auto") == "sdpa"


def test_flex_on_cpu_is_refused_in_one_line():
    with pytest.raises(DPOError, match="no FlexAttention backward on CPU") as error:
        accelerator.choose_attention("cpu", "flex_attention")
    assert "\n" not in str(error.value)


def test_a_flash_attn_build_for_another_torch_is_refused_in_one_line(monkeypatch):
    def broken(name: str):
        raise ImportError(f"{name}_2_cuda.so: undefined symbol: _ZN3c104cuda9SetDeviceEi\nmore")

    monkeypatch.setattr(accelerator.importlib, "import_module", broken)
    with pytest.raises(DPOError, match="flash_attn does not load with torch .*undefined symbol") as error:
        accelerator.choose_attention("cuda", "flash_attention_2")
    assert "\n" not in str(error.value)


def test_cuda_asked_for_without_cuda_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DPOError, match="--device cuda: .* sees no CUDA GPU; pass --device cpu"):
        accelerator.check_device("cuda", "float32")
    accelerator.check_device("auto", "bfloat16")            # auto means the CPU here
    accelerator.check_device("cpu", "bfloat16")


@pytest.fixture
def old_gpu(monkeypatch):
    """One visible GPU of compute capability 7.0 (no bfloat16 arithmetic)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "Tesla V100-SXM2-16GB")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (7, 0))


@pytest.mark.parametrize("device", ["cuda", "auto", "cuda:0"])
def test_bfloat16_on_a_gpu_without_it_is_refused(old_gpu, device):
    with pytest.raises(DPOError, match=r"V100.*\(compute capability 7.0\) has no bfloat16 .*; pass --dtype float32"):
        accelerator.check_device(device, "bfloat16")
    accelerator.check_device(device, "float32")


def test_a_gpu_index_past_the_visible_ones_is_refused(old_gpu):
    with pytest.raises(DPOError, match="--device cuda:3: only 1 CUDA device"):
        accelerator.check_device("cuda:3", "float32")
