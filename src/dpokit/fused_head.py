"""The policy's LM head and a per-pair loss in one pass: each chunk's logits serve the log-probs and the gradient.

The chunked LM head of `logprobs` keeps memory at O(chunk x vocab) by rebuilding each chunk's logits in the
backward pass: one more `[tokens, hidden] x [hidden, vocab]` matmul on top of the forward one and the backward's
two. That is the price when the loss couples all pairs of a batch (AOT sorts them, the NLL terms of ORPO, CPO and
RPO divide by the batch's token count): a token's gradient is unknown until the last token is scored. Most losses
do not: pair p's loss depends on pair p's log-probs only (`LossSpec.pairwise`), and the reference's log-probs
are computed before the policy's. So here a chunk is made of whole pairs (whole groups of pairs that share a
completion), and as soon as its tokens are scored the loss's gradient with respect to their log-probs, g, is
taken on the small per-pair tensors; the head's gradients follow from the logits still in hand:

    dL/dz = g (onehot(y) - softmax(z)),   grad_h = (dL/dz) W,   grad_W += (dL/dz)^T h

The forward keeps grad_h (`[scored, hidden]`) and grad_W (the weight gradient the backward would allocate
anyway); the backward scales them by the upstream gradient of the summed loss. Three head matmuls per scored
token instead of four, the same memory bound, the same numbers (tests compare with autograd through the naive
full-logits forward). A group of pairs with more completion tokens than one chunk is scored twice, chunk by
chunk: log-probs first, then, with g known, the gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .batching import Batch
from .logprobs import (PairLogps, SoftmaxParts, chunk_logits, chunked_target_logps, head_dtype, head_gradients,
                       head_matrix, image_inputs, in_dtype, pair_logps, rebuilt_softmax, select_pair_logps,
                       softmax_parts)
from .quantized_tables import QuantizedTable

# (policy log-probs of some pairs, the indices of those pairs in the batch) -> their losses `[those pairs]`.
LossOfPairs = Callable[[PairLogps, torch.Tensor], torch.Tensor]


@dataclass
class FusedPairLoss:
    """What `SequenceScorer.forward(..., pair_loss=...)` needs to finish the forward with the loss of `batch`.

    Called with the backbone's hidden states at the scored positions and the LM head, it returns the loss summed
    over the batch's pairs (differentiable), the token log-probs `[scored]` and WPO terms (or None), detached.
    """

    batch: Batch
    loss_of_pairs: LossOfPairs
    chunk_size: int
    ld_alpha: float | None = None
    with_wpo: bool = False

    def __call__(self, hidden: torch.Tensor, head: torch.nn.Module, softcap: float | None,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        matrix = head_matrix(head)
        if matrix is not None and torch.is_grad_enabled():
            total, token_logps, token_wpo = _FusedHeadLoss.apply(hidden, matrix, self, softcap)
            return total, token_logps, token_wpo if self.with_wpo else None
        # Another kind of head: log-probs through autograd (chunked, recomputed in backward), then the loss.
        token_logps, token_wpo, _ = chunked_target_logps(hidden, head, self.batch.target_ids, self.chunk_size,
                                                         softcap, self.with_wpo)
        policy = pair_logps(self.batch, token_logps, token_wpo, self.ld_alpha)
        total = self.loss_of_pairs(policy, torch.arange(self.batch.num_pairs, device=hidden.device)).sum()
        return total, token_logps.detach(), token_wpo


def fused_sequence_loss(scorer: torch.nn.Module, batch: Batch, loss_of_pairs: LossOfPairs, chunk_size: int, *,
                        ld_alpha: float | None = None, with_wpo: bool = False) -> tuple[torch.Tensor, PairLogps]:
    """The loss of `batch` summed over its pairs (backpropagate it) and the policy's `PairLogps` (detached),
    from `scorer` (a `SequenceScorer`, or a DDP/FSDP wrap of one) with the LM head and the loss fused."""
    spec = FusedPairLoss(batch, loss_of_pairs, chunk_size, ld_alpha, with_wpo)
    total, token_logps, token_wpo = scorer(batch.input_ids, batch.position_ids, batch.attention_mask,
                                           batch.score_index, batch.target_ids, with_wpo, pair_loss=spec,
                                           **image_inputs(batch))
    return total, pair_logps(batch, token_logps, token_wpo, ld_alpha)


@dataclass
class _Chunk:
    start: int                 # token range [start, end) in the grouped order
    end: int
    pairs: torch.Tensor        # the pairs whose completions are all in it
    single_pass: bool          # fits one chunk; else one group of pairs scored twice, chunk by chunk


def chunk_plan(batch: Batch, chunk_size: int) -> tuple[torch.Tensor | None, list[_Chunk]]:
    """Order the scored tokens by group of pairs (pairs that share a completion form one group), then cut them
    into chunks of whole groups, up to `chunk_size` tokens (a larger group is a chunk of its own).

    Returns the token order (None when the tokens are already grouped, as in the shared and packed layouts) and
    the chunks.
    """
    chosen, rejected = batch.chosen_index.tolist(), batch.rejected_index.tolist()
    parent = list(range(batch.num_sequences))

    def root(s: int) -> int:
        while parent[s] != s:
            parent[s] = parent[parent[s]]
            s = parent[s]
        return s

    for c, r in zip(chosen, rejected):
        parent[root(c)] = root(r)
    roots = torch.tensor([root(s) for s in range(batch.num_sequences)], dtype=torch.long)
    token_roots = roots[batch.sequence_index.cpu()]                       # [scored]
    # Number groups by first appearance, so that already grouped tokens keep their order.
    firsts: dict[int, int] = {}
    for value in torch.unique_consecutive(token_roots).tolist():
        firsts.setdefault(value, len(firsts))
    group_of_root = torch.full((batch.num_sequences,), -1, dtype=torch.long)
    group_of_root[torch.tensor(list(firsts), dtype=torch.long)] = torch.tensor(list(firsts.values()))
    token_group = group_of_root[token_roots]
    order = torch.argsort(token_group, stable=True)
    grouped = bool((order == torch.arange(order.numel())).all())
    sizes = torch.bincount(token_group, minlength=len(firsts)).tolist()  # tokens per group, in group order
    pair_group = group_of_root[roots[torch.tensor(chosen, dtype=torch.long)]]   # [pairs]

    chunks: list[_Chunk] = []
    start = first_group = 0
    tokens = 0
    device = batch.chosen_index.device

    def close(end_group: int) -> None:
        pairs = torch.nonzero((pair_group >= first_group) & (pair_group < end_group))[:, 0].to(device)
        chunks.append(_Chunk(start, start + tokens, pairs, tokens <= chunk_size))

    for g, size in enumerate(sizes):
        if tokens and tokens + size > chunk_size:
            close(g)
            start, first_group, tokens = start + tokens, g, 0
        tokens += size
    if tokens:
        close(len(sizes))
    return (None if grouped else order.to(device)), chunks


class _FusedHeadLoss(torch.autograd.Function):
    """`(hidden [scored, hidden], W [vocab, hidden]) -> (summed loss, token log-probs, token WPO terms)`; see the
    module docstring. Gradients flow through the summed loss only."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor | QuantizedTable,  # type: ignore[override]
                spec: FusedPairLoss, softcap: float | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch = spec.batch
        order, chunks = chunk_plan(batch, spec.chunk_size)
        sequence, position, targets = batch.sequence_index, batch.token_position, batch.target_ids
        if order is not None:
            hidden, sequence, position, targets = hidden[order], sequence[order], position[order], targets[order]
        n = hidden.shape[0]
        token_logps = hidden.new_empty(n, dtype=torch.float32)
        token_wpo = torch.zeros_like(token_logps)
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.zeros_like(hidden) if want_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want_weight else None  # type: ignore[arg-type]
        total = hidden.new_zeros((), dtype=torch.float32)
        dtype = head_dtype(hidden)
        w = in_dtype(weight, dtype)

        # Each chunk's [chunk, vocab] buffers live in one call (or one expression) below, so they are freed before
        # the next chunk's logits are made: one chunk's logits alive at a time.
        def logits(a: int, b: int) -> tuple[torch.Tensor, torch.Tensor | None]:
            return chunk_logits(hidden[a:b].to(dtype), w, softcap)

        def score(a: int, b: int) -> SoftmaxParts:
            parts = softmax_parts(*logits(a, b), targets[a:b])
            token_logps[a:b] = parts.target_logps
            if spec.with_wpo:
                token_wpo[a:b] = parts.wpo()
            return parts

        def backpropagate(a: int, b: int, exps: torch.Tensor, tanh: torch.Tensor | None, g: torch.Tensor,
                          scale: torch.Tensor | None = None) -> None:
            head_gradients(exps, tanh, g, targets[a:b], hidden[a:b].to(dtype), w,
                           None if grad_hidden is None else grad_hidden[a:b], grad_weight, scale)

        def loss_gradient(a: int, b: int, pairs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return _loss_gradient(spec, token_logps[a:b], token_wpo[a:b], sequence[a:b], position[a:b], pairs)

        def single_pass(chunk: _Chunk) -> torch.Tensor:
            parts = score(chunk.start, chunk.end)
            loss, g = loss_gradient(chunk.start, chunk.end, chunk.pairs)
            backpropagate(chunk.start, chunk.end, parts.exps, parts.tanh, g, 1 / parts.sums)
            return loss

        def two_passes(chunk: _Chunk) -> torch.Tensor:
            a, b, size = chunk.start, chunk.end, spec.chunk_size
            lse = torch.cat([score(s, min(s + size, b)).lse for s in range(a, b, size)])
            loss, g = loss_gradient(a, b, chunk.pairs)
            for s in range(a, b, size):
                e = min(s + size, b)
                backpropagate(s, e, *rebuilt_softmax(*logits(s, e), lse[s - a:e - a]), g[s - a:e - a])
            return loss

        for chunk in chunks:
            total += single_pass(chunk) if chunk.single_pass else two_passes(chunk)
        if order is not None:  # back to the batch's token order
            token_logps = torch.empty_like(token_logps).index_copy_(0, order, token_logps)
            token_wpo = torch.empty_like(token_wpo).index_copy_(0, order, token_wpo)
            if grad_hidden is not None:
                grad_hidden = torch.empty_like(grad_hidden).index_copy_(0, order, grad_hidden)
        ctx.gradients = (grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype))
        ctx.mark_non_differentiable(token_logps, token_wpo)
        return total, token_logps, token_wpo

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor, *_: torch.Tensor):  # type: ignore[override]
        grad_hidden, grad_weight = ctx.gradients
        ctx.gradients = None
        return (None if grad_hidden is None else grad_hidden.mul_(grad_total),
                None if grad_weight is None else grad_weight.mul_(grad_total), None, None)


def _loss_gradient(spec: FusedPairLoss, token_logps: torch.Tensor, token_wpo: torch.Tensor,
                   sequence: torch.Tensor, position: torch.Tensor, pairs: torch.Tensor,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The summed loss of `pairs` and its gradient with respect to their tokens' log-probs `[tokens]`."""
    batch = spec.batch
    leaf = token_logps.detach().requires_grad_()
    with torch.enable_grad(), torch.autocast(leaf.device.type, enabled=False):
        policy = select_pair_logps(leaf, sequence, position, batch.chosen_index[pairs], batch.rejected_index[pairs],
                                   batch.num_sequences, token_wpo if spec.with_wpo else None, spec.ld_alpha)
        loss = spec.loss_of_pairs(policy, pairs).sum()
    if not loss.requires_grad:
        return loss.detach().float(), torch.zeros_like(token_logps)
    (g,) = torch.autograd.grad(loss, leaf)
    return loss.detach().float(), g
