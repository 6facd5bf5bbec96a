"""Sampling (generate.py) and evaluation (evaluation.py) against independent computations: a naive greedy loop
over full forwards, hand-derived nucleus sets, the softmax for Gumbel-max frequencies, `naive_sequence_logps`
for every log-prob, and a plain Python count for reward accuracy."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from dpokit import evaluation, generate
from dpokit.cli import main
from dpokit.logprobs import naive_sequence_logps
from dpokit.data.tokenization import TokenizedPair

PROMPTS = ["Human: What is", "The quick brown fox jumps over the lazy", "def", "Question: how many legs"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matmuls run fastest on one thread


@pytest.fixture
def other_model(tiny_model):
    """The tiny model with every weight nudged: a different policy over the same tokenizer."""
    model = copy.deepcopy(tiny_model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return model


def _sample(model, tokenizer, **options):
    defaults = dict(eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id, max_new_tokens=8)
    return generate.sample(model, generate.encode_prompts(tokenizer, PROMPTS), **{**defaults, **options})


def test_batched_left_padded_greedy_matches_naive_loop(tiny_model, tokenizer):
    batched = _sample(tiny_model, tokenizer, temperature=0, batch_size=len(PROMPTS))
    for s in batched:
        ids = torch.tensor([s.prompt_ids])
        for _ in range(8):  # no cache, no padding: the full forward of everything so far
            ids = torch.cat([ids, tiny_model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        naive = ids[0, len(s.prompt_ids):].tolist()
        if tokenizer.eos_token_id in naive:
            naive = naive[:naive.index(tokenizer.eos_token_id) + 1]
        assert s.completion_ids == naive


def test_sampling_is_reproducible_with_a_seed_and_across_batch_sizes(tiny_model, tokenizer):
    first = _sample(tiny_model, tokenizer, num_samples=3, seed=7, batch_size=12)
    again = _sample(tiny_model, tokenizer, num_samples=3, seed=7, batch_size=12)
    one_by_one = _sample(tiny_model, tokenizer, num_samples=3, seed=7, batch_size=1)
    other_seed = _sample(tiny_model, tokenizer, num_samples=3, seed=8, batch_size=12)
    ids = lambda samples: [s.completion_ids for s in samples]  # noqa: E731
    assert ids(first) == ids(again) == ids(one_by_one)
    assert ids(first) != ids(other_seed)
    assert [(s.prompt_index, s.sample_index) for s in first] == [(i, k) for i in range(4) for k in range(3)]
    assert len({tuple(s.completion_ids) for s in first}) > 4  # a random model's samples differ


def test_progress_hears_each_batch_of_rows_and_changes_no_sample(tiny_model, tokenizer):
    told: list[int] = []
    watched = _sample(tiny_model, tokenizer, num_samples=3, seed=7, batch_size=5, progress=told.append)
    plain = _sample(tiny_model, tokenizer, num_samples=3, seed=7, batch_size=5)
    assert told == [5, 5, 2]  # 4 prompts x 3 samples in rows of 5
    assert [s.completion_ids for s in watched] == [s.completion_ids for s in plain]


def test_nucleus_filter_keeps_the_hand_derived_sets():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = lambda p: torch.isfinite(generate.nucleus_filter(logits, p))[0].tolist()  # noqa: E731
    assert kept(0.7) == [True, True, False, False]   # 0.5 < 0.7, 0.5 + 0.3 >= 0.7
    assert kept(0.5) == [True, False, False, False]  # the top token alone reaches 0.5
    assert kept(0.81) == [True, True, True, False]
    assert kept(1.0) == [True, True, True, True]
    shuffled = logits[:, [2, 0, 3, 1]]               # the order of the vocabulary does not matter
    assert torch.isfinite(generate.nucleus_filter(shuffled, 0.7))[0].tolist() == [False, True, False, True]


def test_gumbel_max_draws_follow_the_tempered_softmax():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    rows = 4000
    generators = [torch.Generator().manual_seed(i) for i in range(rows)]
    for temperature in (1.0, 2.0):
        drawn = generate.choose_tokens(logits.expand(rows, -1), temperature, 1.0, generators)
        freq = torch.bincount(drawn, minlength=4).double() / rows
        expected = torch.softmax(logits.double() / temperature, -1)
        assert torch.allclose(freq, expected, atol=0.03), (freq, expected)


def test_completion_logps_match_the_naive_forward(tiny_model, tokenizer):
    samples = _sample(tiny_model, tokenizer, num_samples=2, seed=1)
    got = evaluation.completion_logps(tiny_model, samples, batch_size=3)
    naive = torch.stack([naive_sequence_logps(tiny_model, s.prompt_ids, s.completion_ids) for s in samples])
    assert torch.allclose(got, naive, atol=1e-4)


def test_kl_is_zero_for_the_same_model_and_the_mean_log_ratio_otherwise(tiny_model, other_model, tokenizer):
    reward = lambda prompts, completions: [float(len(c)) for c in completions]  # noqa: E731
    options = dict(num_samples=2, max_new_tokens=6, seed=3, batch_size=8)
    same, _ = evaluation.sample_metrics(tiny_model, copy.deepcopy(tiny_model), tokenizer, PROMPTS, reward, **options)
    assert same["kl"] == 0.0 and same["win_rate"] == 0.5 and same["reward"] == same["reference_reward"]

    metrics, records = evaluation.sample_metrics(other_model, tiny_model, tokenizer, PROMPTS, reward, **options)
    samples = _sample(other_model, tokenizer, num_samples=2, max_new_tokens=6, seed=3)
    with torch.no_grad():
        log_ratios = [float(naive_sequence_logps(other_model, s.prompt_ids, s.completion_ids)
                            - naive_sequence_logps(tiny_model, s.prompt_ids, s.completion_ids)) for s in samples]
    assert metrics["kl"] == pytest.approx(sum(log_ratios) / len(log_ratios), abs=1e-4)
    ref_lengths = [len(t) for _, t in generate.sample_texts(tiny_model, tokenizer, PROMPTS, **options)]
    wins = [1.0 if r["reward"] > b else 0.5 if r["reward"] == b else 0.0 for r, b in zip(records, ref_lengths)]
    assert metrics["win_rate"] == pytest.approx(sum(wins) / len(wins))
    assert [r["reward"] for r in records] == [float(len(r["completion"])) for r in records]


@torch.no_grad()
def test_preference_metrics_match_an_independent_count(tiny_model, other_model, tokenizer):
    pairs = []
    for i, prompt in enumerate(PROMPTS):
        prompt_ids = tokenizer(prompt)["input_ids"]
        pairs.append(TokenizedPair(prompt_ids, tokenizer(f" yes {i}")["input_ids"][1:] + [tokenizer.eos_token_id],
                                   tokenizer(" no")["input_ids"][1:] + [tokenizer.eos_token_id]))
    beta = 0.5
    metrics = evaluation.preference_metrics(other_model, tiny_model, pairs, beta=beta, batch_size=3)
    margins, correct = [], 0
    for p in pairs:
        ratio = lambda ids: float(naive_sequence_logps(other_model, p.prompt_ids, ids)  # noqa: E731
                                  - naive_sequence_logps(tiny_model, p.prompt_ids, ids))
        chosen, rejected = beta * ratio(p.chosen_ids), beta * ratio(p.rejected_ids)
        margins.append(chosen - rejected)
        correct += chosen > rejected
    assert metrics["rewards/accuracies"] == correct / len(pairs)
    assert metrics["rewards/margins"] == pytest.approx(sum(margins) / len(margins), abs=1e-4)
    assert any(abs(m) > 1e-3 for m in margins)  # the two models do differ on these pairs


def test_reward_functions_load_from_files_and_modules_and_are_checked(tmp_path):
    (tmp_path / "my_reward.py").write_text("def length(prompts, completions):\n    return [len(c) for c in completions]\n")
    assert evaluation.load_reward(f"{tmp_path / 'my_reward.py'}:length")(["p"], ["abc"]) == [3]
    assert evaluation.load_reward("math:fsum")([1.0, 2.0]) == 3.0
    for bad in ("nocolon", "math:nope", "no_such_module_xyz:f", f"{tmp_path / 'missing.py'}:f"):
        with pytest.raises(Exception, match="--reward"):
            evaluation.load_reward(bad)
    sample = generate.Sample(0, 0, [1], [2])
    with pytest.raises(Exception, match="2 values for 1"):
        evaluation.score_samples(lambda p, c: [1.0, 2.0], ["p"], [(sample, "x")])
    with pytest.raises(Exception, match="non-finite"):
        evaluation.score_samples(lambda p, c: [float("nan")], ["p"], [(sample, "x")])


def test_cli_generate_writes_reproducible_jsonl_and_eval_reports(tiny_model_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    args = ["generate", "--model", str(tiny_model_dir), "--prompts", str(prompts), "--num-samples", "2",
            "--max-new-tokens", "5", "--seed", "4"]
    main([*args, "--out", str(tmp_path / "a.jsonl")])
    main([*args, "--out", str(tmp_path / "b.jsonl"), "--batch-size", "3"])
    rows = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()
    assert len(rows) == 8 and rows[3]["prompt"] == PROMPTS[1] and rows[3]["sample_index"] == 1

    (tmp_path / "r.py").write_text("def f(prompts, completions):\n    return [len(c) for c in completions]\n")
    main(["eval", "--model", str(tiny_model_dir), "--ref-model", str(tiny_model_dir), "--prompts", str(prompts),
          "--reward", f"{tmp_path / 'r.py'}:f", "--max-new-tokens", "5", "--out", str(tmp_path / "m.json")])
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["samples/kl"] == 0.0 and metrics["samples/win_rate"] == 0.5

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--model", str(tiny_model_dir), "--ref-model", str(tiny_model_dir), "--prompts", str(prompts)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == "dpo eval: error: eval: --prompts needs --reward module:function to " \
                                              "score the samples"
