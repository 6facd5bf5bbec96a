"""The training loop, top to bottom: build everything, then step, accumulate, clip, schedule, eval, log, save.

    dpo train                                  # the built-in synthetic task on the tiny preset (CPU, < 1 min)
    dpo train --model PATH --data pairs.jsonl  # your model and data
    torchrun --nproc-per-node 8 -m dpokit train --model PATH --data pairs.jsonl

Losses, log-probs, layouts and the reference live in their own modules; this file only wires them together.
"""

from __future__ import annotations

import math
import random
import shlex
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import checkpoint, distributed, host_memory, losses, model_card, models, report, trackers
from .data import cache as data_cache, preparation as pipeline
from .batching import Batch, make_batch
from .config import Config
from .errors import DPOError, TrainingFailure
from .fused_head import fused_sequence_loss
from .logprobs import PairLogps, SequenceScorer, sequence_logps
from .metrics import MetricMeter
from .reference import (AdapterReference, ModelReference, NoReference, Reference, paired_parameters,
                        precompute_reference, reference_cache_key, reference_strategy)
from .pair_sampler import batch_stream, micro_batches, split_by_tokens, split_further
from .data.tokenization import TokenizedPair


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
        return self.output_dir / "metrics.jsonl"

    @property
    def curves_path(self) -> Path:
        return self.output_dir / "training_curves.png"

    @property
    def model_card_path(self) -> Path | None:
        return None if self.model_dir is None else self.model_dir / "README.md"


def train(cfg: Config) -> Summary:
    """Run DPO (or any registered loss) as `cfg` says; returns a `Summary`.

    The first SIGTERM/SIGINT saves a checkpoint at the end of the current step and stops (`Interrupted`).
    """
    with checkpoint.StopSignals() as stop:
        return _train(cfg, stop)


def _train(cfg: Config, stop: checkpoint.StopSignals) -> Summary:
    start_time = time.perf_counter()
    dist = distributed.init(cfg.device)
    seed_everything(cfg.seed)
    output = Path(cfg.output)
    tracker_names = trackers.parse_report_to(cfg.report_to)  # a missing extra fails now, not after loading

    # ---- losses ----------------------------------------------------------------------------------------------
    specs = resolve_losses(cfg.loss_names)
    weights = parse_loss_weights(cfg.loss_weights, len(specs))
    if cfg.rpo_alpha is not None:  # RPO's NLL term is the `sft` loss, as TRL 1.16's loss_type=[..., "sft"]
        specs, weights = specs + [losses.get("sft")], weights + [cfg.rpo_alpha]
    check_losses(specs, cfg)
    needs_reference = any(spec.needs_reference for spec in specs)
    strategy = reference_strategy(loss_names=cfg.loss_names, needs_reference=needs_reference,
                                  lora=bool(cfg.lora_r or cfg.lora_adapter), ref_model=cfg.ref_model,
                                  precompute_ref=cfg.precompute_ref, ref_sync_every=cfg.ref_sync_every)
    loss_params = {name: getattr(cfg, name) for spec in specs for name in spec.params}

    # ---- model, tokenizer, data ------------------------------------------------------------------------------
    tokenizer = None if models.is_preset(cfg.model) else models.load_tokenizer(cfg.tokenizer or cfg.model)
    if cfg.data != "synthetic" and tokenizer is None:
        raise DPOError(f"--data {cfg.data} needs a tokenizer: pass --model PATH (or --tokenizer PATH)")
    data = pipeline.prepare(
        data=cfg.data, eval_data=cfg.eval_data, tokenizer=tokenizer, seed=cfg.seed, eval_fraction=cfg.eval_fraction,
        data_split=cfg.data_split, eval_split=cfg.eval_split, format=cfg.format, columns=cfg.columns,
        max_pairs=cfg.max_pairs, skip_invalid=cfg.skip_invalid, max_length=cfg.max_length,
        max_prompt_length=cfg.max_prompt_length, max_completion_length=cfg.max_completion_length,
        truncation_mode=cfg.truncation_mode, pairs=cfg.pairs, unpaired=any(not spec.paired for spec in specs),
        cache=cfg.cache, cache_dir=cfg.cache_dir, progress=cfg.progress)
    check_losses(specs, cfg, extras=frozenset.intersection(*(frozenset(p.extras) for p in data.train + data.eval)))
    sharded = cfg.fsdp and dist.enabled
    synced_reference = bool(cfg.ref_sync_every) and strategy in ("copy", "model")
    if synced_reference and cfg.fsdp and (cfg.save_every or cfg.resume):
        raise DPOError("--ref-sync-every with --fsdp cannot be checkpointed yet (the synced reference is not saved "
                       "sharded); drop --save-every/--resume or run without --fsdp")
    if sharded and cfg.merge_lora:
        raise DPOError("--merge-lora is not supported with --fsdp; save the adapter and merge it afterwards")
    # FSDP2 keeps float32 master weights (sharded 1/N) and computes in bfloat16 through its MixedPrecisionPolicy.
    # Only rank 0 reads the weights (the policy's, a --ref-model's, and draws a new LoRA adapter's); the others
    # build the models on the meta device and receive their shards once they are sharded (--lora-adapter and
    # --precompute-ref need real weights on every rank first).
    from_rank0 = sharded and not (cfg.lora_adapter or cfg.precompute_ref)
    on_meta = from_rank0 and not dist.is_main
    lean = cfg.lean_layers and not cfg.compile  # torch.compile fuses those layers itself
    policy = models.load_model(cfg.model, dtype="float32" if sharded else cfg.dtype, seed=cfg.seed,
                               attn_implementation=cfg.attn_implementation, empty=on_meta, lean=lean)
    policy = policy if on_meta else policy.to(dist.device)
    if cfg.gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora_adapter:
        policy = models.load_lora_adapter(policy, cfg.lora_adapter, r=cfg.lora_r)
    elif cfg.lora_r:
        policy = models.apply_lora(policy, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                                   target_modules=cfg.lora_target_modules)
    reference: Reference = NoReference()
    if strategy == "adapter":
        reference = AdapterReference(policy, chunk_size=cfg.logprob_chunk_size, ld_alpha=cfg.ld_alpha)
    elif strategy in ("copy", "model"):
        ref_model = (models.load_model(cfg.ref_model, dtype=cfg.dtype, attn_implementation=cfg.attn_implementation,
                                       empty=on_meta, lean=lean) if cfg.ref_model else models.frozen_copy(policy))
        reference = ModelReference(ref_model if on_meta else ref_model.to(dist.device), chunk_size=cfg.logprob_chunk_size,
                                   ld_alpha=cfg.ld_alpha)
        if cfg.ref_sync_every:
            paired_parameters(ref_model, policy)  # refuse a --ref-model that TR-DPO cannot update, before training
    if cfg.precompute_ref and strategy != "none":
        reference = precompute_reference_once(cfg, reference, ref_model if strategy in ("copy", "model") else policy,
                                              data.train + data.eval, data.pad_id, dist)
        ref_model = None  # the reference's weights are freed: only the [pairs] table is kept
    policy.train()
    # The end summary reports how far the weights moved; a frozen copy of the start already holds them.
    reference_is_start = strategy == "copy" and not (cfg.ref_sync_every or cfg.precompute_ref or sharded)
    initial = (dict(ref_model.named_parameters()) if reference_is_start
               else snapshot_parameters(policy) if dist.is_main else None)  # only rank 0 reports it
    scorer = SequenceScorer(policy, cfg.logprob_chunk_size)
    if cfg.compile:
        scorer = torch.compile(scorer)  # type: ignore[assignment]
    compute_dtype = models.DTYPES[cfg.dtype] if cfg.dtype != "float32" else None
    # Rank 0's full weights (policy, then reference), taken before sharding to fill every rank's shards after it.
    filled = ([scorer] + ([reference.scorer] if isinstance(reference, ModelReference) else [])) if from_rank0 else []
    full_states = [module.state_dict() if dist.is_main else {} for module in filled]
    model = distributed.wrap(scorer, dist, fsdp=cfg.fsdp, param_dtype=compute_dtype)
    if sharded and isinstance(reference, ModelReference):
        distributed.shard(reference.scorer, dist, param_dtype=compute_dtype)  # the reference sharded like the policy
    elif dist.enabled and isinstance(reference, AdapterReference):
        reference.scorer = model  # the same wrapped scorer, so DDP/FSDP2 hooks see the call (adapter off inside)
    for module, state in zip(filled, full_states):
        distributed.fill_from_rank0(module, state, dist)
    del full_states  # rank 0's full copy: only the shards stay

    # ---- optimizer and schedule ------------------------------------------------------------------------------
    pairs_per_step = cfg.batch_size * cfg.grad_accum * dist.world_size
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(data.train) / pairs_per_step))
    optimizer, schedule = make_optimizer_and_schedule(policy, cfg, total_steps)

    # ---- resume: weights, optimizer, schedule now; RNG, data position and metric sums just before the loop ----
    checkpoints = output / "checkpoints"
    resumed = checkpoint.load(cfg.resume, output, print if dist.is_main else _quiet) if cfg.resume else None
    if resumed is not None:
        if resumed.sharded:  # DCP reshards: written by any number of ranks, read by any number, sharded or not
            try:
                distributed.load_sharded(resumed.path / checkpoint.SHARDED, policy, optimizer)
            except ValueError as err:
                raise DPOError(f"--resume: checkpoint {resumed.path} does not fit this model ({err}); resume "
                               "with the same --model and LoRA flags") from None
        elif sharded:
            raise DPOError(f"--resume: checkpoint {resumed.path} was saved without --fsdp; resume it without "
                           "--fsdp (a run with --fsdp saves checkpoints that any number of ranks can resume)")
        else:
            checkpoint.restore_trainable(policy, resumed.weights, resumed.path)
            optimizer.load_state_dict(resumed.optimizer)
        schedule.load_state_dict(resumed.trainer["scheduler"])
        if "reference" in resumed.trainer and isinstance(reference, ModelReference):  # TR-DPO: where it had moved
            reference.model.load_state_dict(resumed.trainer["reference"])
        if dist.is_main:
            checkpoint.restore_metrics(resumed.path, output / "metrics.jsonl")  # rows after it are redone
        print(f"resuming from {resumed.path}", flush=True)

    layout = layout_name(cfg)
    lean_host_memory = cfg.lean_host_memory and dist.device.type == "cpu" and host_memory.lean_allocator()
    autocast = torch.autocast(dist.device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16")
    use_wpo = cfg.use_weighting

    def to_batch(pairs: Sequence[TokenizedPair], ids: Sequence[int]) -> Batch:
        return make_batch(pairs, layout=layout, pad_id=data.pad_id, pair_ids=ids,
                          row_capacity=cfg.max_tokens_per_batch).to(dist.device)

    # Every selected loss scores each pair on its own: the LM head and the loss run fused (one head matmul less).
    fused = all(spec.pairwise for spec in specs)

    def weighted_losses(policy_logps: PairLogps, reference_logps: PairLogps | None, extras: dict[str, torch.Tensor],
                        ) -> tuple[torch.Tensor, list[losses.LossOutput]]:
        """Per-pair weighted loss `[pairs]` and each loss's output."""
        outputs = [spec.function(policy_logps, reference_logps, extras,
                                 **{k: loss_params[k] for k in spec.params}) for spec in specs]
        per_pair = sum(w * out.losses for w, out in zip(weights, outputs))
        if use_wpo:  # WPO (Zhou et al. 2024, arXiv 2406.11827, Eq. 2) as TRL 1.16: w(y_w) w(y_l), no grad, no clamp
            per_pair = per_pair * torch.exp(policy_logps.chosen_wpo + policy_logps.rejected_wpo)
        return per_pair, outputs

    def forward_loss(batch: Batch, train: bool = False,
                     ) -> tuple[torch.Tensor, torch.Tensor, PairLogps, list[losses.LossOutput]]:
        """The summed loss of the batch's pairs (to backpropagate), per-pair losses, the policy's log-probs and
        each loss's output."""
        with autocast:
            # The reference first: its transient activations are gone before the policy's are kept for backward.
            reference_logps = reference.logps(batch)
            if train and fused:
                def loss_of_pairs(policy_logps: PairLogps, pairs: torch.Tensor) -> torch.Tensor:
                    selected = None if reference_logps is None else reference_logps.select(pairs)
                    return weighted_losses(policy_logps, selected, {k: v[pairs] for k, v in batch.extras.items()})[0]

                total, policy_logps = fused_sequence_loss(model, batch, loss_of_pairs, cfg.logprob_chunk_size,
                                                          ld_alpha=cfg.ld_alpha, with_wpo=use_wpo)
            else:
                policy_logps = sequence_logps(model, batch, ld_alpha=cfg.ld_alpha, with_wpo=use_wpo)
        if train and fused:
            with torch.no_grad():  # the metrics, from the log-probs that the fused pass returned
                per_pair, outputs = weighted_losses(policy_logps, reference_logps, batch.extras)
            return total, per_pair, policy_logps, outputs
        per_pair, outputs = weighted_losses(policy_logps, reference_logps, batch.extras)
        return per_pair.sum(), per_pair, policy_logps, outputs

    def evaluate() -> dict[str, float]:
        """Mean metrics over the held-out pairs, reduced across ranks."""
        if not data.eval:
            return {}
        meter = MetricMeter(dist.device)
        model.eval()
        eval_size = cfg.eval_batch_size or cfg.batch_size
        with torch.no_grad():
            mine = list(range(dist.rank, len(data.eval), dist.world_size))
            # Every rank runs the same number of forwards (FSDP2 all-gathers weights in each one); a rank
            # with fewer pairs scores pair 0 in its spare rounds and leaves it out of the metrics.
            rounds = math.ceil(math.ceil(len(data.eval) / dist.world_size) / eval_size)
            for i in range(rounds):
                ids = mine[i * eval_size:(i + 1) * eval_size]
                ids_or_first = ids or [0]  # pair ids of eval pairs follow the train pairs' (precomputed reference)
                batch = to_batch([data.eval[j] for j in ids_or_first], [len(data.train) + j for j in ids_or_first])
                _, per_pair, policy_logps, outputs = forward_loss(batch)
                if ids:
                    meter.add(per_pair, policy_logps, outputs, batch.num_tokens)
        model.train()
        metrics = meter.reduce(dist)
        metrics.pop("pairs"), metrics.pop("tokens")
        return metrics

    # ---- outputs ---------------------------------------------------------------------------------------------
    reporter: report.Reporter | report.NullReporter = (
        report.Reporter(output, total_steps=total_steps, progress=cfg.progress, append=resumed is not None,
                        sinks=[trackers.build_tracker(tracker_names, output, config=cfg.to_dict())])
        if dist.is_main else report.NullReporter())
    if dist.is_main:
        write_config(cfg, output / "config.yaml")
        for note in data.notes:
            reporter.print(note)

    # ---- train -----------------------------------------------------------------------------------------------
    state = resumed.trainer if resumed is not None else {}
    # SFT alone has no rewards to rank: its held-out number is the NLL per token.
    headline, headline_name = (("loss", "held-out NLL per token") if all(s.name == "sft" for s in specs)
                               else ("rewards/accuracies", "held-out reward accuracy"))
    eval_before = state["eval_before"] if resumed is not None else evaluate()
    if eval_before and resumed is None:
        reporter.log({"step": 0, "epoch": 0.0, **{f"eval/{k}": v for k, v in eval_before.items()}})
        reporter.print(f"{headline_name} before training: {eval_before[headline]:.3f}")
    groups = [("group", p.group) if p.group is not None else ("pair", i) for i, p in enumerate(data.train)]
    batches = batch_stream(micro_batches(len(data.train), cfg.batch_size, cfg.seed, dist.rank, dist.world_size,
                                         consumed=state.get("pairs_consumed", 0), groups=groups),
                           data.train, cfg.num_workers, layout=layout, pad_id=data.pad_id,
                           row_capacity=cfg.max_tokens_per_batch)
    rng_state, meter_state = (checkpoint.rank_state(resumed, dist.rank, dist.world_size) if resumed is not None
                              else ({}, {}))
    meter = MetricMeter(dist.device)
    meter.load_state_dict(meter_state)
    bad_steps = state.get("bad_steps", 0)
    last_log_time = time.perf_counter() - state.get("since_log_s", 0.0)
    step = state.get("step", 0)
    epoch_progress, row = round(step * pairs_per_step / len(data.train), 4), {}
    if resumed is not None:
        checkpoint.restore_rng(rng_state)

    def save_checkpoint(step: int) -> Path | None:
        """Called on every rank; rank 0 writes (with --fsdp every rank writes its shards). The path, or None on
        the other ranks of a DDP run."""
        if not cfg.fsdp:  # DDP: the weights are the same everywhere, each rank's generators and metric sums its own
            ranks = distributed.gather_to_main(checkpoint.rank_payload(meter.state_dict()), dist)
            if not dist.is_main:
                return None
        trainer = {"step": step, "pairs_consumed": step * pairs_per_step, "scheduler": schedule.state_dict(),
                   "meter": meter.state_dict(), "bad_steps": bad_steps, "eval_before": eval_before,
                   "since_log_s": time.perf_counter() - last_log_time, "rng": checkpoint.capture_rng(),
                   "world_size": dist.world_size}
        if synced_reference:  # TR-DPO has moved the reference: a resumed run must start from where it is now
            trainer["reference"] = {k: v.detach().cpu().clone() for k, v in reference.model.state_dict().items()}
        if cfg.fsdp:  # every rank writes its shards (DCP), also when one process runs with --fsdp
            return checkpoint.save_sharded(checkpoints, step, model=policy, optimizer=optimizer, trainer=trainer,
                                           own={"meter": meter.state_dict()}, dist=dist,
                                           metrics=reporter.metrics_path, keep=cfg.save_total_limit)
        if dist.enabled:
            trainer["ranks"] = ranks
        return checkpoint.save(checkpoints, step, weights=checkpoint.trainable_state(policy),
                               optimizer=optimizer.state_dict(), trainer=trainer, metrics=reporter.metrics_path,
                               keep=cfg.save_total_limit)

    for step in range(step + 1, total_steps + 1):
        # One optimizer step = grad_accum micro-batches on every rank. Each micro-loss is its pairs' loss sum
        # over the pairs in the whole step (all ranks), times world size because DDP averages gradients: the
        # gradient is then exactly that of the mean loss over the step's pairs, however they are split.
        micro = [next(batches) for _ in range(cfg.grad_accum)]
        if cfg.micro_batch_tokens:  # the same pairs, cut by a token budget (as many cuts on every rank)
            step_ids = [j for _, ids, _ in micro for j in ids]
            mine = [data.train[j] for j in step_ids]
            cuts = split_by_tokens(mine, cfg.micro_batch_tokens)
            cuts = split_further(cuts, distributed.reduce_max(len(cuts), dist))
            micro = [(micro[0][0], ids, to_batch([data.train[j] for j in ids], ids))
                     for ids in ([step_ids[k] for k in cut] for cut in cuts)]
        step_pairs = cfg.grad_accum * cfg.batch_size * dist.world_size
        step_loss = torch.zeros((), device=dist.device)
        for i, (_, ids, batch) in enumerate(micro):
            batch = batch.to(dist.device)
            with distributed.no_sync(model, enabled=i < len(micro) - 1):
                total, per_pair, policy_logps, outputs = forward_loss(batch, train=True)
                loss = total * dist.world_size / step_pairs
                loss.backward()
            step_loss += loss.detach()
            meter.add(per_pair, policy_logps, outputs, batch.num_tokens)
        grad_norm = distributed.clip_grad_norm(
            policy.parameters(), cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
        if torch.isfinite(grad_norm) and torch.isfinite(step_loss):
            optimizer.step()
            bad_steps = 0
        else:
            bad_steps += 1
            meter.bad_steps += 1
        optimizer.zero_grad(set_to_none=True)
        if lean_host_memory:
            host_memory.release_free_memory()
        schedule.step()
        if cfg.ref_sync_every and step % cfg.ref_sync_every == 0 and isinstance(reference, ModelReference):
            reference.sync(policy, cfg.ref_sync_alpha)  # TR-DPO: the reference follows the policy
        meter.grad_norm_sum += grad_norm.detach().float() if torch.isfinite(grad_norm) else 0.0
        meter.steps += 1

        epoch_progress = round(step * pairs_per_step / len(data.train), 4)
        if step % cfg.log_every == 0 or step == total_steps:
            metrics = meter.reduce(dist)
            elapsed = time.perf_counter() - last_log_time
            pairs, tokens = metrics.pop("pairs"), metrics.pop("tokens")
            row = {"step": step, "epoch": epoch_progress, **metrics, "lr": schedule.get_last_lr()[0],
                   "pairs_per_s": pairs / elapsed, "tokens_per_s": tokens / elapsed}
            reporter.log(row)
            reporter.progress(step, row)
            meter = MetricMeter(dist.device)
            last_log_time = time.perf_counter()
        if cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps:
            reporter.log({"step": step, "epoch": epoch_progress,
                          **{f"eval/{k}": v for k, v in evaluate().items()}})

        # ---- checkpoint at the step boundary: every --save-every steps, at the end, on a signal, on failure ----
        failed = bad_steps >= cfg.max_bad_steps
        stopping = stop.received is not None
        if dist.enabled:  # every rank stops at the same step, whichever got the signal
            stopping = bool(distributed.reduce_sums(torch.tensor([float(stopping)], device=dist.device), dist))
        saved = None
        if failed or stopping or (cfg.save_every and (step % cfg.save_every == 0 or step == total_steps)):
            saved = save_checkpoint(step)
        if failed:
            kept = f"checkpoint {saved} holds the weights from before them" if saved else "no checkpoint saved"
            raise TrainingFailure(
                f"step {step}: {bad_steps} consecutive steps with a non-finite loss or gradient were skipped "
                f"({kept}); try a lower --lr, --dtype float32 instead of bfloat16, or --max-grad-norm 1.0")
        if stopping:
            signal_name = checkpoint.signal_name(stop.received)
            where = f"saved checkpoint {saved}; continue with the same command plus --resume" if saved else \
                "no checkpoint saved"
            raise checkpoint.Interrupted(f"stopped by {signal_name} after step {step}: {where}", stop.received or 15)

    eval_after = evaluate()
    if eval_after:
        reporter.log({"step": step, "epoch": epoch_progress, **{f"eval/{k}": v for k, v in eval_after.items()}})
    final_train = {k: v for k, v in row.items() if k not in ("step", "epoch")}

    # ---- save ------------------------------------------------------------------------------------------------
    model_dir = None
    full_state = distributed.full_state_dict(policy) if sharded else None  # collective: every rank gathers
    if dist.is_main:
        reporter.close()
        movement = parameter_movement(full_state or dict(policy.named_parameters()), initial)  # before merging LoRA
        model_dir = models.save_policy(policy, output, merge_lora=cfg.merge_lora, base_model=cfg.model,
                                       state_dict=full_state, dtype=models.DTYPES[cfg.dtype] if sharded else None)
        if tokenizer is not None:
            tokenizer.save_pretrained(model_dir)
        report.write_report([output], output / "training_curves.png", output / "summary.md")
        model_card.write_card(model_dir, card_info(cfg, output, loss_params, data.counts, step, eval_before,
                                                   eval_after, final_train))
        lines = report.summary_lines(eval_before, eval_after, movement)
        if eval_after:
            lines.insert(0, f"{headline_name} after training: {eval_after[headline]:.3f}")
        lines.append(f"\nsaved model to {model_dir}, metrics to {output / 'metrics.jsonl'}, "
                     f"curves to {output / 'training_curves.png'}, run summary to {output / 'summary.md'}")
        print("\n".join(lines), flush=True)
    distributed.cleanup(dist)
    return Summary(output, model_dir, step, eval_before, eval_after, final_train,
                   time.perf_counter() - start_time, data.counts)


# ---- pieces of the loop ----------------------------------------------------------------------------------------


def layout_name(cfg: Config) -> str:
    """The batch layout the flags ask for (see batching.py). Packing with sdpa attention lays a micro-batch out
    as one row without padding, attended block by block (`blocks`); rows of `--max-tokens-per-batch` tokens
    with dense masks (`packed`) serve the other attention kernels and `--compile`."""
    if not cfg.prefix_sharing:
        return "concatenated"
    if not cfg.packing:
        return "shared"
    if cfg.max_tokens_per_batch is None and cfg.attn_implementation == "sdpa" and not cfg.compile:
        return "blocks"
    return "packed"


def precompute_reference_once(cfg: Config, reference: Reference, weights: torch.nn.Module,
                              pairs: Sequence[TokenizedPair], pad_id: int, dist: distributed.Dist) -> Reference:
    """`--precompute-ref`: the reference's log-probs for every pair, read from the on-disk cache when an
    earlier run computed them with the same reference weights, token ids and settings (else computed now,
    each process scoring its share of the batches)."""
    settings = {"dtype": cfg.dtype, "attn": cfg.attn_implementation, "ld_alpha": cfg.ld_alpha}
    cache_file = None
    if cfg.cache:
        key = reference_cache_key(weights, pairs, settings)
        cache_file = Path(cfg.cache_dir or data_cache.default_dir()) / "reference" / f"{key}.safetensors"
    with torch.autocast(dist.device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16"):
        return precompute_reference(reference, pairs, layout=layout_name(cfg), pad_id=pad_id,
                                    batch_size=cfg.eval_batch_size or cfg.batch_size, device=dist.device,
                                    cache_file=cache_file, progress=cfg.progress and dist.is_main, rank=dist.rank,
                                    world_size=dist.world_size,
                                    reduce_sum=lambda t: distributed.reduce_sums(t, dist))


def resolve_losses(loss_names: list[str]) -> list[losses.LossSpec]:
    specs = []
    for name in loss_names:
        try:
            specs.append(losses.get(name))
        except KeyError:
            raise DPOError(f"--loss: unknown loss {name!r}; choose from {', '.join(losses.names())}") from None
    if not specs:
        raise DPOError("--loss: give at least one loss name")
    return specs


def check_losses(specs: list[losses.LossSpec], cfg: Config, extras: frozenset[str] | None = None) -> None:
    """Every problem with the selected losses' settings (and, once loaded, the data's extra fields), at once."""
    settings = cfg.to_dict()
    problems = [f"--loss {spec.name}: parameter {name!r} is not a setting (a Config field)"
                for spec in specs for name in spec.params if name not in settings]
    if len({spec.paired for spec in specs}) > 1:
        problems.append(f"--loss {cfg.loss}: paired and unpaired (kto) losses cannot be combined")
    problems += [problem for spec in specs for problem in spec.problems(settings, extras)]
    if problems:
        raise DPOError("; ".join(dict.fromkeys(problems)))


def parse_loss_weights(text: str | None, count: int) -> list[float]:
    if text is None:
        return [1.0] * count
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        raise DPOError(f"--loss-weights: expected comma-separated numbers, got {text!r}") from None
    if len(weights) != count:
        raise DPOError(f"--loss-weights: {len(weights)} weights for {count} losses")
    return weights


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


def snapshot_parameters(model: torch.nn.Module, limit: int = 200_000_000) -> dict[str, torch.Tensor] | None:
    """A CPU copy of the trainable weights, to report how far they moved (skipped for big models)."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if sum(p.numel() for _, p in trainable) > limit:
        return None
    return {n: p.detach().float().cpu().clone() for n, p in trainable}


def parameter_movement(weights: dict[str, torch.Tensor], initial: dict[str, torch.Tensor] | None,
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


def card_info(cfg: Config, output: Path, loss_params: dict[str, Any], counts: dict[str, int], steps: int,
              eval_before: dict[str, float], eval_after: dict[str, float], final_train: dict[str, float],
              ) -> model_card.CardInfo:
    """What the model card says about this run; the command omits --resume so that it re-runs from scratch."""
    return model_card.CardInfo(
        name=output.resolve().name, base_model=cfg.model, base_is_preset=models.is_preset(cfg.model),
        losses=cfg.loss_names, loss_params=loss_params, data=[d for d in (cfg.data, cfg.eval_data) if d],
        counts=counts, command=shlex.join(["dpo", "train", *cfg.replace(resume=None).to_args()]),
        eval_before=eval_before, eval_after=eval_after, final_train=final_train, steps=steps,
        tags=["lora", "peft"] if cfg.lora_r or cfg.lora_adapter else [],
        rows=report.read_metrics(output / "metrics.jsonl"))


def _quiet(message: str) -> None:
    """Ranks other than 0 keep checkpoint warnings to themselves (rank 0 prints the same ones)."""


def write_config(cfg: Config, path: Path) -> None:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")

