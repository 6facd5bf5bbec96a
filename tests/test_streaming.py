"""--stream-data: shards tokenized into the cache and read back memory-mapped give the in-memory pairs."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from dpokit.data import preparation, streaming
from dpokit.errors import DPOError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data"


def write_pairs(path: Path, name: str, n: int) -> Path:
    path.write_text("".join(json.dumps({"prompt": f"Human: {name} question {i}?\n\nAssistant:", "chosen": f" yes {i}",
                                        "rejected": f" no, {name} {i}", "margin": i % 3}) + "\n" for i in range(n)),
                    encoding="utf-8")
    return path


@pytest.fixture
def small_shards(monkeypatch):
    monkeypatch.setattr(streaming, "SHARD_PAIRS", 64)


def settings(data, **overrides):
    return preparation.DataSettings(str(data), max_length=64, **overrides)


def test_streamed_pairs_equal_the_in_memory_ones(tokenizer, tmp_path, small_shards):
    data = write_pairs(tmp_path / "a.jsonl", "a", 300)
    in_memory = preparation.prepare(settings(data), tokenizer, cache=False)
    streamed = preparation.prepare(settings(data, stream_data=True), tokenizer, cache_dir=str(tmp_path / "c"))
    assert isinstance(streamed.train, streaming.ShardedPairs) and len(streamed.train.shards) == 5
    assert list(streamed.train) == in_memory.train and len(streamed.eval) == 0
    assert streamed.train[-1] == in_memory.train[-1] and streamed.train[10:13] == in_memory.train[10:13]
    assert streamed.train[5].extras == {"margin": 5 % 3}
    with pytest.raises(IndexError):
        streamed.train[300]
    assert streamed.counts["train_pairs"] == 300 and any("streamed into 5 train" in n for n in streamed.notes)
    again = preparation.prepare(settings(data, stream_data=True), tokenizer, cache_dir=str(tmp_path / "c"))
    assert "read the tokenized shards from the cache" in again.notes[-1] and list(again.train) == in_memory.train


def test_held_out_share_and_max_pairs(tokenizer, tmp_path, small_shards):
    data = write_pairs(tmp_path / "a.jsonl", "a", 300)
    streamed = preparation.prepare(settings(data, stream_data=True, eval_fraction=0.25), tokenizer, cache=False)
    everything = preparation.prepare(settings(data), tokenizer, cache=False).train
    assert sorted(map(str, [*streamed.train, *streamed.eval])) == sorted(map(str, everything))
    assert 50 < len(streamed.eval) < 100  # each pair held out with probability 0.25, by the seed
    capped = preparation.prepare(settings(data, stream_data=True, max_pairs=70), tokenizer, cache=False)
    assert list(capped.train) == everything[:70]


def test_streamed_mixture_takes_each_share(tokenizer, tmp_path, small_shards):
    a, b = write_pairs(tmp_path / "a.jsonl", "a", 100), write_pairs(tmp_path / "b.jsonl", "b", 40)
    streamed = preparation.prepare(settings(f"{a}:2,{b}:0.5", stream_data=True), tokenizer, cache=False)
    prompts = Counter(tokenizer.decode(p.prompt_ids) for p in streamed.train)
    from_a = [n for prompt, n in prompts.items() if " a question" in prompt]
    from_b = [n for prompt, n in prompts.items() if " b question" in prompt]
    assert from_a == [2] * 100 and set(from_b) == {1} and 10 < len(from_b) < 30
    assert len(streamed.train) == 200 + len(from_b) == streamed.counts["train_pairs"]
    assert any(f"  {a}: 200 of 100 pairs (weight 2)" == note for note in streamed.notes)
    assert [" a question" in tokenizer.decode(p.prompt_ids) for p in streamed.train[:20]].count(True) < 20


def test_unpaired_training_is_not_streamed(tokenizer, tmp_path):
    with pytest.raises(DPOError, match="--stream-data"):
        preparation.prepare(settings(EXAMPLES / "hh_rlhf.jsonl", stream_data=True, unpaired=True), tokenizer,
                            cache=False)


def test_dpo_train_runs_on_streamed_data(tiny_model_dir, pairs_jsonl, tmp_path, one_thread):
    from dpokit import Config, train

    cfg = Config(model=str(tiny_model_dir), data=str(pairs_jsonl), stream_data=True, max_steps=2, batch_size=2,
                 max_length=64, eval_fraction=0.25, output=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"),
                 device="cpu", progress=False)
    train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "loss" in row and "step" in row] == [1, 2]
    assert any(key.startswith("eval/") for row in rows for key in row)
    assert list((tmp_path / "cache").glob("*.shards/train-00000.tokens.npy"))
