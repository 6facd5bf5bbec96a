"""Chunked, completion-only log-probs equal the textbook full-logits computation, forward and backward, and
never keep more than one chunk of logits alive (measured with torch's memory profiler)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from dpokit.logprobs import WEIGHT_GRADIENT_ROWS, chunked_target_logps

TOKENS, HIDDEN, VOCAB = 13, 16, 50


def _inputs(seed: int = 0, tokens: int = TOKENS) -> tuple[torch.Tensor, torch.nn.Linear, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, HIDDEN, generator=generator, requires_grad=True)
    head = torch.nn.Linear(HIDDEN, VOCAB, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(VOCAB, HIDDEN, generator=generator))
    targets = torch.randint(0, VOCAB, (tokens,), generator=generator)
    upstream = torch.randn(tokens, generator=generator)  # arbitrary per-token weights, as a loss would give
    return hidden, head, targets, upstream


def _full(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float | None) -> torch.Tensor:
    logits = hidden @ weight.T                                           # [tokens, vocab], all at once
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return torch.log_softmax(logits, dim=-1)[torch.arange(len(targets)), targets]


@pytest.mark.parametrize("chunk_size", [1, 4, TOKENS, 100])
@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("fused", [True, False])
def test_chunked_log_probs_and_gradients_equal_full_logits(chunk_size, softcap, fused):
    hidden, head, targets, upstream = _inputs()
    want = _full(hidden, head.weight, targets, softcap)
    want_grads = torch.autograd.grad((want * upstream).sum(), [hidden, head.weight])

    # A plain Linear takes the fused autograd Function; any other module the checkpointed path.
    module = head if fused else torch.nn.Sequential(head)
    got, wpo, correct = chunked_target_logps(hidden, module, targets, chunk_size, softcap)
    got_grads = torch.autograd.grad((got * upstream).sum(), [hidden, head.weight])

    assert wpo is None and correct is None
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_wpo_term_is_log_prob_minus_log_sum_of_squared_probs():
    hidden, head, targets, upstream = _inputs(1)
    logps, wpo, _ = chunked_target_logps(hidden, head, targets, 5, with_wpo=True)
    probs = torch.softmax(hidden.detach() @ head.weight.detach().T, dim=-1)  # [tokens, vocab]
    want = probs[torch.arange(TOKENS), targets].log() - probs.pow(2).sum(-1).log()
    torch.testing.assert_close(wpo, want, rtol=1e-5, atol=1e-5)
    assert not wpo.requires_grad
    # the log-probs scored in the same pass still carry their gradient
    (logps * upstream).sum().backward()
    hidden_copy = hidden.detach().clone().requires_grad_()
    naive = torch.log_softmax(hidden_copy @ head.weight.detach().T, dim=-1)[torch.arange(TOKENS), targets]
    (naive * upstream).sum().backward()
    torch.testing.assert_close(hidden.grad, hidden_copy.grad, rtol=1e-5, atol=1e-6)


def test_no_more_than_one_chunk_of_logits_is_kept_for_the_backward():
    tokens = 40
    hidden, head, targets, _ = _inputs(2, tokens)
    chunk_size = 4
    largest = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal largest
        largest = max(largest, tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logps, _, _ = chunked_target_logps(hidden, head, targets, chunk_size)
    logps.sum().backward()
    # Saved for the backward: the inputs (hidden, weight) and per-chunk vectors, never a [chunk, vocab] block.
    assert largest <= max(tokens * HIDDEN, VOCAB * HIDDEN) < tokens * VOCAB


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_without_gradient_one_pass_gives_log_probs_and_wpo_terms(softcap):
    hidden, head, targets, _ = _inputs(2)
    with torch.no_grad():
        logps, wpo, _ = chunked_target_logps(hidden, head, targets, 4, softcap, with_wpo=True)
        log_probs = _full(hidden, head.weight, targets, softcap)
        logits = hidden @ head.weight.T
        if softcap:
            logits = softcap * torch.tanh(logits / softcap)
        probs = torch.softmax(logits, dim=-1)
    torch.testing.assert_close(logps, log_probs, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(wpo, log_probs - probs.pow(2).sum(-1).log(), rtol=1e-5, atol=1e-5)


def peak_bytes(run: Callable[[], object]) -> int:
    """The most bytes held at once above the start while `run` runs, from every CPU allocation and free that
    torch's memory profiler records (the allocator's own events, so temporaries inside operators count too)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("dtype,softcap,train,chunks", [
    (torch.float32, None, True, 1),      # the logits' buffer becomes the softmax, then its gradient, in place
    (torch.bfloat16, None, True, 1.5),   # + the head's bf16 output while it is upcast; the bf16 logit gradient
    (torch.float32, 5.0, True, 2),       # + tanh(raw / softcap), kept for the gradient
    (torch.float32, 5.0, False, 1),      # no gradient: capped in place
])
def test_one_chunk_of_logits_is_alive_at_a_time(dtype, softcap, train, chunks):
    """A large vocabulary, 3 chunks: the peak over the forward and backward passes is `chunks` x one chunk's
    float32 logits [chunk, vocab] (two chunks alive at once would be >= 2 x) plus what is not chunk-sized: the
    float32 weight gradient [vocab, hidden] and, in bf16, the bf16 weight (half a float32 weight), a slice of
    `WEIGHT_GRADIENT_ROWS` rows of each chunk's bf16 weight-gradient product and what its matmul allocates (2.25
    weights in all, measured 2.1; the whole product and its float32 upcast made it 3), and 64 KiB for the
    [tokens] vectors."""
    tokens, width, vocab, chunk_size = 192, 8, 20_000, 64
    generator = torch.Generator().manual_seed(4)
    hidden = torch.randn(tokens, width, generator=generator, requires_grad=train)
    head = torch.nn.Linear(width, vocab, bias=False).requires_grad_(train)
    targets = torch.randint(0, vocab, (tokens,), generator=generator)

    def run() -> None:
        autocast = torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
        with autocast, torch.set_grad_enabled(train):
            logps, _, _ = chunked_target_logps(hidden, head, targets, chunk_size, softcap)
        if train:
            logps.sum().backward()

    chunk_bytes, weight_bytes = chunk_size * vocab * 4, vocab * width * 4
    assert vocab > WEIGHT_GRADIENT_ROWS                                    # the product in several slices
    others = (2.25 if dtype != torch.float32 else 1) * weight_bytes * train + 64 * 1024
    assert peak_bytes(run) <= chunks * chunk_bytes + others
