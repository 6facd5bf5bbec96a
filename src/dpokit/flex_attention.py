"""A `blocks` row's attention as one FlexAttention call per layer, whatever the number of blocks.

Block-by-block sdpa (`block_attention`) launches two kernels per block per layer: on a GPU a micro-batch of many
small blocks becomes a Python loop of small launches. FlexAttention computes the whole row in one fused kernel
that skips every 128 x 128 tile of the score matrix the mask rules out entirely, so the work still follows the
blocks' squares, not the row's. The mask is a `BlockMask` built once per forward from the `BlockLayout` (two
per-token vectors and a predicate) and shared by every layer.

On CUDA the kernel is `torch.compile`d (the eager one materialises the full score matrix); on CPU it runs eager,
forward only: torch has no FlexAttention backward on CPU, so training there stays with block-by-block sdpa.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from .batching import BlockLayout


def block_mask(blocks: BlockLayout, device: torch.device) -> BlockMask:
    """The `BlockMask` of a `blocks` row: query q sees key k when both are in the same block, k is not after q,
    and k is in the prompt or in q's own completion (the attention of scoring each prompt+completion alone)."""
    lengths, block, part = [], [], []
    for b, (prompt, completions) in enumerate(zip(blocks.prompt_lengths, blocks.completion_lengths)):
        for k, length in enumerate([prompt, *completions]):
            lengths.append(length)
            block.append(b)
            part.append(k)                                   # 0 = prompt, k = k-th completion
    counts = torch.tensor(lengths, device=device)
    token_block = torch.tensor(block, device=device).repeat_interleave(counts)   # [seq]
    token_part = torch.tensor(part, device=device).repeat_interleave(counts)     # [seq]
    seq = int(counts.sum())

    def visible(b: Any, h: Any, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        same_block = token_block[q] == token_block[k]
        return same_block & (k <= q) & ((token_part[k] == 0) | (token_part[k] == token_part[q]))

    # Compiled on CUDA so that the [seq, seq] predicate is evaluated tile by tile, never materialised.
    return create_block_mask(visible, None, None, seq, seq, device=device, _compile=device.type == "cuda")


def flex_block_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: BlockMask,
                         scaling: float | None = None) -> torch.Tensor:
    """`query` `[1, heads, seq, dim]`, `key`/`value` `[1, kv_heads, seq, dim]` -> `[1, seq, heads, dim]` (the
    layout transformers' attention functions return), in one kernel call."""
    groups = query.shape[1] // key.shape[1]
    # Grouped-query attention inside the kernel, except for a group size that is not a power of two (Qwen2.5's
    # 14 query heads over 2): the short-query (decoding) kernel flex picks for rows under 128 tokens refuses those.
    if groups & (groups - 1):
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    output = _kernel(query.device.type)(query, key, value, block_mask=mask, scale=scaling,
                                        enable_gqa=key.shape[1] != query.shape[1])
    return output.transpose(1, 2).contiguous()


def _kernel(device_type: str) -> Any:
    """The flex attention function for a device: compiled on CUDA (unless a compiled model is being traced,
    which compiles it with the rest), eager elsewhere."""
    if device_type != "cuda" or torch.compiler.is_compiling():
        return flex_attention
    return _compiled()


@functools.cache
def _compiled() -> Any:
    """Compiled once per process; dynamo's automatic dynamic shapes serve every row length from the second on."""
    return torch.compile(flex_attention)
