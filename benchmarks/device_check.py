"""One prepared check for a lent GPU machine (issue 15): install offline, run `pytest -m gpu`, then measure
`dpo train` against TRL 1.16 `DPOTrainer` in bfloat16 and write the GPU block of benchmarks/RESULTS.md.

    make device-wheels                              # here, once: TRL, datasets, bitsandbytes wheels into .whl/
    python3 benchmarks/device_check.py              # there, with `carry: [".whl"]`: about 8 minutes
    python3 benchmarks/device_check.py --skip-tests --models qwen2.5-0.5b-shape \
        --configs dpo-qlora,dpo-qlora-tables,trl-qlora --results benchmarks/RESULTS-qlora.md   # QLoRA (issue 24)
    python benchmarks/device_check.py --dry-run     # the whole path on CPU, tiny shapes and models (CI)

The machine reaches no package registry: the project installs with `pip install --no-index --no-deps
--no-build-isolation -e .` on the torch it finds, and TRL, datasets, dill, multiprocess and bitsandbytes (all it
lacks) come from .whl/ (45 MiB) into a folder on PYTHONPATH. Each stage prints its seconds; a stage that fails is reported and the
next one runs, so one call returns every number it can.

Models (random init, saved once): a ~0.5B Llama (hidden 1024, 24 layers, 16 heads, vocab 32000, untied) and a
Qwen2.5-0.5B-shaped model (hidden 896, 24 layers, 14 query / 2 KV heads, vocab 151,936, tied embeddings).
Shapes (tokens, BOS and EOS included): long, 8 pairs of a 384-token prompt and two ~64-token responses; short, 8
pairs of 32 + 2 x ~128; many, one 512-token prompt with 8 responses of ~128 and all 28 pairs between them.
Configs: `dpo` (the attention `accelerator.choose_attention` picks: flex_attention on CUDA), `dpo-sdpa`
(block-by-block sdpa, the A/B of the kernel) and `trl` (bf16, sdpa, explicit reference copy; TRL 1.16 turns
`padding_free` off with a warning, so padded batches are its best here). QLoRA (issue 24): `dpo-qlora`
(`--lora-r 16 --load-in-4bit`, NF4, bf16 compute), `dpo-qlora-tables` (and `--quantize-embeddings`) and
`trl-qlora` (TRL with the same `BitsAndBytesConfig` and a `LoraConfig` of r 16, alpha 16, all linears, its
reference the disabled adapter); their "x TRL" columns are against `trl-qlora`. Each config runs in its own
process over the three shapes, step 1 untimed (compilation), the fastest later step reported.

tokens/s counts each pair's prompt + chosen + rejected once (the same for every config). MFU counts the work a
layout cannot avoid: 8 x (body params x distinct tokens + head params x distinct completion tokens), i.e. policy
forward + backward and the reference's forward over each distinct prompt and response once, against the bf16
matmul peak measured in this run; for the QLoRA configs 6 x, as no weight gradient is taken (the 4-bit weights'
dequantization is not counted as work).
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
START, END = "<!-- device_check:start -->", "<!-- device_check:end -->"
CONFIGS = ("dpo", "dpo-sdpa", "trl", "dpo-qlora", "dpo-qlora-tables", "trl-qlora")
DEFAULT_CONFIGS = ("dpo", "dpo-sdpa", "trl")
LORA_R = 16

# name: (prompt tokens, response tokens, responses per prompt, prompts); `many` pairs all responses of a prompt.
SHAPES = {"long": (384, 64, 2, 8), "short": (32, 128, 2, 8), "many": (512, 128, 8, 1)}
DRY_SHAPES = {"long": (24, 6, 2, 3), "short": (4, 10, 2, 3), "many": (24, 8, 4, 1)}
MODELS = {
    "llama-0.5b": ("llama", dict(vocab_size=32000, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                 num_attention_heads=16, num_key_value_heads=16, tie_word_embeddings=False)),
    "qwen2.5-0.5b-shape": ("qwen2", dict(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                                         tie_word_embeddings=True, rope_theta=1e6)),
}
DRY_MODELS = {
    "llama-tiny": ("llama", dict(vocab_size=500, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)),
    "qwen2-tiny": ("qwen2", dict(vocab_size=700, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)),
}


# ---- stages ---------------------------------------------------------------------------------------------------


def run(command: list[str], env: dict[str, str] | None = None, timeout: float | None = None) -> int:
    print("$ " + " ".join(command), flush=True)
    try:
        return subprocess.run(command, cwd=ROOT, env=env, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        print(f"timed out after {timeout:.0f} s", flush=True)
        return 124


def install(dry_run: bool, site: Path) -> dict[str, str]:
    """The carried wheels into `site`, then this project, editable, without a registry; the environment that
    the later stages run in."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-index",
           "--no-deps"] + (["--dry-run"] if dry_run else [])
    wheels = sorted((ROOT / ".whl").glob("*.whl"))
    if wheels and not dry_run:
        run(pip + ["--no-compile", "--target", str(site)] + [str(w) for w in wheels])
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    # No build isolation: an isolated build would fetch setuptools from the registry the machine cannot reach.
    run(pip + ["--no-build-isolation", "-e", str(ROOT)], env)
    return env


def build_assets(root: Path, models: dict, shapes: dict, cuda: bool) -> None:
    """A word-level tokenizer (in its own folder: next to a Qwen2 config, AutoTokenizer would load it as Qwen2's
    byte-level tokenizer), a random-init model per model name, and one JSONL file per shape."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models as token_models, pre_tokenizers, processors

    words_count = min(32000, *(shape["vocab_size"] for _, shape in models.values()))
    words = ["<pad>", "<s>", "</s>"] + [f"w{i}" for i in range(3, words_count)]
    tok = Tokenizer(token_models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                               pad_token="<pad>")
    for name, (family, shape) in models.items():
        config_class = getattr(transformers, {"llama": "LlamaConfig", "qwen2": "Qwen2Config"}[family])
        model_class = getattr(transformers, {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[family])
        config = config_class(max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, pad_token_id=0, **shape)
        torch.manual_seed(0)
        with torch.device("cuda" if cuda else "cpu"):
            model_class(config).save_pretrained(root / name, safe_serialization=True)
    fast.save_pretrained(root / "tokenizer")
    rng = random.Random(0)
    text = lambda n: " ".join(f"w{rng.randrange(3, words_count)}" for _ in range(n - 1))  # noqa: E731  BOS/EOS
    for shape, (prompt_len, response_len, responses, prompts) in shapes.items():
        rows = []
        for _ in range(prompts):
            prompt = text(prompt_len)
            answers = [" " + text(rng.randint(round(0.75 * response_len), round(1.25 * response_len)))
                       for _ in range(responses)]
            rows += [{"prompt": prompt, "chosen": answers[i], "rejected": answers[j]}
                     for i in range(responses) for j in range(i + 1, responses)]
        (root / f"{shape}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def work(root: Path, shape: str) -> dict[str, float]:
    """Token counts of a shape: per pair (prompt + chosen + rejected) and distinct (each prompt and response
    once), from the word counts plus BOS / EOS."""
    rows = [json.loads(line) for line in (root / f"{shape}.jsonl").read_text().splitlines()]
    length = lambda text: len(text.split()) + 1  # noqa: E731
    prompts = {r["prompt"] for r in rows}
    responses = {(r["prompt"], side) for r in rows for side in (r["chosen"], r["rejected"])}
    return {"pairs": len(rows), "pair_tokens": sum(length(r["prompt"]) + length(r["chosen"]) + length(r["rejected"])
                                                  for r in rows),
            "distinct": sum(map(length, prompts)) + sum(length(s) for _, s in responses),
            "distinct_completion": sum(length(s) for _, s in responses)}


def parameters(model_dir: Path) -> tuple[int, int]:
    """(body parameters without embeddings, LM-head parameters)."""
    config = json.loads((model_dir / "config.json").read_text())
    h, i, n = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    kv = config.get("head_dim") or h // config["num_attention_heads"]
    kv *= config["num_key_value_heads"]
    return n * (2 * h * h + 2 * h * kv + 3 * h * i + 2 * h) + h, h * config["vocab_size"]


def matmul_peak(cuda: bool) -> float:
    """FLOP/s of a large square matmul in the benchmark's dtype: the practical peak MFU is measured against."""
    import torch

    n, dtype = (8192, torch.bfloat16) if cuda else (1024, torch.float32)
    device = "cuda" if cuda else "cpu"
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = 0.0
    for _ in range(3):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(10):
            a @ b
        if cuda:
            torch.cuda.synchronize()
        best = max(best, 2 * n**3 * 10 / (time.perf_counter() - start))
    return best


# ---- workers: one (model, config) per process, every shape ----------------------------------------------------


def run_dpo(model_dir: Path, data: Path, out: Path, pairs: int, steps: int, cuda: bool, attention: str,
            qlora: str | None = None) -> dict[str, object]:
    """`qlora`: None, "linears" (`--lora-r 16 --load-in-4bit`) or "tables" (and `--quantize-embeddings`)."""
    from dpokit import loop
    from dpokit.config import Config

    quantized = dict(lora_r=LORA_R, lora_alpha=float(LORA_R), load_in_4bit=True,
                     quantize_embeddings=qlora == "tables") if qlora else {}
    cfg = Config(model=str(model_dir), tokenizer=str(model_dir.parent / "tokenizer"), data=str(data),
                 batch_size=pairs, max_steps=steps, eval_fraction=0.0, lr=1e-6, beta=0.1, lr_schedule="linear",
                 max_grad_norm=1.0, cache=False, output=str(out), progress=False,
                 dtype="bfloat16" if cuda else "float32", device="cuda" if cuda else "cpu",
                 attn_implementation=attention, **quantized)
    loop.train(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "pairs_per_s" in r]
    return {"step_s": [pairs / r["pairs_per_s"] for r in rows], "logps_chosen": rows[0]["logps/chosen"]}


def run_trl(model_dir: Path, data: Path, out: Path, pairs: int, steps: int, cuda: bool, qlora: bool = False,
            ) -> dict[str, object]:
    """`qlora`: TRL's QLoRA DPO, the base's linears in 4-bit NF4 (transformers' `BitsAndBytesConfig`), a LoRA
    adapter (r=16, alpha 16, all linears) and the disabled adapter as the reference, as dpo's `dpo-qlora`."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    dtype = torch.bfloat16 if cuda else torch.float32
    if qlora:
        from peft import LoraConfig

        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa",
                                                     quantization_config=bnb,
                                                     device_map={"": "cuda" if cuda else "cpu"})
        ref_model = None
        peft = dict(peft_config=LoraConfig(r=LORA_R, lora_alpha=LORA_R, lora_dropout=0.0,
                                           target_modules="all-linear", task_type="CAUSAL_LM"))
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa")
        ref_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa")
        peft = {}
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001, ANN003
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN003
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.start)

    args = DPOConfig(output_dir=str(out), per_device_train_batch_size=pairs, max_steps=steps, learning_rate=1e-6,
                     beta=0.1, lr_scheduler_type="linear", max_grad_norm=1.0, optim="adamw_torch", bf16=cuda,
                     gradient_checkpointing=False, logging_steps=1, report_to=[], save_strategy="no",
                     use_cpu=not cuda, max_length=2048, seed=0, dataloader_num_workers=0, disable_tqdm=True)
    trainer = DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=AutoTokenizer.from_pretrained(model_dir.parent / "tokenizer"),
                         callbacks=[Timer()], **peft)
    trainer.train()
    first = next(h for h in trainer.state.log_history if "logps/chosen" in h)
    return {"step_s": times, "logps_chosen": first["logps/chosen"]}


def worker(args: argparse.Namespace) -> None:
    import gc

    import torch

    from dpokit import accelerator

    root, cuda = Path(args.assets), args.cuda
    attention = "sdpa" if args.worker == "dpo-sdpa" else accelerator.choose_attention("cuda" if cuda else "cpu")
    for shape in args.shapes.split(","):
        torch.manual_seed(0)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        data, out = root / f"{shape}.jsonl", root / f"out-{args.model}-{args.worker}-{shape}"
        pairs = work(root, shape)["pairs"]
        try:
            if args.worker.startswith("trl"):
                result = run_trl(root / args.model, data, out, pairs, args.steps, cuda, args.worker == "trl-qlora")
            else:
                qlora = {"dpo-qlora": "linears", "dpo-qlora-tables": "tables"}.get(args.worker)
                result = run_dpo(root / args.model, data, out, pairs, args.steps, cuda, attention, qlora)
                result["attention"] = attention
        except Exception as error:  # reported in the table; the other shapes still run
            result = {"error": f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"}
        if cuda:
            result["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
        print("RESULT " + json.dumps({"shape": shape, **result}), flush=True)
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()


# ---- driver ---------------------------------------------------------------------------------------------------


def measure(root: Path, model: str, config: str, shapes: list[str], steps: int, cuda: bool, env: dict[str, str],
            timeout: float) -> dict[str, dict]:
    command = [sys.executable, __file__, "--worker", config, "--model", model, "--shapes", ",".join(shapes),
               "--steps", str(steps), "--assets", str(root)] + (["--cuda"] if cuda else [])
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
        stdout, stderr = done.stdout, done.stderr
    except subprocess.TimeoutExpired as expired:
        stdout, stderr = (s.decode() if isinstance(s, bytes) else s or "" for s in (expired.stdout, expired.stderr))
    results = {}
    for line in stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
            results[result.pop("shape")] = result
    for shape in shapes:
        if shape not in results:
            results[shape] = {"error": "process ended without a result: " + (stderr.strip().splitlines() or ["?"])[-1]}
    if any("error" in r for r in results.values()):
        print(stderr[-3000:], file=sys.stderr, flush=True)
    return results


def report(results: dict[str, dict[str, dict[str, dict]]], counts: dict[str, dict], params: dict[str, tuple],
           peak: float, cuda: bool, header: list[str]) -> str:
    lines = ["| model | shape | config | attention | pairs | tokens/s | x TRL | peak GPU MiB | x TRL | MFU | "
             "logps/chosen step 1 | rel. diff vs TRL |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for model, by_config in results.items():
        body, head = params[model]
        for shape, c in counts.items():
            for config, by_shape in by_config.items():
                trl = by_config.get("trl-qlora" if "qlora" in config else "trl", {}).get(shape, {})
                trl_ok = "error" not in trl and trl
                r = by_shape[shape]
                if "error" in r:
                    lines.append(f"| {model} | {shape} | {config} | | {c['pairs']} | failed: {r['error'][:120]} "
                                 "| | | | | | |")
                    continue
                step = min(r["step_s"][1:] or r["step_s"])      # step 1 compiles; others only ever add time
                tokens_s = c["pair_tokens"] / step
                flops_per_param = 6 if "qlora" in config else 8
                mfu = flops_per_param * (body * c["distinct"] + head * c["distinct_completion"]) / step / peak
                memory = r.get("peak_gpu_mib")
                trl_step = min(trl["step_s"][1:] or trl["step_s"]) if trl_ok else None
                lines.append(" | ".join([
                    f"| {model}", shape, config, r.get("attention", "sdpa"), str(c["pairs"]), f"{tokens_s:,.0f}",
                    f"{trl_step / step:.2f}" if trl_ok else "-",
                    f"{memory:,.0f}" if memory is not None else "-",
                    f"{memory / trl['peak_gpu_mib']:.2f}" if trl_ok and memory is not None else "-",
                    f"{100 * mfu:.0f}%", f"{r['logps_chosen']:.4f}",
                    f"{abs(r['logps_chosen'] - trl['logps_chosen']) / abs(trl['logps_chosen']):.1e} |"
                    if trl_ok else "- |"]))
    dtype = "bfloat16" if cuda else "float32"
    title = "GPU: throughput vs TRL 1.16 (bfloat16)" if cuda else "Dry run on CPU (float32, tiny models and shapes)"
    return "\n".join([f"### {title}", "", *header,
                      f"{dtype} matmul peak measured in this run: {peak / 1e12:.1f} TFLOP/s.", "",
                      *lines, ""])


def write_block(section: str, path: Path) -> None:
    """`section` between the device_check markers of `path`, every other part of the file kept."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    block = f"{START}\n{section}{END}"
    if START in text and END in text:
        text = text[:text.index(START)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + f"\n\n{block}\n"
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="the whole path on CPU, tiny shapes and models")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per shape (step 1 untimed)")
    parser.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                        help=f"comma-separated, of {', '.join(CONFIGS)} (default: {','.join(DEFAULT_CONFIGS)}); "
                             "a qlora config's x TRL is against trl-qlora")
    parser.add_argument("--models", default=None, help="comma-separated model names (default: both)")
    parser.add_argument("--minutes", type=float, default=8.0, help="time budget: configs that would start later "
                        "than this are skipped, so the table is written in time")
    parser.add_argument("--results", type=Path, default=None, help="file to write the block into (default: "
                        "benchmarks/RESULTS.md on a GPU, none in a dry run)")
    parser.add_argument("--skip-tests", action="store_true", help="no `pytest -m gpu`")
    parser.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--shapes", help=argparse.SUPPRESS)
    parser.add_argument("--assets", help=argparse.SUPPRESS)
    parser.add_argument("--cuda", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    began = time.perf_counter()
    stage = lambda name: print(f"== {name} (at {time.perf_counter() - began:.0f} s)", flush=True)  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        stage("install")
        env = install(args.dry_run, Path(tmp) / "site")
        import torch

        cuda = torch.cuda.is_available() and not args.dry_run
        if not cuda and not args.dry_run:
            raise SystemExit("no CUDA GPU visible to torch " + torch.__version__ + "; pass --dry-run for the CPU path")
        if not args.skip_tests:
            stage("pytest -m gpu")
            run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests/test_gpu.py"],
                env, timeout=180)
        models = DRY_MODELS if args.dry_run else MODELS
        models = {name: models[name] for name in (args.models.split(",") if args.models else models)}
        shapes = DRY_SHAPES if args.dry_run else SHAPES
        steps = args.steps or (2 if args.dry_run else 5)
        root = Path(tmp)
        stage("assets")
        build_assets(root, models, shapes, cuda)
        counts = {shape: work(root, shape) for shape in shapes}
        params = {name: parameters(root / name) for name in models}
        peaks = [matmul_peak(cuda)]
        results: dict[str, dict[str, dict[str, dict]]] = {}
        for model in models:
            for config in args.configs.split(","):
                left = 60 * args.minutes - (time.perf_counter() - began)
                if left < 30:
                    print(f"skipped {model} {config}: over the {args.minutes:g}-minute budget", flush=True)
                    continue
                stage(f"{model} {config}")
                results.setdefault(model, {})[config] = measure(root, model, config, list(shapes), steps, cuda,
                                                                env, timeout=left)
                print(json.dumps(results[model][config]), flush=True)
        peaks.append(matmul_peak(cuda))
    import transformers

    machine = (f"{torch.cuda.get_device_name()}, " if cuda else "") + \
        f"{platform.machine()}, torch {torch.__version__}, transformers {transformers.__version__}"
    command = " ".join(["python3 benchmarks/device_check.py", *sys.argv[1:]])
    header = [f"Command: `{command}`  ",
              f"Machine: {machine}; {steps} steps per shape, the fastest after step 1; "
              f"{time.perf_counter() - began:.0f} s in all.  "]
    section = report(results, counts, params, max(peaks), cuda, header)
    print(section, flush=True)
    path = args.results or (None if args.dry_run else RESULTS)
    if path is not None:
        write_block(section, path)
        print(f"written to {path}", flush=True)


if __name__ == "__main__":
    main()
