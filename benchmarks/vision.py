"""Vision-language DPO: the vision encoder's share of a training step, and dpokit's layout against TRL's.

    python benchmarks/vision.py             # 2 batches, 8 timed steps each (after 1 warm-up), ~1 min on one core
    python benchmarks/vision.py --quick     # smoke run: a smaller model, 2 timed steps

A random LLaVA (examples/visual_shapes/task.py: a CLIP tower on 224x224 images of 14x14 patches, 256 image tokens
per image, and a Llama, both 256 wide and 4 layers deep), float32 on CPU, the vision tower frozen (dpokit's
default); images of coloured shapes and ~40-token answers. Two batches:

- `4 pairs`: 4 prompts, each with its own image, a chosen and a rejected answer;
- `1 prompt x 4`: one prompt and image with 4 answers, as 3 pairs (the first preferred to each other one).

One training step is the reference's log-probs (no gradient), the policy's log-probs, the sigmoid DPO loss,
backward and an AdamW step, in two layouts on two copies of the same weights, steps interleaved (dpokit, TRL,
dpokit, ...) so that both see the same machine load; medians are reported:

- `dpokit`: the `blocks` layout `dpo train` uses (`batching.make_batch` + `logprobs.sequence_logps`): each
  distinct prompt's images encoded once and its tokens forwarded once, its completions after it;
- `TRL`: `DPOTrainer.concatenated_forward`'s layout, emulated with the model's own forward: chosen and rejected
  rows padded into one batch, `pixel_values` repeated for both, full logits, in the policy and again in the
  reference (TRL 1.16 is not imported: its VLM path needs the hub's processors).

The vision encoder's share is the time spent inside the vision tower (forward hooks) over the step's time. The
first step's losses of the two layouts agree (they score the same tokens with the same weights), which the script
checks before timing.
"""

from __future__ import annotations

import argparse
import copy
import platform
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "examples" / "visual_shapes"))

import task  # noqa: E402
from results_md import replace_section  # noqa: E402

RESULTS = HERE / "RESULTS.md"
START, END = "<!-- vision:start -->", "<!-- vision:end -->"
BETA = 0.1


@dataclass(frozen=True)
class Model:
    image_size: int = 224
    vision_width: int = 256
    text_width: int = 256
    layers: int = 4


QUICK = Model(image_size=112, vision_width=64, text_width=64, layers=2)


def long_answer(colour: str, shape: str) -> str:
    return (f"The shape is {colour}. It is a {shape}. " * 3).strip()


def build_batches(root: Path, model: Model) -> dict[str, list[Any]]:
    """The two batches, tokenized with the model's processor (`data.multimodal`, as `dpo train` does)."""
    from transformers import AutoProcessor

    from dpokit.data import formats, multimodal

    rng = random.Random(0)
    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": task.QUESTION}]}]
    colours = list(task.COLOURS)
    records: dict[str, list[formats.PreferencePair]] = {"4 pairs": [], "1 prompt x 4": []}
    for i in range(4):
        colour, shape = colours[i], task.SHAPES[i % 3]
        path = root / f"image-{i}.png"
        task.draw(path, colour, shape, rng, model.image_size)
        chosen, rejected = long_answer(colour, shape), long_answer(colours[i + 1], shape)
        records["4 pairs"].append(formats.PreferencePair(
            prompt, [{"role": "assistant", "content": chosen}], [{"role": "assistant", "content": rejected}],
            images=(str(path),)))
    answers = [long_answer(c, "circle") for c in colours[:4]]
    records["1 prompt x 4"] = [formats.PreferencePair(
        prompt, [{"role": "assistant", "content": answers[0]}], [{"role": "assistant", "content": other}],
        images=(str(root / "image-0.png"),)) for other in answers[1:]]
    processor = AutoProcessor.from_pretrained(root / "model")
    return {name: multimodal.tokenize_pairs(pairs, processor, max_length=2048)[0] for name, pairs in records.items()}


def dpo_loss(policy: tuple[torch.Tensor, torch.Tensor], reference: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The sigmoid DPO loss (Rafailov et al. 2023, arXiv 2305.18290, Eq. 7) from [pairs] log-probs."""
    margin = (policy[0] - reference[0]) - (policy[1] - reference[1])
    return -torch.nn.functional.logsigmoid(BETA * margin).mean()


def dpokit_logps(model: torch.nn.Module, pairs: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    from dpokit.batching import make_batch
    from dpokit.logprobs import SequenceScorer, sequence_logps

    logps = sequence_logps(SequenceScorer(model), make_batch(pairs, layout="blocks", pad_id=0))
    return logps.chosen, logps.rejected


def trl_logps(model: torch.nn.Module, pairs: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen rows then rejected rows, right-padded, each with its prompt's images: the model's own forward."""
    rows = [p.prompt_ids + c for c in ("chosen", "rejected") for p in pairs
            for c in [p.chosen_ids if c == "chosen" else p.rejected_ids]]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask, scored = torch.zeros_like(ids), torch.zeros(len(rows), width - 1)
    for i, row in enumerate(rows):
        ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), 1
        scored[i, len(pairs[i % len(pairs)].prompt_ids) - 1:len(row) - 1] = 1
    pixels = torch.cat([torch.from_numpy(p.image_inputs["pixel_values"]) for p in pairs] * 2)
    logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits[:, :-1]
    per_token = logits.log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
    logps = (per_token * scored).sum(-1)
    return logps[:len(pairs)], logps[len(pairs):]


class TowerClock:
    """Seconds spent in the vision tower's forward, and the images it encoded, since the last `reset`."""

    def __init__(self, tower: torch.nn.Module) -> None:
        self.seconds, self.images, self._start = 0.0, 0, 0.0
        tower.register_forward_pre_hook(self._enter)
        tower.register_forward_hook(self._leave)

    def _enter(self, module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        self._start = time.perf_counter()
        self.images += int(args[0].shape[0])

    def _leave(self, module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
        self.seconds += time.perf_counter() - self._start

    def reset(self) -> None:
        self.seconds, self.images = 0.0, 0


class Trainer:
    """One layout's policy, frozen reference and optimizer, on its own copy of the weights."""

    def __init__(self, base: torch.nn.Module, logps: Any) -> None:
        from dpokit.vision import freeze_vision, vision_tower

        self.policy, self.reference = copy.deepcopy(base).train(), copy.deepcopy(base).eval()
        freeze_vision(self.policy)
        self.reference.requires_grad_(False)
        self.clocks = [TowerClock(vision_tower(m)) for m in (self.policy, self.reference)]
        self.optimizer = torch.optim.AdamW([p for p in self.policy.parameters() if p.requires_grad], lr=1e-5)
        self.logps = logps
        self.times: list[float] = []
        self.tower_shares: list[float] = []

    def step(self, pairs: list[Any]) -> tuple[float, int]:
        """One training step: (loss, images the vision tower encoded)."""
        for clock in self.clocks:
            clock.reset()
        start = time.perf_counter()
        with torch.no_grad():
            reference = self.logps(self.reference, pairs)
        loss = dpo_loss(self.logps(self.policy, pairs), reference)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - start
        self.times.append(elapsed)
        self.tower_shares.append(sum(c.seconds for c in self.clocks) / elapsed)
        return loss.item(), sum(c.images for c in self.clocks)


def measure(base: torch.nn.Module, pairs: list[Any], steps: int) -> dict[str, Any]:
    ours, theirs = Trainer(base, dpokit_logps), Trainer(base, trl_logps)
    (loss, images), (trl_loss, trl_images) = ours.step(pairs), theirs.step(pairs)  # warm-up, and the check
    if abs(loss - trl_loss) > 1e-4:
        raise SystemExit(f"the layouts disagree: loss {loss} (dpokit) vs {trl_loss} (TRL's layout)")
    for trainer in (ours, theirs):
        trainer.times.clear()
        trainer.tower_shares.clear()
    for _ in range(steps):
        ours.step(pairs)
        theirs.step(pairs)
    ratios = [t / o for o, t in zip(ours.times, theirs.times)]
    return {"pairs": len(pairs), "images": images, "trl_images": trl_images,
            "step": statistics.median(ours.times), "trl_step": statistics.median(theirs.times),
            "speedup": statistics.median(ratios), "share": statistics.median(ours.tower_shares),
            "trl_share": statistics.median(theirs.tower_shares)}


def table(results: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["| batch | pairs | images encoded per step (dpokit / TRL) | step, dpokit (s) | step, TRL layout (s) | "
             "speed-up | vision share, dpokit | vision share, TRL layout |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['pairs']} | {r['images']} / {r['trl_images']} | {r['step']:.3f} | "
                     f"{r['trl_step']:.3f} | {r['speedup']:.2f}x | {r['share']:.0%} | {r['trl_share']:.0%} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: a smaller model, 2 timed steps")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per layout and batch")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: steady timings on a busy machine)")
    parser.add_argument("--no-write", action="store_true", help="print the table only (RESULTS.md untouched)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, steps = (QUICK, 2) if args.quick else (Model(), args.steps)
    from transformers import AutoModelForImageTextToText

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        parameters = task.build_model(root / "model", image_size=model.image_size, vision_width=model.vision_width,
                                      text_width=model.text_width, layers=model.layers)
        batches = build_batches(root, model)
        base = AutoModelForImageTextToText.from_pretrained(root / "model", dtype=torch.float32)
        results = {name: measure(base, pairs, steps) for name, pairs in batches.items()}
    tokens = (model.image_size // 14) ** 2
    lines = table(results)
    print("\n".join(lines))
    if args.quick or args.no_write:
        return
    text = "\n".join([
        "## Vision-language DPO: encoding images once per prompt",
        "",
        f"`python benchmarks/vision.py` on {platform.machine()} {platform.system()}, {args.threads} thread(s), torch "
        f"{torch.__version__}, float32: a random LLaVA ({parameters / 1e6:.1f}M parameters: a CLIP tower on "
        f"{model.image_size}x{model.image_size} images, {tokens} image tokens each, and a Llama, {model.text_width} "
        f"wide and {model.layers} layers each), vision tower frozen, ~40-token answers. A step is the reference's "
        "and the policy's log-probs, the DPO loss, backward and AdamW; medians of "
        f"{steps} interleaved steps (the speed-up is the median of each step pair's ratio). TRL's layout forwards "
        "chosen and rejected as separate rows, each with its image, in the policy and again in the reference.",
        "",
        *lines,
    ])
    replace_section(RESULTS, (START, END), text)
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
