"""Data mixtures: `--data a.jsonl:0.7,b.jsonl:0.3` (or a YAML list), sampled and shuffled by the seed, counted."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from dpokit import Config
from dpokit.data import mixture, preparation
from dpokit.data.formats import PreferencePair
from dpokit.data.inspect import inspect
from dpokit.errors import DPOError


def write_pairs(path: Path, name: str, n: int) -> Path:
    path.write_text("".join(json.dumps({"prompt": f"Q {name}{i}?", "chosen": f" yes {i}", "rejected": f" no {i}"})
                            + "\n" for i in range(n)), encoding="utf-8")
    return path


def test_parse_sources_and_weights(tmp_path):
    assert mixture.parse("a.jsonl:0.7, b.parquet:0.3") == [mixture.Source("a.jsonl", 0.7),
                                                            mixture.Source("b.parquet", 0.3)]
    assert mixture.parse("org/dataset") == [mixture.Source("org/dataset")]
    assert not mixture.is_mixture(mixture.parse("a.jsonl")) and mixture.is_mixture(mixture.parse("a.jsonl:2"))
    odd = tmp_path / "x,y:1.jsonl"  # an existing file is one source, whatever its name holds
    odd.write_text("", encoding="utf-8")
    assert mixture.parse(str(odd)) == [mixture.Source(str(odd))]
    for bad in ("a.jsonl:0", "a.jsonl:-1", "a.jsonl,,b.jsonl", "a.jsonl:inf"):
        with pytest.raises(DPOError, match="--data"):
            mixture.parse(bad)


def test_mix_takes_each_share_and_is_repeatable():
    a = [PreferencePair(f"a{i}", "y", "n") for i in range(10)]
    b = [PreferencePair(f"b{i}", "y", "n") for i in range(4)]
    mixed, counts = mixture.mix([(a, 0.7), (b, 2.5)], seed=3)
    assert counts == [7, 10] and len(mixed) == 17
    seen = Counter(p.prompt for p in mixed)
    assert sum(k.startswith("a") for k in seen) == 7 and all(seen[f"a{i}"] <= 1 for i in range(10))
    assert sorted(seen[f"b{i}"] for i in range(4)) == [2, 2, 3, 3]  # twice each, then half of them again
    assert mixture.mix([(a, 0.7), (b, 2.5)], seed=3) == (mixed, counts)
    assert mixture.mix([(a, 0.7), (b, 2.5)], seed=4)[0] != mixed
    assert {p.prompt[0] for p in mixed[:8]} == {"a", "b"}  # shuffled together, not one source after the other


def test_groups_stay_together_and_never_collide_across_sources_or_copies():
    ranked = [PreferencePair(f"r{g}", f"best{k}", "worst", group=g) for g in range(3) for k in range(2)]
    other = [PreferencePair(f"o{g}", "y", "n", group=g) for g in range(2)]
    mixed, counts = mixture.mix([(ranked, 2.0), (other, 1.0)], seed=0)
    assert counts == [12, 2]
    by_group: dict[int, set[str]] = {}
    for pair in mixed:
        by_group.setdefault(pair.group, set()).add(pair.prompt)
    assert len(by_group) == 3 * 2 + 2 and all(len(prompts) == 1 for prompts in by_group.values())
    positions = [i for i, p in enumerate(mixed) if p.group == mixed[0].group]
    assert positions == list(range(positions[0], positions[0] + len(positions)))  # adjacent, as loaded


def test_prepare_mixes_counts_sources_and_caches(tokenizer, tmp_path):
    a, b = write_pairs(tmp_path / "a.jsonl", "a", 20), write_pairs(tmp_path / "b.jsonl", "b", 10)
    settings = preparation.DataSettings(f"{a}:0.5,{b}:2", max_length=64)
    first = preparation.prepare(settings, tokenizer, cache_dir=str(tmp_path / "cache"))
    assert len(first.train) == 10 + 20
    assert f"  {a}: 10 of 20 pairs (weight 0.5)" in first.notes and f"  {b}: 20 of 10 pairs (weight 2)" in first.notes
    again = preparation.prepare(settings, tokenizer, cache_dir=str(tmp_path / "cache"))
    assert "loaded tokenized data from the cache" in again.notes[-1] and again.train == first.train
    other = preparation.prepare(preparation.DataSettings(f"{a}:0.5,{b}:1", max_length=64), tokenizer,
                                cache_dir=str(tmp_path / "cache"))
    assert "loaded tokenized data from the cache" not in other.notes[-1] and len(other.train) == 20
    capped = preparation.prepare(preparation.DataSettings(f"{a},{b}", max_length=64, max_pairs=7), tokenizer,
                                 cache=False)
    assert len(capped.train) == 7 and "  stopped at --max-pairs 7" in capped.notes


def test_a_source_of_the_wrong_kind_is_named(tokenizer, tmp_path):
    a = write_pairs(tmp_path / "a.jsonl", "a", 4)
    kto = tmp_path / "kto.jsonl"
    kto.write_text(json.dumps({"prompt": "Q", "completion": " A", "label": True}) + "\n", encoding="utf-8")
    with pytest.raises(DPOError, match=f"{kto} holds unpaired"):
        preparation.prepare(preparation.DataSettings(f"{a},{kto}"), tokenizer, cache=False)


def test_yaml_lists_and_mappings_become_the_data_text(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("data:\n  - a.jsonl: 0.7\n  - {path: b.parquet, weight: 0.3}\n  - c.csv\n  - d.jsonl:2\n",
                      encoding="utf-8")
    assert Config.from_yaml(config).data == "a.jsonl:0.7,b.parquet:0.3,c.csv,d.jsonl:2"
    config.write_text("data: {a.jsonl: 0.7, b.parquet: 0.3}\n", encoding="utf-8")
    assert Config.from_yaml(config).data == "a.jsonl:0.7,b.parquet:0.3"
    config.write_text("data:\n  - [a.jsonl]\n", encoding="utf-8")
    with pytest.raises(DPOError, match="a source is PATH"):
        Config.from_yaml(config)


def test_data_inspect_shows_each_source(tmp_path):
    a, b = write_pairs(tmp_path / "a.jsonl", "a", 6), write_pairs(tmp_path / "b.jsonl", "b", 3)
    lines = inspect(f"{a}:0.5,{b}")
    assert f"{a}: 6 pairs from 6 records (explicit format)" in lines
    assert f"{b}: 3 pairs from 3 records (explicit format)" in lines
    assert "mixture of 2 sources (--seed 42): 6 pairs" in lines and f"  {a}: 3 of 6 pairs (weight 0.5)" in lines
