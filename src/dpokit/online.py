"""`dpo online`: iterative DPO — sample from the policy, judge, pair, train, and again, round after round.

    dpo online --model runs/sft/model --prompts prompts.jsonl --reward task.py:score --rounds 3
    dpo online --model runs/sft/model --prompts prompts.jsonl --reward-model runs/rm --ref-update round

A driver over the engine, not a second training loop. Each round r = 1..R:

1. takes its prompts: all of them, or `prompts_per_round` from a stream of passes over the file, each pass a
   permutation seeded by (seed, pass), so round r's prompts depend on the seed and r, never on R;
2. samples K completions per prompt from the current policy (`generate.sample`: batched, KV cache, each
   sequence seeded from (seed, round, prompt, sample), so a round gives the same samples whatever the batch size);
3. scores them: reward functions `f(prompts, completions) -> floats` (what `dpo eval --reward` takes) and
   sequence-classification reward models, summed with `reward_weights`, minus `missing_eos_penalty` for a
   completion cut at `max_new_tokens` (TRL's OnlineDPO penalty);
4. pairs each prompt's samples as ranked data is paired (`--pairs best-worst|all|adjacent`, data/formats.py):
   equal scores make no pair, and are counted, as are pairs with an empty completion (the data formats refuse
   one); writes them to OUTPUT/rounds/round-N.jsonl with score_chosen / score_rejected, data `dpo train` reads
   as it is;
5. trains on that file with `loop.train` into OUTPUT/rounds/round-N/ (a `dpo train` run folder), starting from
   the previous round's model/ (for LoRA, its adapter). Each round is a fresh optimizer and schedule; --max-steps
   and --epochs count per round.

The reference (`ref_update`): "start" keeps the starting model (or --ref-model) for every round, as online DPO
anchors to the SFT model (Guo et al. 2024, arXiv 2402.04792); "round" makes it the policy at the start of the round,
as iterative DPO does (Xiong et al. 2024, arXiv 2312.11456, Alg. 1). TR-DPO's --ref-sync-every applies within a
round. For LoRA, "start" is the adapter switched off; "round" needs --merge-lora, whose merged model/ is the next
round's reference while its adapter/ goes on training.

Resumable and exact: a round whose model/ exists is done and skipped; a round whose pairs file exists goes on
training with `--resume latest` in its folder (from its last checkpoint with --save-every, else from its first
step: the same weights either way). Every file is written under a temporary name and renamed, so a killed or
failed run leaves no half-written round. OUTPUT/online_metrics.jsonl holds one row per finished round, with
`samples/win_rate` from round 2 on (`win_rate`).

`--on-policy` (`on_policy`) has no rounds: one `loop.train` run into OUTPUT whose every step samples its own
prompts from the policy as it trains (online DPO proper); judging and pairing are the rounds' own (`judging`).

Under torchrun (one process group for the whole run: every round's `loop.train` joins it) each rank samples and
judges its share of the round's prompts, seeded as one process seeds them, and every rank gets all the samples
(`judging.sample_and_judge_shared`); rank 0 writes the round's files while the others wait, and all train on
them with DDP. The round files and weights are those of one process with the same global batch.
"""

from __future__ import annotations

import functools
import gc
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import distributed, evaluation, generate, loop, models, report
from .config import Config
from .errors import DPOError
from .judging import (Judge, RewardModel, Sampling, build_pairs, on_every_rank, rank_share, round_prompts,
                      sample_and_judge_shared)
from .on_policy import OnPolicy
from .run_folder import RESUME_MAY_CHANGE

# `dpo online` changes these `dpo train` defaults: all sampled pairs train (no held-out share), and its own folder.
ONLINE_DEFAULTS = {"output": "runs/online", "eval_fraction": 0.0}
REF_UPDATES = ("start", "round")


@dataclass(frozen=True)
class OnlineOptions:
    """How `online` samples, judges and pairs; everything else (model, prompts as `data`, loss, beta, seed,
    output, LoRA, checkpoints) is the `Config` of each round's training."""

    rewards: Sequence[str | Judge] = ()        # module:function or file.py:function (or, from Python, callables)
    reward_models: Sequence[str] = ()          # folders of sequence-classification reward models (one logit)
    reward_weights: Sequence[float] | None = None  # one per judge, rewards first (default: all 1)
    samples_per_prompt: int = 4                # K >= 2 completions per prompt per round
    rounds: int = 3
    prompts_per_round: int | None = None       # default: every prompt, every round
    ref_update: str = "start"                  # start | round
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    sample_batch_size: int = 32                # sequences per sampling / reward-model forward pass
    missing_eos_penalty: float | None = None   # subtracted from a completion cut at max_new_tokens
    reward_device: str | None = None           # where reward models run (default: the policy's --device)
    on_policy: bool = False                    # sample at every optimizer step, in one training run (`on_policy`)

    def problems(self) -> list[str]:
        found = []
        if self.samples_per_prompt < 2:
            found.append(f"--samples-per-prompt must be at least 2 (a pair needs two samples), "
                         f"got {self.samples_per_prompt}")
        for name in ("rounds", "max_new_tokens", "sample_batch_size", "prompts_per_round"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                found.append(f"--{name.replace('_', '-')} must be positive, got {value}")
        if self.on_policy and (self.ref_update == "round" or self.prompts_per_round is not None):
            found.append("--on-policy samples at every step of one training run: it has no rounds (drop "
                         "--ref-update round and --prompts-per-round; --batch-size x --grad-accum prompts per step)")
        if self.ref_update not in REF_UPDATES:
            found.append(f"--ref-update must be one of {', '.join(REF_UPDATES)}, got {self.ref_update!r}")
        if self.temperature <= 0 or not 0 < self.top_p <= 1:
            found.append("--temperature must be > 0 (greedy samples would all be the same) and --top-p in (0, 1]")
        judges = len(self.rewards) + len(self.reward_models)
        if judges == 0:
            found.append("give a judge: --reward module:function and/or --reward-model PATH")
        if self.reward_weights is not None and len(self.reward_weights) != judges:
            found.append(f"--reward-weights has {len(self.reward_weights)} weights for {judges} judges "
                         "(--reward functions first, then --reward-model folders)")
        return found


@dataclass
class OnlineSummary:
    """What `online` returns: the last round's model and one metrics row per finished round."""

    output_dir: Path
    model_dir: Path
    rounds: list[dict[str, Any]] = field(default_factory=list)

    @property
    def metrics_path(self) -> Path:
        return OnlineFiles(self.output_dir).metrics


@dataclass(frozen=True)
class OnlineFiles:
    """Where an online run writes, named once:

        online.json                 the run's options and config (a re-run must match them to continue)
        online_metrics.jsonl        one row per finished round
        rounds/round-N.jsonl        round N's scored pairs (explicit or conversational format)
        rounds/round-N.stats.json   round N's sampling and scoring statistics
        rounds/round-N/             round N's `dpo train` run folder; its model/ is the round's policy
    """

    root: Path

    @property
    def settings(self) -> Path:
        return self.root / "online.json"

    @property
    def metrics(self) -> Path:
        return self.root / "online_metrics.jsonl"

    @property
    def rounds(self) -> Path:
        return self.root / "rounds"

    def pairs(self, n: int) -> Path:
        return self.rounds / f"round-{n}.jsonl"

    def stats(self, n: int) -> Path:
        return self.rounds / f"round-{n}.stats.json"

    def run(self, n: int) -> Path:
        return self.rounds / f"round-{n}"

    def done(self, n: int) -> bool:
        model = self.run(n) / "model"
        return model.is_dir() and any(model.iterdir())


def online(cfg: Config, options: OnlineOptions) -> OnlineSummary:
    """Run `options.rounds` rounds of sample -> judge -> pair -> train from `cfg.model` on the prompts in
    `cfg.data`, into `cfg.output`; finished rounds of an earlier run with the same settings are skipped."""
    check(cfg, options)
    dist = distributed.init(cfg.device)
    files = OnlineFiles(Path(cfg.output))
    if cfg.overwrite_output and dist.is_main:
        for path in (files.rounds, files.metrics, files.settings):
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    distributed.barrier(dist)
    check_same_run(files, cfg, options)
    prompts = generate.read_prompts(cfg.data)
    tokenizer = models.load_tokenizer(cfg.tokenizer or cfg.model)
    prompt_ids = generate.encode_prompts(tokenizer, prompts)
    check_prompt_lengths(cfg, options, prompt_ids)
    judges = load_judges(options, cfg, dist.device)  # a judge that cannot load fails before anything is written
    sampling = Sampling(tokenizer, prompts, prompt_ids, judges, list(options.reward_weights or [1.0] * len(judges)),
                        options.samples_per_prompt, options.max_new_tokens, options.temperature, options.top_p,
                        options.sample_batch_size, options.missing_eos_penalty)
    if dist.is_main:
        write_atomic(files.settings, json.dumps(run_settings(cfg, options), indent=2) + "\n")
    say = print if dist.is_main else _quiet
    if options.on_policy:
        summary = loop.train(cfg.replace(overwrite_output=False), OnPolicy(sampling))
        distributed.cleanup(dist)
        return OnlineSummary(files.root, summary.model_dir or files.root / "model", [])
    start_model: torch.nn.Module | None = None
    for n in range(1, options.rounds + 1):  # every rank sees the same files here: rank 0 wrote them before a barrier
        if files.done(n):
            say(f"round {n}/{options.rounds}: done ({files.run(n) / 'model'}), skipped", flush=True)
            continue
        if not files.pairs(n).is_file():
            if n > 1 and start_model is None:
                start_model = load_policy(cfg, files, 1, dist.device)
            sample_round(n, cfg, options, files, sampling, start_model, dist)
        say(f"round {n}/{options.rounds}: training on {files.pairs(n)}", flush=True)
        loop.train(round_config(cfg, options, files, n))
        distributed.barrier(dist)  # rank 0 has saved the round's model
        if dist.is_main:
            write_metrics(files, options.rounds)
    distributed.cleanup(dist)
    return OnlineSummary(files.root, files.run(options.rounds) / "model",
                         report.read_metrics(files.metrics) if files.metrics.is_file() else [])


def check(cfg: Config, options: OnlineOptions) -> None:
    """Settings `online` cannot run with, all at once in one line."""
    problems = options.problems()
    if cfg.data == "synthetic":
        problems.append("online needs prompts (--prompts FILE; `data` in Python): records with a prompt field")
    if models.is_preset(cfg.model):
        problems.append(f"--model {cfg.model}: online needs a model folder with its tokenizer, not a preset")
    if options.ref_update == "round" and (cfg.lora_r or cfg.lora_adapter) and not cfg.merge_lora:
        problems.append("--ref-update round with LoRA needs --merge-lora (the merged policy is the next round's "
                        "reference; the adapter switched off is only the base model)")
    if options.on_policy and cfg.fsdp and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        problems.append("--on-policy samples from the policy as it trains, which --fsdp shards over the ranks (each "
                        "token of each rank's samples would wait for the others' layers); drop --fsdp")
    if problems:
        raise DPOError("; ".join(problems))


def run_settings(cfg: Config, options: OnlineOptions) -> dict[str, Any]:
    """What makes the run the same run: the options (judges by name) and the config fields that change results."""
    named = {**asdict(options), "rewards": [r if isinstance(r, str) else getattr(r, "__qualname__", repr(r))
                                             for r in options.rewards]}
    named = {k: list(v) if isinstance(v, tuple) else v for k, v in named.items()}
    if not options.on_policy:  # a round-based run's settings read as before the option existed
        named.pop("on_policy")
    # the number of rounds may grow; batch size and device change only float rounding
    return {"options": {k: v for k, v in named.items() if k not in ("rounds", "sample_batch_size", "reward_device")},
            "config": {k: v for k, v in cfg.to_dict().items() if k not in RESUME_MAY_CHANGE}}


def check_same_run(files: OnlineFiles, cfg: Config, options: OnlineOptions) -> None:
    """A re-run continues the run in OUTPUT only with the same settings (more or fewer rounds are fine)."""
    if not files.settings.is_file():
        return
    saved = json.loads(files.settings.read_text(encoding="utf-8"))
    new = run_settings(cfg, options)
    for part in ("options", "config"):
        for name in sorted(set(saved[part]) | set(new[part])):
            if saved[part].get(name) != new[part].get(name):
                raise DPOError(f"{files.root} holds an online run with {name}={saved[part].get(name)!r}, not "
                               f"{new[part].get(name)!r}; give the same settings to continue it, "
                               "--overwrite-output to replace it, or another --output")


def check_prompt_lengths(cfg: Config, options: OnlineOptions, prompt_ids: list[list[int]]) -> None:
    """A prompt must fit the training limits as sampled (training would cut it, or the completion, otherwise)."""
    for i, ids in enumerate(prompt_ids):
        if cfg.max_prompt_length is not None and len(ids) > cfg.max_prompt_length:
            raise DPOError(f"{cfg.data}: prompt {i} has {len(ids)} tokens, over --max-prompt-length "
                           f"{cfg.max_prompt_length}: training would cut the prompt its samples were drawn from; "
                           "raise --max-prompt-length or shorten the prompt")
        if len(ids) + options.max_new_tokens > cfg.max_length:
            raise DPOError(f"{cfg.data}: prompt {i} has {len(ids)} tokens, which with --max-new-tokens "
                           f"{options.max_new_tokens} exceeds --max-length {cfg.max_length}; raise --max-length, "
                           "lower --max-new-tokens or shorten the prompt")


# ---- one round -------------------------------------------------------------------------------------------------


def round_seed(seed: int, n: int) -> int:
    """The sampling seed of round n: each (round, prompt, sample) gets its own stream (`generate._row_seed`)."""
    return seed * 1_000 + n


def sample_round(n: int, cfg: Config, options: OnlineOptions, files: OnlineFiles, sampling: Sampling,
                 start_model: torch.nn.Module | None, dist: distributed.Dist) -> None:
    """Sample, score and pair round n, each rank its share of the prompts; rank 0 writes its statistics, then its
    pairs (their presence marks the round sampled), and the others wait for them."""
    chosen_prompts = round_prompts(len(sampling.prompts), options.prompts_per_round, cfg.seed, n)
    policy = load_policy(cfg, files, n, dist.device)
    judged = sample_and_judge_shared(policy, sampling, chosen_prompts, round_seed(cfg.seed, n), f"round {n}", dist,
                                     progress=cfg.progress and dist.is_main)
    samples, texts, asked, scores, missing_eos = (judged.samples, judged.texts, judged.asked, judged.scores,
                                                  judged.missing_eos)
    records, counts = build_pairs(asked, texts, scores.tolist(), options.samples_per_prompt, cfg.pairs,
                                  chosen_prompts)
    if not records:
        raise DPOError(f"round {n}: no pairs (all {options.samples_per_prompt} samples of every prompt scored the "
                       f"same{' or were empty' if counts['empty_dropped'] else ''}); sample more "
                       "(--samples-per-prompt, --temperature) or use a finer reward")
    stats = {"round": n, "prompts": len(chosen_prompts), "samples": len(samples),
             "samples/reward": scores.mean().item(), "samples/reward_std": scores.std().item(),
             "samples/missing_eos": missing_eos.double().mean().item(),
             "samples/completion_tokens": sum(len(s.completion_ids) for s in samples) / len(samples),
             "pairs": len(records), "pairs/ties_dropped": counts["ties_dropped"],
             "pairs/empty_dropped": counts["empty_dropped"],
             "pairs/score_chosen": sum(r["score_chosen"] for r in records) / len(records),
             "pairs/score_rejected": sum(r["score_rejected"] for r in records) / len(records)}
    stats |= win_rate(files, n, prompt_rewards(chosen_prompts, scores, options.samples_per_prompt))
    if start_model is None:  # round 1 samples from the starting model itself
        stats["samples/kl"] = 0.0
    else:  # KL(policy || starting model) per sequence, as `dpo eval` estimates it; each rank its share
        own = [samples[i] for i in rank_share(len(samples), dist)]
        own_ratios = functools.partial(log_ratio, policy, start_model, own, options.sample_batch_size)
        stats["samples/kl"] = torch.cat(on_every_rank(own_ratios, dist)).mean().item()                # [samples]
    del policy
    gc.collect()
    if not dist.is_main:
        distributed.barrier(dist)  # until rank 0 has written the round's files
        return
    print(f"round {n}/{options.rounds}: {len(samples)} samples of {len(chosen_prompts)} prompts, mean reward "
          f"{stats['samples/reward']:.4f}; {len(records)} pairs ({counts['ties_dropped']} tied and "
          f"{counts['empty_dropped']} with an empty completion dropped)"
          + (f"; beats round {n - 1} on {stats['samples/win_rate']:.0%} of its prompts" if "samples/win_rate" in stats
             else ""), flush=True)
    write_atomic(files.stats(n), json.dumps(stats, indent=2) + "\n")
    write_atomic(files.pairs(n), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    distributed.barrier(dist)


def log_ratio(policy: torch.nn.Module, start_model: torch.nn.Module, samples: list[generate.Sample],
              batch_size: int) -> torch.Tensor:
    """log pi(completion) - log pi_start(completion) per sample `[samples]` float64."""
    if not samples:
        return torch.zeros(0, dtype=torch.float64)
    return (evaluation.completion_logps(policy, samples, batch_size=batch_size).double()
            - evaluation.completion_logps(start_model, samples, batch_size=batch_size).double())


# ---- models of a round -----------------------------------------------------------------------------------------


def load_policy(cfg: Config, files: OnlineFiles, n: int, device: torch.device) -> torch.nn.Module:
    """The policy at the start of round n, for sampling: the starting model (with --lora-adapter), else the
    previous round's model/ (for LoRA without --merge-lora, the base with that adapter)."""
    lora = cfg.lora_r or cfg.lora_adapter
    merged = n > 1 and lora and cfg.merge_lora
    path = str(files.run(n - 1) / "model") if n > 1 and (not lora or merged) else cfg.model
    policy = models.load_model(path, dtype=cfg.dtype, attn_implementation=cfg.attn_implementation)
    adapter = cfg.lora_adapter if n == 1 else None if merged or not lora else str(files.run(n - 1) / "model")
    if adapter:
        policy = models.load_lora_adapter(policy, adapter)
    policy.requires_grad_(False)
    return policy.to(device).eval()


def round_config(cfg: Config, options: OnlineOptions, files: OnlineFiles, n: int) -> Config:
    """Round n's `dpo train` settings: its pairs, its folder, the previous round's policy and the reference
    `options.ref_update` asks for; `--resume latest` goes on from the round's last checkpoint, if any."""
    changes: dict[str, Any] = {"data": str(files.pairs(n)), "format": None, "columns": None,
                               "output": str(files.run(n)), "resume": "latest", "overwrite_output": False,
                               "max_pairs": None}
    previous = files.run(n - 1)
    if n > 1 and (cfg.lora_r or cfg.lora_adapter):
        changes["lora_adapter"] = str(previous / ("adapter" if cfg.merge_lora else "model"))
        if options.ref_update == "round":
            changes["ref_model"] = str(previous / "model")  # merged: the policy at the start of the round
    elif n > 1:
        changes["model"] = str(previous / "model")
        changes["tokenizer"] = cfg.tokenizer or cfg.model
        # "start": the starting model; "round": the default reference, a frozen copy of the round's start
        changes["ref_model"] = (cfg.ref_model or cfg.model) if options.ref_update == "start" else None
    return cfg.replace(**changes)


def prompt_rewards(prompt_indices: list[int], scores: torch.Tensor, k: int) -> dict[str, float]:
    """Each prompt's mean score over its samples (`k` per prompt in order; a prompt drawn twice, over both), keyed
    by its index as a string (a JSON key)."""
    sums: dict[str, list[float]] = {}
    for position, i in enumerate(prompt_indices):
        sums.setdefault(str(i), []).extend(scores[position * k:(position + 1) * k].tolist())
    return {i: sum(values) / len(values) for i, values in sums.items()}


def win_rate(files: OnlineFiles, n: int, rewards: dict[str, float]) -> dict[str, Any]:
    """Round n's per-prompt mean scores (kept in its statistics for later rounds), `samples/win_rate`: the share
    of the prompts both rounds sampled where round n's mean beats round n - 1's (a tie counts half), i.e. the
    policy after round n - 1's training against the one before it; and `samples/win_rate_vs_start`, the same
    against round 1's samples, which the starting policy (the default reference) drew. Absent for round 1 and
    when the rounds share no prompt (--prompts-per-round slices of one pass)."""
    out: dict[str, Any] = {"prompt_rewards": rewards}
    for key, earlier in (("samples/win_rate", n - 1), ("samples/win_rate_vs_start", 1)):
        if 1 <= earlier < n and (rate := _wins(rewards, _prompt_rewards_of(files, earlier))) is not None:
            out[key] = rate
    return out


def _prompt_rewards_of(files: OnlineFiles, n: int) -> dict[str, float]:
    path = files.stats(n)
    return json.loads(path.read_text(encoding="utf-8")).get("prompt_rewards", {}) if path.is_file() else {}


def _wins(rewards: dict[str, float], earlier: dict[str, float]) -> float | None:
    """The share of the prompts in both where `rewards` beats `earlier` (ties half); None when none is shared."""
    shared = [i for i in rewards if i in earlier]
    if not shared:
        return None
    return sum(1.0 if rewards[i] > earlier[i] else 0.5 if rewards[i] == earlier[i] else 0.0 for i in shared) / len(shared)


def write_metrics(files: OnlineFiles, rounds: int) -> None:
    """online_metrics.jsonl, rebuilt from the finished rounds: sampling statistics and the round's last training
    and held-out rows (prefixed train/ and eval rows as they are)."""
    rows = []
    for n in range(1, rounds + 1):
        if not (files.done(n) and files.stats(n).is_file()):
            continue
        row = json.loads(files.stats(n).read_text(encoding="utf-8"))
        row.pop("prompt_rewards", None)
        trained = report.read_metrics(files.run(n) / "metrics.jsonl")
        train_rows = [r for r in trained if "loss" in r]
        eval_rows = [r for r in trained if any(k.startswith("eval/") for k in r)]
        if train_rows:
            row |= {f"train/{k}": v for k, v in train_rows[-1].items() if k != "epoch"}
        if eval_rows:
            row |= {k: v for k, v in eval_rows[-1].items() if k.startswith("eval/")}
        rows.append(row)
    write_atomic(files.metrics, "".join(json.dumps(r) + "\n" for r in rows))


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename: the file is whole or absent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


# ---- judges ----------------------------------------------------------------------------------------------------


def load_judges(options: OnlineOptions, cfg: Config, device: torch.device) -> list[tuple[str, Judge]]:
    """(name for messages, callable) per judge: the reward functions, then the reward models (on `device`, this
    rank's, unless --reward-device says otherwise)."""
    judges: list[tuple[str, Judge]] = []
    for reward in options.rewards:
        if isinstance(reward, str):
            judges.append((f"--reward {reward}", evaluation.load_reward(reward)))
        else:
            judges.append((f"reward {getattr(reward, '__qualname__', repr(reward))}", reward))
    if options.reward_device:
        device = distributed.resolve_device(options.reward_device)
    for path in options.reward_models:
        judges.append((f"--reward-model {path}", RewardModel(path, device=device, dtype=cfg.dtype,
                                                             batch_size=options.sample_batch_size,
                                                             max_length=cfg.max_length)))
    return judges


def _quiet(*args: Any, **kwargs: Any) -> None:
    """Ranks other than 0 print nothing (rank 0 says it for all)."""
