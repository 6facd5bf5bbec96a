"""The built-in task's tokenizer: the task's own ids as text, saved with a model, loaded by `AutoTokenizer`, and
used by `dpo generate`; `dpo data inspect --model` takes a tokenizer-only folder."""

from __future__ import annotations

import json

import pytest

from dpokit import models
from dpokit.cli import main
from dpokit.data import synthetic
from dpokit.errors import DPOError

from conftest import build_tiny_llama


def test_ids_are_the_synthetic_tasks_and_round_trip_through_text():
    tokenizer = models.preset_tokenizer("tiny")
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (
        synthetic.BOS, synthetic.EOS, synthetic.EOS)
    assert len(tokenizer) == synthetic.VOCAB == models.PRESETS["tiny"]["vocab_size"]
    for pair in synthetic.make_pairs(50, seed=3):
        prompt = " ".join(str(k) for k in pair.prompt_ids[1:])  # written by hand: a symbol's text is its id
        assert tokenizer(prompt)["input_ids"] == pair.prompt_ids
        full = tokenizer(prompt + " " + tokenizer.decode(pair.chosen_ids))["input_ids"]
        assert full == pair.prompt_ids + pair.chosen_ids
    assert tokenizer.decode([0, 29, 30, 31, 2, 1]) == "<s> 29 30 31 2 </s>"


def test_saved_with_a_model_it_loads_with_auto_tokenizer_and_generates(tmp_path, one_thread):
    from transformers import AutoTokenizer

    model_dir = tmp_path / "model"
    build_tiny_llama(model_dir, vocab_size=synthetic.VOCAB, tokenizer=models.preset_tokenizer("tiny"))
    loaded = AutoTokenizer.from_pretrained(model_dir)
    assert loaded("7 8 9")["input_ids"] == [0, 7, 8, 9] and loaded.pad_token_id == synthetic.EOS
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "7 8 9"}) + "\n" + json.dumps({"prompt": "30 31"}) + "\n")
    out = tmp_path / "samples.jsonl"
    main(["generate", "--model", str(model_dir), "--prompts", str(prompts), "--out", str(out),
          "--max-new-tokens", "5", "--device", "cpu"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["7 8 9", "30 31"]
    for row in rows:  # every sampled word is a symbol of the task (or EOS, dropped from the text)
        assert all(word in {str(k) for k in range(2, 32)} for word in row["completion"].split())
        assert 1 <= row["completion_tokens"] <= 5


def test_a_word_outside_the_vocabulary_is_one_line(tmp_path):
    from dpokit.generate import encode_prompts

    with pytest.raises(DPOError, match="could not tokenize"):
        encode_prompts(models.preset_tokenizer("tiny"), ["7 hello"])


def test_inspect_accepts_a_tokenizer_only_folder_and_a_preset(tokenizer, tmp_path, capsys):
    tokenizer.save_pretrained(tmp_path / "tok")
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "Human: hi", "chosen": " yes", "rejected": " no"}) + "\n")
    main(["data", "inspect", str(data), "--model", str(tmp_path / "tok")])
    assert "lengths (tokens)" in capsys.readouterr().out
    data.write_text(json.dumps({"prompt": "7 8", "chosen": " 9 10", "rejected": " 4 4"}) + "\n")
    main(["data", "inspect", str(data), "--model", "tiny"])
    assert "<s> 7 8┃9 10 </s>" in capsys.readouterr().out  # tokens 0 7 8 | 9 10 1, decoded
    with pytest.raises(SystemExit):
        main(["data", "inspect", str(data), "--model", str(tmp_path / "nothing-here")])
    assert "no such folder" in capsys.readouterr().err
