"""`dpo online --on-policy` (dpokit.on_policy): one training run whose every step samples, judges and pairs its own
prompts. Step 1 is `dpo train` on the pairs sampled and ranked here by hand; later steps go on with the same AdamW
(three 1-step runs would not); a resume after step 2 of 4 ends on the same bits as 4 straight steps."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpokit import Config, generate, models
from dpokit.errors import DPOError
from dpokit.judging import round_prompts
from dpokit.loop import train
from dpokit.on_policy import step_seed
from dpokit.online import OnlineOptions, online

K = 3
TIMING = {"pairs_per_s", "tokens_per_s", "elapsed_s"}
REWARD = "def score(prompts, completions):\n    return [float(sum(map(ord, c)) % 97) for c in completions]\n"


def _reward(completion: str) -> float:
    return float(sum(map(ord, completion)) % 97)


def char_reward(prompts, completions):
    """The hand-written reward of tests/test_online.py: code points summed, mod 97 (few ties)."""
    return [_reward(c) for c in completions]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """In-process runs are compared with hand-made ones on one thread; restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _config(model: Path, prompts: Path, output: Path, **changes) -> Config:
    settings = dict(model=str(model), data=str(prompts), output=str(output), max_steps=3, batch_size=2, lr=1e-3,
                    lr_schedule="constant", eval_fraction=0.0, save_every=1, progress=False, cache=False)
    return Config(**{**settings, **changes})


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir, prompts_file) -> Path:
    out = tmp_path_factory.mktemp("on-policy") / "run"
    online(_config(tiny_model_dir, prompts_file, out), OnlineOptions(rewards=[char_reward], samples_per_prompt=K,
                                                                     max_new_tokens=6, on_policy=True))
    return out


def _step_pairs(model_dir: Path, tokenizer_dir: Path, prompts: list[str], step: int, path: Path) -> Path:
    """Step `step`'s pairs, by hand: its prompts, K samples each from `model_dir` with the step's seed, best and
    worst by the reward; written as an offline pairs file."""
    chosen = round_prompts(len(prompts), 2, 42, step)
    texts = generate.sample_texts(models.load_model(str(model_dir)), models.load_tokenizer(str(tokenizer_dir)),
                                  [prompts[i] for i in chosen], num_samples=K, max_new_tokens=6,
                                  seed=step_seed(42, step))
    records = []
    for j, i in enumerate(chosen):
        own = [text for s, text in texts if s.prompt_index == j]
        best = max(range(K), key=lambda k: (_reward(own[k]), -k))
        worst = min(range(K), key=lambda k: (_reward(own[k]), -k))
        assert _reward(own[best]) > _reward(own[worst])
        records.append({"prompt": prompts[i], "chosen": own[best], "rejected": own[worst]})
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _model_at(run_dir: Path, step: int, base: Path, out: Path) -> Path:
    """The policy of checkpoint step-`step` as a model folder (the base model's config and tokenizer)."""
    model = models.load_model(str(base))
    model.load_state_dict(load_file(run_dir / "checkpoints" / f"step-{step}" / "model.safetensors"))
    model.save_pretrained(out)
    models.load_tokenizer(str(base)).save_pretrained(out)
    return out


def test_every_step_trains_on_its_own_samples_with_one_optimizer(run, tmp_path, tiny_model_dir, prompts_file):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3]
    for row in train_rows:  # 2 prompts x K samples a step; best-worst: one pair per prompt (no ties here)
        assert (row["online/samples"], row["online/pairs"], row["online/pairs/ties_dropped"]) == (2 * K, 2, 0)
        assert row["online/pairs/score_chosen"] > row["online/pairs/score_rejected"]
        assert 0 <= row["online/samples/missing_eos"] <= 1
    adam = torch.load(run / "checkpoints" / "step-3" / "optimizer.pt", weights_only=True)
    assert {float(s["step"]) for s in adam["state"].values()} == {3.0}  # one AdamW for the three steps

    prompts = [json.loads(line)["prompt"] for line in prompts_file.read_text().splitlines()]
    by_hand = dict(batch_size=2, max_steps=1, save_every=None, ref_model=str(tiny_model_dir))
    # step 1: `dpo train` on the pairs sampled from the starting model and ranked here gives the same weights
    first = _step_pairs(tiny_model_dir, tiny_model_dir, prompts, 1, tmp_path / "step-1.jsonl")
    train(_config(tiny_model_dir, first, tmp_path / "one", **by_hand))
    fresh, online_one = load_file(tmp_path / "one" / "model" / "model.safetensors"), load_file(
        run / "checkpoints" / "step-1" / "model.safetensors")
    assert all(torch.allclose(fresh[k], online_one[k], atol=1e-6) for k in online_one)
    # step 2: a fresh optimizer on step 2's pairs (a second 1-step run) lands elsewhere than the run's AdamW
    after_one = _model_at(run, 1, tiny_model_dir, tmp_path / "after-one")
    second = _step_pairs(after_one, tiny_model_dir, prompts, 2, tmp_path / "step-2.jsonl")
    train(_config(after_one, second, tmp_path / "two", tokenizer=str(tiny_model_dir), **by_hand))
    restarted, online_two = load_file(tmp_path / "two" / "model" / "model.safetensors"), load_file(
        run / "checkpoints" / "step-2" / "model.safetensors")
    moved = lambda w: sum((w[k] - online_one[k]).norm() ** 2 for k in w) ** 0.5  # noqa: E731
    gap = sum((restarted[k] - online_two[k]).norm() ** 2 for k in online_two) ** 0.5
    assert gap > 0.1 * moved(online_two), (gap, moved(online_two))


def test_resume_after_two_of_four_steps_ends_on_the_same_bits(tmp_path, tiny_model_dir, prompts_file):
    (tmp_path / "judge.py").write_text(REWARD, encoding="utf-8")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    command = [sys.executable, "-m", "dpokit", "online", "--on-policy", "--model", str(tiny_model_dir),
               "--prompts", str(prompts_file), "--reward", f"{tmp_path / 'judge.py'}:score",
               "--samples-per-prompt", str(K), "--max-new-tokens", "6", "--batch-size", "2", "--max-steps", "4",
               "--lr", "1e-3", "--save-every", "1", "--no-progress", "--no-cache"]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    subprocess.run([*command, "--output", str(straight)], check=True, env=env, capture_output=True)
    shutil.copytree(straight, resumed)  # as if killed after step 2: its later checkpoints and model gone
    for name in ("checkpoints/step-3", "checkpoints/step-4", "model"):
        shutil.rmtree(resumed / name)
    done = subprocess.run([*command, "--output", str(resumed), "--resume", "latest"], env=env, capture_output=True,
                          text=True)
    assert done.returncode == 0 and "resuming from" in done.stdout, done.stderr
    final, expected = (load_file(d / "model" / "model.safetensors") for d in (resumed, straight))
    assert all(torch.equal(final[k], expected[k]) for k in expected)
    rows = [(d / "metrics.jsonl").read_text().splitlines() for d in (resumed, straight)]
    strip = lambda line: {k: v for k, v in json.loads(line).items() if k not in TIMING}  # noqa: E731
    assert [strip(r) for r in rows[0]] == [strip(r) for r in rows[1]]


def test_on_policy_has_no_rounds(tmp_path, tiny_model_dir, prompts_file):
    with pytest.raises(DPOError, match="--on-policy samples at every step of one training run"):
        online(_config(tiny_model_dir, prompts_file, tmp_path), OnlineOptions(rewards=[char_reward], on_policy=True,
                                                                              ref_update="round"))
