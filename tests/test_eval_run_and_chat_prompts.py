"""`dpo generate` / `dpo eval --prompts` with message-list prompts, and `dpo eval --run OUTPUT` reading the
run's config.yaml, each against an independent computation (the template rendered by hand, the held-out split
written out and evaluated with explicit flags)."""

from __future__ import annotations

import json

import pytest
import yaml

from dpokit import generate
from dpokit.cli import main
from dpokit.config import Config
from dpokit.data import formats

from conftest import build_tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"}]


def test_message_prompts_are_rendered_with_the_generation_prompt_and_stop_at_the_end_of_turn(tiny_model, tokenizer):
    by_hand = "<s><|system|>\nBe brief.<|end|>\n<|user|>\nWhat is the capital of France?<|end|>\n<|assistant|>\n"
    ids = generate.encode_prompts(tokenizer, [CHAT, "Human: hi"])
    assert ids == [tokenizer(by_hand, add_special_tokens=False)["input_ids"], tokenizer("Human: hi")["input_ids"]]
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    assert generate.stop_ids(tokenizer, [CHAT]) == [tokenizer.eos_token_id, end]
    assert generate.stop_ids(tokenizer, ["Human: hi"]) == [tokenizer.eos_token_id]
    samples = generate.sample(tiny_model, ids[:1] * 6, eos_id=[end], pad_id=tokenizer.pad_token_id,
                              max_new_tokens=40, num_samples=1)
    for s in samples:  # a completion stops at its first end of turn, or runs to the token limit without one
        assert end not in s.completion_ids[:-1] and (s.completion_ids[-1] == end or len(s.completion_ids) == 40)


def test_cli_generate_and_eval_take_message_list_prompts(tiny_model_dir, tmp_path):
    prompts = tmp_path / "chat.jsonl"
    prompts.write_text(json.dumps({"prompt": CHAT}) + "\n" + json.dumps({"prompt": "Human: hi"}) + "\n")
    main(["generate", "--model", str(tiny_model_dir), "--prompts", str(prompts), "--out", str(tmp_path / "s.jsonl"),
          "--max-new-tokens", "4"])
    rows = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [CHAT, "Human: hi"]
    (tmp_path / "r.py").write_text("def f(prompts, completions):\n    return [len(str(p)) for p in prompts]\n")
    main(["eval", "--model", str(tiny_model_dir), "--ref-model", str(tiny_model_dir), "--prompts", str(prompts),
          "--reward", f"{tmp_path / 'r.py'}:f", "--max-new-tokens", "4", "--out", str(tmp_path / "m.json")])
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["samples/reward"] == (len(str(CHAT)) + len("Human: hi")) / 2 and metrics["samples/kl"] == 0.0


def test_a_prompt_that_is_neither_text_nor_messages_is_one_line(tiny_model_dir, tmp_path, capsys):
    prompts = tmp_path / "bad.jsonl"
    prompts.write_text(json.dumps({"prompt": [{"role": "user"}]}) + "\n")
    with pytest.raises(SystemExit):
        main(["generate", "--model", str(tiny_model_dir), "--prompts", str(prompts), "--out", str(tmp_path / "o")])
    assert "bad.jsonl:1: field 'prompt' must be a string or a non-empty list of" in capsys.readouterr().err


def test_eval_run_reads_the_runs_config_for_reference_settings_and_held_out_pairs(tiny_model_dir, tokenizer,
                                                                                 pairs_jsonl, tmp_path, capsys):
    run = tmp_path / "run"
    build_tiny_llama(run / "model", vocab_size=len(tokenizer), seed=1, tokenizer=tokenizer)  # the "trained" policy
    cfg = Config(model=str(tiny_model_dir), data=str(pairs_jsonl), eval_fraction=0.25, seed=3, beta=0.3,
                 max_length=64, max_prompt_length=32, cache=False)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")
    main(["eval", "--run", str(run), "--out", str(tmp_path / "run.json")])

    # The same evaluation spelled out: the held-out split written to a file, every setting as a flag.
    loaded, _ = formats.load_pairs(str(pairs_jsonl))
    _, held_out = formats.split_pairs(loaded, 0.25, 3)
    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}) + "\n"
                            for p in held_out))
    main(["eval", "--model", str(run / "model"), "--ref-model", str(tiny_model_dir), "--data", str(held),
          "--beta", "0.3", "--max-length", "64", "--max-prompt-length", "32", "--out", str(tmp_path / "flags.json")])
    from_run = json.loads((tmp_path / "run.json").read_text())
    assert from_run == json.loads((tmp_path / "flags.json").read_text())
    assert from_run["eval/pairs"] == len(held_out) == 12 and from_run["eval/rewards/margins"] != 0

    main(["eval", "--run", str(run), "--beta", "0.6", "--out", str(tmp_path / "beta.json")])  # a flag wins
    doubled = json.loads((tmp_path / "beta.json").read_text())["eval/rewards/margins"]
    assert doubled == pytest.approx(2 * from_run["eval/rewards/margins"])

    capsys.readouterr()
    for argv, message in ((["eval", "--run", str(tmp_path)], "no config.yaml here"),
                          (["eval", "--data", str(held)], "give --run OUTPUT")):
        with pytest.raises(SystemExit):
            main(argv)
        assert message in capsys.readouterr().err
