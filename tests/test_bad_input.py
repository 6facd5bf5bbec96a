"""More bad input, each one clear line and a non-zero exit, never a traceback: JSON nested thousands deep (in
JSONL and JSON files), and a model folder whose weights file was cut short."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import build_tiny_llama
from dpokit.cli import main


def one_error_line(argv, capsys) -> str:
    capsys.readouterr()  # what the set-up printed (saving the test model)
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def test_json_nested_too_deeply_is_one_line_and_skippable(tmp_path, capsys):
    nested = "[" * 5000 + "]" * 5000
    good = json.dumps({"prompt": "Q", "chosen": " a", "rejected": " b"})
    lines = tmp_path / "nested.jsonl"
    lines.write_text(good + "\n" + '{"prompt": "a", "chosen": "b", "rejected": "c", "x": ' + nested + "}\n")
    assert "nested.jsonl:2: JSON nested too deeply to read" in one_error_line(["data", "inspect", str(lines)], capsys)
    main(["data", "inspect", str(lines), "--skip-invalid"])
    out = capsys.readouterr().out
    assert "1 pairs from 2 records" in out and "skipped 1 invalid records" in out
    whole = tmp_path / "nested.json"
    whole.write_text(nested)
    assert "nested.json: JSON nested too deeply to read" in one_error_line(["data", "inspect", str(whole)], capsys)


def test_a_truncated_weights_file_is_one_line(tmp_path, tokenizer, pairs_jsonl, capsys):
    model = tmp_path / "model"
    build_tiny_llama(model, vocab_size=len(tokenizer), tokenizer=tokenizer)
    weights = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    err = one_error_line(["train", "--model", str(model), "--data", str(pairs_jsonl), "--max-steps", "1",
                          "--output", str(tmp_path / "run"), "--no-progress"], capsys)
    assert "a weights file is damaged or truncated" in err and "download the model again" in err
    shutil.rmtree(model)
