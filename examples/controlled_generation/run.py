"""The DPO paper's controlled-generation experiment (Rafailov et al. 2023, Sec. 6.1, Fig. 2 left), on a CPU.

    python examples/controlled_generation/run.py --threads 1   # under 20 minutes on 2 busy CPU cores

1. SFT a small random-init Llama on synthetic reviews (`dpo sft`).
2. Sample two completions per prompt from the SFT model (`dpo generate`) and label each pair with a
   Bradley-Terry draw from the known reward (task.py: the share of positive words).
3. Train DPO from the SFT model at several beta values, two seeds each (`dpo train`).
4. Evaluate every policy and the SFT model on held-out prompts (`dpo eval`): mean reward of samples and
   KL(policy || SFT); plot the reward-KL frontier and write REPORT.md.

Everything goes through the `dpo` command (in-process); only the task itself is defined here.
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


@dataclass(frozen=True)
class Scale:
    """Sizes of one run of the experiment; `FULL` is the committed one, the tests use a miniature."""

    hidden: int = 256
    layers: int = 4
    corpus: int = 3000
    sft_epochs: float = 2.0
    sft_lr: float = 1e-3
    pair_prompts: int = 768
    dpo_epochs: float = 2.0
    dpo_lr: float = 1e-4
    betas: tuple[float, ...] = (0.05, 0.1, 0.5, 1.0)
    seeds: tuple[int, ...] = (0, 1)
    eval_prompts: int = 256
    eval_samples: int = 2
    batch_size: int = 32
    max_new_tokens: int = 40
    extra_flags: tuple[str, ...] = field(default=("--no-progress", "--no-cache", "--max-length", "128",
                                                  "--max-prompt-length", "32"))


FULL = Scale()
REWARD = f"{HERE / 'task.py'}:positive_share"


def run(out: Path, scale: Scale = FULL) -> dict:
    """Run the whole experiment under `out`; returns the results (also written to `out/results.json`)."""
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    rng = random.Random(0)
    corpus = task.write_jsonl(out / "corpus.jsonl", [task.review(rng) for _ in range(scale.corpus)])
    pair_prompts = task.write_jsonl(out / "pair_prompts.jsonl",
                                    [{"prompt": task.review(rng)["prompt"]} for _ in range(scale.pair_prompts)])
    eval_prompts = task.write_jsonl(out / "eval_prompts.jsonl",
                                    [{"prompt": task.review(rng)["prompt"]} for _ in range(scale.eval_prompts)])
    tokenizer = task.build_tokenizer(out / "init")
    parameters = task.build_model(out / "init", tokenizer, hidden=scale.hidden, layers=scale.layers, seed=0)
    common = [*scale.extra_flags, "--batch-size", str(scale.batch_size)]

    # 1. SFT
    dpo(["sft", "--model", str(out / "init"), "--data", str(corpus), "--output", str(out / "sft"),
         "--lr", str(scale.sft_lr), "--epochs", str(scale.sft_epochs), "--warmup-steps", "10", *common])
    sft_model = out / "sft" / "model"
    sft_time = time.perf_counter() - start

    # 2. pairs sampled from the SFT model, labelled by the reward
    sampling = ["--max-new-tokens", str(scale.max_new_tokens), "--batch-size", "128"]
    dpo(["generate", "--model", str(sft_model), "--prompts", str(pair_prompts), "--out", str(out / "samples.jsonl"),
         "--num-samples", "2", "--seed", "1000", *sampling])
    pairs = task.label_pairs(task.read_jsonl(out / "samples.jsonl"), seed=0)
    task.write_jsonl(out / "pairs.jsonl", pairs)

    # 3 and 4. DPO at each beta and seed, then evaluation against the SFT model
    def evaluate(model: Path, seed: int, name: str) -> dict:
        dpo(["eval", "--model", str(model), "--ref-model", str(sft_model), "--prompts", str(eval_prompts),
             "--reward", REWARD, "--num-samples", str(scale.eval_samples), "--seed", str(seed),
             "--out", str(out / "eval" / f"{name}.json"), *sampling])
        return json.loads((out / "eval" / f"{name}.json").read_text())

    runs = [{"name": "sft", "beta": None, "seed": seed, **evaluate(sft_model, seed, f"sft-seed{seed}")}
            for seed in scale.seeds]
    for beta in scale.betas:
        for seed in scale.seeds:
            name = f"dpo-beta{beta}-seed{seed}"
            dpo(["train", "--model", str(sft_model), "--data", str(out / "pairs.jsonl"), "--output", str(out / name),
                 "--beta", str(beta), "--seed", str(seed), "--lr", str(scale.dpo_lr), "--epochs", str(scale.dpo_epochs),
                 "--warmup-steps", "5", *common])
            held_out = [r for r in _rows(out / name / "metrics.jsonl") if "eval/rewards/accuracies" in r][-1]
            runs.append({"name": name, "beta": beta, "seed": seed, **evaluate(out / name / "model", seed, name),
                         "heldout_accuracy": held_out["eval/rewards/accuracies"]})

    results = {"scale": asdict(scale), "parameters": parameters, "pairs": len(pairs), "runs": runs,
               "label_agreement": label_agreement(pairs),
               "sft_time_s": sft_time, "wall_time_s": time.perf_counter() - start,
               "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def label_agreement(pairs: list[dict]) -> float:
    """Share of pairs whose chosen completion has the higher true reward (ties count half): the best held-out
    pair accuracy any model can expect, since Bradley-Terry labels of close pairs are near coin flips."""
    wins = 0.0
    for pair in pairs:
        chosen, rejected = task.positive_share([], [pair["chosen"], pair["rejected"]])
        wins += 1.0 if chosen > rejected else 0.5 if chosen == rejected else 0.0
    return wins / len(pairs)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summarize(results: dict) -> dict:
    """Per-beta means over seeds and the two targets: DPO beats SFT beyond seed spread; KL grows as beta shrinks."""
    runs = results["runs"]
    sft = [r["samples/reward"] for r in runs if r["beta"] is None]
    groups = {}
    for r in runs:
        if r["beta"] is not None:
            groups.setdefault(r["beta"], []).append(r)
    by_beta = {beta: {"reward": statistics.mean(r["samples/reward"] for r in rs),
                      "kl": statistics.mean(r["samples/kl"] for r in rs),
                      "reward_min": min(r["samples/reward"] for r in rs)} for beta, rs in sorted(groups.items())}
    kls = [by_beta[b]["kl"] for b in sorted(by_beta)]
    return {"sft_reward_max": max(sft), "sft_reward_mean": statistics.mean(sft), "by_beta": by_beta,
            "dpo_beats_sft": all(v["reward_min"] > max(sft) for v in by_beta.values()),
            "kl_grows_as_beta_shrinks": all(a > b for a, b in zip(kls, kls[1:]))}


def plot(results: dict, path: Path) -> Path:
    """Reward of samples against KL(policy || SFT), one point per run, SFT at KL 0 (the paper's Fig. 2, left)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    runs = results["runs"]
    sft = [r for r in runs if r["beta"] is None]
    ax.errorbar([r["samples/kl"] for r in sft], [r["samples/reward"] for r in sft],
                yerr=[r["samples/reward_stderr"] for r in sft], fmt="k*", markersize=11, label="SFT (start)")
    betas = sorted({r["beta"] for r in runs if r["beta"] is not None})
    colors = plt.cm.viridis([i / max(1, len(betas) - 1) for i in range(len(betas))])
    for beta, color in zip(betas, colors):
        rs = [r for r in runs if r["beta"] == beta]
        ax.errorbar([r["samples/kl"] for r in rs], [r["samples/reward"] for r in rs],
                    xerr=[r["samples/kl_stderr"] for r in rs], yerr=[r["samples/reward_stderr"] for r in rs],
                    fmt="o", color=color, label=f"DPO beta={beta}")
    ax.set_xlabel("KL(policy || SFT) per sequence, nats (from samples)")
    ax.set_ylabel("mean reward of samples (share of positive words)")
    ax.set_title("Reward-KL frontier (cf. DPO paper, Fig. 2 left)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(results: dict, path: Path, plot_name: str) -> Path:
    summary = summarize(results)
    s = results["scale"]
    lines = [
        "# Controlled generation: DPO raises a known reward, at a KL cost that grows as beta shrinks",
        "",
        "Reproduce: `python examples/controlled_generation/run.py --threads 1` (rewrites this report and the plot; "
        "one torch thread is far faster than two when other jobs share the cores).",
        "",
        "The DPO paper's controlled sentiment generation (Rafailov et al. 2023, Sec. 6.1, Fig. 2 left) on a task "
        "this CPU can run: synthetic reviews whose reward is the share of positive words (task.py). "
        f"A {results['parameters'] / 1e6:.1f}M-parameter Llama ({s['layers']} layers, hidden {s['hidden']}, "
        f"word-level tokenizer) is trained with `dpo sft` on {s['corpus']} reviews; `dpo generate` samples two "
        f"completions for each of {s['pair_prompts']} prompts, labelled by a Bradley-Terry draw from the reward "
        f"(P(y1 > y2) = sigmoid({task.BT_SCALE:g} (r1 - r2))) into {results['pairs']} pairs; `dpo train` runs DPO "
        f"from the SFT model ({s['dpo_epochs']:g} epochs, lr {s['dpo_lr']:g}) at each beta with seeds "
        f"{', '.join(map(str, s['seeds']))}; `dpo eval` samples {s['eval_samples']} completions for each of "
        f"{s['eval_prompts']} held-out prompts at temperature 1 and reports their mean reward and "
        "KL(policy || SFT) = mean of log pi(y|x) - log pi_sft(y|x) over the policy's samples.",
        "",
        f"![reward-KL frontier]({plot_name})",
        "",
        "| model | beta | seed | mean reward (± s.e.) | KL to SFT, nats (± s.e.) | win rate vs SFT | held-out pair acc. |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results["runs"]:
        acc = f"{r['heldout_accuracy']:.3f}" if "heldout_accuracy" in r else "-"
        lines.append(f"| {'SFT' if r['beta'] is None else 'DPO'} | {r['beta'] if r['beta'] is not None else '-'} | "
                     f"{r['seed']} | {r['samples/reward']:.3f} ± {r['samples/reward_stderr']:.3f} | "
                     f"{r['samples/kl']:.2f} ± {r['samples/kl_stderr']:.2f} | {r['samples/win_rate']:.3f} | {acc} |")
    lines += [
        "",
        "Per beta, mean over seeds: " + "; ".join(
            f"beta {b:g}: reward {v['reward']:.3f}, KL {v['kl']:.2f}" for b, v in summary["by_beta"].items())
        + f". SFT: reward {summary['sft_reward_mean']:.3f} (highest seed {summary['sft_reward_max']:.3f}).",
        "",
        f"- Every DPO run's mean reward is above the SFT model's highest: **{summary['dpo_beats_sft']}**.",
        f"- KL to the SFT model grows as beta shrinks (means over seeds): **{summary['kl_grows_as_beta_shrinks']}**.",
        "",
        "Held-out pair accuracy (DPO's implicit reward on the 10% of pairs held out by `dpo train`) is modest because "
        f"the labels are noisy: the true reward agrees with only {results['label_agreement']:.1%} of the labels "
        "(ties count half), so that is about the ceiling. The reward of samples is the measure that matters here.",
        "",
        f"Wall time: {results['wall_time_s'] / 60:.1f} min in all (SFT {results['sft_time_s'] / 60:.1f} min), "
        f"on {results['machine']}, a 2-core machine shared with other jobs. The seed changes DPO's data order and "
        "the evaluation samples; the SFT model and the pairs are shared by all runs.",
        "",
    ]
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(HERE / "runs"), help="where models, data and metrics go")
    parser.add_argument("--threads", type=int, help="torch CPU threads (1 is fastest on a busy machine)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = run(Path(args.out))
    plot(results, HERE / "frontier.png")
    write_report(results, HERE / "REPORT.md", "frontier.png")
    print(json.dumps(summarize(results), indent=2))


if __name__ == "__main__":
    main()
