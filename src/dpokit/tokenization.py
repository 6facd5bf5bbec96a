"""Turn `PreferencePair`s into token ids with an exact prompt/completion boundary.

The boundary is where most silent DPO bugs live. We tokenize `prompt` and `prompt + completion` and cut at
their common token prefix, so a BPE merge across the boundary never makes the scored completion differ from
what the model sees at inference; the prompt is the prefix common to the prompt and both full texts, so chosen
and rejected share it token for token (which is what lets the prompt be forwarded once). Each completion ends
with EOS exactly once; BOS comes from the tokenizer once, never doubled.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .formats import PreferencePair


@dataclass
class TokenizedPair:
    """Token ids of one pair: the shared prompt, then each completion (ending with EOS)."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    extras: dict[str, float] = field(default_factory=dict)
    group: int | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)


@dataclass
class TruncationReport:
    """Counts of everything tokenization changed or dropped, shown to the user."""

    pairs_in: int = 0
    truncated_prompts: int = 0
    truncated_completions: int = 0
    dropped: int = 0
    boundary_mismatches: int = 0

    def lines(self) -> list[str]:
        out = []
        if self.truncated_prompts:
            out.append(f"truncated {self.truncated_prompts} of {self.pairs_in} prompts to --max-prompt-length")
        if self.truncated_completions:
            out.append(f"truncated completions of {self.truncated_completions} pairs to fit --max-length / "
                       "--max-completion-length")
        if self.dropped:
            out.append(f"dropped {self.dropped} pairs whose prompt leaves no room for a completion")
        if self.boundary_mismatches:
            out.append(f"{self.boundary_mismatches} pairs: the prompt's own tokens are not a prefix of prompt+"
                       "completion (a merge across the boundary); cut at the common token prefix")
        return out


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def split_at_boundary(prompt_ids: list[int], chosen_full: list[int], rejected_full: list[int],
                      ) -> tuple[list[int], list[int], list[int], bool]:
    """Cut two full tokenizations at the prefix they share with the prompt's tokens.

    Returns `(prompt, chosen_completion, rejected_completion, mismatch)`; `mismatch` is True when the prompt's
    own tokens are not a prefix of a full text (a BPE merge across the boundary).
    """
    k = min(common_prefix_length(prompt_ids, chosen_full), common_prefix_length(prompt_ids, rejected_full))
    return chosen_full[:k], chosen_full[k:], rejected_full[k:], k < len(prompt_ids)


def with_eos(ids: list[int], eos_id: int | None) -> list[int]:
    """End a completion with EOS exactly once."""
    if eos_id is None or (ids and ids[-1] == eos_id):
        return ids
    return [*ids, eos_id]


def truncate_pair(pair: TokenizedPair, *, max_length: int, max_prompt_length: int | None,
                  max_completion_length: int | None, truncation_mode: str, report: TruncationReport,
                  ) -> TokenizedPair | None:
    """Apply the length limits; None when nothing of the completion would be left."""
    prompt = pair.prompt_ids
    if max_prompt_length is not None and len(prompt) > max_prompt_length:
        report.truncated_prompts += 1
        prompt = prompt[-max_prompt_length:] if truncation_mode == "keep_end" else prompt[:max_prompt_length]
    room = max_length - len(prompt)
    if max_completion_length is not None:
        room = min(room, max_completion_length)
    if room <= 0:
        report.dropped += 1
        return None
    chosen, rejected = pair.chosen_ids[:room], pair.rejected_ids[:room]
    if len(chosen) < len(pair.chosen_ids) or len(rejected) < len(pair.rejected_ids):
        report.truncated_completions += 1
    return TokenizedPair(prompt, chosen, rejected, pair.extras, pair.group)


def tokenize_pairs(pairs: Sequence[PreferencePair], tokenizer: Any, *, max_length: int,
                   max_prompt_length: int | None = None, max_completion_length: int | None = None,
                   truncation_mode: str = "keep_end") -> tuple[list[TokenizedPair], TruncationReport]:
    """Tokenize text pairs (batched, fast tokenizer) with the exact boundary, EOS and truncation rules above."""
    report = TruncationReport(pairs_in=len(pairs))
    prompts = [p.prompt for p in pairs]
    encode = lambda texts: tokenizer(texts, add_special_tokens=True)["input_ids"]  # noqa: E731
    prompt_ids = encode(prompts)
    chosen_full = encode([p.prompt + p.chosen for p in pairs])
    rejected_full = encode([p.prompt + p.rejected for p in pairs])
    out = []
    for pair, p_ids, c_ids, r_ids in zip(pairs, prompt_ids, chosen_full, rejected_full):
        prompt, chosen, rejected, mismatch = split_at_boundary(p_ids, c_ids, r_ids)
        report.boundary_mismatches += mismatch
        tokenized = TokenizedPair(prompt, with_eos(chosen, tokenizer.eos_token_id),
                                  with_eos(rejected, tokenizer.eos_token_id), dict(pair.extras), pair.group)
        kept = truncate_pair(tokenized, max_length=max_length, max_prompt_length=max_prompt_length,
                             max_completion_length=max_completion_length, truncation_mode=truncation_mode,
                             report=report)
        if kept is not None:
            out.append(kept)
    return out, report
