"""Vision-language DPO on a synthetic visual task, on a CPU: does the policy learn to read the image?

    python examples/visual_shapes/run.py --out runs/visual_shapes   # about 10 minutes on one busy CPU core

1. Draw images of one coloured shape (6 colours x 3 shapes, random place and size) and build a tiny random
   LLaVA with its processor (task.py), saved as a Hugging Face folder.
2. SFT on the right answers ("The shape is red.") to the one question "What colour is the shape?" (`dpo sft`).
3. DPO from the SFT model on pairs: chosen the right colour, rejected another (`dpo train`).
4. On held-out images (`dpo eval`): reward accuracy and margin of the DPO policy against the SFT model, and the
   share of greedy answers (`dpo generate`) that name the right colour, for the SFT and the DPO model.

Every step runs the `dpo` command in a fresh process (`python -m dpokit ...`), as a user does.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import task  # noqa: E402


def dpo(args: list[str], threads: int) -> None:
    """`python -m dpokit ARGS`; its output goes to the terminal, and a failure stops the example."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    print("$ dpo " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "dpokit", *args], check=True, env=env)


def answer_accuracy(samples: Path, prompts: Path) -> float:
    """The share of greedy answers that name the image's colour and no other."""
    right = 0
    for sample, prompt in zip(read_jsonl(samples), read_jsonl(prompts), strict=True):
        named = [c for c in task.COLOURS if c in sample["completion"]]
        right += named == [prompt["colour"]]
    return right / len(read_jsonl(prompts))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rng = random.Random(args.seed)
    data = out / "data"
    train = task.write_records(data, "train", args.train, rng, args.image_size)
    held_out = task.write_records(data, "heldout", args.heldout, rng, args.image_size)
    parameters = task.build_model(out / "init", image_size=args.image_size, vision_width=args.vision_width,
                                  text_width=args.text_width, seed=args.seed)
    common = ["--batch-size", str(args.batch_size), "--device", "cpu", "--no-progress", "--report-to", "none",
              "--seed", str(args.seed), "--warmup-steps", "5"]

    dpo(["sft", "--model", str(out / "init"), "--data", str(train["sft"]), "--output", str(out / "sft"),
         "--eval-fraction", "0", "--lr", str(args.sft_lr), "--epochs", str(args.sft_epochs), *common], args.threads)
    rpo = ["--rpo-alpha", str(args.rpo_alpha)] if args.rpo_alpha else []
    dpo(["train", "--model", str(out / "sft" / "model"), "--data", str(train["pairs"]), "--eval-data",
         str(held_out["pairs"]), "--output", str(out / "dpo"), "--beta", str(args.beta), "--lr", str(args.dpo_lr),
         "--epochs", str(args.dpo_epochs), *rpo, *common], args.threads)
    dpo(["eval", "--model", str(out / "dpo" / "model"), "--ref-model", str(out / "sft" / "model"), "--data",
         str(held_out["pairs"]), "--beta", str(args.beta), "--out", str(out / "eval.json"), "--device", "cpu"],
        args.threads)
    accuracy = {}
    for name in ("sft", "dpo"):
        samples = out / f"{name}_samples.jsonl"
        dpo(["generate", "--model", str(out / name / "model"), "--prompts", str(held_out["prompts"]), "--out",
             str(samples), "--temperature", "0", "--max-new-tokens", "8", "--device", "cpu"], args.threads)
        accuracy[name] = answer_accuracy(samples, held_out["prompts"])

    metrics = json.loads((out / "eval.json").read_text())
    results = {
        "held_out_pairs": args.heldout,
        "reward_accuracy": metrics["eval/rewards/accuracies"],
        "reward_margin": metrics["eval/rewards/margins"],
        "answer_accuracy_sft": accuracy["sft"],
        "answer_accuracy_dpo": accuracy["dpo"],
        "chance": 1 / len(task.COLOURS),
        "parameters": parameters,
        "minutes": (time.perf_counter() - started) / 60,
        "settings": vars(args),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/visual_shapes", help="folder for the data, models and results")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads per dpo process (1 runs steadiest on a busy machine)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the images, the model and the runs")
    parser.add_argument("--train", type=int, default=768, help="training images (one SFT example and one pair each)")
    parser.add_argument("--heldout", type=int, default=200, help="held-out images (one pair each)")
    parser.add_argument("--image-size", type=int, default=56, help="image side in pixels (a multiple of 14)")
    parser.add_argument("--vision-width", type=int, default=32, help="hidden size of the CLIP vision tower")
    parser.add_argument("--text-width", type=int, default=64, help="hidden size of the Llama language model")
    parser.add_argument("--batch-size", type=int, default=16, help="examples or pairs per step")
    parser.add_argument("--sft-lr", type=float, default=3e-3, help="SFT learning rate")
    parser.add_argument("--sft-epochs", type=float, default=1.0, help="SFT passes over the training images")
    parser.add_argument("--dpo-lr", type=float, default=3e-4, help="DPO learning rate")
    parser.add_argument("--dpo-epochs", type=float, default=2.0, help="DPO passes over the training pairs")
    parser.add_argument("--rpo-alpha", type=float, default=0.0,
                        help="weight of an NLL term on the chosen answer (RPO, arXiv 2404.19733); 0: plain DPO")
    parser.add_argument("--beta", type=float, default=0.1, help="DPO beta")
    results = run(parser.parse_args(argv))
    print(json.dumps({k: v for k, v in results.items() if k != "settings"}, indent=2))


if __name__ == "__main__":
    main()
