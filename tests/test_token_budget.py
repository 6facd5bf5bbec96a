"""Micro-batches by token budget (`--micro-batch-tokens`): the cut respects the budget as the shared layouts count
tokens, keeps every pair once and in order, and training with it equals training without it."""

from __future__ import annotations

import random

import pytest
import torch
from safetensors.torch import load_file

from dpokit.config import Config
from dpokit.loop import train
from dpokit.data import synthetic
from dpokit.pair_sampler import micro_batches, split_by_tokens, split_further
from dpokit.data.tokenization import TokenizedPair


def _pairs(seed: int, n: int) -> list[TokenizedPair]:
    rng = random.Random(seed)
    ids = lambda k: [rng.randrange(3, 100) for _ in range(k)]  # noqa: E731
    shared = ids(6)
    return [TokenizedPair(shared if rng.random() < 0.3 else ids(rng.randint(1, 12)), ids(rng.randint(1, 9)),
                          ids(rng.randint(1, 9))) for _ in range(n)]


def _forwarded(pairs: list[TokenizedPair]) -> int:
    """Tokens the shared layouts forward, counted by hand: each prompt once, each distinct response once."""
    by_prompt: dict[tuple, set] = {}
    for p in pairs:
        by_prompt.setdefault(tuple(p.prompt_ids), set()).update({tuple(p.chosen_ids), tuple(p.rejected_ids)})
    return sum(len(prompt) + sum(map(len, responses)) for prompt, responses in by_prompt.items())


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("budget", [1, 20, 45, 10_000])
def test_micro_batches_fit_the_budget_and_keep_every_pair_in_order(seed, budget):
    pairs = _pairs(seed, 17)
    cuts = split_by_tokens(pairs, budget)
    assert [i for cut in cuts for i in cut] == list(range(len(pairs)))
    for cut in cuts:
        assert len(cut) == 1 or _forwarded([pairs[i] for i in cut]) <= budget
    for later, cut in zip(cuts[1:], cuts):  # greedy: the next pair would not have fitted
        assert _forwarded([pairs[i] for i in cut + later[:1]]) > budget
    wanted = min(len(pairs), len(cuts) + 3)
    more = split_further(cuts, wanted)
    assert len(more) == wanted and [i for cut in more for i in cut] == list(range(len(pairs)))


def test_a_shared_prompt_counts_once():
    prompt, a, b, c = [1] * 10, [2] * 3, [3] * 3, [4] * 3
    pairs = [TokenizedPair(prompt, a, b), TokenizedPair(prompt, a, c), TokenizedPair(prompt, c, b)]
    assert split_by_tokens(pairs, 19) == [[0, 1, 2]]          # 10 + 3 x 3 distinct responses
    assert split_by_tokens(pairs, 18) == [[0], [1], [2]]    # 19 > 18, then 16 + 3 (b) > 18


def test_training_by_token_budget_equals_training_by_pair_count(tmp_path, tiny_model_dir):
    common = dict(model=str(tiny_model_dir), data="synthetic", max_pairs=24, eval_fraction=0.0, max_steps=3,
                  batch_size=8, lr=1e-3, seed=0, progress=False, cache=False)
    train(Config(output=str(tmp_path / "pairs"), **common))
    train(Config(output=str(tmp_path / "tokens"), micro_batch_tokens=30, **common))
    train_pairs = synthetic.make_pairs(24, 0)                   # the run's pairs (none held out)
    first_step = next(micro_batches(len(train_pairs), 8, seed=0, rank=0, world_size=1))[1]
    assert len(split_by_tokens([train_pairs[j] for j in first_step], 30)) > 1  # the budget does cut the steps
    by_pairs = load_file(tmp_path / "pairs" / "model" / "model.safetensors")
    by_tokens = load_file(tmp_path / "tokens" / "model" / "model.safetensors")
    before = load_file(tiny_model_dir / "model.safetensors")
    assert max((by_pairs[k] - before[k]).abs().max() for k in before) > 1e-3
    # Micro-batches of other sizes sum the same gradient in another order. AdamW divides by sqrt(v), so on the
    # few elements whose gradient is near zero that rounding becomes an update difference of a few 1e-6 over
    # three steps at lr 1e-3; everywhere else the weights agree to float32 rounding.
    differences = torch.cat([(by_tokens[name] - by_pairs[name]).abs().flatten() for name in by_pairs])
    assert differences.max() < 1e-5
    assert differences.quantile(0.999) < 1e-7
