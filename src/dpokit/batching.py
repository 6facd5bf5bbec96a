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
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import torch

from .tokenization import TokenizedPair

LAYOUTS = ("concatenated", "shared", "packed")


@dataclass
class Batch:
    input_ids: torch.Tensor          # [rows, seq]
    position_ids: torch.Tensor       # [rows, seq]
    attention_mask: torch.Tensor     # [rows, seq] padding mask (concatenated) or [rows, 1, seq, seq] bool
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
            if isinstance(value, torch.Tensor):
                moved[name] = value.to(device, non_blocking=True)
        moved["extras"] = {k: v.to(device, non_blocking=True) for k, v in self.extras.items()}
        return Batch(**moved)


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
        else:
            capacity = max([len(b.tokens) for b in blocks] + [row_capacity or 0])
            for row in _first_fit_decreasing(blocks, capacity):
                builder.add_row(row)
    extras = {}
    for name in sorted({k for p in pairs for k in p.extras}):
        extras[name] = torch.tensor([p.extras.get(name, float("nan")) for p in pairs], dtype=torch.float32)
    return builder.finish(pad_id=pad_id, four_d=layout != "concatenated", chosen_index=chosen_index,
                          rejected_index=rejected_index, pair_ids=pair_ids, extras=extras)


@dataclass
class _Block:
    """One prompt and its completions, laid out contiguously: prompt, completion 1, completion 2, ..."""

    tokens: list[int]
    positions: list[int]
    parts: list[int]                 # 0 = prompt, k = the k-th completion (what each token may attend to)
    scored: list[tuple[int, int, int, int]]  # (offset of predicting token, target, sequence, position)


class _RowBuilder:
    def __init__(self) -> None:
        self.rows: list[list[_Block]] = []
        self.num_sequences = 0

    def block(self, prompt: list[int], completions: list[list[int]]) -> _Block:
        """A block whose completions become new sequences, numbered in order."""
        tokens, positions, parts = list(prompt), list(range(len(prompt))), [0] * len(prompt)
        scored = []
        for k, completion in enumerate(completions, start=1):
            start = len(tokens)
            for j, target in enumerate(completion):
                # Token j is predicted by the previous token of its own sequence: the prompt's last for j = 0.
                predictor = len(prompt) - 1 if j == 0 else start + j - 1
                scored.append((predictor, target, self.num_sequences, j))
            tokens += completion
            positions += range(len(prompt), len(prompt) + len(completion))
            parts += [k] * len(completion)
            self.num_sequences += 1
        return _Block(tokens, positions, parts, scored)

    def add_row(self, blocks: list[_Block]) -> None:
        self.rows.append(blocks)

    def finish(self, *, pad_id: int, four_d: bool, chosen_index: list[int], rejected_index: list[int],
               pair_ids: list[int], extras: dict[str, torch.Tensor]) -> Batch:
        width = max(sum(len(b.tokens) for b in row) for row in self.rows)
        n_rows = len(self.rows)
        input_ids = torch.full((n_rows, width), pad_id, dtype=torch.long)
        position_ids = torch.zeros((n_rows, width), dtype=torch.long)
        block_id = torch.full((n_rows, width), -1, dtype=torch.long)
        part = torch.zeros((n_rows, width), dtype=torch.long)
        score_index, target_ids, sequence_index, token_position = [], [], [], []
        num_tokens = 0
        for r, row in enumerate(self.rows):
            offset = 0
            for b, block in enumerate(row):
                end = offset + len(block.tokens)
                input_ids[r, offset:end] = torch.tensor(block.tokens)
                position_ids[r, offset:end] = torch.tensor(block.positions)
                part[r, offset:end] = torch.tensor(block.parts)
                block_id[r, offset:end] = b
                for predictor, target, sequence, position in block.scored:
                    score_index.append(r * width + offset + predictor)
                    target_ids.append(target)
                    sequence_index.append(sequence)
                    token_position.append(position)
                offset = end
            num_tokens += offset
        real = block_id >= 0
        if four_d:
            # Token q may attend to token k when both are in the same block, k is not after q, and k is in the
            # prompt or in q's own completion. Padding attends to itself only (an all-false row gives NaN).
            same_block = block_id[:, :, None] == block_id[:, None, :]
            causal = torch.ones(width, width, dtype=torch.bool).tril()
            visible = (part[:, None, :] == 0) | (part[:, :, None] == part[:, None, :])
            mask = same_block & causal & visible & real[:, :, None]
            mask |= torch.eye(width, dtype=torch.bool) & ~real[:, :, None]
            attention_mask = mask[:, None]
        else:
            attention_mask = real.long()
        return Batch(
            input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
            score_index=torch.tensor(score_index, dtype=torch.long),
            target_ids=torch.tensor(target_ids, dtype=torch.long),
            sequence_index=torch.tensor(sequence_index, dtype=torch.long),
            token_position=torch.tensor(token_position, dtype=torch.long),
            chosen_index=torch.tensor(chosen_index, dtype=torch.long),
            rejected_index=torch.tensor(rejected_index, dtype=torch.long),
            pair_ids=torch.tensor(pair_ids, dtype=torch.long), extras=extras,
            num_sequences=self.num_sequences, num_tokens=num_tokens)


def _prompt_blocks(pairs: Sequence[TokenizedPair], builder: _RowBuilder,
                   ) -> tuple[list[_Block], list[int], list[int]]:
    """One block per distinct prompt; each distinct completion of that prompt appears once in it."""
    by_prompt: dict[tuple[int, ...], list[tuple[int, ...]]] = {}
    for pair in pairs:
        completions = by_prompt.setdefault(tuple(pair.prompt_ids), [])
        for completion in (tuple(pair.chosen_ids), tuple(pair.rejected_ids)):
            if completion not in completions:
                completions.append(completion)
    blocks, sequence_of = [], {}
    for prompt, completions in by_prompt.items():
        first = builder.num_sequences
        blocks.append(builder.block(list(prompt), [list(c) for c in completions]))
        for k, completion in enumerate(completions):
            sequence_of[prompt, completion] = first + k
    chosen_index = [sequence_of[tuple(p.prompt_ids), tuple(p.chosen_ids)] for p in pairs]
    rejected_index = [sequence_of[tuple(p.prompt_ids), tuple(p.rejected_ids)] for p in pairs]
    return blocks, chosen_index, rejected_index


def _first_fit_decreasing(blocks: list[_Block], capacity: int) -> list[list[_Block]]:
    rows: list[list[_Block]] = []
    room: list[int] = []
    for block in sorted(blocks, key=lambda b: len(b.tokens), reverse=True):
        size = len(block.tokens)
        for i, free in enumerate(room):
            if size <= free:
                rows[i].append(block)
                room[i] -= size
                break
        else:
            rows.append([block])
            room.append(capacity - size)
    return rows
