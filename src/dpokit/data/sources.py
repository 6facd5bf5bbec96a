"""Where records come from: JSONL / JSON / CSV / Parquet files, folders of them, `datasets` folders written by
`save_to_disk`, and hub datasets through `datasets.load_dataset`.

Each reader yields `(where, record)`, with `where` naming the place for error messages: "file:line" (JSONL),
"file:record N" (JSON) or "file:row N" (CSV, Parquet, datasets). A file that cannot be read is one `DPOError`;
a record that cannot be read (a malformed JSONL line, a JSON value that is not an object) is one too, or, with
`read_records_or_malformed`, a `Malformed` record for the caller to count and skip (`--skip-invalid`).

A JSONL or CSV line longer than `MAX_LINE_BYTES` is refused without being read into memory (a JSONL line is
then skippable like any malformed one); a Parquet column that should hold text but has another type is refused
before any row is read, naming the column and its type.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TextIO

from ..errors import DPOError, import_extra

FILE_TYPES = (".jsonl", ".json", ".parquet", ".csv")
MAX_LINE_BYTES = 64 << 20  # one record's line; a longer one is not a preference record (a file not split in lines)
TEXT_COLUMNS = ("prompt", "chosen", "rejected", "completion", "text")  # text, or message lists, in every format


@dataclass(frozen=True)
class Malformed:
    """A record that could not be read, in place of it: `problem` says why ("malformed JSON (... at column 48)")."""

    problem: str


def read_records(path: str, *, split: str = "train") -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield `(where, record)`: "file:line" (JSONL, CSV), "file:record N" (JSON) or "source:row N" (Parquet,
    `datasets`). `path` is a file, a folder of files, a `save_to_disk` folder, or a hub dataset name.
    A record that cannot be read is a `DPOError` (`read_records_or_malformed` yields it instead)."""
    for where, record in read_records_or_malformed(path, split=split):
        if isinstance(record, Malformed):
            raise DPOError(f"{where}: {record.problem} (fix or remove this record)")
        yield where, record


def read_records_or_malformed(path: str, *, split: str = "train",
                              ) -> Iterator[tuple[str, dict[str, Any] | Malformed]]:
    """`read_records`, with a `Malformed` in place of each record that cannot be read, to count and skip."""
    for source in data_files(path):
        if source.is_dir():
            yield from _read_dataset(path, split, load_from_disk=True)
        elif source.suffix.lower() == ".jsonl":
            yield from _read_jsonl(source)
        elif source.suffix.lower() == ".json":
            yield from _read_json(source)
        elif source.suffix.lower() == ".csv":
            yield from _read_csv(source)
        elif source.suffix.lower() == ".parquet":
            yield from _read_parquet(source)
        else:
            yield from _read_dataset(path, split, load_from_disk=False)


def data_files(path: str) -> list[Path]:
    """The files `path` names, sorted (a `save_to_disk` folder is one entry; a hub name is `[Path(name)]`)."""
    source = Path(path)
    if source.is_file():
        if source.suffix.lower() not in FILE_TYPES:
            raise DPOError(f"{path}: unsupported file type {source.suffix or '(none)'}; use {', '.join(FILE_TYPES)}")
        return [source]
    if source.is_dir():
        if any((source / name).is_file() for name in ("dataset_info.json", "dataset_dict.json", "state.json")):
            return [source]
        files = sorted(p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in FILE_TYPES)
        if not files:
            raise DPOError(f"{path}: folder holds no {', '.join(FILE_TYPES)} files and is not a save_to_disk dataset")
        return files
    looks_local = path.startswith((".", "/", "~")) or Path(path).suffix.lower() in FILE_TYPES or path.count("/") > 1
    if looks_local:
        raise DPOError(f"{path}: file not found")
    return [source]  # a hub dataset name


def _read_dataset(path: str, split: str, *, load_from_disk: bool) -> Iterator[tuple[str, dict[str, Any]]]:
    datasets = import_extra("datasets", "datasets", f"{path}: a save_to_disk folder or hub dataset")

    try:
        data = datasets.load_from_disk(path) if load_from_disk else datasets.load_dataset(path, split=split)
    except Exception as err:  # datasets raises many unrelated types (network, missing files, bad configs)
        raise DPOError(f"{path}: could not load this dataset ({str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__})") from None
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise DPOError(f"{path}: no split {split!r}; it has {', '.join(data)} (choose with --data-split)")
        data = data[split]
    for number, record in enumerate(data, start=1):
        yield f"{path}:row {number}", record


def _read_jsonl(path: Path) -> Iterator[tuple[str, dict[str, Any] | Malformed]]:
    with path.open("rb") as handle:
        for number, raw in enumerate(_capped_lines(handle), start=1):
            where = f"{path}:{number}"
            if raw is None:
                yield where, Malformed(f"line longer than {MAX_LINE_BYTES >> 20} MiB, the most one record may take")
                continue
            try:
                line = raw.decode("utf-8").rstrip("\r\n")  # a line break inside the text would move the column
            except UnicodeDecodeError:
                yield where, Malformed("not UTF-8 text")
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                yield where, Malformed(f"malformed JSON ({err.msg} at column {err.colno})")
            except ValueError as err:  # e.g. an integer longer than Python's int-digits limit
                yield where, Malformed(f"unreadable JSON ({err})")
            except RecursionError:  # arrays or objects nested thousands deep
                yield where, Malformed("JSON nested too deeply to read")
            else:
                yield where, record if isinstance(record, dict) else Malformed(
                    f"expected a JSON object, got {type(record).__name__}")


def _read_json(path: Path) -> Iterator[tuple[str, dict[str, Any] | Malformed]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise DPOError(f"{path}: not UTF-8 text") from None
    except json.JSONDecodeError as err:
        raise DPOError(f"{path}:{err.lineno}: malformed JSON ({err.msg} at column {err.colno})") from None
    except ValueError as err:  # e.g. an integer longer than Python's int-digits limit
        raise DPOError(f"{path}: unreadable JSON ({err})") from None
    except RecursionError:  # arrays or objects nested thousands deep
        raise DPOError(f"{path}: JSON nested too deeply to read") from None
    if isinstance(data, dict):  # {"train": [...]} or {"data": [...]}
        lists = [v for v in data.values() if isinstance(v, list)]
        data = lists[0] if len(lists) == 1 else [data]
    if not isinstance(data, list):
        raise DPOError(f"{path}: expected a list of records")
    for number, record in enumerate(data, start=1):
        yield f"{path}:record {number}", record if isinstance(record, dict) else Malformed(
            f"expected a JSON object, got {type(record).__name__}")


def _read_csv(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        with path.open(encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(_text_lines(handle, path))
            for record in reader:
                yield f"{path}:{reader.line_num}", {k: v for k, v in record.items() if k is not None}
    except UnicodeDecodeError:
        raise DPOError(f"{path}: not UTF-8 text") from None
    except csv.Error as err:
        raise DPOError(f"{path}: malformed CSV ({err})") from None


def _read_parquet(path: Path) -> Iterator[tuple[str, dict[str, Any] | Malformed]]:
    pq = import_extra("pyarrow.parquet", "parquet", f"{path}: reading Parquet")

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several unrelated types for unreadable files
        raise DPOError(f"{path}: not a readable Parquet file ({err})") from None
    for name in TEXT_COLUMNS:
        if name in table.column_names and not _holds_text(table.schema.field(name).type):
            raise DPOError(f"{path}: column '{name}' is {table.schema.field(name).type}, but it must hold text: "
                           "write it as a string column (or a list of {role, content} messages)")
    number = 0
    for batch in table.to_batches():  # one batch of Python rows at a time, not the whole table
        try:
            rows: list[dict[str, Any] | Malformed] = batch.to_pylist()
        except UnicodeDecodeError:  # a string column holding bytes that are not UTF-8: find the rows that do
            rows = [_row_or_malformed(batch, i) for i in range(batch.num_rows)]
        for record in rows:
            number += 1
            yield f"{path}:row {number}", record


def _holds_text(kind: Any) -> bool:
    """Whether an Arrow type reads as text or a list (of messages, checked per record), or is all nulls."""
    types = import_extra("pyarrow.types", "parquet", "reading Parquet")
    if types.is_dictionary(kind):  # a categorical column (pandas `category`)
        kind = kind.value_type
    return bool(types.is_string(kind) or types.is_large_string(kind) or types.is_list(kind)
                or types.is_large_list(kind) or types.is_null(kind)
                or getattr(types, "is_string_view", lambda _: False)(kind))


def _row_or_malformed(batch: Any, i: int) -> dict[str, Any] | Malformed:
    record = {}
    for name, column in zip(batch.schema.names, batch.columns):
        try:
            record[name] = column[i].as_py()
        except UnicodeDecodeError:
            return Malformed(f"column '{name}' is not UTF-8 text")
    return record


def _capped_lines(handle: BinaryIO) -> Iterator[bytes | None]:
    """The lines of a binary file, None in place of one longer than `MAX_LINE_BYTES`: the rest of that one is
    read past in 1 MiB pieces (only when the caller goes on), never held whole."""
    while line := handle.readline(MAX_LINE_BYTES + 1):
        if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
            yield None
            while (rest := handle.readline(1 << 20)) and not rest.endswith(b"\n"):
                pass
        else:
            yield line


def _text_lines(handle: TextIO, path: Path) -> Iterator[str]:
    """The lines of a text file for `csv`, refusing one longer than `MAX_LINE_BYTES` characters unread (a CSV
    line cannot be skipped alone: a quoted field may run on over it)."""
    while line := handle.readline(MAX_LINE_BYTES + 1):
        if len(line) > MAX_LINE_BYTES and not line.endswith("\n"):
            raise DPOError(f"{path}: a line longer than {MAX_LINE_BYTES >> 20} MiB, the most one record may take "
                           "(is this a CSV file?)")
        yield line
