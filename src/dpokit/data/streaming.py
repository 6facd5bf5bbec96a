"""Data larger than memory (`--stream-data`): read, tokenize and write to the cache a shard at a time, then read
it back memory-mapped.

Records are read one at a time (`formats.iter_pairs`); every SHARD_PAIRS pairs are tokenized (in
`tokenize_pairs`' worker processes) and written as flat token arrays (`.npy`) into a folder of the cache, so no
more than one shard of text and tokens is ever in memory. The prepared data's `train` and `eval` are
`ShardedPairs`: sequences over the memory-mapped shards that build a `TokenizedPair` when indexed, so whoever
reads them holds only the pairs it is reading (and 32 bytes of lengths and offsets per pair).

What differs from `prepare` in memory: each pair is held out with probability --eval-fraction, drawn by the seed
(not an exact count); a mixture's pairs are taken whole `weight` times plus once more with probability the
fractional part, and their order is one permutation by the seed; unpaired (KTO) data is not streamed.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, overload

import numpy as np

from ..errors import DPOError
from . import formats, mixture, tokenization
from .formats import PreferencePair
from .tokenization import TokenizedPair, TruncationReport

SHARD_PAIRS = 10_000  # pairs read, tokenized and written at a time: the bound on memory while preparing


class ShardedPairs(Sequence[TokenizedPair]):
    """Tokenized pairs in `.npy` shards (`write_shard`), read on demand; `order` indexes pairs across shards (a
    mixture's permutation, repeats included), None for all of them in order."""

    def __init__(self, shards: list[Path], order: np.ndarray | None = None):
        self.shards = shards
        self._tokens = [np.load(f"{shard}.tokens.npy", mmap_mode="r") for shard in shards]
        lengths = [np.load(f"{shard}.lengths.npy") for shard in shards]
        self._groups = [np.load(f"{shard}.group.npy") for shard in shards]
        self._extras = [np.load(f"{shard}.extras.npy", mmap_mode="r") for shard in shards]
        self._extra_names = [json.loads(Path(f"{shard}.extras.json").read_text(encoding="utf-8")) for shard in shards]
        self._lengths = np.concatenate(lengths) if lengths else np.zeros((0, 3), dtype=np.int32)
        self._shard_of = np.repeat(np.arange(len(shards), dtype=np.int32), [len(x) for x in lengths])
        self._first = np.cumsum([0] + [len(x) for x in lengths])[:-1]  # index of each shard's first pair
        starts = [np.concatenate([[0], np.cumsum(x.sum(axis=1))[:-1]]) for x in lengths]
        self._start = np.concatenate(starts).astype(np.int64) if starts else np.zeros(0, dtype=np.int64)
        self.order = order

    def __len__(self) -> int:
        return len(self._lengths) if self.order is None else len(self.order)

    @overload
    def __getitem__(self, index: int) -> TokenizedPair: ...
    @overload
    def __getitem__(self, index: slice) -> list[TokenizedPair]: ...

    def __getitem__(self, index: int | slice) -> TokenizedPair | list[TokenizedPair]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        i = int(index % len(self) if self.order is None else self.order[index])
        shard, local = int(self._shard_of[i]), i - int(self._first[self._shard_of[i]])
        n_prompt, n_chosen, n_rejected = (int(n) for n in self._lengths[i])
        at = int(self._start[i])
        ids = self._tokens[shard][at:at + n_prompt + n_chosen + n_rejected].tolist()
        values = self._extras[shard][local]
        extras = {name: float(v) for name, v in zip(self._extra_names[shard], values) if not np.isnan(v)}
        group = int(self._groups[shard][local])
        return TokenizedPair(ids[:n_prompt], ids[n_prompt:n_prompt + n_chosen], ids[n_prompt + n_chosen:], extras,
                             None if group < 0 else group)

    def __iter__(self) -> Iterator[TokenizedPair]:
        return (self[i] for i in range(len(self)))

    def __add__(self, other: Sequence[TokenizedPair]) -> Chained:
        return Chained(self, other)

    def __radd__(self, other: Sequence[TokenizedPair]) -> Chained:
        return Chained(other, self)


class Chained(Sequence[TokenizedPair]):
    """`first + second` without copying either (train then eval pairs, as the loop scores them)."""

    def __init__(self, first: Sequence[TokenizedPair], second: Sequence[TokenizedPair]):
        self.first, self.second = first, second

    def __len__(self) -> int:
        return len(self.first) + len(self.second)

    def __getitem__(self, index: int) -> TokenizedPair:  # type: ignore[override]
        index = index + len(self) if index < 0 else index
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self.first[index] if index < len(self.first) else self.second[index - len(self.first)]

    def __iter__(self) -> Iterator[TokenizedPair]:
        yield from self.first
        yield from self.second


def write_shard(stem: Path, pairs: list[TokenizedPair]) -> None:
    """One shard's arrays: `stem.tokens.npy` (all ids, int32), `stem.lengths.npy` ([pairs, 3]: prompt, chosen,
    rejected), `stem.group.npy` (-1: none), `stem.extras.npy` ([pairs, extras], NaN: absent) and the extras'
    names in `stem.extras.json`."""
    names = sorted({k for p in pairs for k in p.extras})
    sequences = [ids for p in pairs for ids in (p.prompt_ids, p.chosen_ids, p.rejected_ids)]
    np.save(f"{stem}.tokens.npy", np.fromiter((t for ids in sequences for t in ids), dtype=np.int32,
                                              count=sum(map(len, sequences))))
    np.save(f"{stem}.lengths.npy", np.array([len(ids) for ids in sequences], dtype=np.int32).reshape(-1, 3))
    np.save(f"{stem}.group.npy", np.array([-1 if p.group is None else p.group for p in pairs], dtype=np.int64))
    np.save(f"{stem}.extras.npy", np.array([[p.extras.get(k, np.nan) for k in names] for p in pairs],
                                           dtype=np.float64).reshape(len(pairs), len(names)))
    Path(f"{stem}.extras.json").write_text(json.dumps(names), encoding="utf-8")


def prepare(settings: Any, tokenizer: Any, folder: Path, *, progress: bool = False,
            ) -> tuple[ShardedPairs, ShardedPairs, list[str], dict[str, int]]:
    """Train and eval pairs of `settings` (a `preparation.DataSettings`) in shards under `folder`, with the notes
    and counts; a folder a finished run left is read back as it is."""
    if settings.unpaired:
        raise DPOError("--stream-data does not stream unpaired (KTO) training: drop --stream-data for it")
    meta_path = folder / "meta.json"
    read_back = [f"read the tokenized shards from the cache {folder} (--no-cache redoes them)"]
    if not meta_path.is_file():
        read_back = []
        partial = folder.with_name(f".{folder.name}.{os.getpid()}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        meta = _write(settings, tokenizer, partial, progress)
        (partial / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(partial, folder)
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    train, held_out = ([folder / name for name in meta[split]] for split in ("train", "eval"))
    order = np.load(folder / "order.npy") if (folder / "order.npy").is_file() else None
    return ShardedPairs(train, order), ShardedPairs(held_out), meta["notes"] + read_back, meta["counts"]


def _write(settings: Any, tokenizer: Any, folder: Path, progress: bool) -> dict[str, Any]:
    """Read, split, tokenize and write every shard into `folder`; the meta data `prepare` reads back."""
    sources = mixture.parse(settings.data)
    rng = random.Random(settings.seed)
    limits = {**settings.limits(), "progress": progress}
    names: dict[str, list[str]] = {"train": [], "eval": []}
    truncation = {"train": TruncationReport(), "eval": TruncationReport()}
    reports, copies, taken = [], [], []  # copies: how often each train pair is in the mixture
    budget = settings.max_pairs
    for source in sources:
        report = formats.DataReport(source=source.path, format=settings.format or "?")
        reports.append(report)
        whole, share = divmod(source.weight, 1.0)
        stream = formats.iter_pairs(source.path, report, split=settings.data_split, columns=settings.columns,
                                    skip_invalid=settings.skip_invalid, pairs=settings.pairs)
        before = sum(copies)
        if budget is not None and budget <= 0:
            break
        for shard in _batches(stream, SHARD_PAIRS, budget):
            _check_kind(report, settings)
            report.pairs += len(shard)
            held = settings.eval_data is None and settings.eval_fraction > 0
            split: dict[str, list[PreferencePair]] = {"train": [], "eval": []}
            for pair in shard:
                split["eval" if held and rng.random() < settings.eval_fraction else "train"].append(pair)
            for kind, pairs in split.items():
                if pairs:
                    tokenized, report_part = tokenization.tokenize_pairs(pairs, tokenizer, **limits)
                    if any(getattr(p, "image_inputs", None) for p in tokenized):
                        raise DPOError(f"{source.path}: --stream-data does not stream prompts with images: drop "
                                       "--stream-data for this data")
                    truncation[kind].add(report_part)
                    names[kind].append(f"{kind}-{len(names[kind]):05d}")
                    write_shard(folder / names[kind][-1], tokenized)
                    if kind == "train":
                        copies += [int(whole) + (rng.random() < share) for _ in tokenized]
        if budget is not None:
            budget -= report.pairs
        if not report.pairs:
            raise DPOError(f"{source.path}: no usable preference pairs found ({report.records} records read)")
        taken.append(sum(copies) - before)
    notes = [line for report in reports for line in report.lines()]
    if mixture.is_mixture(sources):
        order = np.repeat(np.arange(len(copies), dtype=np.int64), copies)
        np.random.default_rng(settings.seed).shuffle(order)
        np.save(folder / "order.npy", order)
        notes.append(f"mixture of {len(sources)} sources (--seed {settings.seed}): {len(order)} pairs")
        notes += [f"  {source.path}: {count} of {report.pairs} pairs (weight {source.weight:g})"
                  for source, report, count in zip(sources, reports, taken)]
    if settings.eval_data:
        held_out, eval_report = formats.load_pairs(settings.eval_data, split=settings.eval_split or "test",
                                                   **settings.load_options())
        notes += eval_report.lines()
        tokenized, truncation["eval"] = tokenization.tokenize_pairs(held_out, tokenizer, **limits)
        names["eval"] = ["eval-00000"]
        write_shard(folder / names["eval"][0], tokenized)
    if not sum(copies):
        raise DPOError(f"{settings.data}: no training pairs left after tokenization and truncation (raise "
                       "--max-length)")
    notes += [f"train: {line}" for line in truncation["train"].lines()]
    notes += [f"eval: {line}" for line in truncation["eval"].lines()]
    notes.append(f"streamed into {len(names['train'])} train / {len(names['eval'])} eval shards of up to "
                 f"{SHARD_PAIRS} pairs")
    train = truncation["train"]
    counts = {"train_pairs": int(sum(copies)), "eval_pairs": truncation["eval"].pairs_in - truncation["eval"].dropped,
              "dropped_pairs": train.dropped, "truncated_pairs": train.truncated_prompts + train.truncated_completions,
              "skipped_invalid": sum(r.skipped_invalid for r in reports),
              "identical_pairs": sum(r.identical_pairs for r in reports),
              "boundary_mismatches": train.boundary_mismatches}
    return {"train": names["train"], "eval": names["eval"], "notes": notes, "counts": counts}


def _batches(pairs: Iterator[PreferencePair], size: int, limit: int | None) -> Iterator[list[PreferencePair]]:
    """`pairs` in lists of `size`, stopping after `limit` pairs (None: all)."""
    batch: list[PreferencePair] = []
    for read, pair in enumerate(pairs, start=1):
        batch.append(pair)
        if len(batch) == size or read == limit:
            yield batch
            batch = []
        if read == limit:
            return
    if batch:
        yield batch


def _check_kind(report: formats.DataReport, settings: Any) -> None:
    if report.format == "unpaired":
        raise DPOError(f"{report.source} holds unpaired (prompt/completion/label) examples, which --stream-data "
                       "does not stream: drop --stream-data")
    if report.format == "sft" and settings.sft is False:
        raise DPOError(f"{report.source} holds SFT (prompt/completion or text) records, with nothing to prefer: a "
                       "preference loss learns nothing from them; train them with `dpo sft` (or --loss sft)")
