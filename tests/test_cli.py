"""`dpo` end to end: the synthetic task, a saved model with a JSONL file, and every bad input as one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import run_cli

REPO = Path(__file__).resolve().parents[1]
TRL_METRICS = ("step", "epoch", "loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
               "rewards/margins", "logps/chosen", "logps/rejected", "lr", "grad_norm", "pairs_per_s", "tokens_per_s")


def test_synthetic_task_learns_the_rule(tmp_path):
    """The default job (fewer steps): held-out reward accuracy >= 0.9, outputs in place."""
    from dpokit.loop import train
    from dpokit.config import Config

    summary = train(Config(output=str(tmp_path), max_steps=40, progress=False))
    assert summary.eval_before["rewards/accuracies"] < 0.5
    assert summary.eval_after["rewards/accuracies"] >= 0.9
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert set(TRL_METRICS) <= set(train_rows[-1])
    assert any("eval/rewards/accuracies" in r for r in rows)
    assert train_rows[-1]["rewards/margins"] > train_rows[0]["rewards/margins"]
    assert (tmp_path / "training_curves.png").stat().st_size > 1000
    assert "max_steps: 40" in (tmp_path / "config.yaml").read_text()
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert reloaded.config.vocab_size == 32 and reloaded.config.hidden_size == 512


def test_seed_preset_is_the_tutorial_config():
    from transformers import LlamaConfig

    from dpokit.models import PRESETS

    tutorial = LlamaConfig(vocab_size=32, hidden_size=512, num_attention_heads=4, num_key_value_heads=4)
    ours = LlamaConfig(**PRESETS["seed"])
    assert ours.to_dict() == tutorial.to_dict()


def test_saved_model_and_jsonl(tmp_path, tiny_model_dir, pairs_jsonl, capsys):
    out = tmp_path / "run"
    code, stdout, _ = run_cli(["train", "--model", str(tiny_model_dir), "--data", str(pairs_jsonl), "--output",
                               str(out), "--max-steps", "3", "--batch-size", "4", "--lr", "1e-3",
                               "--no-progress"], capsys)
    assert code == 0
    assert "held-out reward accuracy after training" in stdout
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out / "model")
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    moved = [not torch.equal(a, b) for a, b in zip(model.parameters(), original.parameters())]
    assert all(moved)
    assert AutoTokenizer.from_pretrained(out / "model").eos_token == "</s>"
    assert any(p.suffix == ".safetensors" for p in (out / "model").iterdir())


def test_console_script_and_root_script_help():
    dpo = Path(sys.executable).parent / "dpo"
    result = subprocess.run([str(dpo), "train", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--label-smoothing" in result.stdout and "--max-prompt-length" in result.stdout
    result = subprocess.run([sys.executable, "dpo.py", "--help"], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and "--beta" in result.stdout


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


GOOD = '{"prompt": "Human: hi\\n\\nAssistant:", "chosen": " hello", "rejected": " go away"}\n'


@pytest.mark.parametrize("content, message", [
    (GOOD + '{"prompt": "x", "chosen": "y"\n', r"bad.jsonl:2: malformed JSON"),
    (GOOD + '{"prompt": "x", "chosen": "y"}\n', r"bad.jsonl:2: .*'rejected' is missing"),
    (GOOD + '{"prompt": "x", "chosen": "", "rejected": "z"}\n', r"bad.jsonl:2: .*'chosen' is empty"),
    (GOOD + '{"prompt": "x", "chosen": 3, "rejected": "z"}\n', r"bad.jsonl:2: .*'chosen' must be a string"),
])
def test_bad_records_are_one_line(tmp_path, tiny_model_dir, capsys, content, message):
    data = _write(tmp_path / "bad.jsonl", content)
    code, _, err = run_cli(["train", "--model", str(tiny_model_dir), "--data", str(data),
                            "--output", str(tmp_path / "o")], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err
    import re

    assert re.search(message, lines[0]), lines[0]


@pytest.mark.parametrize("args, message", [
    (["--data", "missing.jsonl"], "missing.jsonl: file not found"),
    (["--model", "{tmp}"], "no model here"),
    (["--lr", "0"], "--lr must be positive"),
    (["--beta", "-0.1"], "--beta must be positive"),
    (["--batch-size", "0"], "--batch-size must be positive"),
    (["--loss", "nope"], "unknown loss 'nope'"),
])
def test_bad_arguments_are_one_line(tmp_path, tiny_model_dir, pairs_jsonl, capsys, args, message):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    base = ["train", "--output", str(tmp_path / "o"), "--max-steps", "1"]
    if "--model" not in args:
        base += ["--model", str(tiny_model_dir)]
    if "--data" not in args:
        base += ["--data", str(pairs_jsonl)]
    code, _, err = run_cli(base + args, capsys)
    assert code == 2, err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_prompt_without_room_is_dropped_and_counted(tmp_path, tiny_model_dir, capsys):
    long_prompt = "Human: " + "word " * 60 + "\n\nAssistant:"
    rows = [{"prompt": long_prompt if i % 4 == 0 else f"Human: {i}?\n\nAssistant:", "chosen": " yes indeed",
             "rejected": " no"} for i in range(24)]
    data = _write(tmp_path / "d.jsonl", "\n".join(json.dumps(r) for r in rows))
    code, _, err = run_cli(["train", "--model", str(tiny_model_dir), "--data", str(data), "--output",
                            str(tmp_path / "o"), "--max-steps", "1", "--batch-size", "2", "--max-length", "40",
                            "--max-prompt-length", "60", "--no-progress"], capsys)
    assert code == 0, err
    assert "dropped 4 pairs" in err or "dropped 5 pairs" in err or "dropped 6 pairs" in err, err
