"""`dpo online` (dpokit.online): round files hold the best-vs-worst pairs of a hand-written reward, a failed run
leaves nothing half-written and its re-run skips finished rounds to the same final weights, samples do not
depend on the batch size, and each bad input is one line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpokit import Config, generate, models
from dpokit.cli import main
from dpokit.errors import DPOError
from dpokit.judging import RewardModel, rank_pairs
from dpokit.online import OnlineOptions, online, round_config, round_prompts, round_seed

K = 3
CALLS: list[int] = []      # prompts per call of `char_reward`
FAIL_ON_CALL: list[int] = []


def char_reward(prompts, completions):
    """A hand-written reward: the completion's code points summed, mod 97 (few ties among random samples)."""
    CALLS.append(len(completions))
    if len(CALLS) in FAIL_ON_CALL:
        raise RuntimeError("judge crashed")
    return [float(sum(map(ord, c)) % 97) for c in completions]


def _reward(completion: str) -> float:
    return float(sum(map(ord, completion)) % 97)


def _config(model: Path, prompts: Path, output: Path, **changes) -> Config:
    return Config(model=str(model), data=str(prompts), output=str(output), max_steps=2, batch_size=2, lr=1e-3,
                  eval_fraction=0.0, save_every=1, progress=False, cache=False, **changes)


def _options(**changes) -> OnlineOptions:
    return OnlineOptions(**{"rewards": [char_reward], "samples_per_prompt": K, "rounds": 2, "max_new_tokens": 6,
                            **changes})


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Runs here are compared with each other bit for bit: all on one thread. Restored afterwards, since later
    test files compare in-process runs with subprocesses running on every thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_model_dir, prompts_file) -> Path:
    """An uninterrupted 2-round run."""
    out = tmp_path_factory.mktemp("online") / "full"
    online(_config(tiny_model_dir, prompts_file, out), _options())
    return out


def _expected_pairs(model_dir: Path, tokenizer_dir: Path, prompts: list[str], seed: int) -> list[tuple[str, str]]:
    """Best and worst of each prompt's K samples, sampled here with the round's seed and ranked by hand."""
    tokenizer = models.load_tokenizer(str(tokenizer_dir))
    model = models.load_model(str(model_dir))
    texts = generate.sample_texts(model, tokenizer, prompts, num_samples=K, max_new_tokens=6, seed=seed)
    out = []
    for i in range(len(prompts)):
        own = [text for s, text in texts if s.prompt_index == i]
        scores = [_reward(t) for t in own]
        best = max(range(K), key=lambda k: (scores[k], -k))
        worst = min(range(K), key=lambda k: (scores[k], -k))
        assert scores[best] > scores[worst]
        out.append((own[best], own[worst]))
    return out


def test_win_rate_of_a_round_over_the_one_before(full_run, tiny_model_dir, prompts_file):
    """Round 2's samples (the policy after round 1's training) against round 1's (the starting policy): per
    prompt, the mean reward of its K samples, drawn here with each round's seed; a tie counts half."""
    prompts = [json.loads(line)["prompt"] for line in prompts_file.read_text().splitlines()]
    tokenizer = models.load_tokenizer(str(tiny_model_dir))
    means = []
    for n, policy in ((1, tiny_model_dir), (2, full_run / "rounds" / "round-1" / "model")):
        texts = generate.sample_texts(models.load_model(str(policy)), tokenizer, prompts, num_samples=K,
                                      max_new_tokens=6, seed=round_seed(42, n))
        means.append([sum(_reward(t) for s, t in texts if s.prompt_index == i) / K for i in range(len(prompts))])
    wins = [1.0 if b > a else 0.5 if b == a else 0.0 for a, b in zip(*means)]
    metrics = _rows(full_run / "online_metrics.jsonl")
    assert "samples/win_rate" not in metrics[0] and "prompt_rewards" not in metrics[1]
    assert metrics[1]["samples/win_rate"] == pytest.approx(sum(wins) / len(wins))
    assert metrics[1]["samples/win_rate_vs_start"] == metrics[1]["samples/win_rate"]  # round 1 is the start


def test_round_three_wins_against_the_round_before_and_against_the_start(tmp_path):
    """Per-prompt means written by hand for rounds 1 and 2: round 3 is scored against each on the prompts they
    share (a tie counts half), and neither rate exists without a shared prompt."""
    from dpokit.online import OnlineFiles, win_rate

    files = OnlineFiles(tmp_path)
    files.rounds.mkdir()
    for n, means in ((1, {"0": 0.1, "1": 0.5, "2": 0.9}), (2, {"0": 0.6, "1": 0.6, "2": 0.2})):
        files.stats(n).write_text(json.dumps({"prompt_rewards": means}), encoding="utf-8")
    out = win_rate(files, 3, {"0": 0.6, "1": 0.7, "2": 0.3})
    assert out["samples/win_rate"] == pytest.approx((0.5 + 1 + 1) / 3)          # against round 2
    assert out["samples/win_rate_vs_start"] == pytest.approx((1 + 1 + 0) / 3)   # against round 1
    assert set(win_rate(files, 3, {"7": 1.0})) == {"prompt_rewards"}


def test_round_files_hold_best_versus_worst_of_the_policy_of_the_round(full_run, tiny_model_dir, prompts_file):
    prompts = [json.loads(line)["prompt"] for line in prompts_file.read_text().splitlines()]
    for n, policy in ((1, tiny_model_dir), (2, full_run / "rounds" / "round-1" / "model")):
        records = _rows(full_run / "rounds" / f"round-{n}.jsonl")
        assert [(r["chosen"], r["rejected"]) for r in records] == _expected_pairs(
            policy, tiny_model_dir, prompts, round_seed(42, n))
        assert [r["prompt"] for r in records] == prompts
        assert all(r["score_chosen"] == _reward(r["chosen"]) and r["score_rejected"] == _reward(r["rejected"])
                   for r in records)
    metrics = _rows(full_run / "online_metrics.jsonl")
    assert [m["round"] for m in metrics] == [1, 2]
    assert [m["pairs"] for m in metrics] == [4, 4] and metrics[0]["samples"] == 4 * K
    assert metrics[0]["samples/kl"] == 0.0 and math.isfinite(metrics[1]["samples/kl"])
    assert metrics[1]["train/step"] == 2
    second = _rows(full_run / "rounds" / "round-2.jsonl")
    assert metrics[1]["pairs/score_chosen"] == pytest.approx(sum(r["score_chosen"] for r in second) / 4)
    # round 2 trained from round 1's model, against the starting model (--ref-update start)
    trained = Config.from_yaml(full_run / "rounds" / "round-2" / "config.yaml")
    assert trained.model == str(full_run / "rounds" / "round-1" / "model")
    assert trained.ref_model == str(tiny_model_dir)


def test_a_failed_run_leaves_nothing_half_written_and_its_rerun_matches(full_run, tmp_path, tiny_model_dir,
                                                                       prompts_file, capsys):
    out = tmp_path / "interrupted"
    cfg, options = _config(tiny_model_dir, prompts_file, out), _options()
    CALLS.clear()
    FAIL_ON_CALL[:] = [2, 3]  # round 2's call fails, and so does its first prompt asked alone
    with pytest.raises(DPOError, match=r"round 2, prompt 0: raised RuntimeError: judge crashed"):
        online(cfg, options)
    FAIL_ON_CALL.clear()
    assert sorted(p.name for p in (out / "rounds").iterdir()) == ["round-1", "round-1.jsonl", "round-1.stats.json"]
    round_one = (out / "rounds" / "round-1" / "model" / "model.safetensors").stat().st_mtime_ns
    CALLS.clear()
    online(cfg, options)
    assert CALLS == [4 * K]  # round 1 was skipped: only round 2 was judged
    assert (out / "rounds" / "round-1" / "model" / "model.safetensors").stat().st_mtime_ns == round_one
    final, expected = (load_file(d / "rounds" / "round-2" / "model" / "model.safetensors") for d in (out, full_run))
    assert all(torch.equal(final[k], expected[k]) for k in expected)

    # killed mid-round 2 after its first step: the pairs file is there, the model not; it resumes from step 1
    model_dir = out / "rounds" / "round-2" / "model"
    for path in [*model_dir.iterdir(), *(out / "rounds" / "round-2" / "checkpoints" / "step-2").iterdir()]:
        path.unlink()
    model_dir.rmdir(), (out / "rounds" / "round-2" / "checkpoints" / "step-2").rmdir()
    CALLS.clear()
    capsys.readouterr()
    online(cfg, options)
    assert CALLS == [] and "resuming from" in capsys.readouterr().out
    final = load_file(model_dir / "model.safetensors")
    assert all(torch.equal(final[k], expected[k]) for k in expected)
    assert len(_rows(out / "online_metrics.jsonl")) == 2


def test_lora_rounds_go_on_training_the_adapter_against_the_merged_policy(tmp_path, tiny_model_dir, prompts_file):
    out = tmp_path / "lora"
    online(_config(tiny_model_dir, prompts_file, out, lora_r=4, merge_lora=True), _options(ref_update="round"))
    prompts = [json.loads(line)["prompt"] for line in prompts_file.read_text().splitlines()]
    records = _rows(out / "rounds" / "round-2.jsonl")  # sampled from round 1's merged policy
    assert [(r["chosen"], r["rejected"]) for r in records] == _expected_pairs(
        out / "rounds" / "round-1" / "model", tiny_model_dir, prompts, round_seed(42, 2))
    trained = Config.from_yaml(out / "rounds" / "round-2" / "config.yaml")
    assert trained.lora_adapter == str(out / "rounds" / "round-1" / "adapter")
    assert trained.ref_model == str(out / "rounds" / "round-1" / "model")
    assert (out / "rounds" / "round-2" / "adapter" / "adapter_config.json").is_file()


def test_samples_are_the_same_whatever_the_batch_size(full_run, tmp_path, tiny_model_dir, prompts_file):
    out = tmp_path / "batch1"
    online(_config(tiny_model_dir, prompts_file, out), _options(rounds=1, sample_batch_size=1))
    assert (out / "rounds" / "round-1.jsonl").read_bytes() == (full_run / "rounds" / "round-1.jsonl").read_bytes()


def test_a_rerun_with_other_settings_stops(full_run, tiny_model_dir, prompts_file):
    with pytest.raises(DPOError, match="samples_per_prompt=3, not 4"):
        online(_config(tiny_model_dir, prompts_file, full_run), _options(samples_per_prompt=4))


def test_rank_pairs_as_ranked_data_with_ties_counted():
    scores = [1.0, 3.0, 3.0, 0.0]  # ranked: 1, 2, 0, 3 (equal scores in sample order)
    assert rank_pairs(scores, "best-worst") == ([(1, 3)], 0)
    assert rank_pairs(scores, "adjacent") == ([(2, 0), (0, 3)], 1)
    assert rank_pairs(scores, "all") == ([(1, 0), (1, 3), (2, 0), (2, 3), (0, 3)], 1)
    assert rank_pairs([2.0, 2.0], "best-worst") == ([], 1)


def test_round_prompts_pass_over_every_prompt_and_depend_only_on_seed_and_round():
    rounds = [round_prompts(5, 2, seed=7, n=n) for n in range(1, 6)]
    stream = [i for r in rounds for i in r]
    assert sorted(stream[:5]) == list(range(5)) and sorted(stream[5:10]) == list(range(5))
    assert round_prompts(5, 2, seed=7, n=3) == rounds[2]
    assert round_prompts(5, None, seed=7, n=3) == list(range(5))


def test_reference_of_each_round(tmp_path):
    cfg = Config(model="sft", data="p.jsonl", output=str(tmp_path))
    files = __import__("dpokit.online", fromlist=["OnlineFiles"]).OnlineFiles(tmp_path)
    start = round_config(cfg, _options(ref_update="start"), files, 2)
    iterative = round_config(cfg, _options(ref_update="round"), files, 2)
    assert start.model == iterative.model == str(tmp_path / "rounds" / "round-1" / "model")
    assert (start.ref_model, iterative.ref_model) == ("sft", None)  # None: a frozen copy of the round's start
    lora = round_config(cfg.replace(lora_r=4, merge_lora=True), _options(ref_update="round"), files, 2)
    assert (lora.model, lora.lora_adapter, lora.ref_model) == (
        "sft", str(tmp_path / "rounds" / "round-1" / "adapter"), str(tmp_path / "rounds" / "round-1" / "model"))
    assert round_config(cfg, _options(), files, 1).ref_model is None


def test_reward_model_scores_batched_as_one_by_one(tmp_path, tokenizer):
    from transformers import AutoModelForSequenceClassification, LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=0)
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    judge = RewardModel(str(tmp_path), device=torch.device("cpu"), dtype="float32", batch_size=3, max_length=128)
    prompts = ["What is 2 plus 2?", [{"role": "user", "content": "Hi"}], "Say hi", "Name a fox"]
    completions = [" Four.", "Hello there, friend", " hi", " The quick brown fox"]
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    expected = []
    for prompt, completion in zip(prompts, completions):
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        ids = tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": completion}],
                                            tokenize=True, return_dict=False)
        with torch.no_grad():
            expected.append(model(input_ids=torch.tensor([ids])).logits[0, 0].item())
    assert judge(prompts, completions) == pytest.approx(expected, abs=1e-5)


# ---- bad input: one line each, nothing in rounds/ ---------------------------------------------------------------

BAD_REWARDS = {
    "raises": ("def f(p, c):\n    if any('2 plus 2' in x for x in p):\n        raise ValueError('no twos')\n"
               "    return [1.0] * len(c)\n", r"round 1, prompt 2: raised ValueError: no twos"),
    "short": ("def f(p, c):\n    return [1.0]\n", r"round 1: returned 1 values for 12 completions"),
    "nan": ("def f(p, c):\n    return [float('nan')] * len(c)\n", r"round 1, prompt 0: returned nan"),
    "text": ("def f(p, c):\n    return ['good'] * len(c)\n", r"round 1, prompt 0: returned 'good'"),
}


@pytest.mark.parametrize("case", sorted(BAD_REWARDS))
def test_bad_reward_is_one_line_and_writes_no_round(case, tmp_path, tiny_model_dir, prompts_file, capsys):
    code, message = BAD_REWARDS[case]
    (tmp_path / "judge.py").write_text(code, encoding="utf-8")
    _bad_input(["--reward", f"{tmp_path / 'judge.py'}:f"], message, tmp_path, tiny_model_dir, prompts_file, capsys)


def test_a_causal_lm_as_reward_model_is_one_line(tmp_path, tiny_model_dir, prompts_file, capsys):
    _bad_input(["--reward-model", str(tiny_model_dir)], r"not a sequence classifier \(it is LlamaForCausalLM\)",
               tmp_path, tiny_model_dir, prompts_file, capsys)


def test_one_sample_per_prompt_is_one_line(tmp_path, tiny_model_dir, prompts_file, capsys):
    (tmp_path / "judge.py").write_text("def f(p, c):\n    return [1.0] * len(c)\n", encoding="utf-8")
    _bad_input(["--reward", f"{tmp_path / 'judge.py'}:f", "--samples-per-prompt", "1"],
               r"--samples-per-prompt must be at least 2", tmp_path, tiny_model_dir, prompts_file, capsys)


def test_a_prompt_over_the_context_is_one_line(tmp_path, tiny_model_dir, capsys):
    prompts = tmp_path / "long.jsonl"
    prompts.write_text(json.dumps({"prompt": "Hi"}) + "\n" + json.dumps({"prompt": "fox " * 300}) + "\n")
    (tmp_path / "judge.py").write_text("def f(p, c):\n    return [1.0] * len(c)\n", encoding="utf-8")
    _bad_input(["--reward", f"{tmp_path / 'judge.py'}:f", "--max-prompt-length", "none", "--max-length", "4096"],
               r"round 1, prompt 1: \d+ tokens \+ --max-new-tokens 4 exceed the model's context \(512 positions\)",
               tmp_path, tiny_model_dir, prompts, capsys)


def _bad_input(flags, message, tmp_path, model, prompts, capsys):
    import re

    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main(["online", "--model", str(model), "--prompts", str(prompts), "--output", str(out), "--rounds", "1",
              "--samples-per-prompt", str(K), "--max-new-tokens", "4", "--no-progress", "--no-cache", *flags])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and re.search(message, err), err
    assert not (out / "rounds").exists() or not any((out / "rounds").iterdir())
