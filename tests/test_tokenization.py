"""Tokenization room and the data pipeline: exact boundary, special tokens, chat templates, truncation, cache."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from dpokit.data import preparation as pipeline
from dpokit.errors import DPOError
from dpokit.data.formats import PreferencePair
from dpokit.data.tokenization import (TokenizedPair, TruncationReport, common_prefix_length, tokenize_pairs,
                                 truncate_pair)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data"


def tokens(tokenizer, ids):
    return tokenizer.convert_ids_to_tokens(ids)


def test_merge_across_the_boundary_is_cut_at_the_common_token_prefix(tokenizer):
    # The prompt ends with a space; alone it is the token "Ġ", but in prompt+completion the space merges into
    # "ĠP": the completion must start with "ĠP", as the model sees it at inference.
    (pair,), report = tokenize_pairs([PreferencePair("Human: hi\n\nAssistant: ", "Paris.", "Paris?")], tokenizer,
                                     max_length=64)
    assert tokens(tokenizer, pair.prompt_ids) == ["<s>", "Human", ":", "Ġh", "i", "Ċ", "Ċ", "Assistant", ":"]
    assert tokens(tokenizer, pair.chosen_ids) == ["ĠP", "ar", "is", ".", "</s>"]
    assert tokens(tokenizer, pair.rejected_ids) == ["ĠP", "ar", "is", "?", "</s>"]
    assert report.boundary_mismatches == 1 and report.boundary_example == " "
    assert any("in 1 of 1 pairs the prompt's own tokens are not a prefix" in line for line in report.lines())


def test_clean_boundary_keeps_the_prompt_tokens_and_adds_eos_once(tokenizer):
    pairs = [PreferencePair("Human: What is the capital of France?\n\nAssistant:", " Paris.", " Lyon.</s>")]
    (pair,), report = tokenize_pairs(pairs, tokenizer, max_length=64)
    assert pair.prompt_ids == tokenizer("Human: What is the capital of France?\n\nAssistant:")["input_ids"]
    assert pair.prompt_ids.count(tokenizer.bos_token_id) == 1 and pair.prompt_ids[0] == tokenizer.bos_token_id
    assert tokens(tokenizer, pair.chosen_ids) == ["ĠP", "ar", "is", ".", "</s>"]
    assert pair.rejected_ids[-1] == tokenizer.eos_token_id and pair.rejected_ids.count(tokenizer.eos_token_id) == 1
    assert report.boundary_mismatches == 0 and report.lines() == []


def test_text_that_starts_with_bos_does_not_double_it(tokenizer):
    (pair,), report = tokenize_pairs([PreferencePair("<s>Human: hi", " yes", " no")], tokenizer, max_length=64)
    assert pair.prompt_ids.count(tokenizer.bos_token_id) == 1 and report.doubled_bos == 1


def test_chat_template_rendering_boundary_and_end_of_turn(tokenizer):
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi in Russian."}]
    pairs = [PreferencePair(prompt, [{"role": "assistant", "content": "Привет!"}],
                            [{"role": "assistant", "content": "Hola"}], {"margin": 1.0})]
    (pair,), report = tokenize_pairs(pairs, tokenizer, max_length=256)
    # Written out by hand from the fixture's template (conftest.CHAT_TEMPLATE).
    expected_prompt = "<s><|system|>\nBe brief.<|end|>\n<|user|>\nSay hi in Russian.<|end|>\n<|assistant|>\n"
    assert pair.prompt_ids == tokenizer(expected_prompt, add_special_tokens=False)["input_ids"]
    assert pair.prompt_ids.count(tokenizer.bos_token_id) == 1
    assert tokenizer.decode(pair.chosen_ids) == "Привет!<|end|>\n"
    assert tokenizer.decode(pair.rejected_ids) == "Hola<|end|>\n"
    assert tokenizer.eos_token_id not in pair.chosen_ids + pair.rejected_ids  # the end-of-turn ends them, not EOS
    assert pair.extras == {"margin": 1.0} and report.boundary_mismatches == 0


def test_string_prompt_with_message_completions_is_rendered_as_a_user_turn(tokenizer):
    (pair,), _ = tokenize_pairs([PreferencePair("Hi", [{"role": "assistant", "content": "Yo"}], "Hey")], tokenizer,
                                max_length=64)
    assert tokenizer.decode(pair.prompt_ids) == "<s><|user|>\nHi<|end|>\n<|assistant|>\n"
    assert tokenizer.decode(pair.rejected_ids) == "Hey<|end|>\n"


def test_missing_chat_template_is_a_clear_error(tokenizer):
    import copy

    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    pair = PreferencePair([{"role": "user", "content": "q"}], [{"role": "assistant", "content": "a"}],
                          [{"role": "assistant", "content": "b"}])
    with pytest.raises(DPOError, match="has no chat template"):
        tokenize_pairs([pair], plain, max_length=64)


def test_sft_text_only_keeps_bos_as_the_prompt(tokenizer):
    (pair,), _ = tokenize_pairs([PreferencePair("", "Hello world.", "Hello world.")], tokenizer, max_length=64)
    assert pair.prompt_ids == [tokenizer.bos_token_id]
    assert pair.chosen_ids == pair.rejected_ids == tokenizer("Hello world.", add_special_tokens=False)["input_ids"] + [
        tokenizer.eos_token_id]


@pytest.mark.parametrize("mode, prompt", [("keep_end", [7, 8, 9, 10]), ("keep_start", [1, 2, 3, 4])])
def test_truncation_modes_and_counts(mode, prompt):
    pair = TokenizedPair(list(range(1, 11)), [20, 21, 22, 23, 24], [30, 31])
    report = TruncationReport()
    out = truncate_pair(pair, max_length=7, max_prompt_length=4, max_completion_length=None, truncation_mode=mode,
                        report=report)
    assert (out.prompt_ids, out.chosen_ids, out.rejected_ids) == (prompt, [20, 21, 22], [30, 31])
    assert (report.truncated_prompts, report.truncated_completions, report.dropped) == (1, 1, 0)
    out = truncate_pair(pair, max_length=20, max_prompt_length=None, max_completion_length=1, truncation_mode=mode,
                        report=report)
    assert (out.chosen_ids, out.rejected_ids, report.truncated_completions) == ([20], [30], 2)
    assert truncate_pair(pair, max_length=10, max_prompt_length=None, max_completion_length=None,
                         truncation_mode=mode, report=report) is None
    assert report.dropped == 1


def test_common_prefix_length_against_a_naive_loop():
    import random

    rng = random.Random(0)
    for _ in range(300):
        a = [rng.randrange(3) for _ in range(rng.randrange(6))]
        b = [rng.randrange(3) for _ in range(rng.randrange(6))]
        naive = 0
        while naive < min(len(a), len(b)) and a[naive] == b[naive]:
            naive += 1
        assert common_prefix_length(a, b) == naive


class CountingTokenizer:
    """Delegates to a real tokenizer and counts encodes (its Rust backend is wrapped too), to see whether a run
    tokenized at all."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0
        counter = self

        class Backend:
            def encode_batch_fast(self, *args, **kwargs):
                counter.calls += 1
                return inner.backend_tokenizer.encode_batch_fast(*args, **kwargs)

            def __getattr__(self, name):
                return getattr(inner.backend_tokenizer, name)

        self.backend_tokenizer = Backend()

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.inner(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def prepare(path, tokenizer, cache_dir, cache=True, **overrides):
    settings = pipeline.DataSettings(data=str(path), seed=0, eval_fraction=0.25, max_length=128,
                                     max_prompt_length=64)
    return pipeline.prepare(replace(settings, **overrides), tokenizer, cache=cache, cache_dir=str(cache_dir))


def test_cache_hit_on_a_second_run_and_misses_when_inputs_change(tokenizer, tmp_path):
    data = tmp_path / "hh.jsonl"
    data.write_bytes((EXAMPLES / "hh_rlhf.jsonl").read_bytes())
    counting = CountingTokenizer(tokenizer)
    first = prepare(data, counting, tmp_path / "cache")
    calls = counting.calls
    assert calls > 0 and len(list((tmp_path / "cache").glob("*.npz"))) == 1
    second = prepare(data, counting, tmp_path / "cache")
    assert counting.calls == calls and "loaded tokenized data from the cache" in second.notes[-1]
    assert (second.train, second.eval, second.counts) == (first.train, first.eval, first.counts)
    prepare(data, counting, tmp_path / "cache", max_length=100)  # a setting changed
    assert counting.calls > calls
    calls = counting.calls
    data.write_text(data.read_text(encoding="utf-8").replace("Paris", "Paris!"), encoding="utf-8")
    changed = prepare(data, counting, tmp_path / "cache")  # the content changed
    assert counting.calls > calls and changed.train != first.train
    calls = counting.calls
    prepare(data, counting, tmp_path / "nocache", cache=False)
    assert counting.calls > calls and not (tmp_path / "nocache").exists()


def test_cache_round_trips_groups_and_extras(tokenizer, tmp_path):
    first = prepare(EXAMPLES / "ranked.jsonl", tokenizer, tmp_path, pairs="all", eval_fraction=0.0)
    second = prepare(EXAMPLES / "ranked.jsonl", tokenizer, tmp_path, pairs="all", eval_fraction=0.0)
    assert second.train == first.train and {p.group for p in second.train} == {0, 1, 2}
    assert any(p.extras for p in second.train) and any(not p.extras for p in second.train)


def test_unpaired_preparation(tokenizer, tmp_path):
    paired = prepare(EXAMPLES / "hh_rlhf.jsonl", tokenizer, tmp_path, eval_fraction=0.0, unpaired=True)
    assert len(paired.train) == 12 and sorted(p.extras["label"] for p in paired.train) == [0.0] * 6 + [1.0] * 6
    assert all(p.chosen_ids != p.rejected_ids for p in paired.train)
    kto = prepare(EXAMPLES / "kto.jsonl", tokenizer, tmp_path, eval_fraction=0.0, unpaired=True)
    assert [p.extras["label"] for p in kto.train] == [1.0, 0.0, 1.0, 1.0, 0.0]
    with pytest.raises(DPOError, match="unpaired loss such as --loss kto"):
        prepare(EXAMPLES / "kto.jsonl", tokenizer, tmp_path, eval_fraction=0.0)
    synthetic = pipeline.prepare(pipeline.DataSettings("synthetic", eval_fraction=0.5, max_pairs=8, unpaired=True),
                                 None)
    assert len(synthetic.train) == 8 and {p.extras["label"] for p in synthetic.train} == {0.0, 1.0}


def test_eval_data_file_and_sources_in_notes(tokenizer, tmp_path):
    rows = [{"prompt": f"Q{i}", "chosen": " a", "rejected": " b"} for i in range(3)]
    held_out = tmp_path / "eval.jsonl"
    held_out.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    data = prepare(EXAMPLES / "hh_rlhf.jsonl", tokenizer, tmp_path, eval_data=str(held_out))
    assert (len(data.train), len(data.eval)) == (6, 3)
    assert any("eval.jsonl: 3 pairs" in note for note in data.notes)
