"""Everything the user sees: `metrics.jsonl`, the progress bar, the end summary, curves and run reports.

This room receives plain floats and decides nothing about training. Non-main ranks get a `NullReporter` with
the same methods, so the loop never branches on "am I rank 0?" (nanochat's DummyWandb idea).

`dpo report RUN [RUN ...]` (and the end of `dpo train`, on its own run) renders `metrics.jsonl` files into one
PNG of curves on shared axes and a markdown table, to compare runs (beta, loss, data) side by side.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, TextIO

from .errors import DPOError

HELD_OUT = ("rewards/accuracies", "rewards/margins", "loss", "logps/chosen", "logps/rejected",  # summaries, cards
            "rewards/desirable", "rewards/undesirable", "mean_token_accuracy")
PLOTTED = ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected", "lr", "grad_norm",
           "rewards/desirable", "rewards/undesirable", "mean_token_accuracy")
MARKED_UP_TO = 50  # curves of at most this many points show each point (a 1-step run is one visible dot)
SHORT_RUN = 10     # runs of at most this many steps get a tick at every step


class Sink(Protocol):
    """Where rows go besides metrics.jsonl: an experiment tracker (see `trackers`)."""

    def log(self, row: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


class Reporter:
    """Writes `metrics.jsonl` under `out_dir`, forwards each row to `sinks`, drives the progress bar on stderr.

    The bar is drawn only on an interactive terminal without NO_COLOR (and TERM != dumb); otherwise (log files,
    CI) a plain line is printed at step 1, every 50 steps and the last step, so logs hold no carriage returns.

    `append` (a resumed run) continues `metrics.jsonl`, and `elapsed_s` goes on from its last row's, plus
    `since_last_row_s` (the time the run had spent after that row before its checkpoint), so it adds up.
    """

    def __init__(self, out_dir: str | Path, *, total_steps: int, progress: bool = True,
                 stream: TextIO | None = None, append: bool = False, sinks: Sequence[Sink] = (),
                 since_last_row_s: float = 0.0) -> None:
        self.sinks = list(sinks)
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.out_dir / "metrics.jsonl"
        before = last_elapsed(self.metrics_path) + since_last_row_s if append else 0.0
        self._start = time.perf_counter() - before
        self.total_steps = total_steps
        self._file = self.metrics_path.open("a" if append else "w", encoding="utf-8")
        self.stream = stream or sys.stderr
        interactive = progress and self.stream.isatty() and not os.environ.get("NO_COLOR") \
            and os.environ.get("TERM") != "dumb"
        self._bar = None
        if interactive:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, desc="train", unit="step", file=self.stream, dynamic_ncols=True)

    def log(self, row: dict[str, Any]) -> None:
        """Append one row to metrics.jsonl (step, epoch, metrics, then `elapsed_s` since the reporter started)."""
        row = {**row, "elapsed_s": round(time.perf_counter() - self._start, 3)}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        for sink in self.sinks:
            sink.log(row)

    def log_eval(self, step: int, epoch: float, metrics: dict[str, float]) -> None:
        """Append held-out metrics as one row, each named `eval/<metric>` (nothing without held-out pairs)."""
        if metrics:
            self.log({"step": step, "epoch": epoch, **{f"eval/{k}": v for k, v in metrics.items()}})

    def progress(self, step: int, metrics: dict[str, float]) -> None:
        """Advance the bar to `step`; without a terminal, print a plain line now and then instead. A run shows
        what its losses measure: reward accuracy and margin, or for SFT the token accuracy (when logged)."""
        shown = {"loss": metrics.get("loss"), "acc": metrics.get("rewards/accuracies"),
                 "margin": metrics.get("rewards/margins"), "token acc": metrics.get("mean_token_accuracy")}
        text = {k: f"{v:.3f}" for k, v in shown.items() if v is not None}
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix(text, refresh=False)
        elif step in (1, self.total_steps) or step % 50 == 0:
            self.print(f"step {step}: " + " ".join(f"{k} {v}" for k, v in text.items()))

    def print(self, message: str) -> None:
        if self._bar is not None:
            self._bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._file.close()
        for sink in self.sinks:
            sink.close()


class NullReporter:
    """Same methods as `Reporter`, doing nothing: for ranks other than 0."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.metrics_path = None

    def log(self, row: dict[str, Any]) -> None: ...

    def log_eval(self, step: int, epoch: float, metrics: dict[str, float]) -> None: ...

    def progress(self, step: int, metrics: dict[str, float]) -> None: ...

    def print(self, message: str) -> None: ...

    def close(self) -> None: ...


def last_elapsed(path: Path) -> float:
    """The last `elapsed_s` in a metrics.jsonl file (0 when there is none)."""
    if not path.is_file():
        return 0.0
    elapsed = [row["elapsed_s"] for row in read_metrics(path) if isinstance(row.get("elapsed_s"), (int, float))]
    return float(elapsed[-1]) if elapsed else 0.0


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a metrics.jsonl file."""
    with Path(path).open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def summary_lines(before: dict[str, float], after: dict[str, float], movement: dict[str, float]) -> list[str]:
    """The end-of-run table: held-out metrics before and after, and how far each parameter group moved."""
    lines = ["", f"{'held-out metric':<24}{'before':>12}{'after':>12}"]
    for name in HELD_OUT:
        if name in after:
            lines.append(f"{name:<24}{before.get(name, math.nan):>12.4f}{after[name]:>12.4f}")
    if movement:
        lines += ["", f"{'parameters moved':<24}{'rel. change':>12}"]
        lines += [f"{group:<24}{value:>12.2e}" for group, value in movement.items()]
    return lines


def load_run(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a run: `path` is a run's output folder or its metrics.jsonl."""
    path = Path(path)
    metrics = path / "metrics.jsonl" if path.is_dir() else path
    if not metrics.is_file():
        raise DPOError(f"{path}: no metrics.jsonl here (give a `dpo train` output folder or a metrics.jsonl file)")
    try:
        return read_metrics(metrics)
    except json.JSONDecodeError as err:
        raise DPOError(f"{metrics}:{err.lineno}: not a JSON line ({err.msg})") from None


def run_labels(paths: Sequence[str | Path]) -> list[str]:
    """Short names for runs in legends and tables: folder names, or the paths as given when those collide."""
    names = [(Path(p).parent if Path(p).name == "metrics.jsonl" else Path(p)).resolve().name for p in paths]
    return names if len(set(names)) == len(names) else [str(p) for p in paths]


def summarize_run(rows: Sequence[Mapping[str, Any]]) -> dict[str, float | None]:
    """Steps, final and best held-out metrics, mean training pairs/s and wall time of one run's rows.

    A run resumed by an older dpokit restarted `elapsed_s` at 0, so wall time adds up the segments.
    """
    evals = [r for r in rows if isinstance(r.get("eval/loss"), (int, float))]
    train = [r for r in rows if isinstance(r.get("pairs_per_s"), (int, float))]
    accuracies = [r["eval/rewards/accuracies"] for r in evals if "eval/rewards/accuracies" in r]
    wall, previous = 0.0, 0.0
    for r in rows:
        elapsed = float(r.get("elapsed_s", previous))
        wall += elapsed - previous if elapsed >= previous else elapsed
        previous = elapsed
    final = evals[-1] if evals else {}
    return {
        "steps": max((float(r["step"]) for r in rows), default=None),
        "final eval acc": final.get("eval/rewards/accuracies"),
        "best eval acc": max(accuracies, default=None),
        "final eval margin": final.get("eval/rewards/margins"),
        "final eval loss": final.get("eval/loss"),
        "best eval loss": min((r["eval/loss"] for r in evals), default=None),
        "pairs/s": sum(r["pairs_per_s"] for r in train) / len(train) if train else None,
        "wall time (s)": wall if any("elapsed_s" in r for r in rows) else None,
    }


def summary_table(runs: Sequence[tuple[str, Sequence[Mapping[str, Any]]]]) -> str:
    """A markdown table, one line per run, of `summarize_run`'s numbers (`-` where a run has none)."""
    summaries = [(label, summarize_run(rows)) for label, rows in runs]
    columns = list(summaries[0][1]) if summaries else []
    lines = ["| run | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for label, summary in summaries:
        cells = ["-" if v is None else f"{v:.0f}" if k == "steps" else f"{v:.4g}" for k, v in summary.items()]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(runs: Sequence[str | Path], png: str | Path, markdown: str | Path | None = None) -> str:
    """`dpo report`: curves of every run to `png`, the summary table to `markdown` (if given); returns the table."""
    loaded = list(zip(run_labels(runs), [load_run(run) for run in runs]))
    plot_curves(loaded, png, losses=[run_loss(run) for run in runs])
    table = summary_table(loaded)
    if markdown is not None:
        Path(markdown).write_text(f"# Run report\n\n![training curves]({Path(png).name})\n\n{table}",
                                  encoding="utf-8")
    return table


def run_loss(path: str | Path) -> str | None:
    """The `--loss` of the run in folder `path`, from its config.yaml (None for a bare metrics.jsonl)."""
    path = Path(path)
    config = (path.parent if path.name == "metrics.jsonl" else path) / "config.yaml"
    if not config.is_file():
        return None
    import yaml

    loss = (yaml.safe_load(config.read_text(encoding="utf-8")) or {}).get("loss")
    return str(loss) if loss else None


def plot_curves(runs: Sequence[tuple[str, Iterable[Mapping[str, Any]]]], path: str | Path,
                metrics: Sequence[str] = PLOTTED, losses: Sequence[str | None] = ()) -> Path:
    """Plot `metrics` over steps, one panel each, every run on the same axes (train solid, eval dashed).

    A metric that no run logged gets no panel (an SFT run has no rewards to draw). Different losses are on
    different scales (IPO's squared loss starts at (1/(2 beta))^2 = 25 for beta 0.1, DPO's at log 2), so
    `loss` gets one panel per loss (`losses[i]` is run i's `--loss`; None: unknown), where one axis would
    flatten the others; the reward and log-prob panels stay shared, as their units are the same across losses.
    Curves of up to MARKED_UP_TO points mark each point; steps are whole numbers.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    listed = [(label, list(rows)) for label, rows in runs]
    panels = curve_panels([rows for _, rows in listed], metrics, losses)
    columns = max(1, min(4, len(panels)))
    rows_of_axes = max(1, -(-len(panels) // columns))
    fig, axes = plt.subplots(rows_of_axes, columns, figsize=(4.2 * columns, 3.2 * rows_of_axes), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[len(panels):]:
        ax.set_visible(False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    steps = [int(r["step"]) for _, rows in listed for r in rows if _number(r.get("step"))] or [0]
    first, last = min(steps), max(steps)  # one step axis for every panel
    for ax, (title, name, drawn) in zip(flat, panels):
        for i in drawn:
            label, rows = listed[i]
            for prefix, style in (("", "-"), ("eval/", "--")):
                points = [(r["step"], r[prefix + name]) for r in rows if _number(r.get(prefix + name))]
                if points:
                    xs, ys = zip(*points)
                    marked = prefix or len(points) <= MARKED_UP_TO
                    ax.plot(xs, ys, style, color=colors[i % len(colors)], marker="o" if marked else None,
                            markersize=3, label=f"{label} {'eval' if prefix else 'train'}".strip())
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.ticklabel_format(axis="y", useOffset=False)  # 0.69312, not "+6.9e-1" above the axis
        if last - first <= SHORT_RUN:  # every step a tick, with room around a single one
            ax.set_xticks(range(first, last + 1))
            ax.set_xlim(first - 0.5, last + 0.5)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.lines and (ax is flat[0] or name == "loss"):  # each loss panel names the runs it holds
            ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def curve_panels(runs: Sequence[Sequence[Mapping[str, Any]]], metrics: Sequence[str],
                 losses: Sequence[str | None] = ()) -> list[tuple[str, str, list[int]]]:
    """(title, metric, indices of the runs drawn) of each panel `plot_curves` draws, in the order of `metrics`."""
    kinds = list(losses) + [None] * (len(runs) - len(losses))
    panels = []
    for name in metrics:
        drawn = [i for i, rows in enumerate(runs)
                 if any(_number(r.get(name)) or _number(r.get("eval/" + name)) for r in rows)]
        if name == "loss" and len({kinds[i] for i in drawn}) > 1:
            panels += [(f"loss ({kind or 'loss not recorded'})", name, [i for i in drawn if kinds[i] == kind])
                       for kind in dict.fromkeys(kinds[i] for i in drawn)]
        elif drawn:
            panels.append((name, name, drawn))
    return panels


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
