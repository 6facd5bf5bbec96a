"""What a new user hits first (issue 23), each through the real `dpo` command: a mistyped model, a mistyped flag,
a bad value on any command, malformed lines, data in the wrong format for the loss, a reused output folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from conftest import run_cli
from dpokit.errors import DPOError

DPO = Path(sys.executable).parent / "dpo"


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ---- a mistyped model ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["./nosuchdir", "runs/dpo/modle", "no such model"])
def test_a_path_that_cannot_be_a_hub_name_is_no_such_folder_at_once(tmp_path, pairs_jsonl, capsys, model):
    started = time.perf_counter()
    code, _, err = run_cli(["train", "--model", model, "--data", str(pairs_jsonl), "--output", str(tmp_path)],
                           capsys)
    assert code == 2 and time.perf_counter() - started < 5
    assert f"{model}: no such folder" in one_error_line(err)


def test_a_hub_name_under_hf_hub_offline_is_not_looked_up(tmp_path, pairs_jsonl, capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    code, _, err = run_cli(["train", "--model", "nosuchdir", "--data", str(pairs_jsonl), "--output", str(tmp_path)],
                           capsys)
    line = one_error_line(err)
    assert code == 2 and "nosuchdir: no such folder" in line and "HF_HUB_OFFLINE" in line


def test_a_hub_name_with_the_hub_unreachable_fails_after_one_attempt(tmp_path, pairs_jsonl):
    """huggingface_hub alone retries a refused connection for ~50 s; one attempt takes well under a second."""
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9",
           "HF_HOME": str(tmp_path / "hf")}
    started = time.perf_counter()
    result = subprocess.run([str(DPO), "train", "--model", "nosuchdir", "--data", str(pairs_jsonl), "--output",
                             str(tmp_path / "o")], capture_output=True, text=True, env=env, timeout=45)
    elapsed = time.perf_counter() - started
    assert result.returncode == 2, result.stderr
    line = one_error_line(result.stderr)
    assert "cannot be reached" in line and "point --model at a local folder" in line
    assert elapsed < 30


# ---- a mistyped flag, a bad value ---------------------------------------------------------------------------


@pytest.mark.parametrize("args, usage, nearest", [
    (["train", "--beat", "0.2"], "usage: dpo train", "did you mean --beta?"),
    (["eval", "--model", "m", "--ref-model", "r", "--max-lenght=9"], "usage: dpo eval", "did you mean --max-length?"),
    (["data", "inspect", "f.jsonl", "--exampels", "3"], "usage: dpo data inspect", "did you mean --examples?"),
])
def test_a_flag_typo_shows_the_subcommand_usage_and_the_nearest_flag(capsys, args, usage, nearest):
    code, _, err = run_cli(args, capsys)
    assert code == 2
    assert err.startswith(usage) and "usage: dpo [-h]" not in err
    assert err.strip().splitlines()[-1].endswith(f"({nearest})")


TRAIN = ["train", "--model", "{model}", "--data", "{data}", "--output", "{tmp}"]
EVAL = ["eval", "--model", "{model}", "--ref-model", "{model}", "--data", "{data}"]
INSPECT = ["data", "inspect", "{data}"]


@pytest.mark.parametrize("command, flag, value, message", [
    (command, flag, value, message)
    for flag, value, message in [("--beta", "-1", "--beta must be positive, got -1.0"),
                                 ("--max-length", "0", "--max-length must be positive, got 0")]
    for command in ([TRAIN, EVAL, INSPECT] if flag != "--beta" else [TRAIN, EVAL])  # inspect has no --beta
])
def test_every_command_refuses_a_bad_shared_setting_alike(tmp_path, tiny_model_dir, pairs_jsonl, capsys, command,
                                                          flag, value, message):
    args = [a.format(model=tiny_model_dir, data=pairs_jsonl, tmp=tmp_path) for a in command]
    code, _, err = run_cli(args + [flag, value], capsys)
    assert code == 2 and one_error_line(err).endswith(message)


# ---- malformed lines ----------------------------------------------------------------------------------------


def _pairs_with_broken_lines(tmp_path: Path) -> tuple[Path, str]:
    good = [json.dumps({"prompt": f"Human: {i}?\n\nAssistant:", "chosen": " yes", "rejected": " no"})
            for i in range(12)]
    broken = '{"prompt": "Human: 1?", "chosen": " yes" "rejected": " no"}'  # no comma before "rejected"
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(good[:3] + [broken] + good[3:] + ["[1, 2]"]) + "\n", encoding="utf-8")
    return path, broken


def test_a_malformed_line_names_its_column_and_what_to_do(tmp_path, tiny_model_dir, capsys):
    data, broken = _pairs_with_broken_lines(tmp_path)
    code, _, err = run_cli(["train", "--model", str(tiny_model_dir), "--data", str(data), "--output",
                            str(tmp_path / "o")], capsys)
    line = one_error_line(err)
    column = broken.index('"rejected"') + 1
    assert code == 2 and f"pairs.jsonl:4: malformed JSON (Expecting ',' delimiter at column {column})" in line
    assert "--skip-invalid" in line


def test_skip_invalid_skips_malformed_lines_and_counts_them(tmp_path, tiny_model_dir, capsys):
    data, _ = _pairs_with_broken_lines(tmp_path)
    code, out, _ = run_cli(["data", "inspect", str(data), "--skip-invalid"], capsys)
    assert code == 0
    assert "12 pairs from 14 records" in out and "skipped 2 invalid records" in out


# ---- data in the wrong format for the loss ------------------------------------------------------------------


@pytest.fixture
def sft_jsonl(tmp_path) -> Path:
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Human: {i}?\n\nAssistant:", "completion": f" {i}."}) + "\n"
                            for i in range(16)), encoding="utf-8")
    return path


def test_sft_data_is_refused_for_a_preference_loss_and_taken_for_sft(sft_jsonl, tokenizer):
    from dpokit.data.preparation import DataSettings, prepare

    settings = DataSettings(str(sft_jsonl), eval_fraction=0.25)
    with pytest.raises(DPOError, match=r"sft.jsonl holds SFT .*`dpo sft` \(or --loss sft\)"):
        prepare(replace(settings, sft=False), tokenizer, cache=False)
    assert len(prepare(replace(settings, sft=True), tokenizer, cache=False).train) == 12


def test_dpo_train_on_sft_data_is_refused_naming_dpo_sft(tmp_path, tiny_model_dir, sft_jsonl, capsys):
    code, _, err = run_cli(["train", "--model", str(tiny_model_dir), "--data", str(sft_jsonl), "--output",
                            str(tmp_path / "o"), "--max-steps", "1", "--no-progress"], capsys)
    assert code == 2 and "`dpo sft` (or --loss sft)" in one_error_line(err)


# ---- a reused output folder ---------------------------------------------------------------------------------


def test_a_fresh_run_into_another_runs_folder_stops(tmp_path, tiny_model_dir, pairs_jsonl, capsys):
    (tmp_path / "checkpoints" / "step-285").mkdir(parents=True)
    code, _, err = run_cli(["train", "--model", str(tiny_model_dir), "--data", str(pairs_jsonl), "--output",
                            str(tmp_path), "--max-steps", "1", "--batch-size", "4", "--no-progress"], capsys)
    line = one_error_line(err)
    assert code == 2 and "holds another run (checkpoints up to step-285)" in line and "--overwrite-output" in line


# ---- help ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [["train"], ["sft"], ["eval"], ["generate"], ["data", "inspect"]])
def test_each_flag_states_its_default_once(capsys, command):
    import re

    code, out, _ = run_cli(command + ["--help"], capsys)
    options = re.split(r"\n  (?=-)", out)  # one entry per flag, its help wrapped over the lines below it
    assert code == 0 and len(options) > 5
    twice = [" ".join(entry.split()) for entry in options if entry.count("(default:") > 1]
    assert twice == []


# ---- a missing extra (issue 20, item 8) ---------------------------------------------------------------------


@pytest.fixture
def parquet_file(tmp_path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "p", "chosen": " a", "rejected": " b"}] * 4), path)
    return path


@pytest.mark.parametrize("hidden, args, extra", [
    ("peft", ["train", "--model", "{model}", "--data", "{data}", "--lora-r", "4"], "lora"),
    ("torch.utils.tensorboard", ["train", "--model", "{model}", "--data", "{data}", "--report-to", "tensorboard"],
     "tensorboard"),
    ("wandb", ["train", "--model", "{model}", "--data", "{data}", "--report-to", "wandb"], "wandb"),
    ("pyarrow.parquet", ["data", "inspect", "{parquet}"], "parquet"),
    ("datasets", ["data", "inspect", "someone/some-dataset"], "datasets"),
])
def test_a_missing_extra_is_one_line_naming_it(tmp_path, tiny_model_dir, pairs_jsonl, parquet_file, capsys,
                                               monkeypatch, hidden, args, extra):
    args = [a.format(model=tiny_model_dir, data=pairs_jsonl, parquet=parquet_file) for a in args]
    if args[0] == "train":
        args += ["--output", str(tmp_path / "o"), "--max-steps", "1", "--batch-size", "4", "--no-progress"]
    monkeypatch.setitem(sys.modules, hidden, None)  # `import hidden` now raises ImportError, as if not installed
    code, _, err = run_cli(args, capsys)
    assert code == 2 and one_error_line(err).endswith(f"pip install 'dpokit[{extra}]'")


def test_every_extra_named_in_a_message_exists():
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text(encoding="utf-8")
    extras = pyproject.split("[project.optional-dependencies]")[1].split("\n[")[0]
    assert all(f"\n{extra} = [" in extras for extra in ("lora", "tensorboard", "wandb", "parquet", "datasets"))
