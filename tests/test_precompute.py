"""`--precompute-ref`: reference log-probs computed once equal the on-the-fly ones, are reused from disk, and are
recomputed whenever the reference weights, the data (token ids) or the settings change."""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch

from dpokit.batching import make_batch
from dpokit.logprobs import naive_sequence_logps
from dpokit.reference import ModelReference, precompute_reference, reference_cache_key
from dpokit.data.tokenization import TokenizedPair


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


def make_pairs(vocab: int, n: int = 7) -> list[TokenizedPair]:
    rng = random.Random(3)
    ids = lambda k: [rng.randrange(3, vocab) for _ in range(k)]  # noqa: E731
    return [TokenizedPair(ids(rng.randint(1, 9)), ids(rng.randint(1, 6)), ids(rng.randint(1, 6))) for _ in range(n)]


class Unreachable:
    """A reference that must not be run (the cached table has to be used)."""

    def logps(self, batch):
        raise AssertionError("the reference was run although its log-probs were cached")


def test_precomputed_log_probs_equal_the_naive_forward_and_are_read_back_from_the_cache(model, tmp_path):
    pairs = make_pairs(model.config.vocab_size)
    cache = tmp_path / "reference.safetensors"
    table = precompute_reference(ModelReference(copy.deepcopy(model)), pairs, layout="packed", pad_id=0,
                                 batch_size=3, device="cpu", cache_file=cache)
    ids = [4, 0, 6, 2]  # a training batch in any order, in any layout
    batch = make_batch([pairs[i] for i in ids], layout="concatenated", pair_ids=ids)
    got = table.logps(batch)
    want_chosen = torch.stack([naive_sequence_logps(model, pairs[i].prompt_ids, pairs[i].chosen_ids) for i in ids])
    want_rejected = torch.stack([naive_sequence_logps(model, pairs[i].prompt_ids, pairs[i].rejected_ids)
                                 for i in ids])
    torch.testing.assert_close(got.chosen, want_chosen.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.rejected, want_rejected.detach(), rtol=1e-5, atol=1e-5)
    assert got.chosen_lengths.tolist() == [len(pairs[i].chosen_ids) for i in ids]

    again = precompute_reference(Unreachable(), pairs, layout="packed", pad_id=0, batch_size=3, device="cpu",
                                 cache_file=cache)
    assert torch.equal(again.logps(batch).chosen, got.chosen)


def test_cache_key_changes_with_reference_weights_data_and_settings(model):
    pairs = make_pairs(model.config.vocab_size)
    settings = {"dtype": "float32", "attn": "sdpa", "ld_alpha": None}
    key = reference_cache_key(model, pairs, settings)
    same_pairs = [TokenizedPair(list(p.prompt_ids), list(p.chosen_ids), list(p.rejected_ids)) for p in pairs]
    assert reference_cache_key(copy.deepcopy(model), same_pairs, dict(settings)) == key

    nudged = copy.deepcopy(model)
    with torch.no_grad():
        next(nudged.parameters()).view(-1)[0] += 1e-6
    assert reference_cache_key(nudged, pairs, settings) != key                       # reference model

    edited = [*same_pairs[:-1], TokenizedPair(pairs[-1].prompt_ids, pairs[-1].chosen_ids[:-1] or [5],
                                              pairs[-1].rejected_ids)]
    assert reference_cache_key(model, edited, settings) != key                       # data / truncation
    moved = [TokenizedPair(p.prompt_ids + p.chosen_ids[:1], p.chosen_ids[1:], p.rejected_ids) for p in pairs]
    assert reference_cache_key(model, moved, settings) != key                        # prompt boundary
    assert reference_cache_key(model, pairs, {**settings, "dtype": "bfloat16"}) != key  # settings
    assert reference_cache_key(model, pairs[:-1], settings) != key


def test_training_with_precompute_ref_matches_the_on_the_fly_reference(tmp_path):
    from dpokit.config import Config
    from dpokit.loop import train

    def run(name: str, **flags) -> list[dict]:
        cfg = Config(data="synthetic", max_pairs=40, eval_fraction=0.2, batch_size=8, max_steps=2,
                     output=str(tmp_path / name), cache_dir=str(tmp_path / "cache"), progress=False, **flags)
        train(cfg)
        return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    on_the_fly, precomputed = run("fly"), run("pre", precompute_ref=True)
    assert len(list((tmp_path / "cache" / "reference").glob("*.safetensors"))) == 1
    assert len(on_the_fly) == len(precomputed)
    for a, b in zip(on_the_fly, precomputed):
        for name in ("loss", "rewards/margins", "eval/loss", "eval/rewards/margins"):
            if name in a:
                assert b[name] == pytest.approx(a[name], rel=1e-5, abs=1e-6), name


def test_processes_score_their_own_batches_and_the_sum_is_the_whole_table(model, tmp_path):
    """Two processes emulated in one: each scores every other batch (the same number of forwards, a spare one
    for the process with fewer), only rank 0 writes the cache, and the summed tables equal one process's."""
    pairs = make_pairs(model.config.vocab_size, n=9)                # 9 pairs in batches of 2: 5 batches
    reference = ModelReference(copy.deepcopy(model))
    whole = precompute_reference(reference, pairs, layout="blocks", pad_id=0, batch_size=2, device="cpu").table
    seen: list[list[int]] = []

    class Counting:
        def logps(self, batch):
            seen.append(batch.pair_ids.tolist())
            return reference.logps(batch)

    shares = []
    for rank in (1, 0):
        cache = tmp_path / f"rank{rank}.safetensors"
        shares.append(precompute_reference(Counting(), pairs, layout="blocks", pad_id=0, batch_size=2, device="cpu",
                                           rank=rank, world_size=2, cache_file=cache).table)
        assert cache.exists() == (rank == 0)
    # rank 1: batches 1, 3 and a spare round on pair 0 (dropped); rank 0: batches 0, 2, 4
    assert seen == [[2, 3], [6, 7], [0], [0, 1], [4, 5], [8]]
    for name in whole:
        torch.testing.assert_close(shares[0][name] + shares[1][name], whole[name])
