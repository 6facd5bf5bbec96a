"""`dpo data inspect` and the data flags of `dpo train`, end to end through `cli.main`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dpokit.cli import main

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data"


def run(argv, capsys):
    try:
        main(argv)
        code = 0
    except SystemExit as exit:
        code = exit.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_inspect_counts_tokens_and_truncation(tiny_model_dir, tokenizer, capsys):
    code, out, err = run(["data", "inspect", str(EXAMPLES / "hh_rlhf.jsonl"), "--model", str(tiny_model_dir),
                          "--max-length", "60", "--max-prompt-length", "20"], capsys)
    assert code == 0, err
    records = [json.loads(line) for line in (EXAMPLES / "hh_rlhf.jsonl").read_text(encoding="utf-8").splitlines()]
    prompts = [r["chosen"][:r["chosen"].rindex("\n\nAssistant:") + len("\n\nAssistant:")] for r in records]
    long_prompts = sum(len(tokenizer(p)["input_ids"]) > 20 for p in prompts)
    assert "6 pairs from 6 records (implicit format)" in out
    assert f"truncated {long_prompts} of 6 prompts to --max-prompt-length" in out
    assert "Assistant:┃ The capital of France is Paris.</s>" in out
    prompt_lengths = sorted(len(tokenizer(p)["input_ids"]) for p in prompts)
    row = next(line for line in out.splitlines() if line.strip().startswith("prompt"))
    assert row.split()[1:] == [str(prompt_lengths[3]), str(prompt_lengths[5]), str(prompt_lengths[5]),
                               str(prompt_lengths[5])]  # p50 p90 p99 max, nearest rank from above


def test_inspect_without_a_model_reports_characters_duplicates_and_identical(tmp_path, capsys):
    rows = [{"prompt": "P", "chosen": " a", "rejected": " a"}, {"prompt": "P", "chosen": " yes", "rejected": " no"},
            {"prompt": "P", "chosen": " yes", "rejected": " no"}]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    code, out, _ = run(["data", "inspect", str(path)], capsys)
    assert code == 0
    assert "1 pairs have chosen identical to rejected" in out
    assert "duplicate pairs (same prompt, chosen and rejected as an earlier pair): 1" in out
    assert "lengths (characters" in out and "P┃ a" in out


def test_inspect_malformed_file_is_one_line_with_file_and_line(tmp_path, capsys):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "P", "chosen": " a", "rejected": " b"}\n{"prompt": "P", "chosen": " a"}\n',
                    encoding="utf-8")
    code, out, err = run(["data", "inspect", str(path)], capsys)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert f"{path}:2: field 'rejected' is missing" in err
    code, out, _ = run(["data", "inspect", str(path), "--skip-invalid"], capsys)
    assert code == 0 and "skipped 1 invalid records" in out


def test_train_on_hh_data_writes_the_cache_where_asked(tiny_model_dir, tmp_path, capsys):
    argv = ["train", "--model", str(tiny_model_dir), "--data", str(EXAMPLES / "hh_rlhf.jsonl"), "--max-steps", "1",
            "--batch-size", "2", "--eval-fraction", "0", "--max-length", "96", "--max-prompt-length", "64",
            "--cache-dir", str(tmp_path / "cache"), "--output", str(tmp_path / "run"), "--no-progress"]
    code, out, err = run(argv, capsys)
    assert code == 0, err
    assert "6 pairs from 6 records (implicit format)" in out + err
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1  # the second run's hit is tested in test_tokenization


def test_text_a_presets_tokenizer_cannot_encode_is_one_line(tmp_path, capsys):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "Q", "chosen": " a", "rejected": " b"}\n', encoding="utf-8")
    with pytest.raises(SystemExit) as stopped:
        main(["data", "inspect", str(path), "--model", "tiny"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "could not tokenize the data" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
