"""Layouts are exact: per-pair log-probs and their gradients equal scoring each prompt+completion on its own
with full logits (`naive_sequence_logps`), whatever the padding, lengths, sharing or packing."""

from __future__ import annotations

import random

import pytest
import torch

from dpokit.batching import grouped_permutation, make_batch
from dpokit.config import Config
from dpokit.logprobs import SequenceScorer, naive_sequence_logps, sequence_logps
from dpokit.placement import run_layout
from dpokit.data.tokenization import TokenizedPair


def _ids(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(3, vocab) for _ in range(n)]


def make_pairs(vocab: int) -> list[TokenizedPair]:
    """Varied lengths; a chosen that is a prefix of its rejected; three pairs from one prompt (four distinct
    responses, one reused); a one-token prompt; an identical chosen and rejected."""
    rng = random.Random(0)
    shared_prompt = _ids(rng, 9, vocab)
    a, b, c = _ids(rng, 5, vocab), _ids(rng, 3, vocab), _ids(rng, 7, vocab)
    prefix = _ids(rng, 4, vocab)
    same = _ids(rng, 3, vocab)
    return [
        TokenizedPair(_ids(rng, 12, vocab), _ids(rng, 6, vocab), _ids(rng, 2, vocab)),
        TokenizedPair(_ids(rng, 5, vocab), prefix, prefix + _ids(rng, 5, vocab)),     # chosen prefix of rejected
        TokenizedPair(shared_prompt, a, b),                                             # one prompt, many responses
        TokenizedPair(shared_prompt, a, c),
        TokenizedPair(shared_prompt, c, _ids(rng, 1, vocab)),
        TokenizedPair([1], _ids(rng, 3, vocab), _ids(rng, 8, vocab)),                   # one-token prompt
        TokenizedPair(_ids(rng, 4, vocab), same, list(same)),                           # chosen == rejected
    ]


LAYOUTS = [("concatenated", None), ("shared", None), ("packed", None), ("packed", 40), ("blocks", None)]


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


@pytest.fixture(scope="module")
def naive(model):
    """Per-pair log-probs from full logits, one prompt+completion at a time, and the gradient of a weighted sum."""
    pairs = make_pairs(model.config.vocab_size)
    weights = torch.randn(2, len(pairs), generator=torch.Generator().manual_seed(1))
    chosen = torch.stack([naive_sequence_logps(model, p.prompt_ids, p.chosen_ids) for p in pairs])
    rejected = torch.stack([naive_sequence_logps(model, p.prompt_ids, p.rejected_ids) for p in pairs])
    grads = torch.autograd.grad((weights[0] * chosen + weights[1] * rejected).sum(), list(model.parameters()))
    return pairs, weights, chosen.detach(), rejected.detach(), grads


@pytest.mark.parametrize("layout,capacity", LAYOUTS)
def test_layout_log_probs_and_gradients_equal_the_naive_forward(model, naive, layout, capacity):
    pairs, weights, naive_chosen, naive_rejected, naive_grads = naive
    batch = make_batch(pairs, layout=layout, pad_id=0, row_capacity=capacity)
    logps = sequence_logps(SequenceScorer(model, chunk_size=7), batch)
    grads = torch.autograd.grad((weights[0] * logps.chosen + weights[1] * logps.rejected).sum(),
                                list(model.parameters()))

    torch.testing.assert_close(logps.chosen, naive_chosen, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logps.rejected, naive_rejected, rtol=1e-5, atol=1e-5)
    assert logps.chosen_lengths.tolist() == [len(p.chosen_ids) for p in pairs]
    assert logps.rejected_lengths.tolist() == [len(p.rejected_ids) for p in pairs]
    for got, want in zip(grads, naive_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_eager_attention_with_4d_mask_is_exact(tiny_model_dir, naive):
    from transformers import AutoModelForCausalLM

    eager = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="eager")
    pairs, _, naive_chosen, _, _ = naive
    logps = sequence_logps(SequenceScorer(eager), make_batch(pairs, layout="packed", row_capacity=40))
    torch.testing.assert_close(logps.chosen, naive_chosen, rtol=1e-5, atol=1e-5)


def test_shared_layout_forwards_each_prompt_and_each_distinct_response_once():
    pairs = make_pairs(400)
    prompts = {tuple(p.prompt_ids) for p in pairs}
    responses = {(tuple(p.prompt_ids), tuple(c)) for p in pairs for c in (p.chosen_ids, p.rejected_ids)}
    expected = sum(len(p) for p in prompts) + sum(len(r) for _, r in responses)
    shared = make_batch(pairs, layout="shared")
    assert shared.num_tokens == expected
    assert shared.input_ids.shape[0] == len(prompts)                      # one row per distinct prompt
    assert shared.chosen_index[3] == shared.chosen_index[2]              # response `a` is forwarded once
    assert shared.chosen_index[6] == shared.rejected_index[6]
    concatenated = make_batch(pairs, layout="concatenated")
    assert concatenated.num_tokens == sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids)
                                          for p in pairs)


def test_packing_fills_rows_up_to_the_capacity_without_splitting_a_prompt():
    pairs = make_pairs(400)
    packed = make_batch(pairs, layout="packed", row_capacity=40)
    shared = make_batch(pairs, layout="shared")
    assert packed.input_ids.shape[1] <= 40 and packed.input_ids.shape[0] < shared.input_ids.shape[0]
    assert packed.num_tokens == shared.num_tokens
    # Block-diagonal: no attention between two different prompts' tokens in the same row.
    mask = packed.attention_mask[:, 0]                                   # [rows, seq, seq]
    position_restarts = (packed.position_ids[:, 1:] == 0).nonzero()
    for row, column in position_restarts.tolist():
        assert not mask[row, column + 1:, :column + 1].any()


def test_grouped_permutation_keeps_groups_together_and_is_randperm_without_groups():
    generator = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    assert grouped_permutation(None, 10, generator()) == torch.randperm(10, generator=generator()).tolist()
    groups = [0, 1, 0, 2, 1, 0, 3, 3, 4, 2]
    order = grouped_permutation(groups, 10, generator())
    assert sorted(order) == list(range(10))
    runs = [groups[i] for k, i in enumerate(order) if k == 0 or groups[order[k - 1]] != groups[i]]
    assert sorted(runs) == sorted(set(groups))                           # each group is one contiguous run
    assert order != grouped_permutation(groups, 10, torch.Generator().manual_seed(6))


@pytest.mark.parametrize("flags,layout", [
    ({}, "blocks"),
    ({"max_tokens_per_batch": 256}, "packed"),
    ({"attn_implementation": "eager"}, "packed"),
    ({"compile": True}, "packed"),
    ({"packing": False}, "shared"),
    ({"prefix_sharing": False, "packing": False}, "concatenated"),
])
def test_layout_follows_the_flags(flags, layout):
    assert run_layout(Config(**flags)) == layout
