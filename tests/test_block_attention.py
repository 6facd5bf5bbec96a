"""The `blocks` layout (one row, no padding, attention block by block) and the sdpa wrapper it installs."""

from __future__ import annotations

import pytest
import torch

from dpokit import block_attention
from dpokit.batching import BlockLayout, make_batch
from dpokit.logprobs import SequenceScorer, sequence_logps

from test_batching import make_pairs


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


def test_blocks_row_holds_every_token_once_and_no_padding(model):
    pairs = make_pairs(model.config.vocab_size)
    batch = make_batch(pairs, layout="blocks", pad_id=0)
    distinct = {tuple(p.prompt_ids): set() for p in pairs}
    for p in pairs:
        distinct[tuple(p.prompt_ids)] |= {tuple(p.chosen_ids), tuple(p.rejected_ids)}
    want_tokens = sum(len(prompt) + sum(map(len, completions)) for prompt, completions in distinct.items())
    assert batch.input_ids.shape == (1, want_tokens) == (1, batch.num_tokens)
    blocks = batch.attention_mask
    assert isinstance(blocks, BlockLayout)
    assert sorted(zip(blocks.prompt_lengths, map(sorted, blocks.completion_lengths))) == sorted(
        (len(prompt), sorted(map(len, completions))) for prompt, completions in distinct.items())
    sizes = [p + sum(c) for p, c in zip(blocks.prompt_lengths, blocks.completion_lengths)]
    assert blocks.starts == [sum(sizes[:i]) for i in range(len(sizes))]


def test_padded_sdpa_calls_are_unchanged_after_install(tiny_model_dir, model):
    from transformers import AutoModelForCausalLM

    block_attention.install()
    eager = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="eager")
    ids = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    with torch.no_grad():
        got, want = model(input_ids=ids, attention_mask=mask).logits, eager(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], rtol=1e-5, atol=1e-5)


class _DropsKeywords(torch.nn.Module):
    """A decoder that does not pass its extra keyword arguments on to attention."""

    def __init__(self, decoder: torch.nn.Module) -> None:
        super().__init__()
        self.decoder = decoder

    def forward(self, input_ids, position_ids, attention_mask, use_cache, **ignored):  # noqa: ANN001, ANN003
        return self.decoder(input_ids=input_ids, position_ids=position_ids, use_cache=use_cache)


def test_a_model_whose_attention_never_sees_the_blocks_is_refused(model, monkeypatch):
    batch = make_batch(make_pairs(model.config.vocab_size), layout="blocks", pad_id=0)
    decoder = _DropsKeywords(model.get_decoder())
    monkeypatch.setattr(model, "get_decoder", lambda: decoder)
    with pytest.raises(ValueError, match="--max-tokens-per-batch"):
        sequence_logps(SequenceScorer(model), batch)
