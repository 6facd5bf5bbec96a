"""Read preference records from files and normalise them into `PreferencePair`s.

This room knows file formats and record schemas, nothing about tokens or tensors. Every bad record is reported
as `file:line: field: what is wrong` (or skipped and counted with `skip_invalid`).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import DPOError

Text = str | list[dict[str, Any]]  # plain text, or chat messages [{"role": ..., "content": ...}]


@dataclass(frozen=True)
class PreferencePair:
    """One preference: `chosen` is preferred over `rejected` as a completion of `prompt`.

    `extras` holds optional per-pair numbers that some losses use (score_chosen, score_rejected, margin, label).
    `group` is the same for pairs that share a prompt (several ranked responses), so it can be computed once.
    """

    prompt: Text
    chosen: Text
    rejected: Text
    extras: dict[str, float] = field(default_factory=dict)
    group: int | None = None


@dataclass
class DataReport:
    """What loading did, for the user: nothing is dropped without being counted here."""

    source: str
    format: str
    records: int = 0
    pairs: int = 0
    skipped_invalid: int = 0
    identical_pairs: int = 0
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"{self.source}: {self.pairs} pairs from {self.records} records ({self.format} format)"]
        if self.skipped_invalid:
            out.append(f"  skipped {self.skipped_invalid} invalid records (--skip-invalid)")
        if self.identical_pairs:
            out.append(f"  {self.identical_pairs} pairs have chosen identical to rejected (they carry no signal)")
        out.extend(f"  {note}" for note in self.notes)
        return out


EXTRA_FIELDS = ("score_chosen", "score_rejected", "margin")


def load_pairs(path: str, *, format: str | None = None, split: str = "train", columns: str | None = None,
               max_pairs: int | None = None, skip_invalid: bool = False) -> tuple[list[PreferencePair], DataReport]:
    """Load preference pairs from a JSON, JSONL or Parquet file (explicit prompt/chosen/rejected strings)."""
    rename = _parse_columns(columns)
    report = DataReport(source=path, format=format or "explicit")
    pairs: list[PreferencePair] = []
    for where, record in read_records(path, split=split):
        report.records += 1
        record = {rename.get(k, k): v for k, v in record.items()}
        try:
            pair = _explicit_pair(record)
        except _BadRecord as bad:
            if skip_invalid:
                report.skipped_invalid += 1
                continue
            raise DPOError(f"{where}: {bad} (fix the record, or pass --skip-invalid to skip such records)") from None
        if pair.chosen == pair.rejected:
            report.identical_pairs += 1
        pairs.append(pair)
        if max_pairs is not None and len(pairs) >= max_pairs:
            break
    if not pairs:
        raise DPOError(f"{path}: no usable preference pairs found")
    report.pairs = len(pairs)
    return pairs, report


def read_records(path: str, *, split: str = "train") -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield `(where, record)` with `where` = "file:line" (JSONL), "file:record N" (JSON) or "file:row N"."""
    source = Path(path)
    if not source.exists():
        raise DPOError(f"{path}: file not found")
    suffix = source.suffix.lower()
    if suffix == ".jsonl":
        yield from _read_jsonl(source)
    elif suffix == ".json":
        yield from _read_json(source)
    elif suffix == ".parquet":
        yield from _read_parquet(source)
    else:
        raise DPOError(f"{path}: unsupported file type {suffix or '(none)'}; use .jsonl, .json or .parquet")


def split_pairs(pairs: list[PreferencePair], eval_fraction: float, seed: int) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """A seeded random held-out split; pairs that share a prompt group stay on the same side."""
    if eval_fraction <= 0:
        return pairs, []
    keys = sorted({p.group if p.group is not None else -1 - i for i, p in enumerate(pairs)})
    random.Random(seed).shuffle(keys)
    n_eval = max(1, round(len(keys) * eval_fraction))
    if n_eval >= len(keys):
        raise DPOError(f"--eval-fraction {eval_fraction} leaves no training data from {len(pairs)} pairs")
    eval_keys = set(keys[:n_eval])
    train, held_out = [], []
    for i, pair in enumerate(pairs):
        key = pair.group if pair.group is not None else -1 - i
        (held_out if key in eval_keys else train).append(pair)
    return train, held_out


class _BadRecord(Exception):
    pass


def _explicit_pair(record: dict[str, Any]) -> PreferencePair:
    for name in ("prompt", "chosen", "rejected"):
        if name not in record:
            raise _BadRecord(f"field '{name}' is missing")
        value = record[name]
        if not isinstance(value, str):
            raise _BadRecord(f"field '{name}' must be a string, got {type(value).__name__}")
        if name != "prompt" and not value.strip():
            raise _BadRecord(f"field '{name}' is empty")
    return PreferencePair(record["prompt"], record["chosen"], record["rejected"], _extras(record))


def _extras(record: dict[str, Any]) -> dict[str, float]:
    extras = {}
    for name in EXTRA_FIELDS:
        value = record.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _BadRecord(f"field '{name}' must be a number, got {value!r}")
        extras[name] = float(value)
    return extras


def _parse_columns(columns: str | None) -> dict[str, str]:
    """`chosen=good,prompt=question` -> {"good": "chosen", "question": "prompt"} (source name -> ours)."""
    rename: dict[str, str] = {}
    for item in (columns or "").split(","):
        if not item.strip():
            continue
        ours, sep, theirs = item.partition("=")
        if not sep or not ours.strip() or not theirs.strip():
            raise DPOError(f"--columns: expected ours=theirs pairs like chosen=good, got {item!r}")
        rename[theirs.strip()] = ours.strip()
    return rename


def _read_jsonl(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DPOError(f"{where}: not UTF-8 text") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DPOError(f"{where}: malformed JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(record, dict):
                raise DPOError(f"{where}: expected a JSON object, got {type(record).__name__}")
            yield where, record


def _read_json(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise DPOError(f"{path}: not UTF-8 text") from None
    except json.JSONDecodeError as err:
        raise DPOError(f"{path}:{err.lineno}: malformed JSON ({err.msg} at column {err.colno})") from None
    if isinstance(data, dict):  # {"train": [...]} or {"data": [...]}
        lists = [v for v in data.values() if isinstance(v, list)]
        data = lists[0] if len(lists) == 1 else [data]
    if not isinstance(data, list):
        raise DPOError(f"{path}: expected a list of records")
    for number, record in enumerate(data, start=1):
        where = f"{path}:record {number}"
        if not isinstance(record, dict):
            raise DPOError(f"{where}: expected a JSON object, got {type(record).__name__}")
        yield where, record


def _read_parquet(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several unrelated types for unreadable files
        raise DPOError(f"{path}: not a readable Parquet file ({err})") from None
    for number, record in enumerate(table.to_pylist(), start=1):
        yield f"{path}:row {number}", record
