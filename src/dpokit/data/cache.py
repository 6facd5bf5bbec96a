"""On-disk cache of tokenized data, so a second run with the same inputs skips loading and tokenizing.

The key is a hash of everything the result depends on: the data's bytes (every file, or a hub dataset's
`datasets` fingerprint), the tokenizer (its full serialised vocabulary, merges, normaliser, special tokens and
chat template), the settings (format, columns, limits, seed, ...) and the source of the modules that produce it
(`formats.py`, `sources.py`, `tokenization.py`, `encoding.py`, `mixture.py`), so editing them never serves
stale tokens. An entry is one `.npz` file of flat token arrays written atomically (no pickle: loading a cache
file cannot run code).
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import import_extra
from . import encoding, formats, mixture, sources, tokenization
from .tokenization import TokenizedPair

VERSION = 2  # 2: a fourth length per pair, the gold response's (-1: none)


@dataclass
class CachedData:
    splits: dict[str, list[TokenizedPair]]
    meta: dict[str, Any] = field(default_factory=dict)  # notes and counts, as the first run reported them


def default_dir() -> Path:
    """`$DPOKIT_CACHE_DIR`, else `$XDG_CACHE_HOME/dpokit/data`, else `~/.cache/dpokit/data`."""
    if os.environ.get("DPOKIT_CACHE_DIR"):
        return Path(os.environ["DPOKIT_CACHE_DIR"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "dpokit" / "data"


def cache_key(*, sources: list[tuple[str, str]], tokenizer: Any, settings: dict[str, Any]) -> str:
    """Hex key of (data content, tokenizer, settings, code); `sources` are `(path or hub name, split)`."""
    digest = hashlib.sha256()
    for part in ([VERSION, settings], [_source_fingerprint(path, split) for path, split in sources],
                 tokenizer_fingerprint(tokenizer), _code_fingerprint()):
        digest.update(json.dumps(part, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:32]


def content_key(sources: list[tuple[str, str]]) -> str:
    """Hex key of the data alone (every file's bytes and name, or a hub dataset's fingerprint), for `--resume` to
    tell whether a run continues on the data it started with; `sources` as in `cache_key`."""
    fingerprints = [_source_fingerprint(path, split) for path, split in sources]
    return hashlib.sha256(json.dumps(fingerprints, sort_keys=True).encode()).hexdigest()[:32]


def tokenizer_fingerprint(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    special = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id,
               getattr(tokenizer, "chat_template", None), type(tokenizer).__name__]
    return hashlib.sha256((body + json.dumps(special, default=str)).encode()).hexdigest()


def load(directory: Path, key: str) -> CachedData | None:
    """The cached entry for `key`, or None (missing or unreadable: it is then rebuilt and overwritten)."""
    path = directory / f"{key}.npz"
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as stored:
            meta = json.loads(str(stored["meta"]))
            splits = {name: _unflatten(stored, name, meta["extras"][name]) for name in meta["splits"]}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):  # a truncated .npz is a broken zip
        return None
    return CachedData(splits, meta)


def save(directory: Path, key: str, data: CachedData) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {}
    extras: dict[str, list[str]] = {}
    for name, pairs in data.splits.items():
        extras[name] = _flatten(pairs, name, arrays)
    meta = {**data.meta, "splits": list(data.splits), "extras": extras}
    arrays["meta"] = np.array(json.dumps(meta))
    path = directory / f"{key}.npz"
    write_atomically(path, lambda partial: np.savez(partial, **arrays))
    return path


def write_atomically(path: Path, write: Callable[[Path], Any]) -> None:
    """`write(partial)` to a temporary sibling of `path`, then rename it to `path`: a concurrent or interrupted
    run never reads half a file, and a crash after it never finds the name pointing at unwritten bytes. The
    sibling keeps `path`'s suffix (np.savez would add one otherwise)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.stem}.{os.getpid()}.partial{path.suffix}")
    try:
        write(partial)
    except BaseException:
        partial.unlink(missing_ok=True)  # a failed write (disk full) leaves no partial file behind
        raise
    with partial.open("rb") as handle:  # on disk before the rename, so a crash never leaves a name on empty bytes
        os.fsync(handle.fileno())
    os.replace(partial, path)


def _flatten(pairs: list[TokenizedPair], name: str, arrays: dict[str, np.ndarray]) -> list[str]:
    """All ids of a split as one int32 array, with per-pair lengths `[pairs, 4]` (prompt, chosen, rejected, gold;
    -1 for no gold), groups and extras."""
    sequences = [ids for p in pairs for ids in (p.prompt_ids, p.chosen_ids, p.rejected_ids, p.gold_ids or [])]
    lengths = np.array([[len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids),
                         -1 if p.gold_ids is None else len(p.gold_ids)] for p in pairs], dtype=np.int64).reshape(-1, 4)
    extra_names = sorted({k for p in pairs for k in p.extras})
    arrays[f"{name}.tokens"] = np.fromiter(chain.from_iterable(sequences), dtype=np.int32,
                                           count=sum(len(ids) for ids in sequences))
    arrays[f"{name}.lengths"] = lengths
    arrays[f"{name}.group"] = np.array([-1 if p.group is None else p.group for p in pairs], dtype=np.int64)
    arrays[f"{name}.extras"] = np.array([[p.extras.get(k, np.nan) for k in extra_names] for p in pairs],
                                        dtype=np.float64).reshape(len(pairs), len(extra_names))
    return extra_names


def _unflatten(stored: Any, name: str, extra_names: list[str]) -> list[TokenizedPair]:
    flat = stored[f"{name}.tokens"].tolist()
    lengths = stored[f"{name}.lengths"].tolist()
    groups = stored[f"{name}.group"].tolist()
    extras = stored[f"{name}.extras"].tolist()
    pairs, at = [], 0
    for (n_prompt, n_chosen, n_rejected, n_gold), group, values in zip(lengths, groups, extras):
        prompt = flat[at:at + n_prompt]
        chosen = flat[at + n_prompt:at + n_prompt + n_chosen]
        at += n_prompt + n_chosen
        rejected = flat[at:at + n_rejected]
        at += n_rejected
        gold = None if n_gold < 0 else flat[at:at + n_gold]
        at += max(n_gold, 0)
        pair_extras = {k: v for k, v in zip(extra_names, values) if not np.isnan(v)}
        pairs.append(TokenizedPair(prompt, chosen, rejected, pair_extras, None if group < 0 else group, gold_ids=gold))
    return pairs


def _source_fingerprint(path: str, split: str) -> list[Any]:
    """Hashes of every file's bytes (and relative name), or a hub dataset's `datasets` fingerprint; for a
    mixture (`a.jsonl:0.7,b.jsonl`), each source's with its weight."""
    parts = mixture.parse(path)
    if mixture.is_mixture(parts):
        return [[part.weight, *_source_fingerprint(part.path, split)] for part in parts]
    files = sources.data_files(path)
    if files and not files[0].exists():  # a hub name: datasets fingerprints its downloaded files
        datasets = import_extra("datasets", "datasets", f"{path}: a hub dataset")

        try:
            return [path, split, datasets.load_dataset(path, split=split)._fingerprint]
        except Exception:  # unreachable hub: loading will report it properly; never cache blindly
            return [path, split, os.urandom(8).hex()]
    out = [split]
    for file in files:
        for member in sorted(p for p in file.rglob("*") if p.is_file()) if file.is_dir() else [file]:
            out += [member.name, _file_hash(member)]
    return out


def _file_hash(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _code_fingerprint() -> str:
    return "".join(_file_hash(Path(module.__file__)) for module in (formats, sources, tokenization, encoding, mixture))  # type: ignore[arg-type]
