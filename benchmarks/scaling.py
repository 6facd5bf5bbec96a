"""Peak memory and seconds per step against sequence length and responses per prompt: dpo and TRL 1.16 in one run.

    python benchmarks/scaling.py                          # prompts 256..16k, 2/4/8 responses; 8 GiB and 600 s caps
    python benchmarks/scaling.py --cap-gib 18 --time-cap 900 --lengths 256,1024,4096,16384
    python benchmarks/scaling.py --dry-run                # a tiny model and short rows: the whole path in a minute

Model (issue 16): Qwen2.5-0.5B's vocabulary, width and attention (vocab 151,936, hidden 896, 14 heads / 2 KV heads,
MLP 4,864, tied embeddings) with 2 layers, random init, float32 on CPU (bf16 on CUDA); a word-level tokenizer of
the same vocabulary. Data: one pair per step by default (`--pairs`), a prompt of L tokens and two 256-token
responses; and one 1,024-token prompt with K = 2, 4, 8 responses, all K(K-1)/2 pairs in one step.

Configs, each in its own process: `dpo` (defaults), `dpo-ckpt` (`--gradient-checkpointing`), `trl` (DPOTrainer
with TRL 1.16's defaults, gradient checkpointing on, no length limit, an explicit reference copy), `trl-no-ckpt`.

Caps: a watchdog reads each process's resident memory every 20 ms and kills it above `--cap-gib` (reported "over
the cap"); its address space is limited to the cap + 2 GiB as well (`RLIMIT_AS`), so an allocation that outruns the
watchdog fails inside the process instead of taking the machine. A process past `--time-cap` seconds is stopped
and reported from the steps it finished (step times are written as they finish), or as "over the time cap".
Cost model for time: the plan's FLOPs per step (`dpokit.plan.step_flops`: 2 per weight per token forward, 4 backward,
attention 4 x width per query-key pair forward, the LM head at completion tokens), so seconds per TFLOP stay flat
when time grows as the work does, linear terms and attention's quadratic share together.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_md import replace_section  # noqa: E402
from word_tokenizer import save_word_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).with_name("RESULTS.md")
PNG = Path(__file__).with_name("scaling.png")
START, END = "<!-- scaling:start -->", "<!-- scaling:end -->"
MODEL = dict(model_type="qwen2", vocab_size=151936, hidden_size=896, num_hidden_layers=2, num_attention_heads=14,
             num_key_value_heads=2, intermediate_size=4864, tie_word_embeddings=True)
DRY_MODEL = dict(model_type="qwen2", vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=128, tie_word_embeddings=True)
CONFIGS = ("dpo", "dpo-ckpt", "trl", "trl-no-ckpt")
RESPONSE = 256
ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled"}
RUN_SETTINGS = ("cap_gib", "time_cap", "steps", "threads", "cuda", "dry_run")   # what the report says of a run
AS_MARGIN = 2 * 2**30   # address space beyond the cap: a torch process maps ~1 GiB more than it holds


# ---- assets -----------------------------------------------------------------------------------------------------


def build_assets(root: Path, shape: dict, lengths: list[int], responses: list[int], pairs: int, response: int,
                 group_prompt: int) -> None:
    """The model, its word-level tokenizer (own folder: next to a Qwen2 config AutoTokenizer would load Qwen2's),
    one JSONL file per prompt length and one per responses-per-prompt count."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    vocab = shape["vocab_size"]
    save_word_tokenizer(vocab, root / "tokenizer")
    config = AutoConfig.for_model(**shape, max_position_embeddings=max(lengths + [group_prompt]) + 2 * response + 8,
                                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "model", safe_serialization=True)
    rng = random.Random(0)
    text = lambda n: " ".join(f"w{rng.randrange(3, vocab)}" for _ in range(n - 1))  # noqa: E731  (+ BOS or EOS)
    for length in lengths:
        rows = [{"prompt": text(length), "chosen": " " + text(response), "rejected": " " + text(response)}
                for _ in range(pairs)]
        (root / f"prompt-{length}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for count in responses:
        prompt, answers = text(group_prompt), [" " + text(response) for _ in range(count)]
        rows = [{"prompt": prompt, "chosen": answers[i], "rejected": answers[j]}
                for i in range(count) for j in range(i + 1, count)]
        (root / f"responses-{count}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        # The same pairs as one ranked record for dpo (`--pairs all`): its pairs form one group, which the sampler
        # keeps together and `dpo plan` counts as one prompt block, as the trainer forwards them.
        ranked = {"prompt": prompt, "responses": answers, "scores": list(range(count, 0, -1))}
        (root / f"responses-{count}.ranked.jsonl").write_text(json.dumps(ranked) + "\n")


def pairs_in(data: Path) -> int:
    return len(data.read_text().splitlines())


# ---- workers: one config each, in their own process ----------------------------------------------------------------


def dpo_config(root: Path, data: Path, output: Path, steps: int, checkpointing: bool, cuda: bool):  # noqa: ANN201
    from dpokit.config import Config

    length = 10**6
    ranked = data.with_suffix(".ranked.jsonl")
    return Config(model=str(root / "model"), tokenizer=str(root / "tokenizer"),
                  data=str(ranked if ranked.exists() else data), pairs="all",
                  batch_size=pairs_in(data), max_steps=steps, eval_fraction=0.0, lr=1e-6, cache=False,
                  output=str(output), progress=False,
                  max_length=length, max_prompt_length=length, gradient_checkpointing=checkpointing,
                  dtype="bfloat16" if cuda else "float32", device="cuda" if cuda else "cpu", overwrite_output=True)


def run_dpo(args: argparse.Namespace) -> None:
    from dpokit import loop

    loop.train(dpo_config(Path(args.assets), Path(args.data), Path(args.output), args.steps,
                          args.worker == "dpo-ckpt", args.cuda))


def run_trl(args: argparse.Namespace) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    root, data, output = Path(args.assets), Path(args.data), Path(args.output)
    dtype = torch.bfloat16 if args.cuda else torch.float32
    model = AutoModelForCausalLM.from_pretrained(root / "model", dtype=dtype, attn_implementation="sdpa")
    ref_model = AutoModelForCausalLM.from_pretrained(root / "model", dtype=dtype, attn_implementation="sdpa")
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    steps_file = output / "steps.jsonl"

    class StepTimes(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001, ANN003
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN003
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            with steps_file.open("a") as f:
                f.write(json.dumps({"seconds": time.perf_counter() - self.start}) + "\n")

    config = DPOConfig(output_dir=str(output / "trl"), per_device_train_batch_size=len(rows), max_steps=args.steps,
                       learning_rate=1e-6, beta=0.1, max_length=None, logging_steps=1, report_to=[],
                       save_strategy="no", use_cpu=not args.cuda, bf16=args.cuda, seed=0, disable_tqdm=True,
                       gradient_checkpointing=args.worker == "trl", dataloader_num_workers=0)
    trainer = DPOTrainer(model=model, ref_model=ref_model, args=config, train_dataset=Dataset.from_list(rows),
                         processing_class=AutoTokenizer.from_pretrained(root / "tokenizer"), callbacks=[StepTimes()])
    trainer.train()


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.manual_seed(0)
    (run_trl if args.worker.startswith("trl") else run_dpo)(args)
    with open("/proc/self/status") as f:   # this process's own high-water mark (ru_maxrss starts from the parent's)
        peak = int(next(line.split()[1] for line in f if line.startswith("VmHWM:"))) * 1024
    if args.cuda:
        peak = torch.cuda.max_memory_allocated()
    print("RESULT " + json.dumps({"peak": peak}), flush=True)


# ---- the caps ------------------------------------------------------------------------------------------------------


def rss(pid: int) -> int:
    """Resident bytes of `pid` and its descendants (0 once gone)."""
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        try:
            with open(f"/proc/{current}/status") as f:
                total += next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:")), 0)
            with open(f"/proc/{current}/task/{current}/children") as f:
                stack += [int(child) for child in f.read().split()]
        except (FileNotFoundError, ProcessLookupError, StopIteration):
            continue
    return total


def run_capped(command: list[str], cap: int, time_cap: float, env: dict[str, str] | None = None,
               ) -> dict[str, object]:
    """Run `command` under a memory cap (bytes; resident memory polled every 20 ms, plus RLIMIT_AS at the cap +
    AS_MARGIN) and a time cap (seconds). Returns status ("ok", "over the cap", "over the time cap", "failed"), the
    highest resident memory seen, the wall time and the output."""
    def limit_address_space() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (cap + AS_MARGIN, cap + AS_MARGIN))

    with tempfile.TemporaryFile("w+") as log:
        began = time.perf_counter()
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO,
                                 preexec_fn=limit_address_space, start_new_session=True)
        status, seen = None, 0
        while child.poll() is None:
            seen = max(seen, rss(child.pid))
            if seen > cap:
                status = "over the cap"
            elif time.perf_counter() - began > time_cap:
                status = "over the time cap"
            if status:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
                break
            time.sleep(0.02)
        log.seek(0)
        output = log.read()
    if status is None:
        out_of_memory = ("MemoryError" in output or "can't allocate memory" in output
                         or "std::bad_alloc" in output or "DefaultCPUAllocator" in output)
        status = "ok" if child.returncode == 0 else "over the cap" if out_of_memory else "failed"
    return {"status": status, "seen": seen, "seconds": time.perf_counter() - began, "output": output}


# ---- driver ----------------------------------------------------------------------------------------------------------


def step_seconds(output: Path, config: str, pairs: int) -> list[float]:
    """Seconds of each finished step: TRL's from its callback, dpo's from metrics.jsonl (pairs / pairs_per_s);
    both files are written as steps finish, so a process stopped at the time cap still reports them."""
    name = "steps.jsonl" if config.startswith("trl") else "metrics.jsonl"
    path = output / name
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    if config.startswith("trl"):
        return [r["seconds"] for r in rows]
    return [pairs / r["pairs_per_s"] for r in rows if "pairs_per_s" in r]


def measure(root: Path, data: Path, config: str, args: argparse.Namespace) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        output = Path(tmp)
        command = [sys.executable, __file__, "--worker", config, "--assets", str(root), "--data", str(data),
                   "--output", str(output), "--steps", str(args.steps)] + (["--cuda"] if args.cuda else [])
        env = {**os.environ, **ENV, "OMP_NUM_THREADS": str(args.threads)}
        run = run_capped(command, int(args.cap_gib * 2**30), args.time_cap, env)
        seconds = step_seconds(output, config, pairs_in(data))
    lines = [line for line in str(run["output"]).splitlines() if line.startswith("RESULT ")]
    peak = json.loads(lines[-1][7:])["peak"] if lines else run["seen"]
    if run["status"] == "failed":
        print(f"{config} on {data.name} failed:\n{str(run['output'])[-3000:]}", file=sys.stderr)
    timed = seconds[1:] or seconds   # the first step warms up
    return {"status": run["status"], "peak": peak, "steps": len(seconds),
            "step_s": min(timed) if timed else None}


def predicted(root: Path, data: Path, steps: int, cuda: bool) -> tuple[int, float]:
    """`dpo plan`'s peak (bytes) and FLOPs per step for the dpo config on `data`."""
    from dpokit.plan import plan_run

    with tempfile.TemporaryDirectory() as tmp:
        plan = plan_run(dpo_config(root, data, Path(tmp), steps, False, cuda), device="cuda" if cuda else "cpu")
    return plan.peak, sum(plan.flops.values())


def tokens_of(data: Path) -> int:
    """Tokens a step forwards once each (every prompt once, every distinct response once), from word counts."""
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    texts = {r["prompt"] for r in rows} | {r["chosen"] for r in rows} | {r["rejected"] for r in rows}
    return sum(len(t.split()) + 1 for t in texts)


def report(rows: list[dict], args: argparse.Namespace, command: str, notes: list[str] | None = None) -> str:
    gib = lambda b: f"{b / 2**30:.2f}"  # noqa: E731
    lines = ["| sweep | prompt | responses | tokens | config | status | peak GiB | `dpo plan` GiB | s / step | "
             "plan TFLOP / step | s / TFLOP |", "|---|---:|---:|---:|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        seconds, flops = r["step_s"], r.get("flops")
        per_tflop = f"{seconds / (flops / 1e12):.1f}" if seconds and flops else "-"
        peak = gib(r["peak"]) if r["status"] != "over the cap" else f"> {args.cap_gib:g}"
        warm_up_only = "*" if r["steps"] == 1 else ""
        lines.append(f"| {r['sweep']} | {r['prompt']:,} | {r['responses']} | {r['tokens']:,} | {r['config']} | "
                     f"{r['status']} | {peak} | {gib(r['plan']) if r.get('plan') else '-'} | "
                     f"{f'{seconds:.1f}{warm_up_only}' if seconds else '-'} | "
                     f"{f'{flops / 1e12:.2f}' if flops else '-'} | {per_tflop} |")
    notes = (notes or []) + growth_notes(rows, args.cap_gib)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {args.threads} threads, torch {_version('torch')}, " \
              f"transformers {_version('transformers')}, trl {_version('trl')}"
    return "\n".join([
        "## Scaling with sequence length" + (" and responses per prompt" if any(r["sweep"] == "responses" for r in rows)
                                              else "") + ": dpo vs TRL 1.16 (issue 16)", "",
        f"Command: `{command}`  ", f"Machine: {machine}; {'bf16 on CUDA' if args.cuda else 'float32 on CPU'}; "
        f"memory cap {args.cap_gib:g} GiB (resident memory, watchdog + RLIMIT_AS), time cap {args.time_cap:g} s per "
        f"config, {args.steps} steps (the first is warm-up; s / step is the fastest of the others).  ",
        f"Model: {'a tiny Qwen2 (dry run)' if args.dry_run else 'Qwen2.5-0.5B shape, 2 layers'}; "
        "tokens = each prompt and each distinct response once. `dpo plan` is the planner's prediction for the dpo "
        "config; plan TFLOP is its FLOPs model of a dpo step (the cost model time is compared against).", "",
        *lines, "", "Peak of a run stopped at the time cap: its peak so far (a lower bound). * only the first "
        "(warm-up) step finished.", "", *notes, "", f"![scaling]({PNG.name})" if not args.dry_run else ""])


def growth_notes(rows: list[dict], cap: float) -> list[str]:
    """Memory growth per 1k tokens (from the two longest rows each config finished) and the longest row each
    config finished within the memory and time caps."""
    notes = []
    for config in dict.fromkeys(r["config"] for r in rows):
        done = sorted((r for r in rows if r["config"] == config and r["sweep"] == "length" and r["status"] == "ok"),
                      key=lambda r: r["tokens"])
        if len(done) >= 2:
            a, b = done[-2], done[-1]
            slope = (b["peak"] - a["peak"]) / (b["tokens"] - a["tokens"]) * 1000
            notes.append(f"- {config}: {slope / 2**20:,.0f} MiB more per extra 1k tokens ({a['tokens']:,} -> "
                         f"{b['tokens']:,}); longest row that finished its steps within both caps: {b['tokens']:,} "
                         "tokens")
        elif done:
            notes.append(f"- {config}: longest row that finished its steps within both caps: {done[-1]['tokens']:,} "
                         "tokens")
    return notes


def plot(rows: list[dict], png: Path, cap: float) -> None:
    """Memory and seconds per step against tokens (log axes): filled markers for finished runs, hollow ones for a
    run stopped at the time cap (its peak so far: a lower bound), x at the cap for one over it, and `dpo plan`'s
    prediction dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    fig, (memory, seconds) = plt.subplots(1, 2, figsize=(11, 4.2))
    for config in dict.fromkeys(r["config"] for r in rows):
        mine = sorted((r for r in rows if r["config"] == config and r["sweep"] == "length"), key=lambda r: r["tokens"])
        ok = [r for r in mine if r["status"] == "ok"]
        line, = memory.plot([r["tokens"] for r in ok], [r["peak"] / 2**30 for r in ok], "o-", label=config)
        color = line.get_color()
        stopped = [r for r in mine if r["status"] == "over the time cap"]
        memory.plot([r["tokens"] for r in stopped], [r["peak"] / 2**30 for r in stopped], "o", color=color,
                    markerfacecolor="none", markersize=8)
        over = [r for r in mine if r["status"] == "over the cap"]
        memory.plot([r["tokens"] for r in over], [cap] * len(over), "x", color=color, markersize=10)
        planned = [r for r in mine if r.get("plan")]
        if planned:
            memory.plot([r["tokens"] for r in planned], [r["plan"] / 2**30 for r in planned], "--", color=color,
                        alpha=0.6, label=f"{config}: dpo plan")
        timed = [r for r in mine if r["step_s"]]
        seconds.plot([r["tokens"] for r in timed], [r["step_s"] for r in timed], "o-", color=color, label=config)
    memory.axhline(cap, color="grey", linestyle=":", label=f"cap {cap:g} GiB (x: over it)")
    memory.plot([], [], "o", color="grey", markerfacecolor="none", label="stopped at the time cap (peak so far)")
    lengths = sorted({r["tokens"] for r in rows if r["sweep"] == "length"})
    for axis, label in ((memory, "peak memory (GiB)"), (seconds, "seconds per step")):
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xticks(lengths, [f"{n:,}" for n in lengths])
        axis.xaxis.set_minor_formatter(NullFormatter())
        axis.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 3.0, 5.0)))
        axis.yaxis.set_major_formatter(ScalarFormatter())
        axis.yaxis.set_minor_formatter(NullFormatter())
        axis.set_xlabel("tokens per step (each prompt and response once)")
        axis.set_ylabel(label)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)
    fig.suptitle("dpo vs TRL 1.16 against sequence length, Qwen2.5-0.5B shape (2 layers)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="256,1024,4096,16384", help="prompt lengths (tokens)")
    parser.add_argument("--responses", default="2,4,8", help="responses per prompt (all pairs), at --group-prompt")
    parser.add_argument("--group-prompt", type=int, default=1024, help="prompt tokens of the responses sweep")
    parser.add_argument("--pairs", type=int, default=1, help="pairs per step in the length sweep")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated configs")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per config (the first warms up)")
    parser.add_argument("--cap-gib", type=float, default=8.0, help="memory cap per config, GiB (default 8)")
    parser.add_argument("--time-cap", type=float, default=600.0, help="seconds per config (default 600)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads per config")
    parser.add_argument("--dry-run", action="store_true", help="a tiny model and short rows, to test the script")
    parser.add_argument("--results", default=str(RESULTS), help="the RESULTS.md to write the section into")
    parser.add_argument("--png", default=str(PNG), help="where to draw the plot")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    parser.add_argument("--save-rows", help="also write the measured rows to this JSON file")
    parser.add_argument("--render", metavar="ROWS.json",
                        help="the table and plot from rows saved by --save-rows, measuring nothing")
    parser.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)
    for hidden in ("--assets", "--data", "--output"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    parser.add_argument("--cuda", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    import torch

    args.cuda = torch.cuda.is_available() and not args.dry_run
    if args.render:   # the run's own settings, so the text describes that run
        saved = json.loads(Path(args.render).read_text())
        vars(args).update(saved["settings"])
        finish(saved["rows"], args, saved["command"], saved.get("notes"))
        return
    lengths = [16] if args.dry_run else [int(x) for x in args.lengths.split(",") if x]
    responses = [3] if args.dry_run else [int(x) for x in args.responses.split(",") if x]
    response, group_prompt = (8, 16) if args.dry_run else (RESPONSE, args.group_prompt)
    if args.dry_run:
        args.steps = 2
    configs = [c for c in args.configs.split(",") if c]
    os.environ.update(ENV)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_assets(root, DRY_MODEL if args.dry_run else MODEL, lengths, responses, args.pairs, response, group_prompt)
        sweeps = [("length", length, 2, root / f"prompt-{length}.jsonl") for length in lengths]
        sweeps += [("responses", group_prompt, count, root / f"responses-{count}.jsonl") for count in responses]
        for sweep, prompt, count, data in sweeps:
            plan_peak, flops = predicted(root, data, args.steps, args.cuda)
            for config in configs:
                print(f"{config}: {data.name} ...", file=sys.stderr, flush=True)
                result = measure(root, data, config, args)
                row = {"sweep": sweep, "prompt": prompt, "responses": count, "tokens": tokens_of(data),
                       "config": config, **result, "plan": plan_peak if config == "dpo" else None,
                       "flops": flops if config.startswith("dpo") else None}
                rows.append(row)
                print(f"  {json.dumps(row)}", file=sys.stderr, flush=True)
    command = ("python benchmarks/scaling.py " + " ".join(sys.argv[1:])).strip()
    if args.save_rows:
        settings = {name: getattr(args, name) for name in RUN_SETTINGS}
        Path(args.save_rows).write_text(json.dumps({"command": command, "settings": settings, "rows": rows}, indent=1))
    finish(rows, args, command)


def finish(rows: list[dict], args: argparse.Namespace, command: str, notes: list[str] | None = None) -> None:
    text = report(rows, args, command, notes)
    print(text)
    if not args.no_write:
        plot(rows, Path(args.png), args.cap_gib)
        replace_section(Path(args.results), (START, END), text)


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


if __name__ == "__main__":
    main()
