"""The Python API: light `import dpokit`, one Config three ways, shell exit codes, and the README example run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import dpokit
from dpokit import Config
from dpokit.cli import main
from dpokit.errors import DPOError, TrainingFailure

REPO = Path(__file__).resolve().parents[1]


def test_import_dpokit_is_light():
    """`import dpokit` and `Config` need neither torch nor transformers; `train` loads them on first use."""
    code = ("import sys, dpokit; from dpokit import Config; "
            "assert not {'torch', 'transformers', 'matplotlib'} & set(sys.modules), sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_public_names_are_the_real_objects():
    from dpokit import Summary, load_pairs, register_loss, train
    from dpokit.data.formats import load_pairs as formats_load_pairs
    from dpokit.loop import Summary as LoopSummary, train as loop_train
    from dpokit.losses import register

    assert (train, Summary, register_loss, load_pairs) == (loop_train, LoopSummary, register, formats_load_pairs)
    assert set(dpokit.__all__) >= {"train", "Config", "register_loss", "load_pairs", "Summary"}
    with pytest.raises(AttributeError):
        dpokit.not_a_name


SETTINGS = {"model": "my/model", "data": "pairs.jsonl", "beta": 0.25, "lr": 5e-7, "max_steps": 10,
            "packing": False, "loss": "sigmoid", "report_to": "tensorboard", "max_prompt_length": 256}
FLAGS = ["--model", "my/model", "--data", "pairs.jsonl", "--beta", "0.25", "--lr", "5e-7", "--max-steps", "10",
         "--no-packing", "--loss", "sigmoid", "--report-to", "tensorboard", "--max-prompt-length", "256"]


def test_config_from_code_yaml_and_args_agree(tmp_path):
    path = tmp_path / "run.yaml"
    # YAML takes either key spelling; 5e-7 without a dot is a string in YAML 1.1 and still accepted
    path.write_text(yaml.safe_dump({k.replace("_", "-") if k.startswith("max") else k: v
                                    for k, v in SETTINGS.items()}).replace("5.0e-07", "5e-7"))
    in_code = Config(**SETTINGS)
    assert Config.from_yaml(path) == in_code
    assert Config.from_args(FLAGS) == in_code
    assert Config.from_args(["--config", str(path)]) == in_code
    assert in_code.beta == 0.25 and in_code.packing is False and in_code.max_steps == 10


def test_config_validation_is_the_same_three_ways(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("beta: -1\n")
    messages = []
    for build in (lambda: Config(beta=-1.0), lambda: Config.from_yaml(path),
                  lambda: Config.from_args(["--beta", "-1"])):
        with pytest.raises(DPOError) as err:
            build()
        messages.append(str(err.value))
    assert messages == ["--beta must be positive, got -1.0"] * 3


def exit_code(argv, capsys) -> tuple[int, str, str]:
    try:
        main(argv)
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 0 if exit_.code is None else 1
    out, err = capsys.readouterr()
    return code, out, err


def test_exit_codes(capsys, monkeypatch):
    code, out, _ = exit_code(["--version"], capsys)
    assert code == 0 and out.strip() == f"dpokit {dpokit.__version__}"
    assert exit_code([], capsys)[0] == 2                                   # no command
    assert exit_code(["train", "--no-such-flag"], capsys)[0] == 2          # argparse usage error
    assert exit_code(["train", "--max-steps", "many"], capsys)[0] == 2     # argparse type error
    code, _, err = exit_code(["train", "--beta", "-1"], capsys)            # invalid value: one line
    assert code == 2 and err == "dpo train: error: --beta must be positive, got -1.0\n"

    def fail(cfg):
        raise TrainingFailure("step 3: 5 consecutive non-finite losses")

    monkeypatch.setattr("dpokit.loop.train", fail)
    code, _, err = exit_code(["train", "--max-steps", "1"], capsys)
    assert code == 1 and err == "dpo train: error: step 3: 5 consecutive non-finite losses\n"


def test_readme_api_example_runs(tmp_path, tiny_model_dir, pairs_jsonl, monkeypatch, capsys):
    """examples/api_example.py is the README's API example: run it as a script (in this process, to reuse the
    imports; its loss registration goes into a copy of the registry that is dropped afterwards)."""
    import runpy

    from dpokit.losses import registry

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    out = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", ["api_example.py", str(tiny_model_dir), str(pairs_jsonl), str(out)])
    runpy.run_path(str(REPO / "examples" / "api_example.py"), run_name="__main__")
    stdout = capsys.readouterr().out
    assert "48 pairs from 48 records" in stdout
    assert "after 2 steps" in stdout and f"model and model card in {out / 'model'}" in stdout

    card = (out / "model" / "README.md").read_text(encoding="utf-8")
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["base_model"] == str(tiny_model_dir) and meta["library_name"] == "dpokit"
    assert "hinge_margin" in meta["tags"] and "`hinge_margin` (beta=0.1)" in card
    assert "| train pairs | 43 |" in card  # 48 pairs, 10% held out
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    assert (out / "training_curves.png").read_bytes().startswith(b"\x89PNG")
    assert "| run |" in (out / "summary.md").read_text()
    assert list((out / "tensorboard").glob("events.out.tfevents.*")), "report_to='tensorboard' wrote no events"
