"""run_folder: a fresh run never lands on another run's files; --resume continues only the same run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dpokit.config import Config
from dpokit.errors import DPOError
from dpokit.run_folder import RESUME_MAY_CHANGE, check_fresh_output, resume_differences

REPO = Path(__file__).resolve().parents[1]


def old_run(folder: Path, *, steps: tuple[int, ...] = (285,), model: bool = True) -> Path:
    """What a finished 300-step run with --save-every leaves behind (contents do not matter here)."""
    for step in steps:
        (folder / "checkpoints" / f"step-{step}").mkdir(parents=True)
        (folder / "checkpoints" / f"step-{step}" / "complete.json").write_text("{}")
    if model:
        (folder / "model").mkdir(parents=True)
        (folder / "model" / "config.json").write_text("{}")
    (folder / "metrics.jsonl").write_text('{"step": 1, "loss": 0.69}\n')
    (folder / "notes.txt").write_text("the user's own file")
    return folder


# ---- fresh runs ---------------------------------------------------------------------------------------------


def test_an_empty_or_missing_folder_is_fine(tmp_path):
    check_fresh_output(tmp_path / "new", None, False)
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    check_fresh_output(tmp_path / "empty", None, False)


@pytest.mark.parametrize("steps, model, found", [
    ((5, 285), True, "checkpoints up to step-285 and a trained model/"),
    ((), True, "a trained model/"),
    ((10,), False, "checkpoints up to step-10"),
])
def test_a_fresh_run_over_another_run_stops_with_one_line(tmp_path, steps, model, found):
    old_run(tmp_path, steps=steps, model=model)
    with pytest.raises(DPOError) as caught:
        check_fresh_output(tmp_path, None, False)
    message = str(caught.value)
    assert "\n" not in message and f"holds another run ({found})" in message
    assert "--resume" in message and "--overwrite-output" in message


def test_overwrite_removes_the_old_run_and_nothing_else(tmp_path):
    old_run(tmp_path)
    check_fresh_output(tmp_path, None, True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_resume_with_a_checkpoint_passes_and_without_one_over_a_model_stops(tmp_path):
    old_run(tmp_path)
    check_fresh_output(tmp_path, "latest", False)
    check_fresh_output(tmp_path, str(tmp_path / "checkpoints" / "step-285"), False)
    finished = old_run(tmp_path / "finished", steps=())
    with pytest.raises(DPOError, match="no checkpoint to continue from .* --overwrite-output"):
        check_fresh_output(finished, "latest", False)
    check_fresh_output(tmp_path / "nothing-yet", "latest", False)  # the loop says it starts fresh


def test_overwrite_and_resume_together_are_refused():
    with pytest.raises(DPOError, match="--overwrite-output and --resume contradict"):
        Config(overwrite_output=True, resume="latest")


# ---- resumes ------------------------------------------------------------------------------------------------


@pytest.fixture
def data(tmp_path) -> Path:
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "p", "chosen": " a", "rejected": " b"}) + "\n")
    return path


def saved_yaml(cfg: Config, tmp_path: Path) -> dict:
    """The dict `--resume` reads back: config.yaml as the loop writes it (yaml.safe_dump of to_dict)."""
    import yaml

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return yaml.safe_load(path.read_text())


def test_the_same_run_resumes_and_run_only_settings_may_change(tmp_path, data):
    first = Config(data=str(data), max_steps=300, save_every=100, batch_size=8)
    later = first.replace(save_every=5, report_to="tensorboard", max_steps=400, progress=False, log_every=10,
                          num_workers=2, eval_every=50, resume="latest", batch_size=4, grad_accum=2)
    assert resume_differences(saved_yaml(first, tmp_path), later.to_dict()) == []


@pytest.mark.parametrize("change, expected", [
    ({"model": "seed"}, "--model tiny -> seed"),
    ({"loss": "ipo"}, "--loss sigmoid -> ipo"),
    ({"beta": 0.2}, "--beta 0.1 -> 0.2"),
    ({"batch_size": 16}, "global batch (--batch-size x --grad-accum x processes) 8 -> 16 pairs"),
    ({"grad_accum": 2}, "global batch (--batch-size x --grad-accum x processes) 8 -> 16 pairs"),
    ({"max_length": 512}, "--max-length 1024 -> 512"),
    ({"max_prompt_length": None}, "--max-prompt-length 512 -> none"),
    ({"max_steps": 10}, "--max-steps 300 -> 10 (a resumed run may run longer, not shorter)"),
    ({"lr": 1e-5}, "--lr 1e-06 -> 1e-05"),
])
def test_a_different_run_is_named_setting_by_setting(tmp_path, data, change, expected):
    first = Config(data=str(data), max_steps=300)
    assert resume_differences(saved_yaml(first, tmp_path), first.replace(**change).to_dict()) == [expected]


def test_the_global_batch_counts_processes(tmp_path, data):
    first = Config(data=str(data), batch_size=8)
    half = first.replace(batch_size=4).to_dict()
    assert resume_differences(saved_yaml(first, tmp_path), half, saved_world_size=1, world_size=2) == []
    assert resume_differences(saved_yaml(first, tmp_path), first.to_dict(), world_size=2) == [
        "global batch (--batch-size x --grad-accum x processes) 8 -> 16 pairs"]


def test_data_is_compared_by_content_not_by_path(tmp_path, data):
    first = saved_yaml(Config(data=str(data)), tmp_path)
    copy = tmp_path / "moved" / data.name
    copy.parent.mkdir()
    copy.write_bytes(data.read_bytes())
    assert resume_differences(first, Config(data=str(copy)).to_dict()) == []
    other = tmp_path / "other" / data.name
    other.parent.mkdir()
    other.write_text(json.dumps({"prompt": "q", "chosen": " c", "rejected": " d"}) + "\n")
    assert resume_differences(first, Config(data=str(other)).to_dict()) == [
        f"--data {data} -> {other} (other content)"]


def test_a_data_key_taken_at_the_start_catches_a_file_edited_since(tmp_path, data):
    from dpokit.run_folder import data_key

    first = Config(data=str(data))
    saved = {**saved_yaml(first, tmp_path), "data_key": data_key(first.to_dict())}
    data.write_text(data.read_text() + data.read_text())
    assert resume_differences(saved, first.to_dict()) == [f"--data {data} -> {data} (other content)"]


def test_an_older_config_yaml_without_newer_settings_counts_them_as_defaults(tmp_path, data):
    saved = saved_yaml(Config(data=str(data)), tmp_path)
    del saved["overwrite_output"], saved["label_smoothing"]
    assert resume_differences(saved, Config(data=str(data)).to_dict()) == []


def test_settings_that_may_change_are_listed_in_the_readme():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    listed = {name for name in RESUME_MAY_CHANGE if name not in ("output", "resume", "overwrite_output")}
    section = readme.split("## Checkpoints and resuming")[1].split("\n## ")[0]
    missing = [name for name in listed if f"`--{name.replace('_', '-')}`" not in section]
    assert missing == []
