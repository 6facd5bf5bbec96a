"""`dpo online --on-policy`: online DPO, where every optimizer step trains on pairs the policy sampled just before.

    dpo online --model runs/sft/model --prompts prompts.jsonl --reward task.py:score --on-policy --max-steps 200

Online AI feedback (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback", arXiv 2402.04792,
Alg. 1): at step s, take the step's prompts, sample K completions of each from the current policy, judge them,
pair them and take one optimizer step on those pairs. It is one `loop.train` run (one AdamW, schedule, reference
and metrics stream), whose `feeds.PairSource` is `OnPolicy` instead of a data file: the pairs go through the same
tokenization (`tokenize_pairs`) and batching (`make_batch`, the run's layout) as offline pairs.

- A step takes `--batch-size x --grad-accum` prompts per process (its units: `--epochs` count passes over the
  prompts), the s-th slice of a stream of seeded passes over the file (`judging.round_prompts`); micro-batch i
  holds the pairs of the step's prompts i*batch .. (i+1)*batch - 1, or, with --micro-batch-tokens, the step's pairs
  cut by tokens.
- Under torchrun each rank samples and judges its own slice of the step's prompts, seeded as one process seeds
  them, and the ranks exchange their tokenized pairs: every rank then holds the step's pairs as one process would,
  deals the micro-batches round-robin so that each runs as many (DDP all-reduces once per step on every rank;
  `step_shares`), and divides by the step's pairs on all ranks: the gradient of the one-process step.
- Sampling uses the policy's current weights (LoRA: with the adapter on) through the KV-cache generator, under
  no_grad in eval mode, then back to train mode; each sequence is seeded from (seed, step, prompt, sample), so a
  step's samples depend only on the weights and the step number, and `--resume` continues exactly.
- Pairs as `--pairs` says; tied scores make no pair and are counted, as are pairs with an empty completion. A step
  left without pairs trains nothing (its `online/pairs` is 0) but counts as a step of the schedule.
- Each metrics row adds what the steps since the last row sampled, under round-based `dpo online`'s names with
  `online/`: per step `online/samples`, `online/pairs`, `online/pairs/ties_dropped`, `online/pairs/empty_dropped`;
  means `online/samples/reward`, `online/samples/missing_eos`, `online/samples/completion_tokens`,
  `online/pairs/score_chosen`, `online/pairs/score_rejected`. Those sums are saved with each checkpoint.
"""

from __future__ import annotations

import math
import random
from typing import Any

import torch

from . import distributed
from .batching import Batch, make_batch
from .config import Config
from .data import preparation as pipeline
from .data.formats import PreferencePair
from .data.tokenization import TokenizedPair, tokenize_pairs
from .errors import DPOError
from .feeds import StepPairs
from .judging import Judged, Sampling, build_pairs, on_every_rank, round_prompts, sample_and_judge
from .objective import Objective
from .pair_sampler import even_shares, split_by_tokens, split_further
from .placement import run_layout

# The sums behind a row's `online/...` metrics: per-step counts (divided by steps), per-sample means (by samples)
# and per-pair means (by pairs).
PER_STEP = ("samples", "pairs", "pairs/ties_dropped", "pairs/empty_dropped")
PER_SAMPLE = ("samples/reward", "samples/missing_eos", "samples/completion_tokens")
PER_PAIR = ("pairs/score_chosen", "pairs/score_rejected")
SUMS = ("steps", *PER_STEP, *PER_SAMPLE, *PER_PAIR)


def step_seed(seed: int, step: int) -> int:
    """The sampling seed of step `step`: a distinct 56-bit stream per (seed, step), from which each (prompt,
    sample) gets its own (`generate._row_seed`)."""
    return random.Random(f"on-policy-{seed}-{step}").getrandbits(56)


class OnPolicy:
    """`loop.train`'s pair source for `--on-policy`: no pairs before training (held-out pairs from --eval-data
    only), the prompts as the epoch, and a `Feed` sampling the policy at every step."""

    def __init__(self, sampling: Sampling) -> None:
        self.sampling = sampling

    def prepare(self, cfg: Config, objective: Objective) -> tuple[Any, pipeline.PreparedData]:
        if not objective.paired:
            raise DPOError(f"--on-policy trains on sampled pairs: --loss {cfg.loss} is unpaired; use a paired loss")
        if cfg.precompute_ref:
            raise DPOError("--on-policy samples its pairs while training, so --precompute-ref cannot score them "
                           "before; drop --precompute-ref")
        objective.check_data(cfg, frozenset({"score_chosen", "score_rejected"}))
        tokenizer = self.sampling.tokenizer
        held_out: list[TokenizedPair] = []
        if cfg.eval_data:
            settings = pipeline.DataSettings.from_settings(cfg.to_dict(), data=cfg.eval_data, eval_data=None,
                                                           data_split=cfg.eval_split or "test", eval_fraction=0.0,
                                                           sft=False)
            held_out = pipeline.prepare(settings, tokenizer, cache=cfg.cache, cache_dir=cfg.cache_dir,
                                        progress=cfg.progress).train
        notes = [f"on-policy: every step samples {self.sampling.samples_per_prompt} completions of each of "
                 f"{cfg.batch_size * cfg.grad_accum} prompts per process (of {len(self.sampling.prompts)}), "
                 f"pairs them ({cfg.pairs}) and trains on them"]
        return tokenizer, pipeline.PreparedData([], held_out, tokenizer.pad_token_id, notes,
                                                {"prompts": len(self.sampling.prompts), "eval_pairs": len(held_out)})

    def epoch_size(self, data: pipeline.PreparedData) -> int:
        return len(self.sampling.prompts)

    def open(self, cfg: Config, data: pipeline.PreparedData, policy: torch.nn.Module, consumed: int,
             dist: distributed.Dist) -> Feed:
        return Feed(self.sampling, policy, cfg, data.pad_id, dist)


class Feed:
    """Each step: sample, judge, pair, tokenize and batch this rank's prompts of the step (`feeds.PairFeed`)."""

    def __init__(self, sampling: Sampling, policy: torch.nn.Module, cfg: Config, pad_id: int,
                 dist: distributed.Dist) -> None:
        self.sampling, self.policy, self.cfg, self.dist = sampling, policy, cfg, dist
        self.limits = pipeline.DataSettings.from_settings(cfg.to_dict()).limits()
        self.layout: dict[str, Any] = dict(layout=run_layout(cfg), pad_id=pad_id,
                                           row_capacity=cfg.max_tokens_per_batch)
        self.sums = dict.fromkeys(SUMS, 0.0)

    def next_step(self, step: int) -> StepPairs:
        cfg, dist = self.cfg, self.dist
        per_rank = cfg.batch_size * cfg.grad_accum
        prompts = round_prompts(len(self.sampling.prompts), per_rank * dist.world_size, cfg.seed, step)
        first = dist.rank * per_rank

        def own_pairs() -> list[TokenizedPair]:
            self.policy.eval()
            with torch.no_grad():
                judged = sample_and_judge(self.policy, self.sampling, prompts[first:first + per_rank],
                                          step_seed(cfg.seed, step), f"step {step}", first_prompt=first)
            self.policy.train()
            return self.pairs(judged, first)

        pairs = [pair for part in on_every_rank(own_pairs, dist) for pair in part]  # the step's, in prompt order
        batches, stand_ins = self.batches(pairs)
        return StepPairs(batches, len(pairs), stand_ins)

    def pairs(self, judged: Judged, first: int) -> list[TokenizedPair]:
        """This rank's pairs of the step, tokenized as offline pairs are, each with its prompt's position in the
        step (`first` is this rank's first) as its group; counted into the sums."""
        k = self.sampling.samples_per_prompt
        records, counts = build_pairs(judged.asked, judged.texts, judged.scores.tolist(), k, self.cfg.pairs,
                                      list(range(first, first + len(judged.prompt_indices))))
        preference = [PreferencePair(r["prompt"], r["chosen"], r["rejected"],
                                     {"score_chosen": r["score_chosen"], "score_rejected": r["score_rejected"]},
                                     group=r["prompt_index"]) for r in records]
        tokenized, report = tokenize_pairs(preference, self.sampling.tokenizer, **self.limits, workers=1)
        if report.dropped:  # prompts are checked to fit with max_new_tokens: only --max-completion-length can cut
            raise DPOError(f"{report.dropped} sampled pairs do not fit the length limits ({'; '.join(report.lines())})")
        samples = judged.samples
        self.sums["steps"] += 1
        self.sums["samples"] += len(samples)
        self.sums["pairs"] += len(records)
        self.sums["pairs/ties_dropped"] += counts["ties_dropped"]
        self.sums["pairs/empty_dropped"] += counts["empty_dropped"]
        self.sums["samples/reward"] += judged.scores.sum().item()
        self.sums["samples/missing_eos"] += judged.missing_eos.sum().item()
        self.sums["samples/completion_tokens"] += sum(len(s.completion_ids) for s in samples)
        self.sums["pairs/score_chosen"] += sum(r["score_chosen"] for r in records)
        self.sums["pairs/score_rejected"] += sum(r["score_rejected"] for r in records)
        return tokenized

    def batches(self, pairs: list[TokenizedPair]) -> tuple[list[Batch], int]:
        """This rank's micro-batches of the step's `pairs` (all ranks'), and how many of them, at the end, are
        stand-ins (`StepPairs.stand_ins`). The cuts: the pairs of the step's prompts i*batch .. (i+1)*batch - 1
        (those with pairs), or with a token budget the pairs cut by tokens; dealt by `step_shares`."""
        if self.cfg.micro_batch_tokens:
            cuts = split_by_tokens(pairs, self.cfg.micro_batch_tokens)
        else:
            batch = self.cfg.batch_size
            cuts = [[j for j, p in enumerate(pairs) if (p.group or 0) // batch == i]
                    for i in range(self.cfg.grad_accum * self.dist.world_size)]
        shares = step_shares([cut for cut in cuts if cut], len(pairs), self.dist.rank, self.dist.world_size)
        return [make_batch([pairs[j] for j in cut], pair_ids=cut, **self.layout) for cut, _ in shares], \
            sum(stand_in for _, stand_in in shares)

    def metrics(self, dist: distributed.Dist) -> dict[str, float]:
        values = torch.tensor([self.sums[name] for name in SUMS], dtype=torch.float64)
        total = dict(zip(SUMS, distributed.reduce_sums(values, dist).tolist()))
        self.sums = dict.fromkeys(SUMS, 0.0)
        steps = max(total["steps"] / dist.world_size, 1.0)
        out = {f"online/{name}": total[name] / steps for name in PER_STEP}
        out |= {f"online/{name}": total[name] / max(total["samples"], 1.0) for name in PER_SAMPLE}
        out |= {f"online/{name}": total[name] / max(total["pairs"], 1.0) for name in PER_PAIR}
        return out

    def state_dict(self) -> dict[str, Any]:
        return dict(self.sums)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sums |= {name: float(value) for name, value in state.items() if name in self.sums}


def step_shares(cuts: list[list[int]], num_pairs: int, rank: int, world_size: int) -> list[tuple[list[int], bool]]:
    """This rank's micro-batches of a step's non-empty `cuts` (positions into its `num_pairs` pairs) as
    (positions, stand-in), as many on every rank: the largest cuts are halved until every rank has one per
    round (`split_further`, never below one pair a cut), then cut b goes to rank b % world_size, as `micro_batches`
    deals a global batch. Only when the step has too few pairs does a rank get a stand-in: cut 0 again, trained
    with weight 0 (its last batches). One process: the cuts as they are."""
    if not cuts:
        return []
    cuts = split_further(cuts, min(math.ceil(len(cuts) / world_size) * world_size, num_pairs))
    return [(cuts[share[0]], False) if share else (cuts[0], True)
            for share in even_shares(len(cuts), 1, rank, world_size)]
