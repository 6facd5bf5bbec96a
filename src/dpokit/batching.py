"""Lay tokenized pairs out as model inputs. The `Batch` is the contract between data and model.

A `Batch` says which tokens to forward (`input_ids`, `position_ids`, `attention_mask`) and which positions to
score: the hidden state at flat position `score_index[i]` predicts `target_ids[i]`, a token of completion
`sequence_index[i]`. Pair p compares sequence `chosen_index[p]` with `rejected_index[p]`; a pair with a gold
response (TPO's third one) has it in sequence `gold_index[p]`, another completion of the same prompt, laid out and
scored like the other two. Log-probs, losses and the loop only read this contract, so a new layout changes nothing
outside this file.

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

Pairs whose prompt has images (`TokenizedPair.image_inputs`) bring an `ImageBatch`: each distinct prompt's images
once, and where each prompt sits in the rows, so that their features are computed once per prompt and placed at
its image tokens wherever it appears (twice per pair in `concatenated`, once per block in the others). A prompt is
shared only with pairs of the same token ids and the same images.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field, fields
from itertools import chain

import hashlib

import numpy as np
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
class ImageBatch:
    """The images of a batch, each distinct prompt's once however many rows show it."""

    inputs: dict[str, torch.Tensor]  # the image processor's arrays of the distinct prompts, concatenated in order
    shown_at: torch.Tensor           # [prompt segments, 4] flat start (in rows*seq), length, prompt number and
                                     # block length (the prompt and its completions after it) of every prompt
                                     # segment with images, in flat order

    def to(self, device: torch.device | str, non_blocking: bool = False) -> ImageBatch:
        return ImageBatch({k: v.to(device, non_blocking=non_blocking) for k, v in self.inputs.items()}, self.shown_at)


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
    images: ImageBatch | None = None  # the prompts' images, for a vision-language model
    gold_index: torch.Tensor | None = None  # [pairs] sequence of each pair's gold response (-1: none); None when
                                            # no pair of the batch has one

    @property
    def num_pairs(self) -> int:
        return int(self.chosen_index.numel())

    def to(self, device: torch.device | str) -> Batch:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in moved.items():
            if isinstance(value, (torch.Tensor, BlockLayout, ImageBatch)):
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
    images = _DistinctImages()
    image_of = [images.number(p.image_inputs) for p in pairs]
    if layout == "concatenated":
        for completion_of in ("chosen_ids", "rejected_ids"):
            for pair, image in zip(pairs, image_of):
                builder.add_row([builder.block(pair.prompt_ids, [getattr(pair, completion_of)], image)])
        n = len(pairs)
        chosen_index, rejected_index = list(range(n)), list(range(n, 2 * n))
        gold_index = []
        for pair, image in zip(pairs, image_of):
            gold_index.append(-1 if pair.gold_ids is None else builder.num_sequences)
            if pair.gold_ids is not None:
                builder.add_row([builder.block(pair.prompt_ids, [pair.gold_ids], image)])
    else:
        blocks, chosen_index, rejected_index, gold_index = _prompt_blocks(pairs, image_of, builder)
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
    batch = builder.finish(pad_id=pad_id, mask=mask, chosen_index=chosen_index,
                           rejected_index=rejected_index, pair_ids=pair_ids, extras=extras, images=images)
    if any(index >= 0 for index in gold_index):
        batch.gold_index = torch.tensor(gold_index, dtype=torch.long)
    return batch


@dataclass
class _Block:
    """One prompt and its completions, laid out contiguously: prompt, completion 1, completion 2, ..."""

    prompt: list[int]
    completions: list[list[int]]
    first_sequence: int              # sequence number of the first completion; the others follow in order
    image: int = -1                  # the prompt's images: their number in `_DistinctImages`, -1 for none

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

    def block(self, prompt: list[int], completions: list[list[int]], image: int = -1) -> _Block:
        """A block whose completions become new sequences, numbered in order."""
        block = _Block(prompt, completions, self.num_sequences, image)
        self.num_sequences += len(completions)
        return block

    def add_row(self, blocks: list[_Block]) -> None:
        self.rows.append(blocks)

    def finish(self, *, pad_id: int, mask: str, chosen_index: list[int], rejected_index: list[int],
               pair_ids: list[int], extras: dict[str, torch.Tensor], images: _DistinctImages) -> Batch:
        width = max(sum(b.size for b in row) for row in self.rows)
        # One entry per segment: flat start (row * width + offset), length, first position id, part (0 = prompt,
        # k = k-th completion of its block), block number within the row, sequence (-1 for prompts), and the
        # flat index of its block's last prompt token (which predicts a completion's first token).
        ids: list[list[int]] = []
        start, length, first_position, part, block_no, sequence, prompt_end = ([] for _ in range(7))
        shown_at: list[tuple[int, int, int, int]] = []  # (flat start, length, image number, block length)
        for r, row in enumerate(self.rows):
            offset = r * width
            for b, block in enumerate(row):
                segments = [block.prompt, *block.completions]
                end_of_prompt = offset + len(block.prompt) - 1
                if block.image >= 0:
                    shown_at.append((offset, len(block.prompt), block.image, block.size))
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
            num_sequences=self.num_sequences, num_tokens=total, images=images.batch(shown_at))


def _prompt_blocks(pairs: Sequence[TokenizedPair], image_of: list[int], builder: _RowBuilder,
                   ) -> tuple[list[_Block], list[int], list[int], list[int]]:
    """One block per distinct prompt (token ids and images); each distinct completion of it (gold responses
    included) appears once in it. Returns the blocks and each pair's chosen, rejected and gold (-1: none)
    sequence."""
    by_prompt: dict[tuple[tuple[int, ...], int], dict[tuple[int, ...], int]] = {}
    for pair, image in zip(pairs, image_of):
        completions = by_prompt.setdefault((tuple(pair.prompt_ids), image), {})
        for completion in (pair.chosen_ids, pair.rejected_ids, *([pair.gold_ids] if pair.gold_ids is not None else [])):
            completions.setdefault(tuple(completion), len(completions))
    blocks, first_of = [], {}
    for (prompt, image), completions in by_prompt.items():
        block = builder.block(list(prompt), [list(c) for c in completions], image)
        blocks.append(block)
        first_of[prompt, image] = block.first_sequence
    sequence_of = lambda key, completion: first_of[key] + by_prompt[key][completion]  # noqa: E731
    chosen_index = [sequence_of((tuple(p.prompt_ids), i), tuple(p.chosen_ids)) for p, i in zip(pairs, image_of)]
    rejected_index = [sequence_of((tuple(p.prompt_ids), i), tuple(p.rejected_ids)) for p, i in zip(pairs, image_of)]
    gold_index = [-1 if p.gold_ids is None else sequence_of((tuple(p.prompt_ids), i), tuple(p.gold_ids))
                  for p, i in zip(pairs, image_of)]
    return blocks, chosen_index, rejected_index, gold_index


class _DistinctImages:
    """The batch's prompts' images, each distinct set once (compared by content: two prompts with the same token
    ids but other images are different prompts)."""

    def __init__(self) -> None:
        self.numbers: dict[tuple[object, ...], int] = {}
        self.inputs: list[dict[str, np.ndarray]] = []

    def number(self, image_inputs: dict[str, np.ndarray]) -> int:
        """The number of these images in the batch (new ones get the next number); -1 for a prompt without."""
        if not image_inputs:
            return -1
        key = tuple((name, array.shape, str(array.dtype), hashlib.blake2b(np.ascontiguousarray(array)).digest())
                    for name, array in sorted(image_inputs.items()))
        if key not in self.numbers:
            self.numbers[key] = len(self.inputs)
            self.inputs.append(image_inputs)
        return self.numbers[key]

    def batch(self, shown_at: list[tuple[int, int, int, int]]) -> ImageBatch | None:
        if not self.inputs:
            return None
        inputs = {name: torch.from_numpy(np.concatenate([arrays[name] for arrays in self.inputs]))
                  for name in self.inputs[0]}
        return ImageBatch(inputs, torch.tensor(sorted(shown_at), dtype=torch.long).view(-1, 4))


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
