"""The training loop, top to bottom: build everything, then step, accumulate, clip, schedule, eval, log, save.

    dpo train                                  # the built-in synthetic task on the tiny preset (CPU, < 1 min)
    dpo train --model PATH --data pairs.jsonl  # your model and data
    torchrun --nproc-per-node 8 -m dpokit train --model PATH --data pairs.jsonl

Losses, log-probs, layouts and the reference live in their own modules; this file only wires them together.
"""

from __future__ import annotations

import functools
import math
import random
import shlex
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import (accelerator, checkpoint, distributed, health, host_memory, model_card, models, plan, report,
               run_folder, trackers)
from .batching import Batch, make_batch
from .config import Config
from .data import preparation as pipeline
from .data.tokenization import TokenizedPair
from .errors import DPOError, TrainingFailure, import_extra
from .feeds import PairFeed, PairSource, StepPairs
from .metrics import MetricMeter
from .objective import BatchLoss, Objective
from .pair_sampler import StepBatches, even_shares, micro_batches
from .placement import Models, Placement, build_models, run_layout
from .reference import Reference
from .run_files import RunFiles


@dataclass
class Summary:
    """What `train` returns: where things are and how the run went."""

    output_dir: Path
    model_dir: Path | None
    steps: int
    eval_before: dict[str, float]
    eval_after: dict[str, float]
    final_train: dict[str, float]
    wall_time_s: float
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def metrics_path(self) -> Path:
        return RunFiles(self.output_dir).metrics

    @property
    def curves_path(self) -> Path:
        return RunFiles(self.output_dir).curves



def train(cfg: Config, source: PairSource | None = None) -> Summary:
    """Run DPO (or any registered loss) as `cfg` says; returns a `Summary`.

    `source`: where each step's pairs come from; by default the pairs of `cfg.data` (`FilePairs`).
    The first SIGTERM/SIGINT saves a checkpoint at the end of the current step and stops (`Interrupted`).
    """
    with checkpoint.StopSignals() as stop:
        return _train(cfg, stop, source or FilePairs())


def _train(cfg: Config, stop: checkpoint.StopSignals, source: PairSource) -> Summary:
    start_time = time.perf_counter()
    accelerator.check_device(cfg.device, cfg.dtype)
    dist = distributed.init(cfg.device)
    cfg = cfg.replace(attn_implementation=accelerator.choose_attention(dist.device, cfg.attn_implementation))
    seed_everything(cfg.seed)
    files = RunFiles(Path(cfg.output))
    tracker_names = trackers.parse_report_to(cfg.report_to)  # a missing extra fails now, not after loading
    if cfg.lora_r or cfg.lora_adapter:
        import_extra("peft", "lora", "--lora-r" if cfg.lora_r else "--lora-adapter")
    claim_output(cfg, files, dist)

    # ---- set-up, phase by phase --------------------------------------------------------------------------------
    objective = Objective.from_config(cfg)
    placement = Placement.from_config(cfg, dist)
    tokenizer, data = source.prepare(cfg, objective)
    plan_line, predicted_peak = plan.startup_summary(cfg, pairs=data.train, nproc=dist.world_size,
                                                     device=dist.device.type)  # before the slow model load
    if dist.is_main:
        print(plan_line, flush=True)
    built = build_models(cfg, objective.strategy, placement, dist, data.train + data.eval, data.pad_id)
    policy, model, reference = built.policy, built.scorer, built.reference
    pairs_per_step = cfg.batch_size * cfg.grad_accum * dist.world_size  # a source's units: pairs, or prompts
    epoch_size = source.epoch_size(data)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * epoch_size / pairs_per_step))
    eval_every = cfg.eval_every or (total_steps // 10 if total_steps >= 20 else None)
    optimizer, schedule = make_optimizer_and_schedule(policy, cfg, total_steps)
    resumed = restore(cfg, files, built, optimizer, schedule, placement, dist)
    state = resumed.record.state if resumed is not None else checkpoint.TrainerState()
    reporter = open_reporter(cfg, files, total_steps, tracker_names, resumed, data.notes, dist)
    monitor = health.HealthMonitor.from_config(cfg, data.train, pretrained=not models.is_preset(cfg.model))
    if resumed is not None and dist.is_main:
        monitor.replay(report.read_metrics(files.metrics))  # the rows up to the checkpoint: no alarm twice
    scoring = Scoring(objective, model, reference, layout=run_layout(cfg), pad_id=data.pad_id,
                      row_capacity=cfg.max_tokens_per_batch, device=dist.device, dtype=cfg.dtype)
    held_out = functools.partial(evaluate, scoring, data.eval, len(data.train), cfg.eval_batch_size or cfg.batch_size,
                                 dist)
    if resumed is None and (eval_before := held_out()):
        state.eval_before = eval_before
        reporter.log_eval(0, 0.0, eval_before)
        reporter.print(f"{objective.headline[1]} before training: {eval_before[objective.headline[0]]:.3f}")
    feed = source.open(cfg, data, built.policy, state.pairs_consumed, dist)
    meter = resume_rank(resumed, feed, dist)  # this rank's metric sums since the last log step, its generators
    last_log_time = time.perf_counter() - state.since_log_s
    lean_host_memory = cfg.lean_host_memory and dist.device.type == "cpu" and host_memory.lean_allocator()
    row: dict[str, Any] = {}

    # ---- train: one optimizer step per iteration ---------------------------------------------------------------
    for step in range(state.step + 1, total_steps + 1):
        # Each micro-loss is its pairs' loss sum over the pairs in the whole step (all ranks), times world size
        # because DDP averages gradients: the gradient is then exactly that of the mean loss over the step's
        # pairs, however they are split into micro-batches and ranks.
        micro = feed.next_step(step)
        step_loss = torch.zeros((), device=dist.device)
        for i, batch in enumerate(micro.batches):
            batch = batch.to(dist.device)
            stand_in = i >= len(micro.batches) - micro.stand_ins  # only there for DDP's all-reduce: weight 0
            with distributed.no_sync(model, enabled=i < len(micro.batches) - 1):
                scored = scoring.loss(batch, train=True)
                loss = scored.total * (0.0 if stand_in else dist.world_size / micro.pairs)
                loss.backward()
            step_loss += loss.detach()
            meter.add(scored.per_pair, scored.policy_logps, scored.outputs, batch.num_tokens, counted=not stand_in)
        grad_norm = distributed.clip_grad_norm(
            policy.parameters(), cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
        finite = bool(torch.isfinite(grad_norm) and torch.isfinite(step_loss))
        if finite:
            optimizer.step()
        state.bad_steps = 0 if finite else state.bad_steps + 1
        meter.end_step(grad_norm, skipped=not finite)
        optimizer.zero_grad(set_to_none=True)
        if lean_host_memory:
            host_memory.release_free_memory()
        schedule.step()
        reference.after_step(step, policy)  # TR-DPO: the reference follows the policy
        state.step, state.pairs_consumed = step, step * pairs_per_step

        epoch = round(step * pairs_per_step / epoch_size, 4)
        if step % cfg.log_every == 0 or step == total_steps:
            metrics = meter.reduce(dist)
            elapsed = time.perf_counter() - last_log_time
            pairs, tokens = metrics.pop("pairs"), metrics.pop("tokens")
            row = {"step": step, "epoch": epoch, **metrics, "lr": schedule.get_last_lr()[0],
                   "pairs_per_s": pairs / elapsed, "tokens_per_s": tokens / elapsed, **feed.metrics(dist)}
            alarms = monitor.check(row)
            reporter.log(row | health.row_keys(alarms))
            for alarm in alarms:
                reporter.print(alarm.line)
            reporter.progress(step, row)
            meter = MetricMeter(dist.device)
            last_log_time = time.perf_counter()
        if eval_every and step % eval_every == 0 and step < total_steps:
            reporter.log_eval(step, epoch, held_out())

        # ---- checkpoint at the step boundary: every --save-every steps, at the end, on a signal, on failure ----
        failed = state.bad_steps >= cfg.max_bad_steps
        stopping = distributed.any_rank(stop.received is not None, dist)  # every rank stops at the same step
        saved = None
        if failed or stopping or (cfg.save_every and (step % cfg.save_every == 0 or step == total_steps)):
            state.since_log_s = time.perf_counter() - last_log_time
            saved = save_checkpoint(cfg, files, state, built, optimizer, schedule, rank_sums(meter, feed), dist)
        if failed or stopping:
            raise stopped_early(step, state.bad_steps if failed else None, stop.received, saved)

    # ---- finish: evaluate, save the model, report -----------------------------------------------------------------
    eval_after = held_out()
    reporter.log_eval(state.step, round(state.step * pairs_per_step / epoch_size, 4), eval_after)
    final_train = {k: v for k, v in row.items() if k not in ("step", "epoch")}
    outcome = Outcome(state.step, state.eval_before, eval_after, final_train, objective.headline, monitor.alarms,
                      plan.peak_line(dist.device.type, predicted_peak))
    model_dir = finish(cfg, files, built, tokenizer, reporter, objective, data.counts, outcome, placement, dist)
    distributed.cleanup(dist)
    return Summary(files.root, model_dir, state.step, state.eval_before, eval_after, final_train,
                   time.perf_counter() - start_time, data.counts)


# ---- the phases ------------------------------------------------------------------------------------------------


def prepare_data(cfg: Config, objective: Objective) -> tuple[Any, pipeline.PreparedData]:
    """The tokenizer and the tokenized train / eval pairs, checked against what the losses need from the data."""
    if cfg.data != "synthetic" and models.is_preset(cfg.model) and not cfg.tokenizer:
        raise DPOError(f"--data {cfg.data} needs a tokenizer: pass --model PATH (or --tokenizer PATH)")
    tokenizer = models.load_tokenizer(cfg.tokenizer or cfg.model)  # a preset's: the built-in task's symbols
    settings = pipeline.DataSettings.from_settings(cfg.to_dict(), unpaired=not objective.paired,
                                                   sft=all(spec.name == "sft" for spec in objective.specs))
    data = pipeline.prepare(settings, tokenizer, cache=cfg.cache, cache_dir=cfg.cache_dir, progress=cfg.progress)
    objective.check_data(cfg, frozenset.intersection(*(frozenset(p.extras) for p in data.train + data.eval)))
    if not cfg.stream_data and not any(spec.needs_gold for spec in objective.specs):  # streamed data has no gold
        data = without_gold(data)
    return tokenizer, data


def without_gold(data: pipeline.PreparedData) -> pipeline.PreparedData:
    """The data with no gold responses (TPO's third column) when no selected loss reads them: forwarding them
    would cost one more completion per pair for nothing. Said once in the data notes."""
    golds = sum(p.gold_ids is not None for p in data.train + data.eval)
    if not golds:
        return data
    return replace(data, train=[replace(p, gold_ids=None) for p in data.train],
                   eval=[replace(p, gold_ids=None) for p in data.eval],
                   notes=[*data.notes, f"gold responses: {golds} ignored (no selected loss reads them; --loss tpo "
                          "does)"])


class FilePairs:
    """`dpo train`'s source: the pairs of --data, tokenized before training, in seeded epochs (`micro_batches`)."""

    def prepare(self, cfg: Config, objective: Objective) -> tuple[Any, pipeline.PreparedData]:
        return prepare_data(cfg, objective)

    def epoch_size(self, data: pipeline.PreparedData) -> int:
        return len(data.train)

    def open(self, cfg: Config, data: pipeline.PreparedData, policy: torch.nn.Module, consumed: int,
             dist: distributed.Dist) -> FileFeed:
        return FileFeed(step_batches(cfg, data, consumed, dist), cfg.batch_size * cfg.grad_accum * dist.world_size)


class FileFeed:
    """Every step the same number of pairs; its position is the loop's count of pairs consumed, so no state."""

    def __init__(self, batches: StepBatches, pairs_per_step: int) -> None:
        self.batches, self.pairs_per_step = batches, pairs_per_step

    def next_step(self, step: int) -> StepPairs:
        return StepPairs(next(self.batches), self.pairs_per_step)

    def metrics(self, dist: distributed.Dist) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def stopped_early(step: int, bad_steps: int | None, signum: int | None, saved: Path | None) -> TrainingFailure:
    """Why the run ends after `step`: `bad_steps` consecutive non-finite steps, or else the signal `signum`."""
    if bad_steps is not None:
        kept = f"checkpoint {saved} holds the weights from before them" if saved else "no checkpoint saved"
        return TrainingFailure(f"step {step}: {bad_steps} consecutive steps with a non-finite loss or gradient were "
                               f"skipped ({kept}); try a lower --lr, --dtype float32 instead of bfloat16, or "
                               "--max-grad-norm 1.0")
    where = f"saved checkpoint {saved}; continue with the same command plus --resume" if saved else \
        "no checkpoint saved"
    return checkpoint.Interrupted(f"stopped by {checkpoint.signal_name(signum)} after step {step}: {where}",
                                  signum or 15)


def claim_output(cfg: Config, files: RunFiles, dist: distributed.Dist) -> None:
    """Refuse (or with --overwrite-output, clear) a folder holding another run, before anything is written there;
    rank 0 looks, and every rank stops when it refuses."""
    refusal = None
    if dist.is_main:
        try:
            run_folder.check_fresh_output(files.root, cfg.resume, cfg.overwrite_output)
        except DPOError as err:
            refusal = err
    if distributed.any_rank(refusal is not None, dist):
        raise refusal or DPOError(f"{files.root}: refused by rank 0 (see its message)")


def step_batches(cfg: Config, data: pipeline.PreparedData, consumed: int, dist: distributed.Dist) -> StepBatches:
    """Each optimizer step's micro-batches for this rank, from the sampler's position `consumed` (pairs)."""
    groups = [("group", p.group) if p.group is not None else ("pair", i) for i, p in enumerate(data.train)]
    order = micro_batches(len(data.train), cfg.batch_size, cfg.seed, dist.rank, dist.world_size,
                          consumed=consumed, groups=groups)
    return StepBatches(order, data.train, grad_accum=cfg.grad_accum, num_workers=cfg.num_workers,
                       token_budget=cfg.micro_batch_tokens, common_count=lambda n: distributed.reduce_max(n, dist),
                       layout=run_layout(cfg), pad_id=data.pad_id, row_capacity=cfg.max_tokens_per_batch)


def restore(cfg: Config, files: RunFiles, built: Models, optimizer: torch.optim.Optimizer,
            schedule: torch.optim.lr_scheduler.LambdaLR, plan: Placement, dist: distributed.Dist,
            ) -> checkpoint.Loaded | None:
    """`--resume`: weights, optimizer, schedule and a moved reference now; the loop takes the counters, generators
    and metric sums from the returned checkpoint. None when there is nothing to resume."""
    if not cfg.resume:
        return None
    resumed = checkpoint.load(cfg.resume, files.root, print if dist.is_main else _quiet)
    if resumed is None:
        if dist.is_main:
            print(f"no checkpoint in {files.checkpoints}: starting a fresh run", flush=True)
        return None
    record = resumed.record
    check_same_run(cfg, resumed, record.world_size or dist.world_size, dist.world_size)
    if resumed.sharded:  # DCP reshards: written by any number of ranks, read by any number, sharded or not
        try:
            distributed.load_sharded(resumed.path / checkpoint.SHARDED, built.policy, optimizer)
        except ValueError as err:
            raise DPOError(f"--resume: checkpoint {resumed.path} does not fit this model ({err}); resume "
                           "with the same --model and LoRA flags") from None
    elif plan.sharded:
        raise DPOError(f"--resume: checkpoint {resumed.path} was saved without --fsdp; resume it without "
                       "--fsdp (a run with --fsdp saves checkpoints that any number of ranks can resume)")
    else:
        checkpoint.restore_trainable(built.policy, resumed.weights, resumed.path)
        optimizer.load_state_dict(resumed.optimizer)
    schedule.load_state_dict(record.scheduler)
    if record.reference is not None:  # TR-DPO: where the reference had moved
        built.reference.load_state_dict(record.reference)
    if dist.is_main:
        checkpoint.restore_metrics(resumed.path, files.metrics)  # rows after it are redone
    print(f"resuming from {resumed.path}", flush=True)
    return resumed


def check_same_run(cfg: Config, resumed: checkpoint.Loaded, saved_world_size: int, world_size: int) -> None:
    """Refuse to resume a checkpoint of another run: another model, data, loss, global batch or sequence limits
    (what may change is `run_folder.RESUME_MAY_CHANGE`, listed in the README)."""
    saved_config = RunFiles(resumed.path.parent.parent).config
    if not saved_config.is_file():
        return
    import yaml

    saved = yaml.safe_load(saved_config.read_text(encoding="utf-8")) or {}
    differences = run_folder.resume_differences(saved, cfg.to_dict(), saved_world_size=saved_world_size,
                                                world_size=world_size)
    if differences:
        raise DPOError(f"--resume: {resumed.path} belongs to a run with other settings: {'; '.join(differences)} "
                       "(the README lists what may change on resume; or start over with --overwrite-output)")


def resume_rank(resumed: checkpoint.Loaded | None, feed: PairFeed, dist: distributed.Dist) -> MetricMeter:
    """A metric meter holding this rank's sums since the last log step of the checkpoint (empty for a fresh
    run), the feed's state restored beside them (`rank_sums`), and the rank's generators as they were saved."""
    meter = MetricMeter(dist.device)
    if resumed is not None:
        own = checkpoint.rank_state(resumed, dist.rank, dist.world_size)
        meter.load_state_dict(own.meter)
        feed.load_state_dict(own.meter.get("feed", {}))
        checkpoint.restore_rng(own.rng)
    return meter


def rank_sums(meter: MetricMeter, feed: PairFeed) -> dict[str, Any]:
    """What this rank counted since the last log step, for its checkpoint: the metric sums, and the feed's state
    when it keeps one (an on-policy feed's sampling counts)."""
    feed_state = feed.state_dict()
    return meter.state_dict() | ({"feed": feed_state} if feed_state else {})


def open_reporter(cfg: Config, files: RunFiles, total_steps: int, tracker_names: list[str],
                  resumed: checkpoint.Loaded | None, notes: list[str], dist: distributed.Dist,
                  ) -> report.Reporter | report.NullReporter:
    """Rank 0 writes the config and the metrics rows and prints; the other ranks report nothing. A resumed run
    appends to the rows the checkpoint kept, its elapsed time going on from where it was saved."""
    if not dist.is_main:
        return report.NullReporter()
    reporter = report.Reporter(files.root, total_steps=total_steps, progress=cfg.progress, append=resumed is not None,
                               since_last_row_s=resumed.record.state.since_log_s if resumed is not None else 0.0,
                               sinks=[trackers.build_tracker(tracker_names, files.root, config=cfg.to_dict())])
    write_config(cfg, files.config)
    for note in notes:
        reporter.print(note)
    return reporter


class Scoring:
    """Turns pairs into a batch on the device and a batch into its loss, the same way in training and evaluation."""

    def __init__(self, objective: Objective, model: torch.nn.Module, reference: Reference, *, layout: str,
                 pad_id: int, row_capacity: int | None, device: torch.device, dtype: str) -> None:
        self.objective, self.model, self.reference = objective, model, reference
        self.layout, self.pad_id, self.row_capacity, self.device = layout, pad_id, row_capacity, device
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")

    def batch(self, pairs: Sequence[TokenizedPair], ids: Sequence[int]) -> Batch:
        return make_batch(pairs, layout=self.layout, pad_id=self.pad_id, pair_ids=ids,
                          row_capacity=self.row_capacity).to(self.device)

    def loss(self, batch: Batch, train: bool = False) -> BatchLoss:
        return self.objective.batch_loss(self.model, self.reference, batch, train=train, autocast=self.autocast)


def evaluate(scoring: Scoring, pairs: Sequence[TokenizedPair], first_id: int, batch_size: int,
             dist: distributed.Dist) -> dict[str, float]:
    """Mean metrics over the held-out `pairs`, reduced across ranks ({} without held-out pairs). Their pair ids
    start at `first_id` (after the train pairs', as the precomputed reference table holds them)."""
    if not pairs:
        return {}
    meter = MetricMeter(dist.device)
    scoring.model.eval()
    with torch.no_grad():
        for ids in even_shares(len(pairs), batch_size, dist.rank, dist.world_size):
            scored_ids = ids or [0]  # a spare round: score pair 0 and leave it out of the metrics
            batch = scoring.batch([pairs[j] for j in scored_ids], [first_id + j for j in scored_ids])
            scored = scoring.loss(batch)
            meter.add(scored.per_pair, scored.policy_logps, scored.outputs, batch.num_tokens, counted=bool(ids))
    scoring.model.train()
    metrics = meter.reduce(dist)
    metrics.pop("pairs"), metrics.pop("tokens")
    return metrics


def save_checkpoint(cfg: Config, files: RunFiles, state: checkpoint.TrainerState, built: Models,
                    optimizer: torch.optim.Optimizer, schedule: torch.optim.lr_scheduler.LambdaLR,
                    sums: dict[str, Any], dist: distributed.Dist) -> Path | None:
    """Called on every rank; rank 0 writes (with --fsdp every rank writes its shards). `sums`: this rank's since
    the last log step (`rank_sums`). The path, or None on the other ranks of a DDP run."""
    record = checkpoint.TrainerRecord(state, schedule.state_dict(), checkpoint.capture_rng(),
                                      sums, dist.world_size, reference=built.reference.state_dict())
    if cfg.fsdp:  # every rank writes its shards (DCP), also when one process runs with --fsdp
        return checkpoint.save_sharded(files.checkpoints, state.step, model=built.policy, optimizer=optimizer,
                                       trainer=record.to_dict(), own_meter=sums, dist=dist,
                                       metrics=files.metrics, keep=cfg.save_total_limit)
    # DDP: the weights are the same everywhere; each rank's generators and metric sums are its own.
    ranks = distributed.gather_to_main(checkpoint.rank_payload(sums), dist)
    if not dist.is_main:
        return None
    if dist.enabled:
        record.ranks = ranks
    return checkpoint.save(files.checkpoints, state.step, weights=checkpoint.trainable_state(built.policy),
                           optimizer=optimizer.state_dict(), trainer=record.to_dict(), metrics=files.metrics,
                           keep=cfg.save_total_limit)


@dataclass(frozen=True)
class Outcome:
    """How the run went, for the summary printed at the end and the model card."""

    steps: int
    eval_before: dict[str, float]
    eval_after: dict[str, float]
    final_train: dict[str, float]
    headline: tuple[str, str]
    alarms: list[health.Alarm]
    peak_memory: str                    # this process's measured peak, beside `dpo plan`'s prediction


def finish(cfg: Config, files: RunFiles, built: Models, tokenizer: Any, reporter: report.Reporter | report.NullReporter,
           objective: Objective, counts: dict[str, int], outcome: Outcome, plan: Placement,
           dist: distributed.Dist) -> Path | None:
    """Save the policy (gathered from its shards under FSDP2), its tokenizer and model card, draw the curves and
    print the summary; rank 0 writes, every rank takes part in the gathering. The model folder on rank 0."""
    full_state = distributed.full_state_dict(built.policy) if plan.sharded else None  # collective: every rank
    if not dist.is_main:
        return None
    reporter.close()
    movement = parameter_movement(full_state or dict(built.policy.named_parameters()), built.initial)  # before merging
    model_dir = models.save_policy(built.policy, files.root, merge_lora=cfg.merge_lora, base_model=cfg.model,
                                   state_dict=full_state, dtype=models.DTYPES[cfg.dtype] if plan.sharded else None)
    try:
        tokenizer.save_pretrained(model_dir)
        report.write_report([files.root], files.curves, files.summary)
        health.append_summary(files.summary, outcome.alarms)
        model_card.write_card(model_dir, card_info(cfg, files, objective, counts, outcome))
    except OSError as err:
        raise TrainingFailure(f"the model is saved in {model_dir}, but writing its tokenizer, model card or the run's "
                              f"report failed ({err.strerror or err}); free disk space and run the same command again "
                              "(with --resume if it saved checkpoints)") from None
    lines = report.summary_lines(outcome.eval_before, outcome.eval_after, movement)
    headline, headline_name = outcome.headline
    if outcome.eval_after:
        lines.insert(0, f"{headline_name} after training: {outcome.eval_after[headline]:.3f}")
    lines.append(outcome.peak_memory)
    lines.append(f"\nsaved model to {model_dir}, metrics to {files.metrics}, curves to {files.curves}, "
                 f"run summary to {files.summary}")
    print("\n".join(lines), flush=True)
    return model_dir


def make_optimizer_and_schedule(model: torch.nn.Module, cfg: Config, total_steps: int,
                                ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over trainable parameters; linear warmup, then linear or cosine decay to zero (as TRL)."""
    params = [p for p in model.parameters() if p.requires_grad]
    # The fused kernel updates each tensor in one pass, without foreach's parameter-sized temporaries; FSDP2's
    # sharded DTensors keep the default implementation.
    fused = not cfg.fsdp and all(p.device.type in ("cpu", "cuda") for p in params)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  weight_decay=cfg.weight_decay, fused=fused)

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        if cfg.lr_schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        if cfg.lr_schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 1.0

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def parameter_movement(weights: dict[str, torch.Tensor], initial: Mapping[str, torch.Tensor] | None,
                       ) -> dict[str, float]:
    """Relative change ||w - w0|| / ||w0|| per group (embeddings, each layer, final norm, LM head)."""
    if initial is None:
        return {}
    delta: dict[str, float] = {}
    base: dict[str, float] = {}
    for name, param in weights.items():
        if name not in initial:
            continue
        parts = name.removeprefix("base_model.model.").removeprefix("model.").split(".")  # PEFT adds a prefix
        group = ".".join(parts[:2]) if parts[0] == "layers" else parts[0]
        start = initial[name].detach().float().cpu()
        delta[group] = delta.get(group, 0.0) + float((param.detach().float().cpu() - start).pow(2).sum())
        base[group] = base.get(group, 0.0) + float(start.pow(2).sum())
    return {g: math.sqrt(delta[g]) / max(math.sqrt(base[g]), 1e-12) for g in delta}


def card_info(cfg: Config, files: RunFiles, objective: Objective, counts: dict[str, int], outcome: Outcome,
              ) -> model_card.CardInfo:
    """What the model card says about this run; the command omits --resume so that it re-runs from scratch."""
    return model_card.CardInfo(
        name=files.root.resolve().name, base_model=cfg.model, base_is_preset=models.is_preset(cfg.model),
        losses=cfg.loss_names, loss_params=objective.params, python_losses=objective.python_losses,
        data=[d for d in (cfg.data, cfg.eval_data) if d], counts=counts,
        command=shlex.join(["dpo", "train", *cfg.replace(resume=None).to_args()]),
        eval_before=outcome.eval_before, eval_after=outcome.eval_after, final_train=outcome.final_train,
        steps=outcome.steps, tags=["lora", "peft"] if cfg.lora_r or cfg.lora_adapter else [],
        quantization=(q.describe() if (q := models.Quantization.from_config(cfg)) else None),
        rows=report.read_metrics(files.metrics))


def _quiet(message: str) -> None:
    """Ranks other than 0 keep checkpoint warnings to themselves (rank 0 prints the same ones)."""


def write_config(cfg: Config, path: Path) -> None:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")

