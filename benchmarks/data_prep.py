"""Data preparation speed: dpokit's pipeline vs TRL 1.16 DPOTrainer's dataset preparation, side by side.

    .venv/bin/python benchmarks/data_prep.py [--pairs 20000] [--prompt-words 300] [--response-words 100]

One process, one JSONL file, one fast BPE tokenizer (trained here with `tokenizers`; whitespace words of a
synthetic vocabulary, so ~1 token per word). Both sides start from the file on disk and end with per-pair
prompt / chosen / rejected token ids:

- dpokit: `pipeline.prepare(...)` (read, split, tokenize with the exact boundary, EOS, truncation; each
  completion tokenized behind the prompt's last tokens, chunks in one forked process per CPU) with a fresh cache
  directory (cold), then again with the same directory (cache hit).
- TRL: `datasets.load_dataset("json", ...)` then `DPOTrainer._prepare_dataset(...)` (add EOS, tokenize prompt,
  prompt+chosen, prompt+rejected, cut at the common prefix), on a trainer built with a tiny model and a 4-row
  dataset so that only the preparation of the full dataset is timed. `datasets` caching is off, so it is cold too.

Prints a table and writes its section of benchmarks/RESULTS.md between the data_prep markers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- data_prep:start -->", "<!-- data_prep:end -->"


def make_data(path: Path, pairs: int, prompt_words: int, response_words: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8))) for _ in range(4000)]
    words = lambda n: " ".join(rng.choice(vocab) for _ in range(n))  # noqa: E731
    with path.open("w", encoding="utf-8") as handle:
        for _ in range(pairs):
            record = {"prompt": "Human: " + words(prompt_words) + "\n\nAssistant:",
                      "chosen": " " + words(response_words), "rejected": " " + words(response_words)}
            handle.write(json.dumps(record) + "\n")
    return vocab


def make_tokenizer(path: Path, vocab: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=8000, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([" ".join(vocab[i:i + 50]) for i in range(0, len(vocab), 50)] * 3, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(path)
    return fast


def time_dpokit(data: Path, tokenizer, cache_dir: Path):
    from dpokit.data import preparation as pipeline

    settings = pipeline.DataSettings(str(data), max_length=4096, max_prompt_length=2048)
    start, cpu = time.perf_counter(), cpu_seconds()
    cold = pipeline.prepare(settings, tokenizer, cache_dir=str(cache_dir))
    cold_s, cold_cpu = time.perf_counter() - start, cpu_seconds() - cpu
    start = time.perf_counter()
    hit = pipeline.prepare(settings, tokenizer, cache_dir=str(cache_dir))
    hit_s = time.perf_counter() - start
    assert "loaded tokenized data from the cache" in hit.notes[-1] and hit.train == cold.train
    return cold, (cold_s, cold_cpu), hit_s


def time_trl(data: Path, tokenizer, work: Path):
    import datasets
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import DPOConfig, DPOTrainer

    datasets.disable_caching()
    datasets.disable_progress_bars()
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    model.save_pretrained(work / "tiny-model")
    tokenizer.save_pretrained(work / "tiny-model")
    args = DPOConfig(output_dir=str(work / "trl"), report_to=[], max_length=4096, use_cpu=True,
                     per_device_train_batch_size=2, logging_strategy="no", save_strategy="no")
    small = datasets.Dataset.from_list([{"prompt": "Human: a\n\nAssistant:", "chosen": " b", "rejected": " c"}] * 4)
    trainer = DPOTrainer(model=str(work / "tiny-model"), args=args, train_dataset=small, processing_class=tokenizer)
    torch.set_num_threads(torch.get_num_threads())
    start, cpu = time.perf_counter(), cpu_seconds()
    raw = datasets.load_dataset("json", data_files=str(data), split="train", cache_dir=str(work / "hf"))
    load_s = time.perf_counter() - start
    prepared = trainer._prepare_dataset(raw, tokenizer, args, "train")
    return prepared, (time.perf_counter() - start, cpu_seconds() - cpu), load_s


def cpu_seconds() -> float:
    """CPU time of this process (all its threads) and of its finished child processes: on a machine shared with
    other jobs, the work each side does, which wall time hides."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def write_results(section: str, start: str = START, end: str = END) -> Path:
    """Put `section` into benchmarks/RESULTS.md between the markers `start` and `end` (at the end if absent)."""
    path = ROOT / "benchmarks" / "RESULTS.md"
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmark results\n"
    block = f"{start}\n{section.rstrip()}\n{end}"
    if start in text and end in text:
        text = text[:text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text, encoding="utf-8")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=20_000)
    parser.add_argument("--prompt-words", type=int, default=300)
    parser.add_argument("--response-words", type=int, default=100)
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()
    import tokenizers
    import transformers
    import trl

    from dpokit.data import tokenization

    load_before = os.getloadavg()[0]  # the machine may be shared: its load is part of the result
    with tempfile.TemporaryDirectory(prefix="dpokit-bench-") as tmp:
        work = Path(tmp)
        os.environ["HF_DATASETS_CACHE"] = str(work / "hf")
        data = work / "pairs.jsonl"
        vocab = make_data(data, args.pairs, args.prompt_words, args.response_words)
        tokenizer = make_tokenizer(work / "tokenizer", vocab)
        ours, ours_s, hit_s = time_dpokit(data, tokenizer, work / "cache")
        theirs, trl_s, trl_load_s = time_trl(data, tokenizer, work)
        # Same token ids on both sides (TRL appends EOS to the text; we append the EOS id): a fair comparison,
        # and TRL's are the full-text method's (prompt, prompt + chosen, prompt + rejected, cut at the prefix).
        same = sum(list(t["prompt_ids"]) == o.prompt_ids and list(t["chosen_ids"]) == o.chosen_ids
                   and list(t["rejected_ids"]) == o.rejected_ids for t, o in zip(theirs, ours.train))
        fallbacks = next((line for line in ours.notes if "in full (slower, same ids)" in line), "none")
        lengths = [(len(p.prompt_ids), len(p.chosen_ids)) for p in ours.train]
    mean_prompt = sum(p for p, _ in lengths) / len(lengths)
    mean_response = sum(c for _, c in lengths) / len(lengths)
    (trl_s, trl_cpu), (ours_s, ours_cpu) = trl_s, ours_s
    rows = [("TRL 1.16 DPOTrainer (load_dataset + _prepare_dataset)", trl_s, f"{trl_cpu:.1f} | 1.00x"),
            ("dpokit pipeline.prepare, cold", ours_s, f"{ours_cpu:.1f} | {ours_cpu / trl_cpu:.2f}x"),
            ("dpokit pipeline.prepare, cache hit", hit_s, "|")]
    machine = (f"{platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, transformers {transformers.__version__}, "
               f"tokenizers {tokenizers.__version__}, trl {trl.__version__}; load average {load_before:.1f} before the "
               f"run, {os.getloadavg()[0]:.1f} after")
    lines = ["## Data preparation: dpokit vs TRL", "",
             f"{args.pairs} pairs, prompt {mean_prompt:.0f} tokens and responses {mean_response:.0f} tokens on average "
             f"(BPE tokenizer trained with `tokenizers`), from one JSONL file; TRL in one process, dpokit in "
             f"{tokenization.default_workers(args.pairs)} (one per CPU).", "",
             "| preparation | seconds | vs TRL | CPU seconds (all processes) | vs TRL |",
             "| --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {name} | {seconds:.2f} | {seconds / trl_s:.2f}x | {cpu} |" for name, seconds, cpu in rows]
    lines += ["", f"TRL's `load_dataset` part: {trl_load_s:.2f} s. Identical prompt, chosen and rejected ids on both "
              f"sides for {same} of {len(ours.train)} pairs. Pairs dpokit tokenized in full: {fallbacks}.", "",
              f"Command: `.venv/bin/python benchmarks/data_prep.py --pairs {args.pairs} --prompt-words "
              f"{args.prompt_words} --response-words {args.response_words}`", "", f"Machine: {machine}."]
    section = "\n".join(lines)
    print(section)
    if not args.no_write:
        print(f"\nwrote {write_results(section)}", file=sys.stderr)


if __name__ == "__main__":
    main()
