"""Peak memory (RSS) of DPO training steps under each reference strategy, on the same model and batch.

    python benchmarks/memory.py             # the four configs below, each in its own subprocess; writes RESULTS.md
    python benchmarks/memory.py --jobs 4    # the same, subprocesses side by side (RSS is per process; times suffer)
    python benchmarks/memory.py --one lora  # one config, prints one JSON line

Setup (issue 6): a ~106M-parameter random-init Llama (hidden 768, 8 layers, 12 heads, intermediate 2048, vocab
32000, untied embeddings, sdpa, float32, CPU); one packed batch of 4 pairs (random 32-token prompt, 32-token
chosen and rejected completions); two optimizer steps (AdamW allocates its state in the first, so the second
is the steady state). Each step is the loop's: policy log-probs, reference log-probs, loss, backward, clip, AdamW
step. Each config runs in a fresh subprocess, so `ru_maxrss` is that config's own peak. Configs:

- `full+copy`: full fine-tuning, the reference a frozen copy of the policy (`ModelReference`, the default);
- `full+precomputed`: full fine-tuning, the reference log-probs precomputed (`PrecomputedReference`: a table
  indexed by pair id; the table is filled here by scoring the batch with the starting policy, and no reference
  model is kept; the precompute pass itself, run before training, is not part of the step measured);
- `lora`: LoRA r=16 on all attention and MLP linears, the reference the policy with the adapter disabled
  (`AdapterReference`, no second copy);
- `simpo`: full fine-tuning with a reference-free loss (`NoReference`: nothing loaded or run).

"baseline" is the RSS after importing torch, transformers and peft, before the model is built; "above baseline"
is what the training step itself costs.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = ("full+copy", "full+precomputed", "lora", "simpo")
MODEL = dict(vocab_size=32000, hidden_size=768, num_hidden_layers=8, num_attention_heads=12, num_key_value_heads=12,
             intermediate_size=2048, tie_word_embeddings=False)
PAIRS, PROMPT, COMPLETION, STEPS, LORA_R = 4, 32, 32, 2, 16
RESULTS = Path(__file__).with_name("RESULTS.md")
START, END = "<!-- memory:start -->", "<!-- memory:end -->"
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


def run_one(config: str) -> dict[str, float | str | int]:
    """Build the model and reference for `config`, take STEPS training steps, report memory."""
    import peft  # noqa: F401  (imported before the baseline so that every config pays the same import cost)
    import torch
    import transformers

    from dpokit import losses, models
    from dpokit.batching import make_batch
    from dpokit.logprobs import SequenceScorer, sequence_logps
    from dpokit.reference import AdapterReference, ModelReference, NoReference, PrecomputedReference
    from dpokit.data.tokenization import TokenizedPair

    torch.set_num_threads(2)
    baseline = current_rss_mib()
    torch.manual_seed(0)
    policy = transformers.LlamaForCausalLM(transformers.LlamaConfig(**MODEL))
    models.disable_dropout(policy)
    g = torch.Generator().manual_seed(1)

    def ids(n: int) -> list[int]:
        return torch.randint(3, MODEL["vocab_size"], (n,), generator=g).tolist()

    pairs = [TokenizedPair(ids(PROMPT), ids(COMPLETION), ids(COMPLETION)) for _ in range(PAIRS)]
    batch = make_batch(pairs, layout="packed", pair_ids=list(range(PAIRS)))

    loss_name = "simpo" if config == "simpo" else "sigmoid"
    if config == "lora":
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
    spec = losses.get(loss_name)
    policy.train()
    scorer = SequenceScorer(policy)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    step_times = []
    for _ in range(STEPS):
        began = time.perf_counter()
        policy_logps = sequence_logps(scorer, batch)
        reference_logps = reference.logps(batch)
        out = spec.function(policy_logps, reference_logps, batch.extras)
        out.losses.mean().backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_times.append(time.perf_counter() - began)
    peak = rss_mib()
    return {"config": config, "loss": loss_name, "params_m": sum(p.numel() for p in policy.parameters()) / 1e6,
            "trainable_m": sum(p.numel() for p in trainable) / 1e6, "baseline_mib": baseline, "peak_mib": peak,
            "above_baseline_mib": peak - baseline, "step_s": step_times[-1]}


def run_all(jobs: int) -> list[dict]:
    """Each config in its own subprocess, `jobs` at a time; rows in CONFIGS order."""
    rows: dict[str, dict] = {}
    for start in range(0, len(CONFIGS), jobs):
        running = {config: subprocess.Popen([sys.executable, __file__, "--one", config], stdout=subprocess.PIPE,
                                            stderr=subprocess.PIPE, text=True)
                   for config in CONFIGS[start:start + jobs]}
        for config, process in running.items():
            stdout, stderr = process.communicate()
            if process.returncode != 0:
                raise SystemExit(f"{config} failed:\n{stderr[-3000:]}")
            rows[config] = json.loads(stdout.strip().splitlines()[-1])
            print(f"{config}: peak {rows[config]['peak_mib']:.0f} MiB", file=sys.stderr, flush=True)
    return [rows[config] for config in CONFIGS]


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


def write_results(text: str) -> None:
    """Replace this benchmark's section of RESULTS.md (between its markers), keeping every other section."""
    old = RESULTS.read_text(encoding="utf-8") if RESULTS.exists() else "# Benchmark results\n"
    section = f"{START}\n{text}\n{END}"
    if START in old and END in old:
        new = old[:old.index(START)] + section + old[old.index(END) + len(END):]
    else:
        new = old.rstrip("\n") + "\n\n" + section + "\n"
    RESULTS.write_text(new, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", choices=CONFIGS, help="run one config in this process and print a JSON line")
    parser.add_argument("--no-write", action="store_true", help="print the table without updating RESULTS.md")
    parser.add_argument("--jobs", type=int, default=1, help="configs run side by side (step times then suffer)")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one)))
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
        write_results(text)


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


if __name__ == "__main__":
    main()
