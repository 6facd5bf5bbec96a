"""Peak memory of data preparation for a large file: `--stream-data` (shards) against the in-memory path.

    .venv/bin/python benchmarks/large_data.py [--pairs 200000 100000] [--prompt-words 40] [--response-words 20]

For each size, writes a JSONL file of that many pairs in a temp folder (the vocabulary and BPE tokenizer of
benchmarks/data_prep.py), then prepares it in a fresh process per path and reports that process's peak RSS
(and the largest worker's: `tokenize_pairs` forks one per CPU), the time, and for the streamed path the peak
after reading every prepared pair back once, as training would. Writes its section of benchmarks/RESULTS.md
between the large_data markers.
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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_prep import make_tokenizer, write_results  # noqa: E402

START, END = "<!-- large_data:start -->", "<!-- large_data:end -->"
CHILD = """
import json, resource, sys, time
from transformers import AutoTokenizer
from dpokit.data import preparation
data, tokenizer_dir, cache_dir, stream = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
prepared = preparation.prepare(preparation.DataSettings(data, max_length=4096, stream_data=stream), tokenizer,
                               cache=stream, cache_dir=cache_dir)
seconds = time.perf_counter() - start
prepared_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
tokens = sum(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in prepared.train)
print(json.dumps({"pairs": len(prepared.train), "seconds": seconds, "base_kib": base, "prepared_kib": prepared_peak,
                  "read_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "tokens": tokens,
                  "worker_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""


def make_data(path: Path, pairs: int, prompt_words: int, response_words: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8))) for _ in range(4000)]
    with path.open("w", encoding="utf-8") as handle:
        for _ in range(pairs):
            words = lambda n: " ".join(rng.choices(vocab, k=n))  # noqa: E731
            handle.write(json.dumps({"prompt": "Human: " + words(prompt_words) + "\n\nAssistant:",
                                     "chosen": " " + words(response_words),
                                     "rejected": " " + words(response_words)}) + "\n")
    return vocab


def measure(data: Path, tokenizer_dir: Path, cache_dir: Path, stream: bool) -> dict[str, float]:
    done = subprocess.run([sys.executable, "-c", CHILD, str(data), str(tokenizer_dir), str(cache_dir),
                           "1" if stream else "0"], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, nargs="+", default=[200_000, 100_000])
    parser.add_argument("--prompt-words", type=int, default=40)
    parser.add_argument("--response-words", type=int, default=20)
    parser.add_argument("--no-in-memory", action="store_true", help="only the streamed path (for very large files)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()
    rows = []
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="dpokit-large-") as tmp:
        work = Path(tmp)
        for n in args.pairs:
            data = work / f"pairs-{n}.jsonl"
            vocab = make_data(data, n, args.prompt_words, args.response_words)
            tokenizer_dir = work / "tokenizer"
            if not tokenizer_dir.exists():
                make_tokenizer(tokenizer_dir, vocab)
            size_mib = data.stat().st_size / 2**20
            for stream in ([True] if args.no_in_memory else [True, False]):
                result = measure(data, tokenizer_dir, work / f"cache-{n}", stream)
                rows.append((n, size_mib, "streamed (--stream-data)" if stream else "in memory", result))
                print(rows[-1], file=sys.stderr, flush=True)
            data.unlink()
    lines = ["## Large data: peak memory of preparation", "",
             f"JSONL files of {args.prompt_words}-word prompts and two {args.response_words}-word responses (the "
             "data_prep vocabulary and BPE tokenizer), prepared in a fresh process each. Peak RSS of that process "
             "after preparing, and after reading every prepared pair back once (as training reads them); the "
             "largest tokenizer worker's own peak is shown apart (one forked worker per CPU).", "",
             "| pairs | file (MiB) | path | tokens (M) | seconds | peak RSS prepared (MiB) | after reading all "
             "(MiB) | largest worker (MiB) |", "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {n:,} | {size:.0f} | {path} | {r['tokens'] / 1e6:.1f} | {r['seconds']:.0f} | "
              f"{r['prepared_kib'] / 1024:.0f} | {r['read_kib'] / 1024:.0f} | {r['worker_kib'] / 1024:.0f} |"
              for n, size, path, r in rows]
    lines += ["", f"Command: `.venv/bin/python benchmarks/large_data.py --pairs {' '.join(map(str, args.pairs))} "
              f"--prompt-words {args.prompt_words} --response-words {args.response_words}"
              f"{' --no-in-memory' if args.no_in_memory else ''}`", "",
              f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}; "
              f"load average {load_before:.1f} before the run, {os.getloadavg()[0]:.1f} after."]
    section = "\n".join(lines)
    print(section)
    if not args.no_write:
        print(f"\nwrote {write_results(section, START, END)}", file=sys.stderr)


if __name__ == "__main__":
    main()
