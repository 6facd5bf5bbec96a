"""Lay tokenized pairs out as model inputs. The `Batch` is the contract between data and model.

A `Batch` says which tokens to forward (`input_ids`, `position_ids`, `attention_mask`) and which positions to
score: the hidden state at flat position `score_index[i]` predicts `target_ids[i]`, a token of completion
`sequence_index[i]`. Pair p compares sequence `chosen_index[p]` with `rejected_index[p]`. Log-probs, losses and
the loop only read this contract, so a new layout changes nothing outside this file.

Layouts (all exact: the same per-sequence log-probs as scoring each prompt+completion on its own):

- `concatenated`: one row per prompt+completion, right-padded, 2-D padding mask (what TRL does).
- `shared`: one row per prompt, then each distinct completion of that prompt; a 4-D mask lets a completion see
  the prompt and itself only, and position ids restart at the prompt's end for each completion (prefix sharing,
  arXiv 2410.20305). Pairs with an identical prompt in the batch share one row: the prompt is forwarded once and
  each distinct response once, however many pairs use it.
- `packed`: the `shared` blocks packed first-fit-decreasing into rows of `row_capacity` tokens with
  block-diagonal masks, so short pairs fill the padding that one-block-per-row would waste.
- `blocks`: the `shared` blocks end to end in one row: no padding at all. Instead of a `[seq, seq]` mask over
  the row, `attention_mask` is a `BlockLayout` (where each block starts, its prompt and completion lengths), for
  an attention function that runs block by block (`block_attention`), so attention costs the sum of the blocks'
  squares, not the row's.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field, fields
from itertools import chain

import torch

from .data.tokenization import TokenizedPair

LAYOUTS = ("concatenated", "shared", "packed", "blocks")


@dataclass
class BlockLayout:
    """The attention of a `blocks` row: block i starts at token starts[i] with a prompt of prompt_lengths[i] tokens,
    followed by its completions (completion_lengths[i]). A token sees the tokens before it in its block's prompt and
    in its own completion, nothing else (no tensors: the attention function builds what it needs)."""

    starts: list[int]
    prompt_lengths: list[int]
    completion_lengths: list[list[int]]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> BlockLayout:
        return self


@dataclass
class Batch:
    input_ids: torch.Tensor          # [rows, seq]
    position_ids: torch.Tensor       # [rows, seq]
    # [rows, seq] padding mask (concatenated), [rows, 1, seq, seq] bool (shared, packed) or BlockLayout (blocks)
    attention_mask: torch.Tensor | BlockLayout
    score_index: torch.Tensor        # [scored] flat index into rows*seq of the hidden state that predicts...
    target_ids: torch.Tensor         # [scored] ...this token
    sequence_index: torch.Tensor     # [scored] which completion the token belongs to
    token_position: torch.Tensor     # [scored] 0-based position of the token within its completion
    chosen_index: torch.Tensor       # [pairs] sequence of each pair's chosen completion
    rejected_index: torch.Tensor     # [pairs] sequence of each pair's rejected completion
    pair_ids: torch.Tensor           # [pairs] index of each pair in its dataset (for precomputed references)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # per-pair numbers, [pairs] each
    num_sequences: int = 0
    num_tokens: int = 0              # real (non-padding) tokens forwarded

    @property
    def num_pairs(self) -> int:
        return int(self.chosen_index.numel())

    def to(self, device: torch.device | str) -> Batch:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in moved.items():
            if isinstance(value, (torch.Tensor, BlockLayout)):
                moved[name] = value.to(device, non_blocking=True)
        moved["extras"] = {k: v.to(device, non_blocking=True) for k, v in self.extras.items()}
        return Batch(**moved)


def layout_for(*, prefix_sharing: bool = True, packing: bool = True, attn_implementation: str = "sdpa",
               compile: bool = False, max_tokens_per_batch: int | None = None) -> str:
    """The layout for these settings. Packing with sdpa or FlexAttention lays a micro-batch out as one row
    without padding, attended block by block or in one FlexAttention call per layer (`blocks`; "auto" picks one
    of the two); rows of `max_tokens_per_batch` tokens with dense masks
    (`packed`) serve the other attention kernels and `torch.compile`."""
    if not prefix_sharing:
        return "concatenated"
    if not packing:
        return "shared"
    if max_tokens_per_batch is None and attn_implementation in ("auto", "sdpa", "flex_attention") and not compile:
        return "blocks"
    return "packed"


def make_batch(pairs: Sequence[TokenizedPair], *, layout: str = "packed", pad_id: int = 0,
               pair_ids: Sequence[int] | None = None, row_capacity: int | None = None) -> Batch:
    """Build one `Batch` from `pairs` in the given layout (see the module docstring)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    pair_ids = list(range(len(pairs))) if pair_ids is None else list(pair_ids)
    builder = _RowBuilder()
    if layout == "concatenated":
        sequences: list[tuple[list[int], list[int]]] = [(p.prompt_ids, p.chosen_ids) for p in pairs]
        sequences += [(p.prompt_ids, p.rejected_ids) for p in pairs]
        for prompt, completion in sequences:
            builder.add_row([builder.block(prompt, [completion])])
        n = len(pairs)
        chosen_index, rejected_index = list(range(n)), list(range(n, 2 * n))
    else:
        blocks, chosen_index, rejected_index = _prompt_blocks(pairs, builder)
        if layout == "shared":
            for block in blocks:
                builder.add_row([block])
        elif layout == "blocks":
            builder.add_row(blocks)
        else:
            capacity = max([b.size for b in blocks] + [row_capacity or 0])
            for row in _first_fit_decreasing(blocks, capacity):
                builder.add_row(row)
    extras = {}
    for name in sorted({k for p in pairs for k in p.extras}):
        extras[name] = torch.tensor([p.extras.get(name, float("nan")) for p in pairs], dtype=torch.float32)
    mask = {"concatenated": "padding", "blocks": "blocks"}.get(layout, "4d")
    return builder.finish(pad_id=pad_id, mask=mask, chosen_index=chosen_index,
                          rejected_index=rejected_index, pair_ids=pair_ids, extras=extras)


@dataclass
class _Block:
    """One prompt and its completions, laid out contiguously: prompt, completion 1, completion 2, ..."""

    prompt: list[int]
    completions: list[list[int]]
    first_sequence: int              # sequence number of the first completion; the others follow in order

    @property
    def size(self) -> int:
        return len(self.prompt) + sum(len(c) for c in self.completions)


class _RowBuilder:
    """Collects rows of blocks, then lays them all out with a handful of tensor operations (no per-token
    Python): every prompt and completion is a *segment*, and each per-token field is its segment's value
    repeated over the segment's length."""

    def __init__(self) -> None:
        self.rows: list[list[_Block]] = []
        self.num_sequences = 0

    def block(self, prompt: list[int], completions: list[list[int]]) -> _Block:
        """A block whose completions become new sequences, numbered in order."""
        block = _Block(prompt, completions, self.num_sequences)
        self.num_sequences += len(completions)
        return block

    def add_row(self, blocks: list[_Block]) -> None:
        self.rows.append(blocks)

    def finish(self, *, pad_id: int, mask: str, chosen_index: list[int], rejected_index: list[int],
               pair_ids: list[int], extras: dict[str, torch.Tensor]) -> Batch:
        width = max(sum(b.size for b in row) for row in self.rows)
        # One entry per segment: flat start (row * width + offset), length, first position id, part (0 = prompt,
        # k = k-th completion of its block), block number within the row, sequence (-1 for prompts), and the
        # flat index of its block's last prompt token (which predicts a completion's first token).
        ids: list[list[int]] = []
        start, length, first_position, part, block_no, sequence, prompt_end = ([] for _ in range(7))
        for r, row in enumerate(self.rows):
            offset = r * width
            for b, block in enumerate(row):
                segments = [block.prompt, *block.completions]
                end_of_prompt = offset + len(block.prompt) - 1
                for k, segment in enumerate(segments):
                    ids.append(segment)
                    start.append(offset)
                    length.append(len(segment))
                    first_position.append(0 if k == 0 else len(block.prompt))
                    part.append(k)
                    block_no.append(b)
                    sequence.append(-1 if k == 0 else block.first_sequence + k - 1)
                    prompt_end.append(end_of_prompt)
                    offset += len(segment)
        lengths = torch.tensor(length)                                       # [segments]
        per_token = lambda values: torch.tensor(values).repeat_interleave(lengths)  # noqa: E731
        total = int(lengths.sum())
        within = torch.arange(total) - (lengths.cumsum(0) - lengths).repeat_interleave(lengths)  # [tokens]
        flat = per_token(start) + within                                     # [tokens] index into rows * width

        size = len(self.rows) * width
        input_ids = torch.full((size,), pad_id, dtype=torch.long)
        input_ids[flat] = torch.tensor(list(chain.from_iterable(ids)), dtype=torch.long)
        position_ids = torch.zeros(size, dtype=torch.long)
        position_ids[flat] = per_token(first_position) + within
        token_sequence = per_token(sequence)
        scored = token_sequence >= 0                                         # completion tokens are scored
        # Token j of a completion is predicted by the token before it in its own sequence: the prompt's last
        # token for j = 0, else the previous completion token.
        predictor = torch.where(within == 0, per_token(prompt_end), flat - 1)[scored]
        score_index, target_ids = predictor, input_ids[flat[scored]]

        shape = (len(self.rows), width)
        real = torch.zeros(size, dtype=torch.bool)
        real[flat] = True
        real = real.view(shape)
        attention_mask: torch.Tensor | BlockLayout
        if mask == "padding":
            attention_mask = real.long()                                     # [rows, seq]
        elif mask == "blocks":  # one row, no padding: the blocks' own structure instead of a dense mask
            blocks = self.rows[0]
            starts = [sum(b.size for b in blocks[:i]) for i in range(len(blocks))]
            attention_mask = BlockLayout(starts, [len(b.prompt) for b in blocks],
                                        [[len(c) for c in b.completions] for b in blocks])
        else:
            block_id = torch.full((size,), -1, dtype=torch.long)
            block_id[flat] = per_token(block_no)
            token_part = torch.zeros(size, dtype=torch.long)
            token_part[flat] = per_token(part)
            block_id, token_part = block_id.view(shape), token_part.view(shape)
            # Token q may attend to token k when both are in the same block, k is not after q, and k is in the
            # prompt or in q's own completion. Padding attends to itself only (an all-false row gives NaN).
            same_block = block_id[:, :, None] == block_id[:, None, :]
            visible = (token_part[:, None, :] == 0) | (token_part[:, :, None] == token_part[:, None, :])
            dense = same_block & visible & torch.ones(width, width, dtype=torch.bool).tril() & real[:, :, None]
            dense |= torch.eye(width, dtype=torch.bool) & ~real[:, :, None]
            attention_mask = dense[:, None]                                  # [rows, 1, seq, seq]
        return Batch(
            input_ids=input_ids.view(shape), position_ids=position_ids.view(shape), attention_mask=attention_mask,
            score_index=score_index, target_ids=target_ids, sequence_index=token_sequence[scored],
            token_position=within[scored],
            chosen_index=torch.tensor(chosen_index, dtype=torch.long),
            rejected_index=torch.tensor(rejected_index, dtype=torch.long),
            pair_ids=torch.tensor(pair_ids, dtype=torch.long), extras=extras,
            num_sequences=self.num_sequences, num_tokens=total)


def _prompt_blocks(pairs: Sequence[TokenizedPair], builder: _RowBuilder,
                   ) -> tuple[list[_Block], list[int], list[int]]:
    """One block per distinct prompt; each distinct completion of that prompt appears once in it."""
    by_prompt: dict[tuple[int, ...], dict[tuple[int, ...], int]] = {}
    for pair in pairs:
        completions = by_prompt.setdefault(tuple(pair.prompt_ids), {})
        for completion in (tuple(pair.chosen_ids), tuple(pair.rejected_ids)):
            completions.setdefault(completion, len(completions))
    blocks, first_of = [], {}
    for prompt, completions in by_prompt.items():
        block = builder.block(list(prompt), [list(c) for c in completions])
        blocks.append(block)
        first_of[prompt] = block.first_sequence
    sequence_of = lambda prompt, completion: first_of[prompt] + by_prompt[prompt][completion]  # noqa: E731
    chosen_index = [sequence_of(tuple(p.prompt_ids), tuple(p.chosen_ids)) for p in pairs]
    rejected_index = [sequence_of(tuple(p.prompt_ids), tuple(p.rejected_ids)) for p in pairs]
    return blocks, chosen_index, rejected_index


def _first_fit_decreasing(blocks: list[_Block], capacity: int) -> list[list[_Block]]:
    rows: list[list[_Block]] = []
    room: list[int] = []
    for block in sorted(blocks, key=lambda b: b.size, reverse=True):
        for i, free in enumerate(room):
            if block.size <= free:
                rows[i].append(block)
                room[i] -= block.size
                break
        else:
            rows.append([block])
            room.append(capacity - block.size)
    return rows


def grouped_permutation(groups: Sequence[Hashable] | None, num_pairs: int, generator: torch.Generator,
                        ) -> list[int]:
    """A seeded permutation of `range(num_pairs)` in which pairs of the same group (several responses to one
    prompt) are consecutive, so a batch holds as many of them as it can and the `shared` layout forwards their
    prompt once. Groups are shuffled as units; with no groups this is exactly `torch.randperm`."""
    if groups is None:
        return torch.randperm(num_pairs, generator=generator).tolist()
    members: dict[Hashable, list[int]] = {}
    for index, group in enumerate(groups):
        members.setdefault(group, []).append(index)
    units = list(members.values())
    return [index for unit in torch.randperm(len(units), generator=generator).tolist() for index in units[unit]]
