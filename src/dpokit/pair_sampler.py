"""Which pairs go into which micro-batch, and building those batches (ahead, in worker processes if asked).

`micro_batches` is the sampler: seeded per-epoch permutations laid end to end and cut into global batches,
sharded across ranks, resumable by the count of pairs consumed. `batch_stream` turns its index lists into
`Batch`es, optionally in DataLoader workers, without changing the result. `split_by_tokens` cuts a step's pairs
into micro-batches by a token budget (`--micro-batch-tokens`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any

import torch

from .batching import Batch, grouped_permutation, make_batch
from .errors import DPOError
from .data.tokenization import TokenizedPair


class _BuildBatches(torch.utils.data.Dataset):
    """Maps one `(epoch, pair ids)` item to `(epoch, ids, Batch)` on the CPU; runs in DataLoader workers."""

    def __init__(self, pairs: Sequence[TokenizedPair], **layout: Any) -> None:
        self.pairs, self.layout = pairs, layout

    def __getitem__(self, item: tuple[int, list[int]]) -> tuple[int, list[int], Batch]:
        epoch, ids = item
        return epoch, ids, make_batch([self.pairs[j] for j in ids], pair_ids=ids, **self.layout)


def batch_stream(order: Iterator[tuple[int, list[int]]], pairs: Sequence[TokenizedPair], num_workers: int,
                 **layout: Any) -> Iterator[tuple[int, list[int], Batch]]:
    """`(epoch, ids, Batch)` in `order`'s order; with `num_workers`, built ahead in that many processes.

    A batch is a pure function of its ids and the DataLoader keeps `order`, so results do not depend on the
    number of workers. The DataLoader gets its own generator: otherwise each iterator draws its worker seed from
    the global torch RNG, and the run would differ with and without workers.
    """
    build = _BuildBatches(pairs, **layout)
    if num_workers == 0:
        return map(build.__getitem__, order)
    loader = torch.utils.data.DataLoader(build, sampler=order, batch_size=None, num_workers=num_workers,  # type: ignore[arg-type]
                                         collate_fn=_keep, generator=torch.Generator())
    return iter(loader)


def _keep(item: Any) -> Any:
    return item


def micro_batches(num_pairs: int, batch_size: int, seed: int, rank: int, world_size: int, consumed: int = 0,
                  groups: Sequence[Hashable] | None = None) -> Iterator[tuple[int, list[int]]]:
    """Endless `(epoch, pair indices)` for this rank: seeded permutations (one per epoch) laid end to end, cut
    into global batches of `batch_size * world_size` pairs, of which rank r takes slice r.

    Nothing is dropped or repeated: every pair is seen exactly once per epoch across ranks, and a global batch
    may straddle two epochs (it reports the epoch of its first pair). The pairs of a step depend only on the
    global batch, so 2 ranks x batch 4, 1 rank x batch 8 and 1 rank x batch 4 x grad-accum 2 see the same ones.
    `consumed` pairs (all ranks together, e.g. a checkpoint's step x pairs per step) are skipped without
    replay; counting in pairs lets a run resume on a different number of ranks. Pairs of one `groups` value
    (several responses to one prompt) are kept consecutive, so that they share batches and their prompt is
    forwarded once (`grouped_permutation`).
    """
    global_batch = batch_size * world_size
    if num_pairs < global_batch:
        raise DPOError(f"{num_pairs} training pairs cannot fill one batch of {batch_size} pairs x {world_size} "
                       "processes; lower --batch-size")

    def stream() -> Iterator[tuple[int, int]]:
        epoch, offset = divmod(consumed, num_pairs)
        while True:
            generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            order = grouped_permutation(groups, num_pairs, generator)[offset:]
            yield from ((epoch, index) for index in order)
            epoch, offset = epoch + 1, 0

    pairs = stream()
    while True:
        global_pairs = [next(pairs) for _ in range(global_batch)]
        yield global_pairs[0][0], [index for _, index in global_pairs[rank * batch_size:(rank + 1) * batch_size]]


def split_by_tokens(pairs: Sequence[TokenizedPair], budget: int) -> list[list[int]]:
    """Cut `pairs` (in order) into consecutive micro-batches of at most `budget` forwarded tokens, as the shared
    layouts count them (each distinct prompt once, each distinct response of it once); a pair larger than the
    budget goes alone. Returns positions into `pairs`.
    """
    batches: list[list[int]] = [[]]
    seen: dict[tuple[int, ...], set[tuple[int, ...]]] = {}   # prompt -> responses already in the micro-batch
    tokens = 0
    for index, pair in enumerate(pairs):
        added = _added_tokens(pair, seen)
        if batches[-1] and tokens + added > budget:
            batches.append([])
            seen, tokens = {}, 0
            added = _added_tokens(pair, seen)
        batches[-1].append(index)
        seen.setdefault(tuple(pair.prompt_ids), set()).update({tuple(pair.chosen_ids), tuple(pair.rejected_ids)})
        tokens += added
    return [b for b in batches if b]


def split_further(batches: list[list[int]], parts: int) -> list[list[int]]:
    """Halve the micro-batches with the most pairs until there are `parts` of them (at most as many as pairs), so
    that every process runs the same number of forwards; order kept."""
    batches = list(batches)
    while len(batches) < parts:
        at = max(range(len(batches)), key=lambda i: len(batches[i]))
        largest = batches[at]
        batches[at:at + 1] = [largest[:len(largest) // 2], largest[len(largest) // 2:]]
    return batches


def _added_tokens(pair: TokenizedPair, seen: dict[tuple[int, ...], set[tuple[int, ...]]]) -> int:
    """Tokens that `pair` adds to a micro-batch already holding the prompts and responses in `seen`."""
    known = seen.get(tuple(pair.prompt_ids))
    new_responses = {tuple(pair.chosen_ids), tuple(pair.rejected_ids)} - (known or set())
    return (len(pair.prompt_ids) if known is None else 0) + sum(len(r) for r in new_responses)


def even_shares(num_items: int, batch_size: int, rank: int, world_size: int) -> list[list[int]]:
    """This rank's batches of `range(num_items)` for a pass where every rank must run the same number of forwards
    (FSDP2 all-gathers the weights in each): contiguous batches of `batch_size`, batch b going to rank
    b % world_size. A rank left without a batch in the last round gets `[]`: it runs a stand-in forward and
    drops the result."""
    starts = range(0, num_items, batch_size)
    shares = []
    for round_index in range(math.ceil(len(starts) / world_size)):
        b = round_index * world_size + rank
        shares.append(list(range(starts[b], min(starts[b] + batch_size, num_items))) if b < len(starts) else [])
    return shares


class StepBatches:
    """The micro-batches of each optimizer step, in order: `grad_accum` batches of the sampler's pairs, or, with a
    token budget (`--micro-batch-tokens`), the same pairs cut by tokens instead (as many cuts on every rank:
    `common_count` is the maximum over ranks). Batches are built once, in DataLoader workers when asked."""

    def __init__(self, order: Iterator[tuple[int, list[int]]], pairs: Sequence[TokenizedPair], *, grad_accum: int,
                 num_workers: int, token_budget: int | None, common_count: Callable[[int], int],
                 **layout: Any) -> None:
        self.order, self.pairs, self.grad_accum = order, pairs, grad_accum
        self.token_budget, self.common_count, self.layout = token_budget, common_count, layout
        self.built = None if token_budget else batch_stream(order, pairs, num_workers, **layout)

    def __iter__(self) -> StepBatches:
        return self

    def __next__(self) -> list[Batch]:
        if self.built is not None:
            return [next(self.built)[2] for _ in range(self.grad_accum)]
        assert self.token_budget is not None
        step_ids = [j for _ in range(self.grad_accum) for j in next(self.order)[1]]
        cuts = split_by_tokens([self.pairs[j] for j in step_ids], self.token_budget)
        cuts = split_further(cuts, self.common_count(len(cuts)))
        return [make_batch([self.pairs[step_ids[k]] for k in cut], pair_ids=[step_ids[k] for k in cut],
                           **self.layout) for cut in cuts]
