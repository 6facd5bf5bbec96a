"""`--report-to`: the rows of metrics.jsonl reach TensorBoard (read back from the event file) and wandb (offline)."""

from __future__ import annotations

import json
import sys

import pytest

from dpokit.config import Config
from dpokit.errors import DPOError
from dpokit.report import Reporter
from dpokit.trackers import NullTracker, build_tracker, parse_report_to

# Rows as the loop writes them: an eval row at step 0, train rows, an eval row sharing the last train step.
ROWS = [
    {"step": 0, "epoch": 0.0, "eval/loss": 0.6931, "eval/rewards/accuracies": 0.0},
    {"step": 1, "epoch": 0.1, "loss": 0.69, "rewards/margins": 0.01, "lr": 1e-4, "grad_norm": 3.5},
    {"step": 2, "epoch": 0.2, "loss": 0.61, "rewards/margins": 0.25, "lr": 5e-5, "grad_norm": 2.5},
    {"step": 2, "epoch": 0.2, "eval/loss": 0.55, "eval/rewards/accuracies": 0.75},
]


def _log_through_reporter(tmp_path, names):
    tracker = build_tracker(parse_report_to(names), tmp_path, config={"beta": 0.1, "loss": "sigmoid"})
    reporter = Reporter(tmp_path, total_steps=2, progress=False, sinks=[tracker])
    for row in ROWS:
        reporter.log(row)
    reporter.close()
    return tracker


def test_tensorboard_event_file_holds_the_logged_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _log_through_reporter(tmp_path, "tensorboard")
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    def read(tag):
        return [(e.step, round(e.value, 6)) for e in events.Scalars(tag)]

    assert read("loss") == [(1, 0.69), (2, 0.61)]
    assert read("rewards/margins") == [(1, 0.01), (2, 0.25)]
    assert read("eval/rewards/accuracies") == [(0, 0.0), (2, 0.75)]
    assert read("lr") == [(1, 1e-4), (2, 5e-5)]
    assert "epoch" in events.Tags()["scalars"] and "step" not in events.Tags()["scalars"]
    # the same numbers as metrics.jsonl, row for row
    jsonl = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in jsonl if "loss" in r] == read("loss")


def wandb_history(run_file):
    """History rows `{step: {metric: value}}` of an offline `run-*.wandb` file, read independently of dpokit.

    The file is a LevelDB-style log: a 7-byte file header, then records of [crc32 (4), length (2, little
    endian), type (1)] + payload in 32 KiB blocks; type FULL (1) or LAST (4) ends a protobuf `Record`.
    """
    from wandb.proto import wandb_internal_pb2

    data, pos, payload, history = run_file.read_bytes(), 7, b"", {}
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        payload += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            payload = b""
            if record.WhichOneof("record_type") == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                history[record.history.step.num] = items
    return history


def test_wandb_offline_run_directory_holds_the_metrics(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-root"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    tracker = _log_through_reporter(tmp_path / "run", "wandb")
    import wandb

    wandb.teardown()  # stops the wandb-core service, which writes the run file out (as at process exit)
    runs = list((tmp_path / "wandb-root" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    history = wandb_history(next(runs[0].glob("run-*.wandb")))
    assert sorted(history) == [0, 1, 2]
    assert history[0]["eval/loss"] == pytest.approx(0.6931)
    assert history[1]["loss"] == pytest.approx(0.69) and history[1]["lr"] == pytest.approx(1e-4)
    # the eval row logged after the last train row lands on the same step, next to it
    assert history[2]["loss"] == pytest.approx(0.61)
    assert history[2]["eval/rewards/accuracies"] == pytest.approx(0.75)
    assert tracker.run.config["beta"] == 0.1


def test_several_trackers_and_none():
    assert parse_report_to("none") == []
    assert parse_report_to("tensorboard, wandb,tensorboard") == ["tensorboard", "wandb"]
    assert isinstance(build_tracker([], "unused", config={}), NullTracker)


def test_missing_extra_names_the_pip_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
    with pytest.raises(DPOError, match=r"pip install 'dpokit\[wandb\]'"):
        parse_report_to("wandb")


def test_unknown_tracker_is_rejected_by_config():
    with pytest.raises(DPOError, match="--report-to takes none, tensorboard, wandb"):
        Config(report_to="tensorboard,mlflow")
