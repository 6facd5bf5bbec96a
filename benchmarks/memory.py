"""Peak memory (RSS) of DPO training steps under each reference strategy, on the same model and batch.

    python benchmarks/memory.py             # the four configs below, each in its own subprocess; writes RESULTS.md
    python benchmarks/memory.py --jobs 4    # the same, subprocesses side by side (RSS is per process; times suffer)
    python benchmarks/memory.py --one lora  # one config, prints one JSON line
    python benchmarks/memory.py --qlora     # lora, qlora and qlora+embeddings, as glibc runs them and without heap
                                            # holes; writes its own section of RESULTS.md

Setup (issue 6): a ~106M-parameter random-init Llama (hidden 768, 8 layers, 12 heads, intermediate 2048, vocab
32000, untied embeddings, sdpa, float32, CPU, lean layers as `dpo train` uses them); one packed batch of 4 pairs
(random 32-token prompt, 32-token chosen and rejected completions); five optimizer steps (AdamW allocates its
state in the first, so the later ones are the steady state; `step (s)` is the median of steps 2-5). Each step is
the loop's (`Objective.batch_loss`): the reference's log-probs, then the policy's LM head and loss fused, backward,
clip, AdamW step, the heap's free pages handed back (`host_memory`, with its mmap threshold, as `dpo train` runs on
CPU). Each config runs in a fresh subprocess, so `ru_maxrss` is that config's own peak. Configs:

- `full+copy`: full fine-tuning, the reference a frozen copy of the policy (`ModelReference`, the default);
- `full+precomputed`: full fine-tuning, the reference log-probs precomputed (`PrecomputedReference`: a table
  indexed by pair id; the table is filled here by scoring the batch with the starting policy, and no reference
  model is kept; the precompute pass itself, run before training, is not part of the step measured);
- `lora`: LoRA r=16 on all attention and MLP linears, the reference the policy with the adapter disabled
  (`AdapterReference`, no second copy);
- `simpo`: full fine-tuning with a reference-free loss (`NoReference`: nothing loaded or run);
- `qlora`: `lora` on a 4-bit NF4 base (QLoRA, arXiv 2305.14314: `models.load_model(..., quantization=...)`,
  float32 compute), the same model saved to a temporary folder first and read back through bitsandbytes, as
  `dpo train --load-in-4bit` reads it. The embeddings and LM head (49M of the 106M parameters) stay float32;
- `qlora+embeddings`: `qlora` with the input embeddings and LM head stored in 4 bits too (`--quantize-embeddings`).

Reading a saved model maps its float32 file into memory while each layer is quantized, so the QLoRA process
peaks while loading; `step peak` is the peak from the first training step on (the kernel's high-water mark is
reset there, `/proc/self/clear_refs`), which is what training holds.

"baseline" is the RSS after importing torch, transformers and peft, before the model is built; "above baseline"
is what the training step itself costs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_md import replace_section  # noqa: E402

CONFIGS = ("full+copy", "full+precomputed", "lora", "simpo", "qlora", "qlora+embeddings")
QLORA_CONFIGS = ("lora", "qlora", "qlora+embeddings")
MODEL = dict(vocab_size=32000, hidden_size=768, num_hidden_layers=8, num_attention_heads=12, num_key_value_heads=12,
             intermediate_size=2048, tie_word_embeddings=False)
PAIRS, PROMPT, COMPLETION, STEPS, LORA_R = 4, 32, 32, 5, 16
RESULTS = Path(__file__).with_name("RESULTS.md")
START, END = "<!-- memory:start -->", "<!-- memory:end -->"
QLORA_MARKERS = ("<!-- memory-qlora:start -->", "<!-- memory-qlora:end -->")
# glibc maps every block of 1 MiB or more on its own and unmaps it when freed: no heap holes (measures them)
NO_HEAP_HOLES = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
NOTE = ("Why LoRA is not lower: it drops the reference copy, the full gradients and AdamW's two moments (4 of "
        "the 5 weight-sized buffers of full+copy), but the batch's activations and the process baseline stay; at "
        "~100M parameters they are of the order of the weights, so the ratio of total peaks sits near 0.5x while "
        "the step's own memory (above baseline) is below it; for larger models it falls toward 0.2x. "
        "full+precomputed and simpo save the reference copy only.")


def rss_mib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def reset_peak_rss() -> float:
    """The peak RSS so far, then restart the kernel's high-water mark from the current RSS."""
    peak = rss_mib()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return peak


def save_model(folder: str) -> None:
    """The benchmark's model, as `save_pretrained` writes it (what the `qlora` config reads back in 4 bits)."""
    import torch
    import transformers

    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**MODEL)).save_pretrained(folder)


def run_one(config: str, model_dir: str | None = None) -> dict[str, float | str | int]:
    """Build the model and reference for `config`, take STEPS training steps, report memory."""
    import peft  # noqa: F401  (imported before the baseline so that every config pays the same import cost)
    import torch
    import transformers

    try:
        import bitsandbytes  # noqa: F401  (the same import cost for every config, when installed)
    except ImportError:
        if config.startswith("qlora"):
            raise SystemExit("qlora needs bitsandbytes: pip install 'dpokit[quantization]'")

    from dpokit import host_memory, lean_layers, models
    from dpokit.batching import make_batch
    from dpokit.config import Config
    from dpokit.logprobs import SequenceScorer, sequence_logps
    from dpokit.objective import Objective
    from dpokit.reference import AdapterReference, ModelReference, NoReference, PrecomputedReference
    from dpokit.data.tokenization import TokenizedPair

    torch.set_num_threads(2)
    host_memory.lean_allocator()  # as `dpo train` runs on CPU (--lean-host-memory, the default)
    baseline = current_rss_mib()
    torch.manual_seed(0)
    if config.startswith("qlora"):
        assert model_dir is not None, "qlora reads the model from --model-dir"
        quantization = models.Quantization(4, embeddings=config == "qlora+embeddings")
        policy = models.load_model(model_dir, quantization=quantization)
    else:
        policy = transformers.LlamaForCausalLM(transformers.LlamaConfig(**MODEL))
        lean_layers.apply(policy)
    models.disable_dropout(policy)
    g = torch.Generator().manual_seed(1)

    def ids(n: int) -> list[int]:
        return torch.randint(3, MODEL["vocab_size"], (n,), generator=g).tolist()

    pairs = [TokenizedPair(ids(PROMPT), ids(COMPLETION), ids(COMPLETION)) for _ in range(PAIRS)]
    batch = make_batch(pairs, layout="packed", pair_ids=list(range(PAIRS)))

    loss_name = "simpo" if config == "simpo" else "sigmoid"
    if config in ("lora", "qlora", "qlora+embeddings"):
        policy = models.apply_lora(policy, r=LORA_R, alpha=2 * LORA_R, dropout=0.0, target_modules="all-linear")
        reference = AdapterReference(policy)
    elif config == "full+copy":
        reference = ModelReference(models.frozen_copy(policy))
    elif config == "full+precomputed":
        with torch.no_grad():
            start = sequence_logps(SequenceScorer(policy), batch)
        reference = PrecomputedReference({name: getattr(start, name).float() for name in
                                          ("chosen", "rejected", "chosen_lengths", "rejected_lengths")})
    else:
        reference = NoReference()
    objective = Objective.from_config(Config(loss=loss_name))
    policy.train()
    scorer = SequenceScorer(policy)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    step_times = []
    model_mib = current_rss_mib() - baseline  # weights and adapter, before AdamW allocates its state
    load_peak = reset_peak_rss()
    for _ in range(STEPS):
        began = time.perf_counter()
        objective.batch_loss(scorer, reference, batch, train=True).total.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        host_memory.release_free_memory()
        step_times.append(time.perf_counter() - began)
    step_peak = rss_mib()
    peak = max(load_peak, step_peak)
    return {"config": config, "loss": loss_name, "params_m": _logical_params(policy) / 1e6,
            "trainable_m": sum(p.numel() for p in trainable) / 1e6, "baseline_mib": baseline, "peak_mib": peak,
            "above_baseline_mib": peak - baseline, "load_peak_mib": load_peak, "model_mib": model_mib,
            "step_peak_mib": step_peak, "step_above_baseline_mib": step_peak - baseline,
            "step_s": statistics.median(step_times[1:])}


def _logical_params(model) -> int:
    """Parameters the model stands for, however they are stored (4-bit tables are buffers, not parameters)."""
    from dpokit.quantized_tables import QuantizedTable

    tables = sum(m.rows * m.width for m in model.modules() if isinstance(m, QuantizedTable))
    return sum(_numel(p) for p in model.parameters()) + tables


def _numel(param) -> int:
    """Parameters a weight stands for: a 4-bit weight packs two per byte (bitsandbytes keeps its logical shape)."""
    quant_state = getattr(param, "quant_state", None)
    return quant_state.shape.numel() if quant_state is not None else param.numel()


def run_all(jobs: int, configs: tuple[str, ...] = CONFIGS, env: dict[str, str] | None = None) -> list[dict]:
    """Each config in its own subprocess, `jobs` at a time, with `env` added to its environment; rows in `configs`
    order. The qlora config's model is saved first by a subprocess of its own, so no process holds it twice."""
    rows: dict[str, dict] = {}
    folder = tempfile.TemporaryDirectory(prefix="memory-bench-")
    if any(config.startswith("qlora") for config in configs):
        subprocess.run([sys.executable, __file__, "--save-model", folder.name], check=True, capture_output=True)
    for start in range(0, len(configs), jobs):
        running = {config: subprocess.Popen([sys.executable, __file__, "--one", config, "--model-dir", folder.name],
                                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                            env={**os.environ, **(env or {})})
                   for config in configs[start:start + jobs]}
        for config, process in running.items():
            stdout, stderr = process.communicate()
            if process.returncode != 0:
                raise SystemExit(f"{config} failed:\n{stderr[-3000:]}")
            rows[config] = json.loads(stdout.strip().splitlines()[-1])
            print(f"{config}: peak {rows[config]['peak_mib']:.0f} MiB", file=sys.stderr, flush=True)
    folder.cleanup()
    return [rows[config] for config in configs]


def table(rows: list[dict]) -> str:
    reference = next(r for r in rows if r["config"] == "full+copy")
    lines = ["| config | loss | params (M) | trainable (M) | peak RSS (MiB) | above baseline (MiB) | "
             "peak vs full+copy | above-baseline vs full+copy | step (s) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['loss']} | {r['params_m']:.1f} | {r['trainable_m']:.2f} | "
                     f"{r['peak_mib']:.0f} | {r['above_baseline_mib']:.0f} | "
                     f"{r['peak_mib'] / reference['peak_mib']:.2f}x | "
                     f"{r['above_baseline_mib'] / reference['above_baseline_mib']:.2f}x | {r['step_s']:.1f} |")
    return "\n".join(lines)


def qlora_table(rows: list[dict], heap: str) -> str:
    lora = next(r for r in rows if r["config"] == "lora")
    lines = ["| config | heap | params (M) | trainable (M) | model (MiB) | load peak (MiB) | step peak (MiB) | "
             "step above baseline (MiB) | step above baseline vs lora | step (s) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['config']} | {heap} | {r['params_m']:.1f} | {r['trainable_m']:.2f} | "
                     f"{r['model_mib']:.0f} | {r['load_peak_mib']:.0f} | {r['step_peak_mib']:.0f} | "
                     f"{r['step_above_baseline_mib']:.0f} | "
                     f"{r['step_above_baseline_mib'] / lora['step_above_baseline_mib']:.2f}x | {r['step_s']:.1f} |")
    return "\n".join(lines)


def qlora_section(rows: list[dict], unholed: list[dict]) -> str:
    """`rows`: lora, qlora and qlora+embeddings as glibc runs them; `unholed`: the same with every block of 1 MiB
    or more mapped on its own (NO_HEAP_HOLES), which takes the heap's holes out of the peak."""
    (lora, qlora, tables), (lora_nh, qlora_nh, tables_nh) = (
        [next(r for r in group if r["config"] == name) for name in QLORA_CONFIGS] for group in (rows, unholed))

    def ratio(r: dict, base: dict) -> float:
        return r["step_above_baseline_mib"] / base["step_above_baseline_mib"]

    def step_only(r: dict) -> float:
        return r["step_above_baseline_mib"] - r["model_mib"]

    holes = {r["config"]: r["step_above_baseline_mib"] - nh["step_above_baseline_mib"]
             for r, nh in zip(rows, unholed)}
    return "\n".join([
        "## Memory: QLoRA against LoRA (issue 24)",
        "",
        f"`python benchmarks/memory.py --qlora` on {platform.machine()} {platform.system()}, 2 threads, torch "
        f"{_version('torch')}, transformers {_version('transformers')}, peft {_version('peft')}, bitsandbytes "
        f"{_version('bitsandbytes')}; CPU, float32 compute. The model, batch and steps of the section above; LoRA "
        f"r={LORA_R} on all attention and MLP linears, the reference the policy with its adapter off. The base: "
        "float32 (lora); its linears 4-bit NF4 (qlora, `--load-in-4bit`); its linears, input embeddings and LM head "
        "4-bit NF4 (qlora+embeddings, `--load-in-4bit --quantize-embeddings`). Model: RSS above baseline once the "
        "model and adapter are built. Load peak: the process peak while building the model (the 4-bit configs map "
        "the float32 file while quantizing it); step peak: the peak from the first training step on. Heap `glibc`: "
        "as glibc runs; `no holes`: the same run with `MALLOC_MMAP_THRESHOLD_=1048576` (every block of 1 MiB or "
        "more mapped alone and unmapped when freed), which measures how much of the peak is free memory glibc's "
        "heap keeps between blocks still in use.",
        "",
        qlora_table(rows, "glibc"),
        "",
        qlora_table(unholed, "no holes"),
        "",
        f"**With `--quantize-embeddings`, a QLoRA step takes {ratio(tables_nh, lora_nh):.2f}x LoRA's memory above "
        f"the import baseline without heap holes (target <= 0.6x), {ratio(tables, lora):.2f}x as glibc runs by "
        f"default.** QLoRA as transformers lays it out (embeddings and head in the compute dtype): "
        f"{ratio(qlora_nh, lora_nh):.2f}x and {ratio(qlora, lora):.2f}x. Measured, not assumed:",
        "",
        "- Autograd keeps no dequantized weight. bitsandbytes 0.50's 4-bit matmul (`MatMul4Bit`) saves the packed "
        "weight and dequantizes it again in the backward pass; the tensors a QLoRA forward saves for backward are "
        "those of LoRA on the full-precision model, byte for byte (weights excluded; "
        "`tests/test_qlora.py::test_backward_keeps_no_dequantized_weight`). The lean SwiGLU calls the projections "
        "as modules.",
        "- Loading leaves nothing behind. `from_pretrained` left the float weights as views on the memory-mapped "
        "float32 checkpoint, which kept resident the full-precision linears the quantizer had read; "
        "`models.load_model` copies them into memory of their own and trims the heap after quantizing (the "
        "QLoRA step was 1.14x LoRA's before).",
        f"- The vocabulary tables. This model's input embeddings and untied LM head are 49M of its 108M "
        f"parameters, 188 MiB in float32, which transformers' bitsandbytes integration leaves unquantized: the "
        f"built qlora model takes {qlora['model_mib']:.0f} MiB against LoRA's {lora['model_mib']:.0f}. "
        "`--quantize-embeddings` stores both as 4-bit tables (`quantized_tables`: NF4 codes, a float32 scale per "
        "64 weights): a lookup dequantizes the rows it reads; the LM head multiplies 1,024 vocabulary rows at a "
        "time, dequantized into a transient slice, in the forward pass and in the backward one, inside the "
        f"chunked and fused heads' own loops. The model then takes {tables['model_mib']:.0f} MiB; the step's own "
        f"memory (activations, a chunk of logits, the adapter's gradients and AdamW states, the reference pass; no "
        f"holes) is {step_only(tables_nh):.0f} MiB against {step_only(lora_nh):.0f} for lora. Log-probs, "
        "adapter gradients, logits and greedy generations equal transformers' forward with bitsandbytes' "
        "round-tripped tables (`tests/test_quantized_tables.py`). Its cost: one dequantization of the head per "
        f"head pass (step {tables['step_s']:.2f} s against {qlora['step_s']:.2f} s for qlora, medians of steps "
        "2-5).",
        f"- Heap holes. Every 4-bit matmul dequantizes its weight into a temporary (2.25 or 6 MiB here) in the "
        f"forward pass, the reference pass and the backward pass; glibc serves these from its heap, between "
        f"activations still alive, and keeps the holes they leave: {holes['qlora+embeddings']:.0f} MiB of the "
        f"qlora+embeddings peak, {holes['qlora']:.0f} of qlora's, {holes['lora']:.0f} of lora's. "
        "`MALLOC_MMAP_THRESHOLD_=1048576 dpo train ...` maps each such block alone, so the peak is the `no holes` "
        "row, at the price of the kernel zeroing those pages again at every step (the step times above); `dpo "
        "train` keeps a threshold set in the environment (`host_memory.lean_allocator`), and otherwise fixes it at "
        "32 MiB. Three runs of this script agreed within 10 MiB on every row (scored in another order than the "
        "loop's, policy before reference, the glibc rows moved by up to ~10% between runs). On a GPU the caching "
        "allocator reuses the same blocks and none of this applies.",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", choices=CONFIGS, help="run one config in this process and print a JSON line")
    parser.add_argument("--no-write", action="store_true", help="print the table without updating RESULTS.md")
    parser.add_argument("--jobs", type=int, default=1, help="configs run side by side (step times then suffer)")
    parser.add_argument("--qlora", action="store_true", help="lora and qlora only, into their own section")
    parser.add_argument("--model-dir", help="where --one qlora reads the model (written by --save-model)")
    parser.add_argument("--save-model", metavar="DIR", help="save the benchmark's model to DIR and exit")
    args = parser.parse_args()
    if args.save_model:
        save_model(args.save_model)
        return
    if args.one:
        print(json.dumps(run_one(args.one, args.model_dir)))
        return
    if args.qlora:
        text = qlora_section(run_all(args.jobs, QLORA_CONFIGS),
                             run_all(args.jobs, QLORA_CONFIGS, NO_HEAP_HOLES))
        print(text)
        if not args.no_write:
            replace_section(RESULTS, QLORA_MARKERS, text)
        return
    rows = run_all(args.jobs)
    lora = next(r for r in rows if r["config"] == "lora")
    full = next(r for r in rows if r["config"] == "full+copy")
    text = "\n".join([
        "## Memory: peak RSS of a training step by reference strategy (issue 6)",
        "",
        f"`python benchmarks/memory.py{f' --jobs {args.jobs}' if args.jobs > 1 else ''}` "
        f"on {platform.machine()} {platform.system()}, "
        f"{platform.processor() or 'CPU'}, 2 threads, torch {_version('torch')}, transformers "
        f"{_version('transformers')}, peft {_version('peft')}; CPU, float32. ~106M-parameter random-init Llama "
        f"(hidden 768, 8 layers, vocab 32000, untied), {PAIRS} pairs x ({PROMPT}-token prompt + 2 x {COMPLETION}-token "
        f"completions), packed, {STEPS} AdamW steps; each config in its own process. Step times are noisy "
        "(shared machine).",
        "",
        table(rows),
        "",
        f"LoRA (r={LORA_R}) with the disabled-adapter reference: {lora['peak_mib'] / full['peak_mib']:.2f}x the peak "
        f"of full fine-tuning with a reference copy ({lora['above_baseline_mib'] / full['above_baseline_mib']:.2f}x "
        "above the import baseline); target <= 0.5x.",
        "",
        NOTE,
    ])
    print(text)
    if not args.no_write:
        replace_section(RESULTS, (START, END), text)


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


if __name__ == "__main__":
    main()
