"""Throughput and memory of `dpo train` against TRL 1.16 `DPOTrainer`, on the same weights and token ids.

    python benchmarks/throughput.py            # both shapes, 6 steps per config (the first is warm-up)
    python benchmarks/throughput.py --quick    # smoke run: 3 steps, short shape only

Setup (issue 5): a random-init Llama (hidden 256, 4 layers, 8 heads / 8 KV heads, intermediate 688, vocab 32000,
untied embeddings, sdpa) in float32 on CPU, or in bfloat16 with a ~0.5B-parameter Llama on CUDA when a GPU is
present; a 32000-word word-level tokenizer (BOS on the prompt, EOS on each response); one batch of 8 pairs, each
with its own random prompt, trained for N steps (the 8 pairs every step, so every config sees the same batch).
Each config runs in its own subprocess, so peak RSS is that config's own. Configs:

- `dpo`: defaults (prefix sharing + packing, completion-only chunked LM head);
- `dpo-unshared`: `--no-prefix-sharing --no-packing` (TRL's layout, our log-prob code);
- `trl`: `DPOTrainer` with beta 0.1, AdamW, linear decay, clipping 1.0, fp32 (bf16=False, no gradient
  checkpointing) and an explicit reference copy; it tokenizes the same text into the same ids.

Useful FLOPs per pair = 8 x (body params x (prompt + chosen + rejected) + head params x (chosen + rejected)):
the policy's forward + backward (6) and the reference's forward (2) over each token once. Reported as a share of
this machine's matmul peak, measured in the same run (a large square matmul in the same dtype).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {"long": (384, 64), "short": (32, 128)}  # (prompt tokens incl. BOS, mean response tokens incl. EOS)
CONFIGS = ("dpo", "dpo-unshared", "trl")
PAIRS = 8
VOCAB = 32000
CPU_MODEL = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8,
                 intermediate_size=688)
GPU_MODEL = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16,
                 intermediate_size=4096)  # 0.40B body + 2 x 33M embeddings: a ~0.5B-parameter Llama
RESULTS = Path(__file__).with_name("RESULTS.md")
START, END = "<!-- throughput:start -->", "<!-- throughput:end -->"


# ---- assets: tokenizer, model, data ---------------------------------------------------------------------------


def build_assets(root: Path, cuda: bool) -> None:
    """Write the word-level tokenizer, the random-init model and one JSONL file of 8 pairs per shape."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>"] + [f"w{i}" for i in range(3, VOCAB)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(root / "model")
    shape = GPU_MODEL if cuda else CPU_MODEL
    config = LlamaConfig(vocab_size=VOCAB, tie_word_embeddings=False, max_position_embeddings=1024,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, **shape)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(root / "model", safe_serialization=True)
    rng = random.Random(0)
    text = lambda n: " ".join(f"w{rng.randrange(3, VOCAB)}" for _ in range(n))  # noqa: E731
    for name, (prompt_len, response_len) in SHAPES.items():
        rows = []
        for _ in range(PAIRS):
            lengths = [rng.randint(round(0.75 * response_len), round(1.25 * response_len)) for _ in range(2)]
            # BOS and EOS are added by tokenization (ours and TRL's), hence the -1s.
            rows.append({"prompt": text(prompt_len - 1), "chosen": " " + text(lengths[0] - 1),
                         "rejected": " " + text(lengths[1] - 1)})
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def shape_counts(root: Path, shape: str) -> dict[str, float]:
    """Token counts of the shape's data (word count + BOS / EOS), for FLOPs and the forwarded-token prediction."""
    rows = [json.loads(line) for line in (root / f"{shape}.jsonl").read_text().splitlines()]
    prompt = [len(r["prompt"].split()) + 1 for r in rows]
    chosen = [len(r["chosen"].split()) + 1 for r in rows]
    rejected = [len(r["rejected"].split()) + 1 for r in rows]
    longest = max(p + max(c, r) for p, c, r in zip(prompt, chosen, rejected))
    return {"prompt": sum(prompt), "completion": sum(chosen) + sum(rejected),
            "shared": sum(prompt) + sum(chosen) + sum(rejected),            # prompt once per pair, no padding
            "unshared": 2 * len(rows) * longest}                            # 2 rows per pair, padded


def model_params(root: Path) -> tuple[int, int]:
    """(non-embedding body parameters, LM-head parameters) of the benchmark model."""
    config = json.loads((root / "model" / "config.json").read_text())
    h, i, n = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    kv = h * config["num_key_value_heads"] // config["num_attention_heads"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h                  # q,o + k,v + MLP + two RMSNorms
    return n * per_layer + h, h * config["vocab_size"]                      # + final norm; head


def matmul_peak(device: str, dtype_name: str) -> float:
    """FLOP/s of a large square matmul: the machine's practical matmul peak for this dtype."""
    import torch

    dtype = getattr(torch, dtype_name)
    n = 8192 if device == "cuda" else 2048
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = 0.0
    for _ in range(3):
        repeats = 20 if device == "cuda" else 3
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * n**3 * repeats / (time.perf_counter() - start))
    return best


# ---- workers: one config each, in their own process -----------------------------------------------------------


def run_dpo(root: Path, shape: str, steps: int, unshared: bool, cuda: bool) -> dict[str, object]:
    from dpokit import loop
    from dpokit.config import Config

    flags = dict(prefix_sharing=False, packing=False) if unshared else {}
    cfg = Config(model=str(root / "model"), data=str(root / f"{shape}.jsonl"), batch_size=PAIRS, max_steps=steps,
                 eval_fraction=0.0, lr=1e-6, beta=0.1, lr_schedule="linear", max_grad_norm=1.0, cache=False,
                 output=str(root / f"out-{shape}-{int(unshared)}"), progress=False,
                 dtype="bfloat16" if cuda else "float32", device="cuda" if cuda else "cpu", **flags)
    loop.train(cfg)
    rows = [json.loads(line) for line in (Path(cfg.output) / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "pairs_per_s" in r]
    return {"step_s": [PAIRS / r["pairs_per_s"] for r in rows], "logps_chosen": rows[0]["logps/chosen"]}


def run_trl(root: Path, shape: str, steps: int, cuda: bool) -> dict[str, object]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    dtype = torch.bfloat16 if cuda else torch.float32
    model = AutoModelForCausalLM.from_pretrained(root / "model", dtype=dtype, attn_implementation="sdpa")
    ref_model = AutoModelForCausalLM.from_pretrained(root / "model", dtype=dtype, attn_implementation="sdpa")
    tokenizer = AutoTokenizer.from_pretrained(root / "model")
    rows = [json.loads(line) for line in (root / f"{shape}.jsonl").read_text().splitlines()]
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001, ANN003
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN003
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.start)

    args = DPOConfig(output_dir=str(root / f"trl-{shape}"), per_device_train_batch_size=PAIRS, max_steps=steps,
                     learning_rate=1e-6, beta=0.1, lr_scheduler_type="linear", max_grad_norm=1.0,
                     optim="adamw_torch", bf16=cuda, gradient_checkpointing=False, logging_steps=1,
                     report_to=[], save_strategy="no", use_cpu=not cuda, max_length=1024, seed=0,
                     dataloader_num_workers=0, disable_tqdm=True)
    trainer = DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer, callbacks=[Timer()])
    trainer.train()
    first = next(h for h in trainer.state.log_history if "logps/chosen" in h)
    return {"step_s": times, "logps_chosen": first["logps/chosen"]}


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.manual_seed(0)
    root = Path(args.assets)
    if args.worker == "trl":
        result = run_trl(root, args.shape, args.steps, args.cuda)
    else:
        result = run_dpo(root, args.shape, args.steps, args.worker == "dpo-unshared", args.cuda)
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.cuda:
        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    print("RESULT " + json.dumps(result), flush=True)


# ---- driver ---------------------------------------------------------------------------------------------------


def measure(root: Path, shape: str, config: str, steps: int, cuda: bool) -> dict[str, object]:
    command = [sys.executable, __file__, "--worker", config, "--shape", shape, "--steps", str(steps),
               "--assets", str(root)] + (["--cuda"] if cuda else [])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled"}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise SystemExit(f"{config} on {shape} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def report(results: dict[str, dict[str, dict]], counts: dict[str, dict], params: tuple[int, int], peak: float,
           command: str, cuda: bool) -> str:
    body, head = params
    lines = ["| shape | config | pairs/s | tokens/s | x TRL pairs/s | peak RSS MiB | x TRL RSS | "
             "logps/chosen step 1 | rel. diff vs TRL | useful TFLOP/s | % matmul peak |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for shape, by_config in results.items():
        c = counts[shape]
        flops_per_pair = 8 * (body * c["shared"] + head * c["completion"]) / PAIRS
        tokens_per_pair = c["shared"] / PAIRS
        trl = by_config.get("trl")
        # Fastest step after the first (warm-up) one: other processes on the machine only ever add time.
        speed = {config: PAIRS / min(r["step_s"][1:] or r["step_s"]) for config, r in by_config.items()}
        memory = {config: r.get("peak_gpu_mib", r["peak_rss_mib"]) for config, r in by_config.items()}
        for config, r in by_config.items():
            pairs_s = speed[config]
            versus_speed = f"{pairs_s / speed['trl']:.2f}" if trl else "-"
            versus_memory = f"{memory[config] / memory['trl']:.2f}" if trl else "-"
            rel = f"{abs(r['logps_chosen'] - trl['logps_chosen']) / abs(trl['logps_chosen']):.1e}" if trl else "-"
            lines.append(
                f"| {shape} | {config} | {pairs_s:.3f} | {pairs_s * tokens_per_pair:,.0f} | {versus_speed} | "
                f"{memory[config]:,.0f} | {versus_memory} | {r['logps_chosen']:.4f} | {rel} | "
                f"{pairs_s * flops_per_pair / 1e12:.3f} | {100 * pairs_s * flops_per_pair / peak:.0f}% |")
        if "dpo" in speed and "dpo-unshared" in speed:
            notes.append(f"- {shape}: sharing vs `--no-prefix-sharing --no-packing` measured "
                         f"{speed['dpo'] / speed['dpo-unshared']:.2f}x; forwarded tokens predict "
                         f"{c['unshared'] / c['shared']:.2f}x ({c['unshared']:,} padded tokens in 16 rows vs "
                         f"{c['shared']:,} in the shared layout); counting the LM head, which both score only at "
                         f"the {c['completion']:,} completion tokens, FLOPs predict "
                         f"{(body * c['unshared'] + head * c['completion']) / (body * c['shared'] + head * c['completion']):.2f}x")
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
               f"{__import__('torch').__version__}" + (f", {__import__('torch').cuda.get_device_name()}" if cuda else ""))
    dtype = "bfloat16" if cuda else "float32"
    return "\n".join([
        f"### Throughput vs TRL 1.16 ({'GPU' if cuda else 'CPU'}, {dtype})", "",
        f"Command: `{command}`  ", f"Machine: {machine}; {dtype} matmul peak measured in this run: "
        f"{peak / 1e12:.3f} TFLOP/s.  ",
        f"Model: random-init Llama, {body / 1e6:.2f}M body + {head / 1e6:.2f}M head parameters; batch of {PAIRS} "
        "pairs; memory is peak RSS (peak GPU memory on CUDA), each config in its own process; tokens/s counts "
        "each pair's prompt + chosen + rejected tokens once (the same work for every config); step 1 is warm-up "
        "and not timed (fastest of the others).", "",
        *lines, "", *notes, ""])


def write_section(section: str, device: str) -> None:
    """Put `section` in RESULTS.md between the throughput markers, in the sub-block of `device` (cpu or gpu),
    keeping the other device's sub-block and every other section of the file."""
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    if START not in text or END not in text:
        text = text.rstrip("\n") + f"\n\n{START}\n## Throughput (`benchmarks/throughput.py`)\n{END}\n"
    head, rest = text.split(START, 1)
    inner, tail = rest.split(END, 1)
    start, end = f"<!-- {device}:start -->", f"<!-- {device}:end -->"
    block = f"{start}\n{section}{end}"
    if start in inner and end in inner:
        inner = inner[:inner.index(start)] + block + inner[inner.index(end) + len(end):]
    else:
        inner = inner.rstrip("\n") + f"\n\n{block}\n"
    RESULTS.write_text(head + START + inner + END + tail)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 steps, short shape only")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per config (first is warm-up)")
    parser.add_argument("--shapes", default=None, help="comma-separated shapes (long,short)")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated configs")
    parser.add_argument("--no-write", action="store_true", help="print the table only, leave RESULTS.md alone")
    parser.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    parser.add_argument("--assets", help=argparse.SUPPRESS)
    parser.add_argument("--cuda", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    import torch

    cuda = torch.cuda.is_available()
    steps = args.steps or (3 if args.quick else 6)
    shapes = (args.shapes or ("short" if args.quick else "long,short")).split(",")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_assets(root, cuda)
        counts = {shape: shape_counts(root, shape) for shape in shapes}
        params = model_params(root)
        peaks = [matmul_peak("cuda" if cuda else "cpu", "bfloat16" if cuda else "float32")]
        results: dict[str, dict[str, dict]] = {}
        for shape in shapes:
            for config in args.configs.split(","):
                print(f"running {config} on {shape} ...", file=sys.stderr, flush=True)
                results.setdefault(shape, {})[config] = measure(root, shape, config, steps, cuda)
                print(f"  {json.dumps(results[shape][config])}", file=sys.stderr, flush=True)
        peaks.append(matmul_peak("cuda" if cuda else "cpu", "bfloat16" if cuda else "float32"))
    command = "python benchmarks/throughput.py " + " ".join(sys.argv[1:])
    section = report(results, counts, params, max(peaks), command.strip(), cuda)
    print(section)
    if not cuda:
        section += ("\nGPU (bf16, ~0.5B-parameter Llama, both shapes): not run yet. On a machine with CUDA the same "
                    "command runs it and reports tokens/s and MFU against the bf16 matmul peak.\n")
    if not args.no_write and not args.quick:
        write_section(section, "gpu" if cuda else "cpu")


if __name__ == "__main__":
    main()
