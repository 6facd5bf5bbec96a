"""Everything the user sees: `metrics.jsonl`, the progress bar, the end summary and `training_curves.png`.

This room receives plain floats and decides nothing about training. Non-main ranks get a `NullReporter` with
the same methods, so the loop never branches on "am I rank 0?" (nanochat's DummyWandb idea).
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TextIO

PLOTTED = ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected", "lr", "grad_norm")


class Reporter:
    """Writes `metrics.jsonl` under `out_dir` and drives the progress bar on stderr."""

    def __init__(self, out_dir: str | Path, *, total_steps: int, progress: bool = True,
                 stream: TextIO | None = None, append: bool = False) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.out_dir / "metrics.jsonl"
        self._file = self.metrics_path.open("a" if append else "w", encoding="utf-8")
        self.stream = stream or sys.stderr
        interactive = progress and self.stream.isatty() and not os.environ.get("NO_COLOR") \
            and os.environ.get("TERM") != "dumb"
        self._bar = None
        if interactive:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, desc="train", unit="step", file=self.stream, dynamic_ncols=True)

    def log(self, row: dict[str, Any]) -> None:
        """Append one row to metrics.jsonl (step, epoch, then metrics)."""
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def progress(self, step: int, metrics: dict[str, float]) -> None:
        """Advance the bar to `step`; without a terminal, print a plain line now and then instead."""
        shown = {"loss": metrics.get("loss"), "acc": metrics.get("rewards/accuracies"),
                 "margin": metrics.get("rewards/margins")}
        text = {k: f"{v:.3f}" for k, v in shown.items() if v is not None}
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix(text, refresh=False)
        elif step == 1 or step % 50 == 0:
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


class NullReporter:
    """Same methods as `Reporter`, doing nothing: for ranks other than 0."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.metrics_path = None

    def log(self, row: dict[str, Any]) -> None: ...

    def progress(self, step: int, metrics: dict[str, float]) -> None: ...

    def print(self, message: str) -> None: ...

    def close(self) -> None: ...


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a metrics.jsonl file."""
    with Path(path).open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def summary_lines(before: dict[str, float], after: dict[str, float], movement: dict[str, float]) -> list[str]:
    """The end-of-run table: held-out metrics before and after, and how far each parameter group moved."""
    lines = ["", f"{'held-out metric':<24}{'before':>12}{'after':>12}"]
    for name in ("rewards/accuracies", "rewards/margins", "loss", "logps/chosen", "logps/rejected"):
        if name in after:
            lines.append(f"{name:<24}{before.get(name, math.nan):>12.4f}{after[name]:>12.4f}")
    if movement:
        lines += ["", f"{'parameters moved':<24}{'rel. change':>12}"]
        lines += [f"{group:<24}{value:>12.2e}" for group, value in movement.items()]
    return lines


def plot_curves(runs: Sequence[tuple[str, Iterable[dict[str, Any]]]], path: str | Path,
                metrics: Sequence[str] = PLOTTED[:3]) -> Path:
    """Plot `metrics` over steps for one or several runs (train solid, eval dashed) to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.4), squeeze=False)
    for (label, rows) in runs:
        rows = list(rows)
        for ax, name in zip(axes[0], metrics):
            for prefix, style in (("", "-"), ("eval/", "--")):
                points = [(r["step"], r[prefix + name]) for r in rows
                          if isinstance(r.get(prefix + name), (int, float))]
                if points:
                    xs, ys = zip(*points)
                    marker = "o" if prefix else None
                    ax.plot(xs, ys, style, marker=marker, markersize=3,
                            label=f"{label} {'eval' if prefix else 'train'}".strip())
    for ax, name in zip(axes[0], metrics):
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
