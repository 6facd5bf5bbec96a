"""Attention for the `blocks` layout: one row of blocks end to end, each block attending within itself only.

A dense mask over a packed row makes attention cost (row length)^2 and forces rows padded to a common length;
running scaled-dot-product attention block by block, each with its own small mask, costs the sum of the
blocks' squares and needs no padding at all. transformers passes a model's extra forward keyword arguments down
to its attention function, so the blocks travel as `dpokit_blocks=BlockLayout`; `install` wraps transformers'
"sdpa" and "flex_attention" entries so that a call carrying them takes this path, and every other call goes to
transformers' own function unchanged (generation, other libraries, batches in other layouts).

The model's attention implementation picks the kernel: "sdpa" runs block by block (two calls per block per
layer, the fastest on CPU), "flex_attention" the whole row in one call per layer (`flex_attention`, for GPUs).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from . import flex_attention
from .batching import BlockLayout

KERNELS = ("sdpa", "flex_attention")  # the attention implementations that take a `blocks` row

_original: dict[str, Any] = {}
_block_calls = 0  # attention calls that took the blocks (a counter here: FSDP2 may hand attention a copy of them)


def install() -> None:
    """Route sdpa and flex_attention calls that carry `dpokit_blocks` through this module (idempotent)."""
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if not _original:
        _original.update((name, ALL_ATTENTION_FUNCTIONS[name]) for name in KERNELS)
        AttentionInterface.register("sdpa", _sdpa_or_blocks)
        AttentionInterface.register("flex_attention", _flex_or_blocks)


def _sdpa_or_blocks(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                    dpokit_blocks: BlockLayout | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    if dpokit_blocks is None:
        return _original["sdpa"](module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                 **kwargs)
    return block_attention(query, key, value, dpokit_blocks, dropout=dropout, scaling=scaling), None


def _flex_or_blocks(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: Any, scaling: float | None = None, dpokit_blocks: BlockLayout | None = None,
                    **kwargs: Any) -> tuple[torch.Tensor, None]:
    """A `blocks` row arrives with its `BlockMask` as `attention_mask` (built once per forward by
    `decoder_hidden_states`; transformers passes a 4-D mask through untouched)."""
    if dpokit_blocks is None:
        return _original["flex_attention"](module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    if kwargs.get("dropout", 0.0) > 0:
        raise ValueError("FlexAttention has no attention dropout; set the model's attention_dropout to 0")
    _count_call()
    return flex_attention.flex_block_attention(query, key, value, attention_mask, scaling=scaling), None


def block_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, blocks: BlockLayout,
                    dropout: float = 0.0, scaling: float | None = None) -> torch.Tensor:
    """`query` `[1, heads, seq, dim]`, `key`/`value` `[1, kv_heads, seq, dim]` -> `[1, seq, heads, dim]` (the
    layout transformers' attention functions return), each block attending within itself.

    A block is a prompt P and completions C1..CK. P and C1 together are one causal sequence: a single
    `is_causal` call, which the kernels run without a mask and without the score blocks above the diagonal. Each
    later completion Ck attends to P and to itself: its queries against the keys of P then Ck, under a mask that
    is causal within Ck. So no score between two completions is computed, and no mask over the whole block.
    """
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention: each key/value head serves `groups` query heads
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    # Cut the row once with `split` (whose backward is one concatenation; slicing would zero-fill a row-sized
    # gradient per slice): per block, P + C1, then each later completion.
    sizes = [size for prompt, completions in zip(blocks.prompt_lengths, blocks.completion_lengths)
             for size in (prompt + completions[0], *completions[1:])]
    queries, keys, values = (t.split(sizes, dim=2) for t in (query, key, value))
    outputs, segment = [], 0
    for prompt, completions in zip(blocks.prompt_lengths, blocks.completion_lengths):
        head = segment
        outputs.append(F.scaled_dot_product_attention(queries[head], keys[head], values[head], dropout_p=dropout,
                                                      is_causal=True, scale=scaling))
        for length in completions[1:]:
            segment += 1
            k = torch.cat([keys[head][:, :, :prompt], keys[segment]], dim=2)
            v = torch.cat([values[head][:, :, :prompt], values[segment]], dim=2)
            mask = torch.ones(length, prompt + length, dtype=torch.bool, device=query.device).tril(prompt)
            outputs.append(F.scaled_dot_product_attention(queries[segment], k, v, attn_mask=mask, dropout_p=dropout,
                                                          scale=scaling))
        segment += 1
    _count_call()
    return torch.cat([out.transpose(1, 2) for out in outputs], dim=1)  # [1, seq, heads, dim] in one copy


def _count_call() -> None:
    global _block_calls
    _block_calls += 1


def decoder_hidden_states(decoder: torch.nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor,
                          blocks: BlockLayout, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
    """The decoder's last hidden states `[1, seq, hidden]` for a `blocks` row (from `inputs_embeds` instead of the
    ids when given: a vision-language model's, with the image features in place).

    Refuses a model whose attention never received the blocks (one that does not pass its keyword arguments down
    to transformers' attention functions, or uses neither sdpa nor flex_attention): its output would have
    ignored them.
    """
    install()
    calls_before = _block_calls
    # A 4-D mask is passed through by transformers untouched (no mask is built for the row): flex attention gets
    # the row's BlockMask, built here once for every layer; sdpa a placeholder it ignores.
    mask: Any
    if getattr(getattr(decoder, "config", None), "_attn_implementation", None) == "flex_attention":
        mask = flex_attention.block_mask(blocks, input_ids.device)
    else:
        mask = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=input_ids.device)
    tokens = {"input_ids": input_ids} if inputs_embeds is None else {"inputs_embeds": inputs_embeds}
    hidden = decoder(**tokens, position_ids=position_ids, attention_mask=mask, use_cache=False,
                     dpokit_blocks=blocks).last_hidden_state
    if _block_calls == calls_before:
        raise ValueError("this model's attention did not take dpokit's block layout (it needs transformers' sdpa "
                         "or flex_attention attention with keyword arguments passed down); pass "
                         "--max-tokens-per-batch N to pack rows with dense masks instead")
    return hidden
