"""Soak: a long `dpo train` run stays flat: memory, open files and threads do not grow, no metrics row goes
missing and no checkpoint folder is left half-written.

    python benchmarks/soak.py                  # 2,000 steps; prints a table and writes its section of RESULTS.md
    python benchmarks/soak.py --steps 500      # shorter, on a busy machine
    python benchmarks/soak.py --no-write       # the table only

The run: the tests' smallest model (a random-init Llama, hidden 32, 2 layers, vocabulary 32, the built-in
synthetic task), batch 4, `--eval-every 100 --save-every 50 --save-total-limit 2`, a metrics row every step, in
a child process (`python -m dpokit train`). This process samples the child's /proc/PID/status (VmRSS, Threads)
and /proc/PID/fd every `--interval` seconds, and its step from the last row of metrics.jsonl. Checks:

- peak RSS of the last quarter of the steps within 5% of the first quarter's (the start-up before step 1 and
  the final eval, model save and report after the last step are left out: they run once);
- the open file descriptors and threads of the last quarter no more than the first quarter's;
- one training row for every step, one eval row at 0, every 100 steps and at the end, nothing twice;
- exactly `--save-total-limit` checkpoints at the end, each complete (`checkpoint.problem`), no `.tmp-*` left;
- the run ends with exit status 0 and saves its model.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_md import replace_section  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the tests' tiny model and tokenizer builders

RESULTS = Path(__file__).with_name("RESULTS.md")
START, END = "<!-- soak:start -->", "<!-- soak:end -->"
EVAL_EVERY, SAVE_EVERY, KEEP = 100, 50, 2
RSS_TOLERANCE = 0.05


@dataclass
class Sample:
    seconds: float
    step: int
    rss_kib: int
    threads: int
    fds: int


def build_model(folder: Path) -> None:
    """The tests' hidden-32 Llama over the synthetic task's 32 tokens, saved with their BPE tokenizer."""
    from conftest import build_tiny_llama, build_tokenizer

    tokenizer = build_tokenizer(folder / "tokenizer")
    build_tiny_llama(folder / "model", vocab_size=32, tokenizer=tokenizer)


def command(model: Path, output: Path, steps: int) -> list[str]:
    return [sys.executable, "-m", "dpokit", "train", "--model", str(model), "--max-steps", str(steps),
            "--batch-size", "4", "--eval-every", str(EVAL_EVERY), "--save-every", str(SAVE_EVERY),
            "--save-total-limit", str(KEEP), "--log-every", "1", "--no-progress", "--report-to", "none",
            "--no-cache", "--output", str(output)]


def sample(pid: int, step: int, started: float) -> Sample | None:
    """The child's RSS, threads and open descriptors now; None once it has exited."""
    try:
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, ValueError):
        return None
    if "VmRSS" not in fields:  # a zombie: exited, not yet reaped
        return None
    return Sample(time.perf_counter() - started, step, int(fields["VmRSS"].split()[0]), int(fields["Threads"]), fds)


class StepWatcher:
    """The step of the newest complete row of metrics.jsonl, reading only what was appended since last time."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset, self.step, self.partial = path, 0, 0, b""

    def poll(self) -> int:
        if self.path.is_file():
            with self.path.open("rb") as handle:
                handle.seek(self.offset)
                new = handle.read()
            self.offset += len(new)
            lines = (self.partial + new).split(b"\n")
            self.partial = lines.pop()
            for line in lines:
                if line.strip():
                    self.step = max(self.step, json.loads(line)["step"])
        return self.step


def soak(steps: int, interval: float, work: Path) -> dict:
    from dpokit import checkpoint
    from dpokit.report import read_metrics

    build_model(work)
    output = work / "run"
    log = work / "train.log"
    watcher, samples = StepWatcher(output / "metrics.jsonl"), []
    started = time.perf_counter()
    with log.open("w") as out:  # a file, not a pipe: a pipe nobody reads would fill and stall the run
        child = subprocess.Popen(command(work / "model", output, steps), stdout=out, stderr=subprocess.STDOUT,
                                 env={**os.environ, "OMP_NUM_THREADS": "1"})
        while child.poll() is None:
            if (s := sample(child.pid, watcher.poll(), started)) is not None:
                samples.append(s)
            time.sleep(interval)
    wall = time.perf_counter() - started

    training = [s for s in samples if 1 <= s.step < steps]  # after loading, before the final eval and save
    quarter = steps // 4
    first = [s for s in training if s.step <= quarter] or training[:1]
    last = [s for s in training if s.step > steps - quarter] or training[-1:]
    rows = read_metrics(output / "metrics.jsonl") if (output / "metrics.jsonl").is_file() else []
    train_steps = [r["step"] for r in rows if "loss" in r]
    eval_steps = [r["step"] for r in rows if "eval/loss" in r]
    want_eval = [0, *range(EVAL_EVERY, steps, EVAL_EVERY), steps]
    folders = sorted(p.name for p in (output / "checkpoints").iterdir()) if (output / "checkpoints").is_dir() else []
    broken = [name for name in folders if not name.startswith("step-")
              or checkpoint.problem(output / "checkpoints" / name) is not None]
    first_rss, last_rss = max(s.rss_kib for s in first), max(s.rss_kib for s in last)
    result = {
        "steps": steps, "wall_s": round(wall, 1), "exit": child.returncode, "samples": len(samples),
        "first_quarter_peak_rss_mib": round(first_rss / 1024, 1), "last_quarter_peak_rss_mib": round(last_rss / 1024, 1),
        "rss_drift": round(last_rss / first_rss - 1, 4),
        "fds": (max(s.fds for s in first), max(s.fds for s in last)),
        "threads": (max(s.threads for s in first), max(s.threads for s in last)),
        "train_rows": len(train_steps), "train_rows_ok": train_steps == list(range(1, steps + 1)),
        "eval_rows": len(eval_steps), "eval_rows_ok": eval_steps == want_eval,
        "checkpoints": folders, "checkpoints_ok": len(folders) == KEEP and not broken,
        "model_saved": (output / "model" / "model.safetensors").is_file(), "log": str(log),
    }
    result["passed"] = (result["exit"] == 0 and result["rss_drift"] <= RSS_TOLERANCE
                        and result["fds"][1] <= result["fds"][0] and result["threads"][1] <= result["threads"][0]
                        and result["train_rows_ok"] and result["eval_rows_ok"] and result["checkpoints_ok"]
                        and result["model_saved"])
    return result


def table(r: dict) -> str:
    ok = lambda good: "yes" if good else "**no**"  # noqa: E731
    return "\n".join([
        "| check | first quarter | last quarter | within bound |",
        "| --- | ---: | ---: | --- |",
        f"| peak RSS | {r['first_quarter_peak_rss_mib']:,} MiB | {r['last_quarter_peak_rss_mib']:,} MiB | "
        f"{ok(r['rss_drift'] <= RSS_TOLERANCE)} ({r['rss_drift']:+.1%}, bound +5%) |",
        f"| open file descriptors (max) | {r['fds'][0]} | {r['fds'][1]} | {ok(r['fds'][1] <= r['fds'][0])} |",
        f"| threads (max) | {r['threads'][0]} | {r['threads'][1]} | {ok(r['threads'][1] <= r['threads'][0])} |",
        "",
        f"- training rows: {r['train_rows']} of {r['steps']}, one per step in order: {ok(r['train_rows_ok'])}; "
        f"eval rows: {r['eval_rows']} (before, every {EVAL_EVERY} steps, after): {ok(r['eval_rows_ok'])}",
        f"- checkpoints left: {', '.join(r['checkpoints']) or 'none'} (--save-total-limit {KEEP}), each complete, "
        f"no temporary folder: {ok(r['checkpoints_ok'])}; model saved, exit {r['exit']}: {ok(r['model_saved'])}",
        f"- {r['steps']:,} steps in {r['wall_s']:,} s wall, {r['samples']:,} samples of /proc; "
        f"**{'passed' if r['passed'] else 'FAILED'}**",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000, help="optimizer steps (a multiple of 4 reads best)")
    parser.add_argument("--interval", type=float, default=0.25, help="seconds between samples of /proc")
    parser.add_argument("--no-write", action="store_true", help="print the table without updating RESULTS.md")
    parser.add_argument("--keep", metavar="DIR", help="run in DIR and keep it (default: a temporary folder)")
    args = parser.parse_args()
    if not Path("/proc/self/status").is_file():
        raise SystemExit("soak.py reads /proc: Linux only")
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(args.keep or scratch)
        work.mkdir(parents=True, exist_ok=True)
        result = soak(args.steps, args.interval, work)
    text = table(result)
    print(text)
    if not args.no_write:
        machine = f"{platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f} at the end"
        replace_section(RESULTS, (START, END), f"## Soak\n\n`python benchmarks/soak.py --steps {args.steps}` ({machine}; "
                      f"`dpo train` on a hidden-32 Llama, batch 4, eval every {EVAL_EVERY}, checkpoint every "
                      f"{SAVE_EVERY}, --save-total-limit {KEEP}, a row every step):\n\n{text}")
        print(f"\nwrote {RESULTS}", file=sys.stderr)
    raise SystemExit(0 if result["passed"] else 1)


if __name__ == "__main__":
    main()
