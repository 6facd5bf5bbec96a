"""`dpo report` on hand-written runs (numbers checked by hand), and progress output that suits log files."""

from __future__ import annotations

import io
import json

import pytest

from dpokit.cli import main
from dpokit.errors import DPOError
from dpokit.report import Reporter, summarize_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(folder, rows):
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return folder


def run_rows(beta_shift: float) -> list[dict]:
    """Eval at 0, 2, 4 (accuracy peaks at step 2 for the first run), train rows 1-4, 10 s per step."""
    rows = [{"step": 0, "epoch": 0.0, "eval/loss": 0.69, "eval/rewards/accuracies": 0.5, "eval/rewards/margins": 0.0,
             "elapsed_s": 1.0}]
    for step in (1, 2, 3, 4):
        rows.append({"step": step, "epoch": step / 4, "loss": 0.7 - 0.05 * step, "rewards/accuracies": 0.5,
                     "rewards/margins": 0.1 * step, "logps/chosen": -20.0, "logps/rejected": -21.0 - step,
                     "lr": 1e-4, "grad_norm": 2.0, "pairs_per_s": 10.0 * step, "elapsed_s": 1.0 + 10 * step})
        if step in (2, 4):
            accuracy = {2: 0.9, 4: 0.8}[step] + beta_shift
            rows.append({"step": step, "epoch": step / 4, "eval/loss": 0.6 - 0.1 * step / 2,
                         "eval/rewards/accuracies": accuracy, "eval/rewards/margins": 0.2 * step,
                         "elapsed_s": 2.0 + 10 * step})
    return rows


def test_report_on_two_runs_writes_a_png_and_a_table_naming_both(tmp_path, capsys):
    write_run(tmp_path / "beta0.1", run_rows(0.0))
    write_run(tmp_path / "beta0.5", run_rows(0.05))
    main(["report", str(tmp_path / "beta0.1"), str(tmp_path / "beta0.5" / "metrics.jsonl"),
          "--out", str(tmp_path / "cmp" / "report.png")])  # returns normally: exit status 0
    png = (tmp_path / "cmp" / "report.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 10_000
    table = (tmp_path / "cmp" / "report.md").read_text()
    assert "![training curves](report.png)" in table
    lines = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
             for line in table.splitlines() if line.startswith("| beta")}
    # steps, final eval acc, best eval acc, final eval margin, final eval loss, best eval loss, pairs/s, wall time:
    # final = the step-4 eval row, best = max accuracy (step 2) / min loss (step 4), pairs/s = mean(10, 20, 30, 40),
    # wall time = the last elapsed_s (42 s).
    assert lines["beta0.1"] == ["4", "0.8", "0.9", "0.8", "0.4", "0.4", "25", "42"]
    assert lines["beta0.5"] == ["4", "0.85", "0.95", "0.8", "0.4", "0.4", "25", "42"]
    assert "| beta0.1 |" in capsys.readouterr().out  # the table also goes to stdout


def test_wall_time_adds_up_resumed_segments():
    """`elapsed_s` restarts when a run resumes: 30 s, then 25 s more."""
    rows = [{"step": 1, "elapsed_s": 10.0}, {"step": 2, "elapsed_s": 30.0},
            {"step": 3, "elapsed_s": 5.0}, {"step": 4, "elapsed_s": 25.0}]
    summary = summarize_run(rows)
    assert summary["wall time (s)"] == pytest.approx(55.0)
    assert summary["final eval acc"] is None and summary["steps"] == 4


def test_report_errors_are_one_line_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["report", str(tmp_path / "missing")])
    assert exit_.value.code == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
    bad = write_run(tmp_path / "bad", [{"step": 1}])
    (bad / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2,\n', encoding="utf-8")
    with pytest.raises(SystemExit) as exit_:
        main(["report", str(bad), "--out", str(tmp_path / "r.png")])
    assert exit_.value.code == 2 and "metrics.jsonl:2: not a JSON line" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["report"])  # argparse usage error
    assert exit_.value.code == 2


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def run_progress(stream, steps=120):
    reporter = Reporter(stream.name, total_steps=steps, stream=stream)
    for step in range(1, steps + 1):
        reporter.progress(step, {"loss": 0.5, "rewards/accuracies": 0.75, "rewards/margins": 0.1})
    reporter.close()
    return stream.getvalue()


@pytest.mark.parametrize("terminal, no_color", [(False, None), (True, "1")])
def test_progress_without_terminal_or_with_no_color_is_plain_lines(tmp_path, monkeypatch, terminal, no_color):
    """Log files and CI get a line at step 1, every 50 steps and the last: no bar, no carriage returns, no
    escapes."""
    if no_color:
        monkeypatch.setenv("NO_COLOR", no_color)
    else:
        monkeypatch.delenv("NO_COLOR", raising=False)
    stream = (FakeTerminal if terminal else io.StringIO)()
    stream.name = str(tmp_path)
    text = run_progress(stream)
    assert text.splitlines() == ["step 1: loss 0.500 acc 0.750 margin 0.100",
                                 "step 50: loss 0.500 acc 0.750 margin 0.100",
                                 "step 100: loss 0.500 acc 0.750 margin 0.100",
                                 "step 120: loss 0.500 acc 0.750 margin 0.100"]
    assert "\r" not in text and "\x1b" not in text


def test_progress_on_a_terminal_is_a_bar(tmp_path, monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    stream = FakeTerminal()
    stream.name = str(tmp_path)
    text = run_progress(stream)
    assert "\r" in text and "120/120" in text and "step 50:" not in text


def test_reporter_stamps_elapsed_time_and_forwards_rows_to_sinks(tmp_path):
    class Recorder:
        def __init__(self):
            self.rows, self.closed = [], False

        def log(self, row):
            self.rows.append(row)

        def close(self):
            self.closed = True

    sink = Recorder()
    reporter = Reporter(tmp_path, total_steps=1, progress=False, sinks=[sink])
    row = {"step": 1, "loss": 0.5}
    reporter.log(row)
    reporter.close()
    written = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert written == sink.rows[0] and written["loss"] == 0.5 and 0 <= written["elapsed_s"] < 60
    assert row == {"step": 1, "loss": 0.5}, "the caller's row is not modified"
    assert sink.closed


def test_load_run_needs_a_metrics_file(tmp_path):
    from dpokit.report import load_run

    with pytest.raises(DPOError, match="no metrics.jsonl"):
        load_run(tmp_path)
