"""From a data argument to tokenized train and eval pairs: load, split, (unpair), tokenize, report, cache.

Glue between the data rooms (formats, tokenization, data_cache, synthetic); takes plain arguments, returns plain
lists. With `cache=True` a second call with the same data bytes, tokenizer and settings loads the result from
disk instead of redoing it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import cache as data_cache, formats, synthetic, tokenization
from ..errors import DPOError
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
            columns: str | None = None, pairs: str = "best-worst", max_pairs: int | None = None,
            skip_invalid: bool = False, max_length: int = 1024, max_prompt_length: int | None = None,
            max_completion_length: int | None = None, truncation_mode: str = "keep_end", unpaired: bool = False,
            sft: bool | None = None, cache: bool = True, cache_dir: str | None = None, progress: bool = False,
            ) -> PreparedData:
    """Train and eval pairs for the loop. `unpaired=True` (a loss with `paired=False`, e.g. KTO) turns paired
    data into labelled examples with mismatched completions (`formats.to_unpaired`).

    `sft`: whether the run's losses are all `sft`. SFT-format data (chosen = rejected) is refused when they are
    not, as unpaired data is without an unpaired loss: a preference loss learns nothing from it and looks like
    it trains. None does not check (callers that only score the data).
    """
    if data == "synthetic":
        return _synthetic(max_pairs or SYNTHETIC_PAIRS, seed, eval_fraction, unpaired)
    settings = dict(format=format, columns=columns, pairs=pairs, max_pairs=max_pairs, skip_invalid=skip_invalid,
                    max_length=max_length, max_prompt_length=max_prompt_length, eval_fraction=eval_fraction,
                    max_completion_length=max_completion_length, truncation_mode=truncation_mode, seed=seed,
                    unpaired=unpaired, sft=sft)
    eval_split = eval_split or "test"
    sources = [(data, data_split)] + ([(eval_data, eval_split)] if eval_data else [])
    directory = Path(cache_dir) if cache_dir else data_cache.default_dir()
    key = data_cache.cache_key(sources=sources, tokenizer=tokenizer, settings=settings) if cache else None
    if key is not None and (hit := data_cache.load(directory, key)) is not None:
        notes = hit.meta["notes"] + [f"loaded tokenized data from the cache {directory / key}.npz (--no-cache "
                                     "redoes it)"]
        return PreparedData(hit.splits["train"], hit.splits["eval"], tokenizer.pad_token_id, notes,
                            hit.meta["counts"])

    started = time.perf_counter()
    load = dict(format=format, columns=columns, pairs=pairs, max_pairs=max_pairs, skip_invalid=skip_invalid,
                seed=seed)
    loaded, report = formats.load_pairs(data, split=data_split, **load)
    notes = report.lines()
    if report.format == "unpaired" and not unpaired:
        raise DPOError(f"{data} holds unpaired (prompt/completion/label) examples: train them with an unpaired "
                       "loss such as --loss kto")
    if report.format == "sft" and sft is False:
        raise DPOError(f"{data} holds SFT (prompt/completion or text) records, with nothing to prefer: a preference "
                       "loss learns nothing from them; train them with `dpo sft` (or --loss sft)")
    if report.format == "sft":
        notes.append("  sft format: chosen = rejected = the completion; train it with an NLL loss such as --loss sft")
    if eval_data:
        train_pairs = loaded
        eval_pairs, eval_report = formats.load_pairs(eval_data, split=eval_split, **load)
        notes += eval_report.lines()
        if eval_report.format == "sft" and sft is False:
            raise DPOError(f"--eval-data {eval_data} holds SFT (prompt/completion or text) records: a preference "
                           "loss cannot score them; give preference pairs, or train with `dpo sft` (or --loss sft)")
    else:
        train_pairs, eval_pairs = formats.split_pairs(loaded, eval_fraction, seed)
    if unpaired:
        train_pairs = formats.to_unpaired(train_pairs, seed)
        eval_pairs = formats.to_unpaired(eval_pairs, seed + 1) if eval_pairs else []
    limits = dict(max_length=max_length, max_prompt_length=max_prompt_length,
                  max_completion_length=max_completion_length, truncation_mode=truncation_mode, progress=progress)
    train, train_trunc = tokenization.tokenize_pairs(train_pairs, tokenizer, **limits)
    held_out, eval_trunc = tokenization.tokenize_pairs(eval_pairs, tokenizer, **limits)
    notes += [f"train: {line}" for line in train_trunc.lines()]
    notes += [f"eval: {line}" for line in eval_trunc.lines()]
    if not train:
        raise DPOError(f"{data}: no training pairs left after tokenization and truncation (raise --max-length)")
    counts = {"train_pairs": len(train), "eval_pairs": len(held_out), "dropped_pairs": train_trunc.dropped,
              "truncated_pairs": train_trunc.truncated_prompts + train_trunc.truncated_completions,
              "skipped_invalid": report.skipped_invalid, "identical_pairs": report.identical_pairs,
              "boundary_mismatches": train_trunc.boundary_mismatches}
    notes.append(f"prepared {len(train)} train / {len(held_out)} eval pairs in {time.perf_counter() - started:.1f}s")
    if key is not None:
        data_cache.save(directory, key, data_cache.CachedData({"train": train, "eval": held_out},
                                                              {"notes": notes, "counts": counts}))
    return PreparedData(train, held_out, pad_id=tokenizer.pad_token_id, notes=notes, counts=counts)


def _synthetic(num_pairs: int, seed: int, eval_fraction: float, unpaired: bool) -> PreparedData:
    pairs = synthetic.make_pairs(num_pairs, seed)
    n_eval = round(len(pairs) * eval_fraction)
    train, held_out = pairs[n_eval:], pairs[:n_eval]
    if unpaired:
        train, held_out = _unpair_tokenized(train, seed), _unpair_tokenized(held_out, seed + 1)
    return PreparedData(train, held_out, pad_id=synthetic.EOS,
                        notes=[f"synthetic task: {len(train)} train / {len(held_out)} held-out examples"],
                        counts={"train_pairs": len(train), "eval_pairs": len(held_out)})


def _unpair_tokenized(pairs: list[TokenizedPair], seed: int) -> list[TokenizedPair]:
    """`formats.to_unpaired` for already tokenized pairs (the synthetic task has no text)."""
    own = [(i, pair, ids, label) for i, pair in enumerate(pairs)
           for ids, label in ((pair.chosen_ids, 1.0), (pair.rejected_ids, 0.0))]
    partner = formats.mismatch_partners(len(own), seed)
    return [TokenizedPair(pair.prompt_ids, ids, own[partner[k]][2], {**pair.extras, "label": label}, group=i)
            for k, (i, pair, ids, label) in enumerate(own)]
