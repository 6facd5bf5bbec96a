"""Config: flags, YAML and code build the same validated object; bad values are one clear error."""

from __future__ import annotations

import pytest

from dpokit.config import Config
from dpokit.errors import DPOError


def test_flags_yaml_and_code_agree(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("beta: 0.25\nmax-steps: 7\nlr: 3e-5\nprefix_sharing: false\nloss: [sigmoid, ipo]\n")
    from_yaml = Config.from_yaml(path)
    from_flags = Config.from_args(["--beta", "0.25", "--max-steps", "7", "--lr", "3e-5", "--no-prefix-sharing",
                                   "--loss", "sigmoid,ipo"])
    in_code = Config(beta=0.25, max_steps=7, lr=3e-5, prefix_sharing=False, loss="sigmoid,ipo")
    assert from_yaml == from_flags == in_code
    assert in_code.loss_names == ["sigmoid", "ipo"]


def test_command_line_wins_over_yaml(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("beta: 0.25\nbatch_size: 4\n")
    cfg = Config.from_args(["--config", str(path), "--beta", "0.5"])
    assert (cfg.beta, cfg.batch_size) == (0.5, 4)


def test_lr_default_depends_on_task():
    assert Config().lr == 1e-4  # synthetic task trains a tiny model from scratch
    assert Config(data="pairs.jsonl").lr == 1e-6  # TRL's default for pretrained models


@pytest.mark.parametrize("changes, message", [
    ({"lr": 0.0}, "--lr must be positive"),
    ({"beta": -1.0}, "--beta must be positive"),
    ({"batch_size": 0}, "--batch-size must be positive"),
    ({"eval_fraction": 1.0}, "--eval-fraction"),
    ({"dtype": "float16"}, "--dtype must be one of"),
])
def test_invalid_values_name_the_flag(changes, message):
    with pytest.raises(DPOError, match=message):
        Config(**changes)


def test_yaml_unknown_key_and_bad_type(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("betta: 0.1\n")
    with pytest.raises(DPOError, match=r"bad.yaml: unknown setting 'betta'"):
        Config.from_yaml(path)
    path.write_text("batch_size: many\n")
    with pytest.raises(DPOError, match=r"'batch_size' must be int"):
        Config.from_yaml(path)
    path.write_text("beta: [0.1\n")
    with pytest.raises(DPOError, match=r"bad.yaml:\d+: not valid YAML"):
        Config.from_yaml(path)


def test_a_limit_that_is_on_by_default_can_be_turned_off_from_the_command_line():
    assert Config.from_args(["--max-prompt-length", "none"]).max_prompt_length is None
    assert Config.from_args(["--max-prompt-length", "64"]).max_prompt_length == 64
    with pytest.raises(SystemExit):
        Config.from_args(["--max-prompt-length", "lots"])
