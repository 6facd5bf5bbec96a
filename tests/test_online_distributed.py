"""`dpo online` on 2 gloo ranks (forked as torchrun would launch them) against 1 process with the same global
batch: the round files are byte for byte the same and the final weights within 1e-5, round-based and on-policy
(also when a step has fewer pairs than ranks); a judge failing on one rank's prompts stops both ranks with its one
line (printed once); the on-policy micro-batches are dealt so every rank runs as many and every pair trains once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from distributed_helpers import fork_ranks
from safetensors.torch import load_file

from dpokit import Config
from dpokit.errors import DPOError
from dpokit.on_policy import step_shares
from dpokit.online import OnlineOptions, online

K = 3


def char_reward(prompts, completions):
    """Code points summed, mod 97 (as tests/test_online.py): few ties."""
    return [float(sum(map(ord, c)) % 97) for c in completions]


def few_pairs_reward(prompts, completions):
    """Prompts 3 and 4's samples tie: with seed 3 the on-policy steps take prompts {3, 0} and {1, 2}, so step 1
    has 1 pair, fewer than the ranks, and step 2 has 2 (a stand-in of any weight but 0 would show: AdamW does not
    undo a gradient scaled in one step only)."""
    return [1.0 if "3 plus" in p or "4 plus" in p else float(sum(map(ord, c)) % 97)
            for p, c in zip(prompts, completions)]


def fails_on_prompt_4(prompts, completions):
    """Raises on the last prompt, which the last rank samples."""
    if any("4 plus" in p for p in prompts):
        raise ValueError("cannot judge fours")
    return [1.0] * len(completions)


def _config(model: Path, prompts: Path, output: Path, **changes) -> Config:
    settings = dict(model=str(model), data=str(prompts), output=str(output), max_steps=2, lr=1e-3, seed=3,
                    eval_fraction=0.0, progress=False, cache=False)
    return Config(**{**settings, **changes})


def _options(reward=char_reward, **changes) -> OnlineOptions:
    return OnlineOptions(**{"rewards": [reward], "samples_per_prompt": K, "rounds": 2, "max_new_tokens": 6,
                            **changes})


# (name, reward, 1-process batch changes, per-rank batch changes on 2 ranks): the same prompts / pairs per step
RUNS = [("rounds", char_reward, False, dict(batch_size=2), dict(batch_size=1)),
        ("on-policy", char_reward, True, dict(batch_size=2, grad_accum=2), dict(batch_size=2)),
        ("on-policy-one-pair", few_pairs_reward, True, dict(batch_size=1, grad_accum=2, max_grad_norm=0.0),
         dict(batch_size=1, max_grad_norm=0.0))]  # unclipped: clipping would hide a stand-in's weight


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir) -> Path:
    """Each run in this process, then on 2 forked ranks (one launch)."""
    root = tmp_path_factory.mktemp("online-distributed")
    prompts = root / "prompts.jsonl"  # 5 prompts: rank 0 samples 3 of a round, rank 1 2
    prompts.write_text("".join(json.dumps({"prompt": f"Human: What is {i} plus {i}?\n\nAssistant:"}) + "\n"
                               for i in range(5)), encoding="utf-8")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, reward, on_policy, single, _ in RUNS:
            online(_config(tiny_model_dir, prompts, root / f"{name}-1", **single),
                   _options(reward, on_policy=on_policy))
    finally:
        torch.set_num_threads(threads)
    fork_ranks(worker, 2, tiny_model_dir, prompts, root)
    return root


def worker(rank: int, world_size: int, model: Path, prompts: Path, root: Path) -> None:
    for name, reward, on_policy, _, per_rank in RUNS:
        online(_config(model, prompts, root / f"{name}-2", **per_rank), _options(reward, on_policy=on_policy))
    try:
        online(_config(model, prompts, root / "fails", batch_size=1), _options(fails_on_prompt_4, rounds=1))
    except DPOError as err:
        (root / f"error-rank{rank}.txt").write_text(f"{type(err).__name__}: {err}", encoding="utf-8")


def _weights_close(one: Path, two: Path) -> None:
    single, multi = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert single.keys() == multi.keys()
    for key in single:
        torch.testing.assert_close(multi[key], single[key], atol=1e-5, rtol=0, msg=key)


def test_rounds_on_two_ranks_write_the_round_files_and_weights_of_one(runs, tiny_model_dir):
    for n in (1, 2):
        one, two = (runs / f"rounds-{p}" / "rounds" / f"round-{n}.jsonl" for p in (1, 2))
        assert two.read_bytes() == one.read_bytes()
        assert len(one.read_text().splitlines()) >= 4  # pairs of prompts sampled on both ranks
    _weights_close(*(runs / f"rounds-{p}" / "rounds" / "round-2" / "model" for p in (1, 2)))
    start = load_file(tiny_model_dir / "model.safetensors")
    moved = load_file(runs / "rounds-2" / "rounds" / "round-2" / "model" / "model.safetensors")
    assert max((moved[k] - start[k]).abs().max() for k in start) > 1e-3
    rows = [[json.loads(line) for line in (runs / f"rounds-{p}" / "online_metrics.jsonl").read_text().splitlines()]
            for p in (1, 2)]
    assert [(r["round"], r["samples"], r["pairs"]) for r in rows[1]] == [(r["round"], r["samples"], r["pairs"])
                                                                        for r in rows[0]]
    assert rows[1][1]["samples/kl"] == pytest.approx(rows[0][1]["samples/kl"], abs=1e-5)  # each rank its share


@pytest.mark.parametrize("name", ["on-policy", "on-policy-one-pair"])
def test_on_policy_on_two_ranks_trains_the_weights_of_one(runs, name):
    _weights_close(runs / f"{name}-1" / "model", runs / f"{name}-2" / "model")
    rows = [[json.loads(line) for line in (runs / f"{name}-{p}" / "metrics.jsonl").read_text().splitlines()]
            for p in (1, 2)]
    train = [[r for r in rows_ if "loss" in r] for rows_ in rows]
    assert [r["step"] for r in train[1]] == [1, 2]
    for one, two in zip(*train):
        for key in ("loss", "rewards/chosen", "online/samples", "online/pairs", "online/samples/reward"):
            assert two[key] == pytest.approx(one[key], abs=1e-5), key
    if name == "on-policy-one-pair":  # one rank trains the step's pair, the other a stand-in of weight 0
        assert [r["online/pairs"] for r in train[0]] == [1, 2]


def test_a_judge_failing_on_one_rank_stops_every_rank_with_its_line(runs):
    """Rank 1's judge raises; both ranks stop with its line, which rank 0 reports and rank 1 keeps quiet (the CLI
    prints no `ReportedElsewhere`), so a torchrun launch shows it once."""
    line = "reward fails_on_prompt_4: round 1, prompt 4: raised ValueError: cannot judge fours"
    messages = [(runs / f"error-rank{rank}.txt").read_text(encoding="utf-8") for rank in (0, 1)]
    assert messages == [f"DPOError: {line}", f"ReportedElsewhere: {line}"]
    assert not (runs / "fails" / "rounds").exists() or not any((runs / "fails" / "rounds").iterdir())


@pytest.mark.parametrize("sizes, ranks", [([2, 1, 3], 2), ([3], 2), ([1], 2), ([1, 1, 1], 2), ([4, 2], 3),
                                          ([2, 2], 1)])
def test_step_shares_give_every_rank_as_many_batches_and_every_pair_once(sizes, ranks):
    cuts, start = [], 0
    for size in sizes:
        cuts.append(list(range(start, start + size)))
        start += size
    shares = [step_shares(cuts, start, rank, ranks) for rank in range(ranks)]
    assert len({len(s) for s in shares}) == 1                          # as many micro-batches on every rank
    trained = sorted(j for s in shares for cut, stand_in in s if not stand_in for j in cut)
    assert trained == list(range(start))                               # every pair once
    stand_ins = [[stand_in for _, stand_in in s] for s in shares]
    assert all(flags == sorted(flags) for flags in stand_ins)          # stand-ins last
    assert any(any(flags) for flags in stand_ins) == (start < ranks * len(shares[0]))  # only when pairs are few
    if ranks == 1:
        assert shares[0] == [(cut, False) for cut in cuts]             # one process: the cuts as they are
