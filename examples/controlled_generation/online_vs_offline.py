"""Online and iterative DPO against offline DPO on the controlled-generation task (a known reward), on a CPU.

    python examples/controlled_generation/online_vs_offline.py --threads 1   # about 15 minutes on 2 busy cores

1. SFT a small random-init Llama on synthetic reviews (`dpo sft`, as run.py does, smaller), or take --sft MODEL.
2. For each seed, three ways to spend the same number of gradient steps with the same beta, learning rate, judge
   (the known reward, task.positive_share) and pairing (best vs worst of K samples per prompt):
   - offline: `dpo online --rounds 1` over all R x N prompts, R x S steps: DPO on the SFT model's samples;
   - online: `dpo online --rounds R --prompts-per-round N --max-steps S`, the SFT model as reference throughout
     (--ref-update start, as online DPO anchors to it: Guo et al. 2024, arXiv 2402.04792);
   - iterative: the same with --ref-update round (Xiong et al. 2024, arXiv 2312.11456).
   Each prompt is sampled once in all three; only who wrote the samples (the SFT model, or the policy of the
   round) differs.
3. `dpo eval` every final policy against the SFT model on held-out prompts: mean reward of samples and
   KL(policy || SFT); plot them on one reward-KL frontier and write REPORT_online.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import task  # noqa: E402
from dpokit.cli import main as dpo  # noqa: E402

METHODS = {"offline": [], "online": ["--ref-update", "start"], "iterative": ["--ref-update", "round"]}


@dataclass(frozen=True)
class Scale:
    """Sizes of one run of the comparison; `FULL` is the reported one."""

    hidden: int = 128
    layers: int = 2
    corpus: int = 2000
    sft_epochs: float = 2.0
    sft_lr: float = 1e-3
    rounds: int = 3                 # R
    prompts_per_round: int = 128    # N
    samples_per_prompt: int = 4     # K
    steps_per_round: int = 16       # S: 2 epochs over a round's pairs at batch 16
    beta: float = 0.1
    lr: float = 1e-4
    seeds: tuple[int, ...] = (0, 1)
    eval_prompts: int = 256
    eval_samples: int = 2
    batch_size: int = 16
    max_new_tokens: int = 40
    extra_flags: tuple[str, ...] = field(default=("--no-progress", "--no-cache", "--max-length", "128",
                                                  "--max-prompt-length", "32", "--lr-schedule", "constant"))


FULL = Scale()
REWARD = f"{HERE / 'task.py'}:positive_share"


def run(out: Path, scale: Scale = FULL, sft: Path | None = None) -> dict:
    """Run the comparison under `out`; returns the results (also written to `out/results.json`)."""
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    corpus = [task.review(rng) for _ in range(scale.corpus)]
    prompts = task.write_jsonl(out / "prompts.jsonl", [{"prompt": task.review(rng)["prompt"]}
                                                       for _ in range(scale.rounds * scale.prompts_per_round)])
    eval_prompts = task.write_jsonl(out / "eval_prompts.jsonl",
                                    [{"prompt": task.review(rng)["prompt"]} for _ in range(scale.eval_prompts)])
    if sft is None:
        task.write_jsonl(out / "corpus.jsonl", corpus)
        tokenizer = task.build_tokenizer(out / "init")
        torch.manual_seed(0)
        task.build_model(out / "init", tokenizer, hidden=scale.hidden, layers=scale.layers, seed=0)
        dpo(["sft", "--model", str(out / "init"), "--data", str(out / "corpus.jsonl"), "--output", str(out / "sft"),
             "--lr", str(scale.sft_lr), "--epochs", str(scale.sft_epochs), "--warmup-steps", "10",
             "--batch-size", "32", *scale.extra_flags])
        sft = out / "sft" / "model"
    sft_time = time.perf_counter() - start
    sampling = ["--max-new-tokens", str(scale.max_new_tokens)]

    def evaluate(model: Path, seed: int, name: str) -> dict:
        dpo(["eval", "--model", str(model), "--ref-model", str(sft), "--prompts", str(eval_prompts),
             "--reward", REWARD, "--num-samples", str(scale.eval_samples), "--seed", str(seed), "--batch-size", "128",
             "--out", str(out / "eval" / f"{name}.json"), *sampling])
        return json.loads((out / "eval" / f"{name}.json").read_text())

    runs = [{"method": "sft", "seed": seed, "time_s": 0.0, **evaluate(sft, seed, f"sft-seed{seed}")}
            for seed in scale.seeds]
    total_steps = scale.rounds * scale.steps_per_round
    for seed in scale.seeds:
        for method, flags in METHODS.items():
            name = f"{method}-seed{seed}"
            rounds = (["--rounds", "1", "--max-steps", str(total_steps)] if method == "offline" else
                      ["--rounds", str(scale.rounds), "--prompts-per-round", str(scale.prompts_per_round),
                       "--max-steps", str(scale.steps_per_round)])
            began = time.perf_counter()
            dpo(["online", "--model", str(sft), "--prompts", str(prompts), "--reward", REWARD, "--output",
                 str(out / name), "--samples-per-prompt", str(scale.samples_per_prompt), "--seed", str(seed),
                 "--beta", str(scale.beta), "--lr", str(scale.lr), "--batch-size", str(scale.batch_size),
                 "--sample-batch-size", "128", *sampling, *rounds, *flags, *scale.extra_flags])
            elapsed = time.perf_counter() - began
            per_round = _rows(out / name / "online_metrics.jsonl")
            final = out / name / "rounds" / f"round-{len(per_round)}" / "model"
            runs.append({"method": method, "seed": seed, "time_s": elapsed, "rounds": per_round,
                         **evaluate(final, seed, name)})
    results = {"scale": asdict(scale), "runs": runs, "sft": str(sft), "sft_time_s": sft_time,
               "wall_time_s": time.perf_counter() - start,
               "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summarize(results: dict) -> dict:
    """Mean reward and KL over seeds per method, and whether online / iterative end above offline in reward."""
    by_method: dict[str, dict[str, float]] = {}
    for method in ("sft", *METHODS):
        rs = [r for r in results["runs"] if r["method"] == method]
        by_method[method] = {"reward": statistics.mean(r["samples/reward"] for r in rs),
                             "kl": statistics.mean(r["samples/kl"] for r in rs),
                             "reward_min": min(r["samples/reward"] for r in rs),
                             "reward_max": max(r["samples/reward"] for r in rs)}
    offline = by_method["offline"]
    return {"by_method": by_method,
            **{f"{m}_above_offline_every_seed": by_method[m]["reward_min"] > offline["reward_max"]
               for m in ("online", "iterative")}}


def plot(results: dict, path: Path) -> Path:
    """Reward of held-out samples against KL(policy || SFT), one point per run and method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    styles = {"sft": ("k*", "SFT (start)"), "offline": ("o", "offline DPO (SFT samples)"),
              "online": ("s", "online DPO (ref = SFT)"), "iterative": ("^", "iterative DPO (ref = round start)")}
    for method, (fmt, label) in styles.items():
        rs = [r for r in results["runs"] if r["method"] == method]
        ax.errorbar([r["samples/kl"] for r in rs], [r["samples/reward"] for r in rs],
                    xerr=[r["samples/kl_stderr"] for r in rs], yerr=[r["samples/reward_stderr"] for r in rs],
                    fmt=fmt, markersize=9 if method == "sft" else 6, label=label)
    ax.set_xlabel("KL(policy || SFT) per sequence, nats (from samples)")
    ax.set_ylabel("mean reward of samples (share of positive words)")
    ax.set_title("Same steps, same beta: who writes the samples")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(results: dict, path: Path, plot_name: str) -> Path:
    summary = summarize(results)
    s = results["scale"]
    total = s["rounds"] * s["steps_per_round"]
    lines = [
        "# Online and iterative DPO against offline DPO, on the task with a known reward",
        "",
        "Reproduce: `python examples/controlled_generation/online_vs_offline.py --threads 1` (rewrites this report "
        "and online_frontier.png).",
        "",
        f"The controlled-generation task of run.py (reward: share of positive words, task.py). A {s['layers']}-layer, "
        f"hidden-{s['hidden']} Llama SFT'd on {s['corpus']} reviews is the start. Three ways to spend {total} "
        f"gradient steps (batch {s['batch_size']} pairs, beta {s['beta']:g}, lr {s['lr']:g} constant) on the same "
        f"{s['rounds'] * s['prompts_per_round']} prompts, each pair the best and worst of {s['samples_per_prompt']} "
        "samples under the known reward:",
        "",
        f"- **offline**: `dpo online --rounds 1`: every prompt sampled from the SFT model, {total} steps;",
        f"- **online**: `dpo online --rounds {s['rounds']} --prompts-per-round {s['prompts_per_round']} --max-steps "
        f"{s['steps_per_round']}`: each round's prompts sampled from the policy of that round, reference the SFT model;",
        "- **iterative**: the same with `--ref-update round` (reference = the policy at the start of the round).",
        "",
        f"Each final policy is evaluated with `dpo eval` against the SFT model on {s['eval_prompts']} held-out prompts "
        f"({s['eval_samples']} samples each, temperature 1): mean reward and KL(policy || SFT) from the samples.",
        "",
        f"![online vs offline]({plot_name})",
        "",
        "| method | seed | mean reward (± s.e.) | KL to SFT, nats (± s.e.) | win rate vs SFT | train pairs | wall s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results["runs"]:
        pairs = sum(row["pairs"] for row in r.get("rounds", [])) or "-"
        lines.append(f"| {r['method']} | {r['seed']} | {r['samples/reward']:.3f} ± {r['samples/reward_stderr']:.3f} | "
                     f"{r['samples/kl']:.2f} ± {r['samples/kl_stderr']:.2f} | {r['samples/win_rate']:.3f} | {pairs} | "
                     f"{r['time_s']:.0f} |")
    lines += ["", "Mean over seeds: " + "; ".join(
        f"{m}: reward {v['reward']:.3f}, KL {v['kl']:.2f}" for m, v in summary["by_method"].items()) + ".", ""]
    for method in ("online", "iterative"):
        lines.append(f"- {method} above offline in reward for every seed (lowest {method} > highest offline): "
                     f"**{summary[f'{method}_above_offline_every_seed']}**.")
    lines += ["", "Per round (training prompts; the samples of round r come from the policy after r - 1 rounds, KL "
              "to the SFT model):", "",
              "| method | seed | round | mean reward of samples | KL to SFT | pairs | ties dropped |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in results["runs"]:
        for row in r.get("rounds", []):
            lines.append(f"| {r['method']} | {r['seed']} | {row['round']} | {row['samples/reward']:.3f} | "
                         f"{row['samples/kl']:.2f} | {row['pairs']} | {row['pairs/ties_dropped']} |")
    lines += ["", f"Wall time: {results['wall_time_s'] / 60:.1f} min in all (SFT {results['sft_time_s'] / 60:.1f} "
              f"min), on {results['machine']}, a 2-core machine shared with other jobs.", ""]
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(HERE / "runs" / "online"), help="where models, data and metrics go")
    parser.add_argument("--sft", help="an SFT model folder to start from (default: SFT one here)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (1 is fastest on a busy machine)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = run(Path(args.out), sft=Path(args.sft) if args.sft else None)
    plot(results, HERE / "online_frontier.png")
    write_report(results, HERE / "REPORT_online.md", "online_frontier.png")
    print(json.dumps(summarize(results), indent=2))


if __name__ == "__main__":
    main()
