"""`dpo plan` against measurement: real `dpo train` runs on this machine, predicted vs measured peak memory.

    python benchmarks/plan_check.py                  # every config below; writes the plan_check block of RESULTS.md
    python benchmarks/plan_check.py --configs qwen-1k,lora-4k-ckpt --no-write
    python benchmarks/plan_check.py --assets /tmp/plan-assets   # keep the models and data between runs

Each config runs `dpo train` (2 optimizer steps, so AdamW's states exist in the second; no held-out pairs) in its
own process (two gloo processes under torchrun for the `x2` configs), which reports its peak resident memory
(VmHWM) at exit; under torchrun the largest of its workers counts. `dpo plan` is given the same flags. The
import floor (a process that imports what `dpo train` imports, before any model) is measured too: "above floor"
compares the part of the peak the run's settings cause, which is what the plan's parts other than the framework
predict. Target: within 15% for each config.

Models (random init, saved with save_pretrained, word-level tokenizers of their vocabulary):
- `qwen`: Qwen2.5-0.5B's vocabulary, width and attention (vocab 151,936, hidden 896, 14 / 2 KV heads, MLP 4,864,
  tied embeddings) with 2 layers;
- `llama`: vocab 32,000, hidden 512, 8 / 8 heads, MLP 1,376, 4 layers, untied.
Data: 4 pairs per file, prompts of 256, 1,024 or 4,096 tokens and two 256-token responses.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_md import replace_section  # noqa: E402
from word_tokenizer import save_word_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).with_name("RESULTS.md")
START, END = "<!-- plan_check:start -->", "<!-- plan_check:end -->"
MODELS = {
    "qwen": dict(model_type="qwen2", vocab_size=151936, hidden_size=896, num_hidden_layers=2, num_attention_heads=14,
                 num_key_value_heads=2, intermediate_size=4864, tie_word_embeddings=True),
    "llama": dict(model_type="llama", vocab_size=32000, hidden_size=512, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=8, intermediate_size=1376, tie_word_embeddings=False),
}
LENGTHS = {"256": 256, "1k": 1024, "4k": 4096}
RESPONSE = 256
PAIRS = 4

# name: (model, prompt length, processes, dpo train flags)
CONFIGS: dict[str, tuple[str, str, int, list[str]]] = {
    "demo": ("tiny", "synthetic", 1, []),   # `dpo train`'s own default job: the tiny preset on the built-in task
    "qwen-256": ("qwen", "256", 1, ["--batch-size", "2"]),
    "qwen-1k": ("qwen", "1k", 1, ["--batch-size", "2"]),
    "qwen-4k": ("qwen", "4k", 1, ["--batch-size", "1"]),
    "qwen-4k-ckpt": ("qwen", "4k", 1, ["--batch-size", "1", "--gradient-checkpointing"]),
    "lora-1k": ("qwen", "1k", 1, ["--batch-size", "2", "--lora-r", "16"]),
    "lora-4k-ckpt": ("qwen", "4k", 1, ["--batch-size", "1", "--lora-r", "16", "--gradient-checkpointing"]),
    "precompute-1k": ("qwen", "1k", 1, ["--batch-size", "2", "--precompute-ref"]),
    "simpo-1k": ("qwen", "1k", 1, ["--batch-size", "2", "--loss", "simpo"]),
    "budget-1k": ("qwen", "1k", 1, ["--batch-size", "2", "--micro-batch-tokens", "1536"]),
    "qlora-1k": ("qwen", "1k", 1, ["--batch-size", "2", "--lora-r", "16", "--load-in-4bit"]),
    "llama-1k": ("llama", "1k", 1, ["--batch-size", "4"]),
    "llama-lora-1k": ("llama", "1k", 1, ["--batch-size", "4", "--lora-r", "16"]),
    "llama-qlora-1k": ("llama", "1k", 1, ["--batch-size", "4", "--lora-r", "16", "--load-in-4bit"]),
    "qlora-tables-1k": ("qwen", "1k", 1, ["--batch-size", "2", "--lora-r", "16", "--load-in-4bit",
                                          "--quantize-embeddings"]),
    "llama-qlora-tables-1k": ("llama", "1k", 1, ["--batch-size", "4", "--lora-r", "16", "--load-in-4bit",
                                                 "--quantize-embeddings"]),
    "llama-256-bf16": ("llama", "256", 1, ["--batch-size", "2", "--dtype", "bfloat16"]),
    "llama-1k-unshared": ("llama", "1k", 1, ["--batch-size", "2", "--no-prefix-sharing", "--no-packing"]),
    "llama-256-ddp-x2": ("llama", "256", 2, ["--batch-size", "2"]),
    "llama-256-fsdp-x2": ("llama", "256", 2, ["--batch-size", "2", "--fsdp"]),
}
NOTES = ("What the measurements taught the model (each a named part of `src/dpokit/plan.py`): the LM head holds one "
         "chunk of logits at a time (each freed before the next is made), with a float32 head "
         "gradient from the head's pass to the end of the backward pass; a tied embedding's gradient is a second "
         "vocab x hidden tensor at the end of the backward pass; `--precompute-ref` and reference-free losses free the "
         "reference copy, and the starting weights kept for the end-of-run report wait in a temporary file, outside "
         "the process's memory; with several micro-batches, glibc keeps the "
         "previous micro-batch's freed activations until the step's `malloc_trim`; FSDP2's root group (embeddings, "
         "head) is gathered whole for the policy and stays gathered for the reference. Loading a tokenizer and a "
         "model leaves ~190 MiB resident whatever their size (imports of the modeling code, safetensors).")
ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled"}
GiB = 2**30


def build_assets(root: Path) -> None:
    """The models (config + random weights), their tokenizers and one JSONL file per prompt length and model."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    for name, shape in MODELS.items():
        folder = root / name
        if (folder / "config.json").is_file():
            continue
        vocab = shape["vocab_size"]
        # In its own folder: next to a Qwen2 config, AutoTokenizer would load Qwen2's byte-level tokenizer.
        save_word_tokenizer(vocab, root / f"{name}-tokenizer")
        config = AutoConfig.for_model(**shape, max_position_embeddings=8192, bos_token_id=1, eos_token_id=2,
                                      pad_token_id=0)
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(folder, safe_serialization=True)
        rng = random.Random(0)
        text = lambda n: " ".join(f"w{rng.randrange(3, vocab)}" for _ in range(n))  # noqa: E731
        for label, length in LENGTHS.items():   # BOS and EOS are added by tokenization: 256 + 1 + 255 + 1
            rows = [{"prompt": text(length - 1), "chosen": " " + text(RESPONSE - 1),
                     "rejected": " " + text(RESPONSE - 1)} for _ in range(PAIRS)]
            (root / f"{name}-{label}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def train_args(root: Path, config: str, output: Path) -> list[str]:
    model, prompt, _, flags = CONFIGS[config]
    data = (["--model", model] if prompt == "synthetic" else
            ["--model", str(root / model), "--tokenizer", str(root / f"{model}-tokenizer"), "--data",
             str(root / f"{model}-{prompt}.jsonl")])
    return [*data, "--max-steps", "2", "--eval-fraction", "0", "--no-cache", "--no-progress", "--max-length", "8192",
            "--max-prompt-length", "8192", "--output", str(output), "--overwrite-output", "--device", "cpu", *flags]


# Each measured process prints its own peak at exit: /proc/self/status's VmHWM (the high-water mark of its memory
# map since exec). wait4's ru_maxrss would not do: a child starts from the parent's high-water mark at fork.
PEAK_WRAPPER = """import atexit, sys
def _peak():
    with open("/proc/self/status") as f:
        kib = next(line.split()[1] for line in f if line.startswith("VmHWM:"))
    print(f"PEAK_RSS {int(kib) * 1024}", file=sys.stderr, flush=True)
atexit.register(_peak)
mode = sys.argv.pop(1)
if mode == "imports":
    import dpokit.cli, dpokit.loop
else:
    from dpokit.cli import main
    main(sys.argv[1:])
"""


def run_peak(command: list[str], threads: int) -> tuple[int, str]:
    """Run `command` (which runs PEAK_WRAPPER); the largest peak its processes print, and its output."""
    env = {**os.environ, **ENV, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
    output = done.stdout + done.stderr
    peaks = [int(line.split()[-1]) for line in output.splitlines() if line.startswith("PEAK_RSS ")]
    if done.returncode or not peaks:
        raise SystemExit(f"{' '.join(command[:6])} ... failed ({done.returncode}):\n{output[-3000:]}")
    return max(peaks), output


def measure(root: Path, config: str, threads: int) -> dict[str, float]:
    """Run `dpo train` for `config` in its own process(es); peak RSS (bytes) and wall seconds."""
    processes = CONFIGS[config][2]
    with tempfile.TemporaryDirectory() as out:
        wrapper = Path(out) / "peak_wrapper.py"
        wrapper.write_text(PEAK_WRAPPER)
        args = ["train", *train_args(root, config, Path(out) / "run")]
        launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
                    if processes > 1 else [sys.executable])
        began = time.perf_counter()
        peak, _ = run_peak([*launcher, str(wrapper), "run", *args], max(1, threads // processes))
    return {"peak": peak, "seconds": time.perf_counter() - began}


def import_floor() -> int:
    """Peak RSS of a process that imports what `dpo train` imports before any model or data (peft, imported for
    LoRA only, is a part of the plan)."""
    with tempfile.TemporaryDirectory() as out:
        wrapper = Path(out) / "peak_wrapper.py"
        wrapper.write_text(PEAK_WRAPPER)
        return run_peak([sys.executable, str(wrapper), "imports"], 1)[0]


def predict(root: Path, config: str) -> dict[str, object]:
    from dpokit.config import Config
    from dpokit.plan import FRAMEWORK_CPU, plan_run

    with tempfile.TemporaryDirectory() as out:
        cfg = Config.from_args(train_args(root, config, Path(out) / "run"))
        plan = plan_run(cfg, nproc=CONFIGS[config][2], device="cpu")
    return {"peak": plan.peak, "phase": plan.peak_phase, "floor": FRAMEWORK_CPU,
            "parts": {name: part.bytes for name, part in plan.parts.items() if part.bytes}}


@dataclass
class Row:
    """One config: the plan's peak (and its framework constant) and the measured peak, in bytes."""

    config: str
    predicted: int
    measured: int
    plan_floor: int
    phase: str
    seconds: float

    def error(self) -> float:
        return (self.predicted - self.measured) / self.measured

    def error_above(self, floor: int) -> float:
        """Error of the part above the import floor: the plan's framework constant, the measured floor."""
        return ((self.predicted - self.plan_floor) - (self.measured - floor)) / (self.measured - floor)


def table(rows: list[Row], floor: int) -> str:
    lines = ["| config | flags | predicted GiB | measured GiB | error | predicted above floor | measured above floor | "
             "error above floor | peak phase (plan) | seconds |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |"]
    for r in rows:
        model, prompt, processes, flags = CONFIGS[r.config]
        shown = " ".join(flags) + (f" (torchrun x{processes})" if processes > 1 else "") or "(defaults)"
        prompt_text = f"prompt {LENGTHS[prompt]:,}" if prompt in LENGTHS else "the built-in task"
        lines.append(f"| {r.config} | {model}, {prompt_text}, `{shown}` | {r.predicted / GiB:.2f} | "
                     f"{r.measured / GiB:.2f} | {100 * r.error():+.1f}% | {(r.predicted - r.plan_floor) / GiB:.2f} | "
                     f"{(r.measured - floor) / GiB:.2f} | {100 * r.error_above(floor):+.1f}% | {r.phase} | "
                     f"{r.seconds:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated configs (default: all)")
    parser.add_argument("--assets", help="folder for the models and data (default: a temporary folder)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads per config (default: 2)")
    parser.add_argument("--no-write", action="store_true", help="print the table, leave RESULTS.md alone")
    parser.add_argument("--measurements", help="JSON file of measured peaks: configs found there are not run again "
                                               "(re-predict after changing the plan), new ones are added")
    args = parser.parse_args()
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configs {unknown}; choose from {', '.join(CONFIGS)}")
    os.environ.update(ENV)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.assets or tmp)
        root.mkdir(parents=True, exist_ok=True)
        build_assets(root)
        stored = Path(args.measurements) if args.measurements else None
        known = json.loads(stored.read_text()) if stored and stored.is_file() else {}
        if "import floor" not in known:
            known["import floor"] = {"peak": import_floor(), "seconds": 0.0}
        floor = int(known["import floor"]["peak"])
        print(f"import floor: {floor / 2**20:.0f} MiB", file=sys.stderr, flush=True)
        rows = []
        for config in configs:
            predicted = predict(root, config)
            if config not in known:
                known[config] = measure(root, config, args.threads)
                if stored:
                    stored.write_text(json.dumps(known, indent=1))
            measured = known[config]
            rows.append(Row(config, predicted["peak"], measured["peak"], predicted["floor"], predicted["phase"],
                            measured["seconds"]))
            print(f"{config}: predicted {predicted['peak'] / GiB:.2f} GiB ({predicted['phase']}), measured "
                  f"{measured['peak'] / GiB:.2f} GiB in {measured['seconds']:.0f}s; parts (MiB) "
                  + json.dumps({k: round(v / 2**20) for k, v in predicted["parts"].items()}), file=sys.stderr,
                  flush=True)
    errors, above = [abs(r.error()) for r in rows], [abs(r.error_above(floor)) for r in rows]
    subset = "" if len(configs) == len(CONFIGS) else " --configs " + ",".join(configs)
    cached = " --measurements " + Path(args.measurements).name if args.measurements else ""
    text = "\n".join([
        "## `dpo plan` against measured peak memory (issue 16)", "",
        f"Command: `python benchmarks/plan_check.py{subset}{cached}`  ",
        f"Machine: {platform.machine()} {platform.system()}, {os.cpu_count()} cores, {args.threads} threads per "
        f"config, torch {_version('torch')}, transformers {_version('transformers')}, peft {_version('peft')}; CPU, "
        "float32 unless the flags say bfloat16; peak RSS of the `dpo train` process (2 steps), the largest worker "
        f"under torchrun; import floor measured {floor / 2**20:.0f} MiB (the plan's constant: "
        f"{rows[0].plan_floor / 2**20:.0f} MiB)."
        + (" Measured peaks were kept in a `--measurements` file across runs of this script (each config measured "
           "once; seconds are that run's, on a machine shared with other jobs); the predictions are the current "
           "plan.py's." if args.measurements else ""), "",
        table(rows, floor), "", NOTES, "",
        f"Largest error: {100 * max(errors):.1f}% of the peak, {100 * max(above):.1f}% of the peak above the import "
        f"floor; within 15%: {sum(e <= 0.15 for e in errors)} of {len(rows)} (peak), {sum(e <= 0.15 for e in above)} "
        f"of {len(rows)} (above floor).",
    ])
    print(text)
    if not args.no_write:
        replace_section(RESULTS, (START, END), text)


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


if __name__ == "__main__":
    main()
