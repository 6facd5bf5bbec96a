"""What this machine can run: the device asked for, bfloat16 on it, and the attention kernel to use.

Each refusal is one `DPOError` line saying what to pass instead; the run stops rather than swap in something
the flags did not ask for. `choose_attention` is where "auto" becomes a kernel, so the choice is made once, by
device and by what is installed, and an explicit `--attn-implementation` always wins.
"""

from __future__ import annotations

import importlib
import importlib.util

import torch

from .errors import DPOError

FLASH_MODULES = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}


def check_device(device: str, dtype: str) -> None:
    """Refuse `--device cuda[:N]` where torch sees no such GPU, and `--dtype bfloat16` on a GPU without it."""
    wants_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if not wants_cuda:
        return
    if not torch.cuda.is_available():
        raise DPOError(f"--device {device}: this torch ({torch.__version__}) sees no CUDA GPU; "
                       "pass --device cpu, or auto to use a GPU when there is one")
    index = torch.device(device).index if device.startswith("cuda") else None
    if index is not None and index >= torch.cuda.device_count():
        raise DPOError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    if dtype == "bfloat16" and not torch.cuda.is_bf16_supported(including_emulation=False):
        capability = ".".join(map(str, torch.cuda.get_device_capability(index)))
        raise DPOError(f"--dtype bfloat16: {torch.cuda.get_device_name(index)} (compute capability {capability}) "
                       "has no bfloat16 arithmetic; pass --dtype float32")


def choose_attention(device: torch.device | str, requested: str | None = None) -> str:
    """The attention implementation to load models with, for `--attn-implementation requested`.

    "auto" (or None): "flex_attention" on CUDA when torch has FlexAttention and triton is installed to compile
    it (one kernel per layer for a `blocks` row, however many blocks it holds), else "sdpa" (block by block,
    the fastest on CPU, where torch has no FlexAttention backward). flash-attn is never chosen on its own: its
    kernels take padding or whole packed sequences, not a prompt shared by several completions.
    """
    device = torch.device(device)
    if requested in (None, "auto"):
        compiles = device.type == "cuda" and importlib.util.find_spec("triton") is not None
        return "flex_attention" if compiles and _has_flex() else "sdpa"
    if requested == "flex_attention" and device.type == "cpu":
        raise DPOError("--attn-implementation flex_attention: torch has no FlexAttention backward on CPU; "
                       "use sdpa (the automatic choice there)")
    if requested in FLASH_MODULES:
        try:
            importlib.import_module(FLASH_MODULES[requested])
        except Exception as error:  # a build for another torch fails with an undefined symbol, not ImportError
            first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise DPOError(f"--attn-implementation {requested}: {FLASH_MODULES[requested]} does not load with "
                           f"torch {torch.__version__} ({first_line}); install a build for this torch or drop "
                           "the flag") from None
    return requested


def _has_flex() -> bool:
    return importlib.util.find_spec("torch.nn.attention.flex_attention") is not None
