"""From a data argument to tokenized train and eval pairs: load, split, tokenize, report.

Glue between the data rooms (formats, tokenization, synthetic); takes plain arguments, returns plain lists.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from . import formats, synthetic, tokenization
from .tokenization import TokenizedPair

SYNTHETIC_PAIRS = 1024  # the built-in task's size (train + held out)


@dataclass
class PreparedData:
    train: list[TokenizedPair]
    eval: list[TokenizedPair]
    pad_id: int
    notes: list[str] = field(default_factory=list)   # what loading and tokenization did, for the user
    counts: dict[str, int] = field(default_factory=dict)


def prepare(*, data: str, eval_data: str | None, tokenizer: Any, seed: int, eval_fraction: float,
            data_split: str = "train", eval_split: str | None = None, format: str | None = None,
            columns: str | None = None, max_pairs: int | None = None, skip_invalid: bool = False,
            max_length: int = 1024, max_prompt_length: int | None = None,
            max_completion_length: int | None = None, truncation_mode: str = "keep_end") -> PreparedData:
    if data == "synthetic":
        pairs = synthetic.make_pairs(max_pairs or SYNTHETIC_PAIRS, seed)
        n_eval = round(len(pairs) * eval_fraction)
        train, held_out = pairs[n_eval:], pairs[:n_eval]
        return PreparedData(train, held_out, pad_id=synthetic.EOS,
                            notes=[f"synthetic task: {len(train)} train / {len(held_out)} held-out pairs"],
                            counts={"train_pairs": len(train), "eval_pairs": len(held_out)})

    load = dict(format=format, columns=columns, max_pairs=max_pairs, skip_invalid=skip_invalid)
    pairs, report = formats.load_pairs(data, split=data_split, **load)
    notes = report.lines()
    if eval_data:
        train_pairs = pairs
        eval_pairs, eval_report = formats.load_pairs(eval_data, split=eval_split or "test", **load)
        notes += eval_report.lines()
    else:
        train_pairs, eval_pairs = formats.split_pairs(pairs, eval_fraction, seed)
    limits = dict(max_length=max_length, max_prompt_length=max_prompt_length,
                  max_completion_length=max_completion_length, truncation_mode=truncation_mode)
    train, train_trunc = tokenization.tokenize_pairs(train_pairs, tokenizer, **limits)
    held_out, eval_trunc = tokenization.tokenize_pairs(eval_pairs, tokenizer, **limits) if eval_pairs else ([], None)
    notes += [f"train: {line}" for line in train_trunc.lines()]
    if eval_trunc is not None:
        notes += [f"eval: {line}" for line in eval_trunc.lines()]
    counts = {"train_pairs": len(train), "eval_pairs": len(held_out), "dropped_pairs": train_trunc.dropped,
              "truncated_pairs": train_trunc.truncated_prompts + train_trunc.truncated_completions,
              "skipped_invalid": report.skipped_invalid}
    if not train:
        from .errors import DPOError

        raise DPOError(f"{data}: no training pairs left after tokenization and truncation (raise --max-length)")
    return PreparedData(train, held_out, pad_id=tokenizer.pad_token_id, notes=notes, counts=counts)
