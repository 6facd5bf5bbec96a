"""The fused LM head + loss (`fused_loss`) gives the loss, log-probs and gradients of the textbook computation:
full logits per prompt+completion, log_softmax, gather, the loss written out here, autograd."""

from __future__ import annotations

import inspect
import random
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from dpokit import losses
from dpokit.batching import Batch, make_batch
from dpokit.fused_head import FusedPairLoss, chunk_plan, fused_sequence_loss
from dpokit.logprobs import PairLogps, SequenceScorer
from dpokit.data.tokenization import TokenizedPair

from test_batching import LAYOUTS, make_pairs

BETA = 0.3


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


def _naive_token_logps(model: torch.nn.Module, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """log p of each completion token from the full logits of prompt + completion `[len(completion)]`."""
    ids = torch.tensor([prompt + completion])
    logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float()
    return logits.log_softmax(-1).gather(-1, ids[0, len(prompt):, None])[:, 0]


def _naive_wpo(model: torch.nn.Module, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """WPO's mean over tokens of log p(y_t) - log sum_v p(v)^2, from full logits, without gradient."""
    with torch.no_grad():
        ids = torch.tensor([prompt + completion])
        probs = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float().softmax(-1)
        picked = probs.gather(-1, ids[0, len(prompt):, None])[:, 0]
        return (picked.log() - probs.square().sum(-1).log()).mean()


def _ld(chosen: torch.Tensor, rejected: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """LD-DPO (Eq. 11): tokens past the shorter completion count with weight alpha."""
    m = min(len(chosen), len(rejected))
    return (chosen[:m].sum() + alpha * chosen[m:].sum(), rejected[:m].sum() + alpha * rejected[m:].sum())


def _reference(pairs: list[TokenizedPair]) -> PairLogps:
    generator = torch.Generator().manual_seed(3)
    lengths = lambda side: torch.tensor([float(len(getattr(p, side))) for p in pairs])  # noqa: E731
    return PairLogps(-20 * torch.rand(len(pairs), generator=generator), -20 * torch.rand(len(pairs), generator=generator),
                     lengths("chosen_ids"), lengths("rejected_ids"))


def _dpo(policy: PairLogps, reference: PairLogps, wpo: bool) -> torch.Tensor:
    losses_ = -F.logsigmoid(BETA * ((policy.chosen - reference.chosen) - (policy.rejected - reference.rejected)))
    if wpo:
        losses_ = losses_ * torch.exp(policy.chosen_wpo + policy.rejected_wpo)
    return losses_


@pytest.mark.parametrize("layout,capacity", LAYOUTS)
@pytest.mark.parametrize("chunk_size", [3, 16, 10_000])  # 3: every group is split and scored twice
@pytest.mark.parametrize("variant", ["dpo", "wpo+ld"])
def test_fused_loss_and_gradients_equal_the_naive_forward(model, layout, capacity, chunk_size, variant):
    pairs = make_pairs(model.config.vocab_size)
    reference = _reference(pairs)
    wpo, ld_alpha = variant == "wpo+ld", (0.4 if variant == "wpo+ld" else None)

    # Naive: each prompt+completion on its own through the full logits.
    chosen, rejected, chosen_wpo, rejected_wpo = [], [], [], []
    for p in pairs:
        c, r = _naive_token_logps(model, p.prompt_ids, p.chosen_ids), _naive_token_logps(model, p.prompt_ids, p.rejected_ids)
        c_sum, r_sum = _ld(c, r, ld_alpha) if ld_alpha else (c.sum(), r.sum())
        chosen.append(c_sum), rejected.append(r_sum)
        chosen_wpo.append(_naive_wpo(model, p.prompt_ids, p.chosen_ids))
        rejected_wpo.append(_naive_wpo(model, p.prompt_ids, p.rejected_ids))
    naive = PairLogps(torch.stack(chosen), torch.stack(rejected), reference.chosen_lengths,
                      reference.rejected_lengths, torch.stack(chosen_wpo), torch.stack(rejected_wpo))
    want_total = _dpo(naive, reference, wpo).sum()
    want_grads = torch.autograd.grad(want_total, list(model.parameters()))

    batch = make_batch(pairs, layout=layout, pad_id=0, row_capacity=capacity)
    seen: list[list[int]] = []

    def loss_of_pairs(policy: PairLogps, ids: torch.Tensor) -> torch.Tensor:
        seen.append(ids.tolist())
        return _dpo(policy, reference.select(ids), wpo)

    total, policy = fused_sequence_loss(SequenceScorer(model, chunk_size), batch, loss_of_pairs, chunk_size,
                                        ld_alpha=ld_alpha, with_wpo=wpo)
    got_grads = torch.autograd.grad(total, list(model.parameters()))

    assert sorted(i for ids in seen for i in ids) == list(range(len(pairs)))  # each pair's loss taken once
    torch.testing.assert_close(total.detach(), want_total.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(policy.chosen, naive.chosen.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(policy.rejected, naive.rejected.detach(), rtol=1e-5, atol=1e-5)
    if wpo:
        torch.testing.assert_close(policy.chosen_wpo, naive.chosen_wpo, rtol=1e-4, atol=1e-5)
    for got, want in zip(got_grads, want_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def _head_batch(sequence_lengths: list[int], pairs: list[tuple[int, int]], vocab: int) -> Batch:
    """A `Batch` whose only meaningful fields are the scored tokens', for driving the head directly."""
    generator = torch.Generator().manual_seed(5)
    tokens = sum(sequence_lengths)
    sequence = torch.repeat_interleave(torch.arange(len(sequence_lengths)), torch.tensor(sequence_lengths))
    position = torch.cat([torch.arange(n) for n in sequence_lengths])
    unused = torch.zeros(1, 1, dtype=torch.long)
    return Batch(unused, unused, unused, torch.arange(tokens), torch.randint(0, vocab, (tokens,), generator=generator),
                 sequence, position, torch.tensor([c for c, _ in pairs]), torch.tensor([r for _, r in pairs]),
                 torch.arange(len(pairs)), num_sequences=len(sequence_lengths))


@pytest.mark.parametrize("softcap", [None, 4.0])
@pytest.mark.parametrize("chunk_size", [2, 7, 100])
@pytest.mark.parametrize("head_kind", ["linear", "other"])
def test_fused_head_with_softcap_equals_full_logits(softcap, chunk_size, head_kind):
    # Sequences 0..5; pairs (0, 1), (2, 3), (2, 4): sequence 2 is shared, so pairs 1 and 2 form one group; (5, 0)
    # would join pair 0's group too.
    lengths, pair_list, vocab, width = [3, 5, 4, 2, 6, 1], [(0, 1), (2, 3), (2, 4), (5, 0)], 40, 8
    batch = _head_batch(lengths, pair_list, vocab)
    generator = torch.Generator().manual_seed(6)
    hidden = torch.randn(sum(lengths), width, generator=generator, requires_grad=True)
    head = torch.nn.Linear(width, vocab, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, width, generator=generator))
    weights = torch.randn(len(pair_list), generator=generator)

    def loss_of_pairs(policy: PairLogps, ids: torch.Tensor) -> torch.Tensor:
        return weights[ids] * torch.sin(policy.chosen - 2 * policy.rejected)   # any smooth per-pair function

    logits = hidden @ head.weight.T
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    token = logits.log_softmax(-1)[torch.arange(sum(lengths)), batch.target_ids]
    sums = torch.zeros(len(lengths)).index_add(0, batch.sequence_index, token)
    want = (weights * torch.sin(sums[batch.chosen_index] - 2 * sums[batch.rejected_index])).sum()
    want_grads = torch.autograd.grad(want, [hidden, head.weight])

    module = head if head_kind == "linear" else torch.nn.Sequential(head)   # "other": the unfused fallback
    total, token_logps, _ = FusedPairLoss(batch, loss_of_pairs, chunk_size)(hidden, module, softcap)
    got_grads = torch.autograd.grad(total, [hidden, head.weight])

    torch.testing.assert_close(total, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(token_logps, token.detach(), rtol=1e-5, atol=1e-5)
    for got, expected in zip(got_grads, want_grads):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_chunks_hold_whole_groups_of_pairs():
    # Concatenated-style order: all chosen sequences first, then all rejected: tokens must be regrouped by pair.
    lengths, pair_list = [2, 3, 4, 1, 2, 5], [(0, 3), (1, 4), (2, 5)]
    order, chunks = chunk_plan(_head_batch(lengths, pair_list, 10), chunk_size=6)
    sequence = torch.repeat_interleave(torch.arange(6), torch.tensor(lengths))[order]
    assert sequence.tolist() == [0, 0, 3] + [1, 1, 1, 4, 4] + [2, 2, 2, 2, 5, 5, 5, 5, 5]
    assert [(c.start, c.end, c.pairs.tolist(), c.single_pass) for c in chunks] == [
        (0, 3, [0], True), (3, 8, [1], True), (8, 17, [2], False)]   # pair 2 (9 tokens) > 6: scored twice


def _loss_kwargs(spec: losses.LossSpec) -> dict[str, object]:
    return {name: p.default for name, p in inspect.signature(spec.function).parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY}


@pytest.mark.parametrize("name", [n for n in losses.names() if losses.get(n).pairwise])
def test_losses_marked_pairwise_do_not_depend_on_the_other_pairs(name):
    """The promise behind `pairwise=True`: a pair's loss is the same whatever else is in its batch."""
    spec, rng = losses.get(name), random.Random(0)
    n = 12
    policy = PairLogps(*(torch.tensor([rng.uniform(-60, -5) for _ in range(n)]) for _ in range(2)),
                       *(torch.tensor([float(rng.randint(3, 30)) for _ in range(n)]) for _ in range(2)))
    reference = PairLogps(*(torch.tensor([rng.uniform(-60, -5) for _ in range(n)]) for _ in range(2)),
                          policy.chosen_lengths, policy.rejected_lengths)
    extras = {"margin": torch.tensor([rng.uniform(0, 2) for _ in range(n)])}
    kwargs = _loss_kwargs(spec)
    whole = spec.function(policy, reference, extras, **kwargs).losses
    split = torch.randperm(n, generator=torch.Generator().manual_seed(1))
    for part in (split[:5], split[5:]):
        alone = spec.function(policy.select(part), reference.select(part), {k: v[part] for k, v in extras.items()},
                              **kwargs).losses
        torch.testing.assert_close(alone, whole[part])


LOSSES_II = {"dpop": {"beta": BETA, "dpop_lambda": 5.0}, "alphapo": {"beta": 2.0, "alphapo_alpha": 0.25},
             "astar_po": {"beta": BETA, "astar_po_beta1": 0.5}}


@pytest.mark.parametrize("layout,capacity", [("shared", None), ("packed", 40)])
@pytest.mark.parametrize("name", sorted(LOSSES_II))
def test_dpop_alphapo_astar_po_fused_equal_the_unfused_head(model, layout, capacity, name):
    """Prefix-shared and packed batches, chunks of 3 tokens (groups split): the fused head's loss and gradients
    equal the loss function applied to the unfused head's log-probs, with the pairs' scores as extras."""
    from dpokit.logprobs import sequence_logps

    pairs = [replace(p, extras={"score_chosen": float(i % 3), "score_rejected": 1.0})
             for i, p in enumerate(make_pairs(model.config.vocab_size))]
    spec, kwargs = losses.get(name), LOSSES_II[name]
    reference = _reference(pairs) if spec.needs_reference else None
    batch = make_batch(pairs, layout=layout, pad_id=0, row_capacity=capacity)
    assert set(batch.extras) == {"score_chosen", "score_rejected"}
    scorer, params = SequenceScorer(model, chunk_size=3), list(model.parameters())

    def loss_of_pairs(policy: PairLogps, ids: torch.Tensor) -> torch.Tensor:
        selected = None if reference is None else reference.select(ids)
        return spec.function(policy, selected, {k: v[ids] for k, v in batch.extras.items()}, **kwargs).losses

    total, _ = fused_sequence_loss(scorer, batch, loss_of_pairs, 3)
    got = torch.autograd.grad(total, params)
    want_total = spec.function(sequence_logps(scorer, batch), reference, batch.extras, **kwargs).losses.sum()
    want = torch.autograd.grad(want_total, params)
    torch.testing.assert_close(total.detach(), want_total.detach(), rtol=1e-5, atol=1e-5)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_batch_coupled_losses_are_not_marked_pairwise():
    # AOT sorts the batch; ORPO, CPO and SFT divide by the batch's chosen tokens; KTO's z0 is a batch mean.
    assert not any(losses.get(name).pairwise for name in ("aot", "aot_unpaired", "orpo", "cpo", "sft", "kto"))


def test_fused_under_bfloat16_autocast_matches_the_unfused_head(model):
    """`--dtype bfloat16`: the fused head multiplies in bf16 like the chunked head's backward, sums in float32."""
    from dpokit.logprobs import sequence_logps

    pairs = make_pairs(model.config.vocab_size)
    reference = _reference(pairs)
    batch = make_batch(pairs, layout="blocks", pad_id=0)
    scorer = SequenceScorer(model, chunk_size=16)
    params = list(model.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, _ = fused_sequence_loss(scorer, batch, lambda p, ids: _dpo(p, reference.select(ids), False), 16)
    got = torch.autograd.grad(total, params)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want_total = _dpo(sequence_logps(scorer, batch), reference, False).sum()
    want = torch.autograd.grad(want_total, params)
    torch.testing.assert_close(total.detach(), want_total.detach().float(), rtol=1e-2, atol=1e-2)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype == torch.float32
        assert (g - w).norm() <= 2e-2 * w.norm() + 1e-6


def test_one_chunk_of_logits_is_alive_at_a_time_in_a_tiny_llama():
    """A one-layer Llama with a 32k vocabulary, trained through the scorer with the fused head (chunks of whole
    pairs, and one pair too long for a chunk, scored twice): the peak that torch's memory profiler measures over
    the forward and backward passes is one chunk's float32 logits [chunk, vocab] (the buffer becomes the softmax,
    then the logits' gradient, in place; two chunks alive at once would be 2 x) plus what is not chunk-sized: the
    head's and the embedding's float32 weight gradients [vocab, hidden] and 4 MiB for the decoder's activations
    and the [tokens] vectors (under 1 MiB here)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from test_logprobs import peak_bytes

    vocab, width, chunk_size = 32_000, 16, 256
    config = LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    rng = random.Random(1)
    ids = lambda n: [rng.randrange(3, vocab) for _ in range(n)]  # noqa: E731
    # Two 128-token pairs fill a chunk; the last pair's 300 tokens are scored in two passes of 256 and 44.
    pairs = [TokenizedPair(ids(8), ids(70), ids(58)) for _ in range(4)] + [TokenizedPair(ids(8), ids(160), ids(140))]
    batch = make_batch(pairs, layout="blocks", pad_id=0)
    reference = _reference(pairs)
    scorer = SequenceScorer(model, chunk_size)

    def run() -> None:
        total, _ = fused_sequence_loss(scorer, batch, lambda p, i: _dpo(p, reference.select(i), False), chunk_size)
        total.backward()

    chunk_bytes, weight_bytes = chunk_size * vocab * 4, vocab * width * 4
    assert peak_bytes(run) <= chunk_bytes + 2 * weight_bytes + 4 * 2**20
