"""A miniature of examples/controlled_generation (SFT -> sample pairs -> Bradley-Terry labels -> DPO -> eval),
through the `dpo` command, in seconds: SFT lowers the held-out NLL, and DPO raises the known reward of samples
above the SFT model's at a positive KL, while the SFT model's KL to itself is exactly zero."""

from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "controlled_generation"
sys.path.insert(0, str(EXAMPLE))

import run  # noqa: E402
import task  # noqa: E402

MINIATURE = run.Scale(hidden=32, layers=2, corpus=320, sft_epochs=2, sft_lr=3e-3, pair_prompts=128, dpo_epochs=4,
                      dpo_lr=2e-3, betas=(0.1,), seeds=(0,), eval_prompts=128, eval_samples=1, batch_size=32,
                      max_new_tokens=24)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matmuls run fastest on one thread


def test_miniature_pipeline_raises_the_reward(tmp_path):
    results = run.run(tmp_path, MINIATURE)
    sft_evals = [row["eval/loss"] for row in map(json.loads, (tmp_path / "sft" / "metrics.jsonl").open())
                 if "eval/loss" in row]
    assert sft_evals[-1] < sft_evals[0] - 0.3   # SFT learned the corpus (held-out NLL per token)

    base, dpo = results["runs"]
    assert base["beta"] is None and dpo["beta"] == 0.1
    assert base["samples/kl"] == 0.0 and base["samples/win_rate"] == 0.5
    assert dpo["samples/kl"] > 0.0
    gap = dpo["samples/reward"] - base["samples/reward"]
    assert gap > 2 * math.hypot(dpo["samples/reward_stderr"], base["samples/reward_stderr"]), results["runs"]
    assert dpo["samples/win_rate"] > 0.5

    summary = run.summarize(results)
    assert summary["dpo_beats_sft"]
    report = run.write_report(results, tmp_path / "REPORT.md", "frontier.png")
    assert "| DPO | 0.1 | 0 |" in report.read_text()
    assert run.plot(results, tmp_path / "frontier.png").stat().st_size > 0


def test_bradley_terry_labels_follow_the_reward_gap():
    """Pairs with reward gap d are labelled first-wins with probability sigmoid(BT_SCALE * d)."""
    good, bad = " a film was good and fun .", " a film was bad ."
    r_good, r_bad = task.positive_share([], [good, bad])
    assert (r_good, r_bad) == (2 / 7, 0.0)
    samples = []
    for i in range(2000):
        samples += [{"prompt_index": i, "prompt": "p", "completion": good},
                    {"prompt_index": i, "prompt": "p", "completion": bad}]
    pairs = task.label_pairs(samples, seed=0)
    share = sum(p["chosen"] == good for p in pairs) / len(pairs)
    assert share == pytest.approx(1 / (1 + math.exp(-task.BT_SCALE * (r_good - r_bad))), abs=0.03)
    assert task.label_pairs([{"prompt_index": 0, "prompt": "p", "completion": good}] * 2, seed=0) == []


def test_reviews_tokenize_word_by_word(tmp_path):
    tokenizer = task.build_tokenizer(tmp_path)
    record = task.review(random.Random(0))
    ids = tokenizer(record["prompt"] + record["completion"])["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and tokenizer.unk_token_id not in ids
    assert len(ids) == 1 + len((record["prompt"] + record["completion"]).split())
