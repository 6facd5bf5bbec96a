"""From a data argument to tokenized train and eval pairs: load, split, (unpair), tokenize, report, cache.

Glue between the data rooms (formats, tokenization, cache, synthetic); takes a `DataSettings`, returns plain
lists. With `cache=True` a second call with the same data bytes, tokenizer and settings loads the result from
disk instead of redoing it.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from . import cache as data_cache, formats, mixture, multimodal, streaming, synthetic, tokenization
from ..errors import DPOError
from .formats import PreferencePair
from .tokenization import TokenizedPair

SYNTHETIC_PAIRS = 1024  # the built-in task's size (train + held out)


@dataclass
class PreparedData:
    train: list[TokenizedPair]
    eval: list[TokenizedPair]
    pad_id: int
    notes: list[str] = field(default_factory=list)   # what loading and tokenization did, for the user
    counts: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class DataSettings:
    """What to read and how to turn it into tokenized pairs; each field is the `dpo train` setting of its name."""

    data: str
    eval_data: str | None = None
    data_split: str = "train"
    eval_split: str | None = None           # default "test"
    format: str | None = None               # None: detected from the records
    columns: str | None = None
    pairs: str = "best-worst"               # how ranked data becomes pairs
    max_pairs: int | None = None
    skip_invalid: bool = False
    seed: int = 0
    eval_fraction: float = 0.0              # held out from `data` when there is no `eval_data`
    max_length: int = 1024
    max_prompt_length: int | None = None
    max_completion_length: int | None = None
    truncation_mode: str = "keep_end"
    unpaired: bool = False                  # a loss with `paired=False` (KTO): labelled single completions
    sft: bool | None = None                 # the run's losses are all `sft` (None: do not check the data's kind)
    stream_data: bool = False               # tokenize in shards to the cache, read back memory-mapped (`streaming`)

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any], **overrides: Any) -> DataSettings:
        """The fields found in `settings` (e.g. `Config.to_dict()`), then `overrides`."""
        names = {f.name for f in fields(cls)}
        return cls(**{**{k: v for k, v in settings.items() if k in names}, **overrides})

    def load_options(self) -> dict[str, Any]:
        """`formats.load_pairs`'s keywords."""
        return dict(format=self.format, columns=self.columns, pairs=self.pairs, max_pairs=self.max_pairs,
                    skip_invalid=self.skip_invalid, seed=self.seed)

    def limits(self) -> dict[str, Any]:
        """`tokenization.tokenize_pairs`'s truncation keywords."""
        return dict(max_length=self.max_length, max_prompt_length=self.max_prompt_length,
                    max_completion_length=self.max_completion_length, truncation_mode=self.truncation_mode)


def prepare(settings: DataSettings, tokenizer: Any, *, cache: bool = True, cache_dir: str | None = None,
            progress: bool = False) -> PreparedData:
    """Train and eval pairs for the loop. `settings.unpaired` (a loss with `paired=False`, e.g. KTO) turns paired
    data into labelled examples with mismatched completions (`formats.to_unpaired`).

    `settings.sft`: whether the run's losses are all `sft`. SFT-format data (chosen = rejected) is refused when
    they are not, as unpaired data is without an unpaired loss: a preference loss learns nothing from it and
    looks like it trains. None does not check (callers that only score the data).
    """
    data, eval_data = settings.data, settings.eval_data
    if data == "synthetic":
        return _synthetic(settings.max_pairs or SYNTHETIC_PAIRS, settings.seed, settings.eval_fraction,
                          settings.unpaired)
    sources = [(data, settings.data_split)] + ([(eval_data, settings.eval_split or "test")] if eval_data else [])
    key_settings = {k: v for k, v in asdict(settings).items() if k not in ("data", "eval_data", "data_split",
                                                                           "eval_split")}
    directory = Path(cache_dir) if cache_dir else data_cache.default_dir()
    processor = multimodal.is_processor(tokenizer)
    if processor:  # the cache holds token ids only, and its key does not cover the image files' bytes
        cache = False
        if settings.stream_data:
            raise DPOError("--stream-data does not take a vision-language model's data yet; drop --stream-data")
    key = data_cache.cache_key(sources=sources, tokenizer=tokenizer, settings=key_settings) if cache else None
    if settings.stream_data:  # train / eval are then `streaming.ShardedPairs`, sequences read from disk
        key = key or data_cache.cache_key(sources=sources, tokenizer=tokenizer, settings=key_settings)
        shards = directory / f"{key}.shards"
        if not cache:
            shutil.rmtree(shards, ignore_errors=True)
        train, held_out, notes, counts = streaming.prepare(settings, tokenizer, shards, progress=progress)
        return PreparedData(train, held_out, tokenizer.pad_token_id, notes, counts)  # type: ignore[arg-type]
    stale = key is not None and (directory / f"{key}.npz").is_file()
    if key is not None and (hit := data_cache.load(directory, key)) is not None:
        notes = hit.meta["notes"] + [f"loaded tokenized data from the cache {directory / key}.npz (--no-cache "
                                     "redoes it)"]
        return PreparedData(hit.splits["train"], hit.splits["eval"], tokenizer.pad_token_id, notes,
                            hit.meta["counts"])

    started = time.perf_counter()
    train, held_out, notes, counts = _tokenized_splits(settings, tokenizer, processor, progress)
    if stale:  # there, but truncated or not a cache file: rebuilt and written over
        notes.insert(0, f"warning: the data cache {directory / key}.npz is unreadable (truncated or not written by "
                        "dpokit); tokenizing again and replacing it")
    notes.append(f"prepared {len(train)} train / {len(held_out)} eval pairs in {time.perf_counter() - started:.1f}s")
    if key is not None:
        try:
            data_cache.save(directory, key, data_cache.CachedData({"train": train, "eval": held_out},
                                                                  {"notes": notes, "counts": counts}))
            notes.append(f"cached the tokenized data in {directory / key}.npz: a run with the same data, tokenizer "
                         "and settings loads it from there (--cache-dir moves the cache, --no-cache skips it)")
        except OSError as err:  # a full or read-only cache disk costs the cache, not the run
            notes.append(f"warning: could not write the data cache {directory / key}.npz "
                         f"({err.strerror or err}); training goes on without it")
    return PreparedData(train, held_out, pad_id=multimodal.text_tokenizer(tokenizer).pad_token_id, notes=notes,
                        counts=counts)


def _tokenized_splits(settings: DataSettings, tokenizer: Any, processor: bool, progress: bool,
                      ) -> tuple[list[TokenizedPair], list[TokenizedPair], list[str], dict[str, int]]:
    """Load, split (or read `eval_data`), unpair for unpaired losses, and tokenize: train and held-out pairs, the
    notes for the user and the counts of what was skipped, dropped or truncated."""
    data, eval_data, seed, sft = settings.data, settings.eval_data, settings.seed, settings.sft
    load = settings.load_options()
    loaded, notes, skipped, identical = _load_train(settings)
    if eval_data:
        train_pairs = loaded
        eval_pairs, eval_report = formats.load_pairs(eval_data, split=settings.eval_split or "test", **load)
        notes += eval_report.lines()
        if eval_report.format == "sft" and sft is False:
            raise DPOError(f"--eval-data {eval_data} holds SFT (prompt/completion or text) records: a preference "
                           "loss cannot score them; give preference pairs, or train with `dpo sft` (or --loss sft)")
    else:
        train_pairs, eval_pairs = formats.split_pairs(loaded, settings.eval_fraction, seed)
    if settings.unpaired:
        train_pairs = formats.to_unpaired(train_pairs, seed)
        eval_pairs = formats.to_unpaired(eval_pairs, seed + 1) if eval_pairs else []
    limits = {**settings.limits(), "progress": progress}
    multimodal.check_model_takes_images(data, train_pairs + eval_pairs, tokenizer)
    tokenize = multimodal.tokenize_pairs if processor else tokenization.tokenize_pairs
    train, train_trunc = tokenize(train_pairs, tokenizer, **limits)
    held_out, eval_trunc = tokenize(eval_pairs, tokenizer, **limits)
    notes += [f"train: {line}" for line in train_trunc.lines()]
    notes += [f"eval: {line}" for line in eval_trunc.lines()]
    if not train:
        raise DPOError(f"{data}: no training pairs left after tokenization and truncation (raise --max-length)")
    counts = {"train_pairs": len(train), "eval_pairs": len(held_out), "dropped_pairs": train_trunc.dropped,
              "truncated_pairs": train_trunc.truncated_prompts + train_trunc.truncated_completions,
              "skipped_invalid": skipped, "identical_pairs": identical,
              "boundary_mismatches": train_trunc.boundary_mismatches}
    if processor:
        counts["images"] = sum(len(p.images) for p in train_pairs + eval_pairs)
        notes.append(f"{counts['images']} images, encoded with the model's processor (not cached)")
    return train, held_out, notes, counts


def _load_train(settings: DataSettings) -> tuple[list[PreferencePair], list[str], int, int]:
    """The training pairs of `settings.data` (one source, or a mixture), the notes on them, and the counts of
    skipped invalid records and of pairs with chosen identical to rejected."""
    sources = mixture.parse(settings.data)
    if not mixture.is_mixture(sources):
        loaded, report = formats.load_pairs(settings.data, split=settings.data_split, **settings.load_options())
        return loaded, _checked(settings, report), report.skipped_invalid, report.identical_pairs
    mixed, reports, mixture_notes = mixture.load(sources, split=settings.data_split, **settings.load_options())
    notes = [line for report in reports for line in _checked(settings, report)] + mixture_notes
    return (mixed, notes, sum(r.skipped_invalid for r in reports), sum(r.identical_pairs for r in reports))


def _checked(settings: DataSettings, report: formats.DataReport) -> list[str]:
    """The report's lines, once its data is known to suit the run's losses (`prepare` says which)."""
    notes = report.lines()
    if report.format == "unpaired" and not settings.unpaired:
        raise DPOError(f"{report.source} holds unpaired (prompt/completion/label) examples: train them with an "
                       "unpaired loss such as --loss kto")
    if report.format == "sft" and settings.sft is False:
        raise DPOError(f"{report.source} holds SFT (prompt/completion or text) records, with nothing to prefer: a "
                       "preference loss learns nothing from them; train them with `dpo sft` (or --loss sft)")
    if report.format == "sft":
        notes.append("  sft format: chosen = rejected = the completion; train it with an NLL loss such as --loss sft")
    return notes


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
