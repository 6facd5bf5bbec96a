"""Faults the run survives: the data-cache write failing (disk full) costs the cache, not the run; a truncated or
foreign file where the data cache should be is rebuilt with a warning. (A full disk during a checkpoint write is
in test_checkpoint.py.)"""

from __future__ import annotations

import errno

import numpy as np

from dpokit.config import Config
from dpokit.data import cache as data_cache
from dpokit.data import preparation


def prepare(pairs_jsonl, tokenizer, cache_dir):
    settings = preparation.DataSettings.from_settings(Config(data=str(pairs_jsonl), eval_fraction=0.25).to_dict(),
                                                      unpaired=False, sft=False)
    return preparation.prepare(settings, tokenizer, cache=True, cache_dir=str(cache_dir))


def test_a_full_disk_during_the_data_cache_write_warns_and_goes_on_without_the_cache(
        pairs_jsonl, tokenizer, tmp_path, monkeypatch):
    def savez_until_full(path, **arrays):
        path.write_bytes(b"half a file")
        raise OSError(errno.ENOSPC, "No space left on device")

    expected = prepare(pairs_jsonl, tokenizer, tmp_path / "healthy")        # the same data, cached normally
    monkeypatch.setattr(np, "savez", savez_until_full)
    data = prepare(pairs_jsonl, tokenizer, tmp_path / "full")
    warnings = [n for n in data.notes if n.startswith("warning:")]
    assert len(warnings) == 1 and "No space left on device" in warnings[0] and "goes on without it" in warnings[0]
    assert [(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in data.train] == \
        [(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in expected.train]
    assert list((tmp_path / "full").iterdir()) == []                         # no partial file left behind


def test_a_truncated_or_foreign_cache_file_is_rebuilt_with_a_warning(pairs_jsonl, tokenizer, tmp_path):
    first = prepare(pairs_jsonl, tokenizer, tmp_path)
    (cached,) = tmp_path.glob("*.npz")
    whole = cached.read_bytes()
    for damaged in (whole[: len(whole) // 2], b"PK\x03\x04 not a cache written by dpokit"):
        cached.write_bytes(damaged)
        again = prepare(pairs_jsonl, tokenizer, tmp_path)
        warnings = [n for n in again.notes if n.startswith("warning:")]
        assert len(warnings) == 1 and str(cached) in warnings[0] and "replacing it" in warnings[0]
        assert [p.chosen_ids for p in again.train] == [p.chosen_ids for p in first.train]
        assert data_cache.load(tmp_path, cached.stem) is not None            # replaced by a readable entry
