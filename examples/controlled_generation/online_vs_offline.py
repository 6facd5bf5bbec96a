"""Online and iterative DPO against offline DPO on the controlled-generation task (a known reward), on a CPU.

    python examples/controlled_generation/online_vs_offline.py --threads 1   # about 15 minutes on 2 busy cores

1. SFT a small random-init Llama on synthetic reviews (`dpo sft`, as run.py does, smaller), or take --sft MODEL.
2. For each beta and seed, three ways to spend the same number of gradient steps with the same learning rate, judge
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
    betas: tuple[float, ...] = (0.1, 0.5)
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

    runs = [{"method": "sft", "beta": None, "seed": seed, "time_s": 0.0, **evaluate(sft, seed, f"sft-seed{seed}")}
            for seed in scale.seeds]
    total_steps = scale.rounds * scale.steps_per_round
    for beta, seed, (method, flags) in [(b, s, m) for b in scale.betas for s in scale.seeds for m in METHODS.items()]:
        name = f"{method}-beta{beta}-seed{seed}"
        rounds = (["--rounds", "1", "--max-steps", str(total_steps)] if method == "offline" else
                  ["--rounds", str(scale.rounds), "--prompts-per-round", str(scale.prompts_per_round),
                   "--max-steps", str(scale.steps_per_round)])
        began = time.perf_counter()
        dpo(["online", "--model", str(sft), "--prompts", str(prompts), "--reward", REWARD, "--output",
             str(out / name), "--samples-per-prompt", str(scale.samples_per_prompt), "--seed", str(seed),
             "--beta", str(beta), "--lr", str(scale.lr), "--batch-size", str(scale.batch_size),
             "--sample-batch-size", "128", *sampling, *rounds, *flags, *scale.extra_flags])
        elapsed = time.perf_counter() - began
        per_round = _rows(out / name / "online_metrics.jsonl")
        final = out / name / "rounds" / f"round-{len(per_round)}" / "model"
        runs.append({"method": method, "beta": beta, "seed": seed, "time_s": elapsed, "rounds": per_round,
                     **evaluate(final, seed, name)})
    results = {"scale": asdict(scale), "runs": runs, "sft": str(sft), "sft_time_s": sft_time,
               "wall_time_s": time.perf_counter() - start,
               "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def mean_points(results: dict, method: str) -> list[dict[str, float]]:
    """(beta, mean KL, mean reward) over seeds for each beta of `method`, by increasing KL."""
    runs = [r for r in results["runs"] if r["method"] == method]
    points = [{"beta": beta, "kl": statistics.mean(r["samples/kl"] for r in rs),
               "reward": statistics.mean(r["samples/reward"] for r in rs)}
              for beta in sorted({r["beta"] for r in runs}, key=lambda b: -1 if b is None else b)
              for rs in [[r for r in runs if r["beta"] == beta]]]
    return sorted(points, key=lambda p: p["kl"])


def above_offline(results: dict, method: str) -> tuple[int, int]:
    """How many of `method`'s mean points lie above offline's frontier (offline's mean points and the SFT model,
    joined by straight lines) at the same KL, out of those within offline's KL range: comparable KL only."""
    frontier = sorted(mean_points(results, "sft") + mean_points(results, "offline"), key=lambda p: p["kl"])
    above = comparable = 0
    for p in mean_points(results, method):
        for a, b in zip(frontier, frontier[1:]):
            if a["kl"] <= p["kl"] <= b["kl"]:
                t = (p["kl"] - a["kl"]) / max(b["kl"] - a["kl"], 1e-12)
                comparable += 1
                above += p["reward"] > a["reward"] + t * (b["reward"] - a["reward"])
                break
    return above, comparable


def summarize(results: dict) -> dict:
    """Mean points per method and beta, and how many online / iterative points beat offline at the same KL."""
    return {"points": {m: mean_points(results, m) for m in ("sft", *METHODS)},
            **{f"{m}_above_offline_at_same_kl": "{} of {} comparable".format(*above_offline(results, m))
               for m in ("online", "iterative")}}


def plot(results: dict, path: Path) -> Path:
    """Reward of held-out samples against KL(policy || SFT): one point per run; each method's means over seeds
    joined into its frontier (from the SFT model), one marker per beta."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    sft = [r for r in results["runs"] if r["method"] == "sft"]
    ax.errorbar([r["samples/kl"] for r in sft], [r["samples/reward"] for r in sft], fmt="k*", markersize=11,
                label="SFT (start)")
    labels = {"offline": "offline DPO (SFT samples)", "online": "online DPO (ref = SFT)",
              "iterative": "iterative DPO (ref = round start)"}
    markers = dict(zip(results["scale"]["betas"], "os^Dv"))
    for (method, label), color in zip(labels.items(), ("tab:gray", "tab:blue", "tab:orange")):
        line = mean_points(results, "sft")[:1] + mean_points(results, method)
        ax.plot([p["kl"] for p in line], [p["reward"] for p in line], "-", color=color, alpha=0.6, label=label)
        for r in (r for r in results["runs"] if r["method"] == method):
            ax.errorbar(r["samples/kl"], r["samples/reward"], xerr=r["samples/kl_stderr"],
                        yerr=r["samples/reward_stderr"], fmt=markers[r["beta"]], color=color, markersize=5)
    for beta, marker in markers.items():
        ax.plot([], [], marker, color="k", label=f"beta={beta}")
    ax.set_xlabel("KL(policy || SFT) per sequence, nats (from samples)")
    ax.set_ylabel("mean reward of samples (share of positive words)")
    ax.set_title("Same steps and beta: who writes the samples")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
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
        f"gradient steps (batch {s['batch_size']} pairs, lr {s['lr']:g} constant; beta {', '.join(map(str, s['betas']))}; "
        f"seeds {', '.join(map(str, s['seeds']))}) on the same "
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
        "| method | beta | seed | mean reward (± s.e.) | KL to SFT, nats (± s.e.) | win rate vs SFT | train pairs "
        "| wall s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results["runs"]:
        pairs = sum(row["pairs"] for row in r.get("rounds", [])) or "-"
        beta = r["beta"] if r["beta"] is not None else "-"
        lines.append(f"| {r['method']} | {beta} | {r['seed']} | {r['samples/reward']:.3f} ± {r['samples/reward_stderr']:.3f} | "
                     f"{r['samples/kl']:.2f} ± {r['samples/kl_stderr']:.2f} | {r['samples/win_rate']:.3f} | {pairs} | "
                     f"{r['time_s']:.0f} |")
    lines += ["", "Means over seeds: " + "; ".join(
        f"{m} beta {p['beta']}: reward {p['reward']:.3f}, KL {p['kl']:.2f}"
        for m, points in summary["points"].items() if m != "sft" for p in points) + ".", ""]
    for method in ("online", "iterative"):
        verdict = summary[f"{method}_above_offline_at_same_kl"]
        lines.append(f"- {method} mean points above offline's frontier (SFT and offline's means joined by straight "
                     f"lines) at the same KL: **{verdict}** (a point beyond offline's largest KL is not comparable).")
    lines += ["", "Per round (training prompts; the samples of round r come from the policy after r - 1 rounds, KL "
              "to the SFT model):", "",
              "| method | beta | seed | round | mean reward of samples | KL to SFT | pairs | ties dropped |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results["runs"]:
        for row in r.get("rounds", []):
            lines.append(f"| {r['method']} | {r['beta']} | {r['seed']} | {row['round']} | {row['samples/reward']:.3f} | "
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
