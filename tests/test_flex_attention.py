"""A `blocks` row through FlexAttention: exact against scoring each prompt+completion on its own (log-probs and
every parameter's gradient), with one attention call per layer however many blocks the row holds."""

from __future__ import annotations

import random

import pytest
import torch

from dpokit import flex_attention
from dpokit.batching import make_batch
from dpokit.data.tokenization import TokenizedPair
from dpokit.logprobs import SequenceScorer, naive_sequence_logps, sequence_logps

VOCAB = 64


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


@pytest.fixture
def cpu_flex_backward(monkeypatch):
    """torch refuses FlexAttention's backward on CPU by a guard in front of the call only; its eager (math)
    implementation differentiates exactly, so with the guard lifted the CPU checks the CUDA kernel's inputs:
    the same BlockMask, the same call."""
    import torch.nn.attention.flex_attention as torch_flex

    guard = torch_flex._validate_device
    monkeypatch.setattr(torch_flex, "_validate_device", lambda q, k, v: guard(*(t.detach() for t in (q, k, v))))


def _rows(num_blocks: int, pairs_per_block: int = 3) -> list[TokenizedPair]:
    """`num_blocks` distinct prompts, each with three distinct responses in three pairs: two pairs sharing a
    response, and one whose chosen is a prefix of its rejected (only that one with `pairs_per_block=1`)."""
    rng = random.Random(num_blocks)
    ids = lambda n: [rng.randrange(3, VOCAB) for _ in range(n)]  # noqa: E731
    pairs, prompts = [], set()
    while len(prompts) < num_blocks:
        prompt, a, b = ids(rng.randint(1, 6)), ids(rng.randint(1, 4)), ids(rng.randint(1, 4))
        longer = a + ids(rng.randint(1, 3))
        if tuple(prompt) in prompts or len({tuple(a), tuple(b), tuple(longer)}) < 3:
            continue
        prompts.add(tuple(prompt))
        pairs += [TokenizedPair(prompt, a, b), TokenizedPair(prompt, b, longer),
                  TokenizedPair(prompt, a, longer)][-pairs_per_block:]
    return pairs


def _set_kernel(model: torch.nn.Module, kernel: str) -> None:
    model.set_attn_implementation(kernel)


@pytest.mark.parametrize("num_blocks,pairs_per_block", [(1, 3), (8, 3), (64, 1)])
def test_flex_blocks_equal_the_naive_forward_with_one_call_per_layer(model, cpu_flex_backward, monkeypatch,
                                                                     num_blocks, pairs_per_block):
    """64 blocks of one pair each (chosen a prefix of rejected) keep the eager CPU kernel's full score matrix small."""
    pairs = _rows(num_blocks, pairs_per_block)
    weights = torch.randn(2, len(pairs), generator=torch.Generator().manual_seed(num_blocks))
    params = list(model.parameters())
    _set_kernel(model, "sdpa")
    chosen = torch.stack([naive_sequence_logps(model, p.prompt_ids, p.chosen_ids) for p in pairs])
    rejected = torch.stack([naive_sequence_logps(model, p.prompt_ids, p.rejected_ids) for p in pairs])
    want_grads = torch.autograd.grad((weights[0] * chosen + weights[1] * rejected).sum(), params)

    calls = []
    kernel = flex_attention.flex_attention
    monkeypatch.setattr(flex_attention, "flex_attention", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    _set_kernel(model, "flex_attention")
    try:
        batch = make_batch(pairs, layout="blocks")
        assert len(batch.attention_mask.starts) == num_blocks and batch.input_ids.shape[0] == 1
        logps = sequence_logps(SequenceScorer(model), batch)
        got_grads = torch.autograd.grad((weights[0] * logps.chosen + weights[1] * logps.rejected).sum(), params)
    finally:
        _set_kernel(model, "sdpa")

    assert len(calls) == model.config.num_hidden_layers            # one call per layer, whatever num_blocks
    torch.testing.assert_close(logps.chosen, chosen.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logps.rejected, rejected.detach(), rtol=1e-5, atol=1e-5)
    for name, got, want in zip([n for n, _ in model.named_parameters()], got_grads, want_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=name)


def test_block_by_block_sdpa_calls_grow_with_the_blocks_and_flex_calls_do_not(model, monkeypatch):
    """The count the GPU cares about: attention kernel calls per layer for rows of 1, 8 and 64 blocks."""
    sdpa_calls, flex_calls = [], []
    sdpa, flex = torch.nn.functional.scaled_dot_product_attention, flex_attention.flex_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: sdpa_calls.append(1) or sdpa(*a, **k))
    monkeypatch.setattr(flex_attention, "flex_attention", lambda *a, **k: flex_calls.append(1) or flex(*a, **k))
    layers = model.config.num_hidden_layers
    per_layer: dict[str, list[float]] = {"sdpa": [], "flex_attention": []}
    try:
        for num_blocks in (1, 8, 64):
            batch = make_batch(_rows(num_blocks), layout="blocks")
            for kernel in per_layer:
                _set_kernel(model, kernel)
                sdpa_calls.clear()
                flex_calls.clear()
                with torch.no_grad():
                    sequence_logps(SequenceScorer(model), batch)
                per_layer[kernel].append((len(sdpa_calls) + len(flex_calls)) / layers)
    finally:
        _set_kernel(model, "sdpa")
    assert per_layer["flex_attention"] == [1, 1, 1]
    # P + C1 in one call, then one call per later completion: 3 responses per prompt -> 3 calls per block.
    assert per_layer["sdpa"] == [3, 24, 192]


def test_block_mask_tiles_follow_the_blocks():
    """Two blocks of 128 tokens: the tile of block 2's queries against block 1's keys is skipped."""
    from dpokit.batching import BlockLayout

    mask = flex_attention.block_mask(BlockLayout([0, 128], [64, 64], [[32, 32], [32, 32]]), torch.device("cpu"))
    tiles = mask.to_dense()[0, 0]                                   # [query tiles, key tiles]
    assert tiles.tolist() == [[1, 0], [0, 1]]
