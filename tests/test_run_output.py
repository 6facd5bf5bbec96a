"""What a user reads after a run, through the real commands: logs redirected to a file (no carriage returns, the
last step, no foreign warnings, Ctrl-C as a stop rather than an error), each kind of data and loss in its own
terms (KTO examples and counts, SFT records, NLL and no rewards), readable plots and honest model cards."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import matplotlib.figure
import pytest

import dpokit
from dpokit import losses
from dpokit.cli import main
from dpokit.config import Config

from conftest import build_tiny_llama

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data"
REWARD_KEYS = {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/rejected"}


@pytest.fixture(scope="module")
def synthetic_model(tmp_path_factory, tokenizer):
    """A hidden-32 Llama over the synthetic task's 32-token vocabulary: milliseconds per step."""
    path = tmp_path_factory.mktemp("synthetic-llama")
    build_tiny_llama(path, vocab_size=32, tokenizer=tokenizer)
    return path


def dpo(*argv: str, cache: Path, timeout: float = 240) -> tuple[int, str]:
    """`dpo ARGV` as a user runs it with its output redirected to a file: (exit status, the whole log)."""
    log = cache / f"log-{len(list(cache.glob('log-*')))}.txt"
    with log.open("wb") as handle:
        done = subprocess.run([sys.executable, "-m", "dpokit", *argv], stdout=handle, stderr=subprocess.STDOUT,
                              env={**os.environ, "DPOKIT_CACHE_DIR": str(cache)}, timeout=timeout)
    return done.returncode, log.read_bytes().decode()


def rows(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines() if line.strip()]


def cli(argv: list[str], capsys) -> tuple[int, str]:
    try:
        main(argv)
        code = 0
    except SystemExit as stop:
        code = stop.code
    captured = capsys.readouterr()
    return code, captured.out + captured.err


# ---- logs -------------------------------------------------------------------------------------------------------


def test_a_redirected_log_has_plain_lines_the_last_step_and_says_when_the_reference_cache_is_reused(
        synthetic_model, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    argv = ["train", "--model", str(synthetic_model), "--precompute-ref", "--lora-r", "4", "--max-pairs", "40",
            "--batch-size", "4", "--max-steps", "7", "--eval-fraction", "0", "--report-to", "none"]
    code, log = dpo(*argv, "--output", str(tmp_path / "first"), cache=cache)
    assert code == 0, log
    assert "\r" not in log
    steps = [line.split(":")[0] for line in log.splitlines() if line.startswith("step ")]
    assert steps == ["step 1", "step 7"]          # the first, every 50th (none here) and the last
    assert "Warning" not in log                   # transformers' FutureWarning on LoRA runs included
    assert "reference log-probs: cached in" in log
    code, log = dpo(*argv, "--output", str(tmp_path / "second"), cache=cache)
    assert code == 0, log
    reused = [line for line in log.splitlines() if line.startswith("reference log-probs: reused")]
    assert len(reused) == 1 and str(cache / "reference") in reused[0]


def test_ctrl_c_exits_130_as_a_stop_not_an_error(synthetic_model, tmp_path):
    process = subprocess.Popen(
        [sys.executable, "-m", "dpokit", "train", "--model", str(synthetic_model), "--max-pairs", "40",
         "--batch-size", "4", "--max-steps", "100000", "--eval-fraction", "0", "--report-to", "none",
         "--no-cache", "--output", str(tmp_path / "run")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None and process.stderr is not None
        err_lines = []
        for line in process.stderr:  # the first step's line: training has begun
            err_lines.append(line)
            if line.startswith("step 1:"):
                break
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=120)
    finally:
        process.kill()
    err = "".join(err_lines) + err
    assert process.returncode == 130, err
    stop = [line for line in err.splitlines() if "stopped by SIGINT" in line]
    assert stop == [stop[0]] and stop[0].startswith("dpo train: stopped by SIGINT") and "error" not in stop[0]


# ---- each kind of data in its own terms -------------------------------------------------------------------------


def test_inspect_describes_unpaired_examples_by_label_and_sft_records_without_a_rejected_side(capsys):
    records = [json.loads(line) for line in (EXAMPLES / "kto.jsonl").read_text().splitlines()]
    code, out = cli(["data", "inspect", str(EXAMPLES / "kto.jsonl"), "--examples", "5"], capsys)
    assert code == 0, out
    desirable = sum(r["label"] for r in records)
    assert f"{desirable} desirable, {len(records) - desirable} undesirable examples" in out
    assert " pairs" not in out and "rejected" not in out
    texts = [line.strip() for line in out.splitlines() if "┃" in line and not line.startswith("example")]
    by_completion = {r["completion"]: "desirable" if r["label"] else "undesirable" for r in records}
    assert len(texts) == len(records)
    for text in texts:  # each example shown with its own completion's label
        assert text.split(":", 1)[0] == by_completion[text.split("┃", 1)[1]]

    code, out = cli(["data", "inspect", str(EXAMPLES / "sft.jsonl")], capsys)
    assert code == 0, out
    assert "SFT records" in out and "rejected:" not in out and " pairs" not in out
    assert sum(line.strip().startswith("completion:") for line in out.splitlines()) == 2


def test_an_sft_run_reports_nll_and_no_rewards_in_log_metrics_card_and_names_the_data_cache(
        tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DPOKIT_CACHE_DIR", str(tmp_path / "cache"))
    output = tmp_path / "sft"
    code, out = cli(["sft", "--model", str(tiny_model_dir), "--data", str(EXAMPLES / "sft.jsonl"), "--batch-size",
                     "2", "--max-steps", "2", "--eval-fraction", "0.25", "--output", str(output), "--report-to",
                     "none", "--no-progress"], capsys)
    assert code == 0, out
    train = [r for r in rows(output) if "loss" in r]
    evals = [r for r in rows(output) if "eval/loss" in r]
    assert train and evals
    for row in train:
        assert not REWARD_KEYS & set(row) and row["nll_loss"] == pytest.approx(row["loss"])
    assert not {f"eval/{k}" for k in REWARD_KEYS} & set(evals[-1])
    step_one = next(line for line in out.splitlines() if line.startswith("step 1:"))
    assert "margin" not in step_one and step_one.count("acc") == step_one.count("token acc") == 1   # no reward acc
    card = (output / "model" / "README.md").read_text()
    assert "SFT records" in card and "rewards/" not in card and "| loss (NLL per token) |" in card
    assert f"cached the tokenized data in {tmp_path / 'cache'}" in out


def test_a_kto_run_logs_desirable_and_undesirable_counts_and_rewards(tiny_model_dir, tmp_path, capsys):
    records = [json.loads(line) for line in (EXAMPLES / "kto.jsonl").read_text().splitlines()]
    output = tmp_path / "kto"
    code, out = cli(["train", "--loss", "kto", "--model", str(tiny_model_dir), "--data", str(EXAMPLES / "kto.jsonl"),
                     "--batch-size", str(len(records)), "--max-steps", "1", "--eval-fraction", "0", "--output",
                     str(output), "--report-to", "none", "--no-progress", "--no-cache"], capsys)
    assert code == 0, out
    (row,) = [r for r in rows(output) if "loss" in r]
    desirable = sum(r["label"] for r in records)     # one step over every example
    assert (row["count/desirable"], row["count/undesirable"]) == (desirable, len(records) - desirable)
    assert {"rewards/desirable", "rewards/undesirable", "kl"} <= set(row)
    assert "desirable / undesirable examples" in (output / "model" / "README.md").read_text()


# ---- plots ------------------------------------------------------------------------------------------------------


@pytest.fixture
def figures(monkeypatch):
    """The figures that `dpo report` saves, as matplotlib drew them."""
    saved = []
    original = matplotlib.figure.Figure.savefig

    def keep(fig, *args, **kwargs):
        saved.append(fig)
        return original(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep)
    return saved


def test_report_draws_short_runs_with_points_whole_steps_a_loss_panel_per_loss_and_no_rewards_for_sft(
        synthetic_model, tiny_model_dir, tmp_path, capsys, figures):
    runs = {"dpo": ["--loss", "sigmoid", "--max-steps", "1"], "ipo": ["--loss", "ipo", "--max-steps", "3"]}
    for name, extra in runs.items():
        code, out = cli(["train", "--model", str(synthetic_model), "--max-pairs", "40", "--batch-size", "4",
                         "--eval-fraction", "0", "--output", str(tmp_path / name), "--report-to", "none",
                         "--no-progress", *extra], capsys)
        assert code == 0, out
    code, out = cli(["sft", "--model", str(tiny_model_dir), "--data", str(EXAMPLES / "sft.jsonl"), "--batch-size",
                     "2", "--max-steps", "2", "--eval-fraction", "0", "--output", str(tmp_path / "sft"),
                     "--report-to", "none", "--no-progress", "--no-cache"], capsys)
    assert code == 0, out
    figures.clear()
    code, out = cli(["report", str(tmp_path / "dpo"), str(tmp_path / "ipo"), "--out", str(tmp_path / "cmp.png")],
                    capsys)
    assert code == 0, out
    axes = [ax for ax in figures[-1].axes if ax.get_visible()]
    titles = [ax.get_title() for ax in axes]
    assert "loss (sigmoid)" in titles and "loss (ipo)" in titles and "loss" not in titles
    dpo_loss = axes[titles.index("loss (sigmoid)")]
    assert [line.get_label() for line in dpo_loss.lines] == ["dpo train"]
    assert dpo_loss.lines[0].get_marker() == "o"           # one step: one visible point
    for ax in axes:
        assert all(float(tick).is_integer() for tick in ax.get_xticks())

    figures.clear()
    code, out = cli(["report", str(tmp_path / "sft"), "--out", str(tmp_path / "sft.png")], capsys)
    assert code == 0, out
    titles = [ax.get_title() for ax in figures[-1].axes if ax.get_visible()]
    assert "loss" in titles and not [t for t in titles if t.startswith("rewards/") or t == "logps/rejected"]


# ---- smaller --------------------------------------------------------------------------------------------------


def test_a_resumed_run_adds_up_elapsed_time(synthetic_model, tmp_path, capsys):
    argv = ["train", "--model", str(synthetic_model), "--max-pairs", "40", "--batch-size", "4", "--eval-fraction",
            "0", "--save-every", "2", "--output", str(tmp_path / "run"), "--report-to", "none", "--no-progress"]
    assert cli([*argv, "--max-steps", "2"], capsys)[0] == 0
    first = [r["elapsed_s"] for r in rows(tmp_path / "run")]
    assert cli([*argv, "--max-steps", "4", "--resume"], capsys)[0] == 0
    elapsed = [r["elapsed_s"] for r in rows(tmp_path / "run") if "loss" in r]
    assert len(elapsed) == 4 and elapsed[2] > max(first) and elapsed == sorted(elapsed)


def test_the_card_of_a_loss_registered_from_python_says_so_instead_of_a_command_the_cli_refuses(
        synthetic_model, tmp_path, monkeypatch):
    monkeypatch.setattr(losses.registry, "_REGISTRY", dict(losses.registry._REGISTRY))

    @losses.register("my_margin", needs_reference=False)
    def my_margin(policy, reference, extras, *, beta: float) -> losses.LossOutput:
        chosen, rejected = policy.chosen / policy.chosen_lengths, policy.rejected / policy.rejected_lengths
        return losses.LossOutput(-(beta * (chosen - rejected)).sigmoid().log(), chosen.detach(), rejected.detach())

    dpokit.train(Config(model=str(synthetic_model), loss="my_margin", max_pairs=16, batch_size=4, max_steps=1,
                        eval_fraction=0, output=str(tmp_path / "run"), progress=False, report_to="none"))
    card = (tmp_path / "run" / "model" / "README.md").read_text()
    assert "`my_margin` was registered from Python code" in card
