"""Where the models live and in what form: the placement plan, then the policy and the reference built by it.

`Placement.from_config` decides once how the run is laid out (sharded or not, which ranks read the weights,
which dtype to load in); `build_models` loads the policy (with LoRA), builds the reference the objective asks
for, wraps the policy for DDP / FSDP2 / `torch.compile`, places the reference beside it and fills every rank's
shards from rank 0.
"""

from __future__ import annotations

import functools
import sys
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import distributed, models, vision
from .batching import layout_for
from .config import Config
from .data import cache as data_cache
from .data.tokenization import TokenizedPair
from .errors import DPOError
from .logprobs import SequenceScorer
from .reference import (AdapterReference, BemaSchedule, ModelReference, NoReference, Reference, paired_parameters,
                        precompute_reference, reference_cache_key)


@dataclass(frozen=True)
class Placement:
    """How the run lays out its models across processes and dtypes.

    FSDP2 keeps float32 master weights (sharded 1/N) and computes in bfloat16 through its MixedPrecisionPolicy.
    Only rank 0 reads the weights (the policy's, a --ref-model's, and draws a new LoRA adapter's); the others
    build the models on the meta device and receive their shards once they are sharded (--lora-adapter and
    --precompute-ref need real weights on every rank first).
    """

    sharded: bool                          # FSDP2 over several processes
    from_rank0: bool                       # only rank 0 reads the weights; the others get their shards from it
    on_meta: bool                          # this rank builds its models on the meta device
    lean: bool                             # lean layers (torch.compile fuses those layers itself)
    load_dtype: str                        # the dtype the policy's weights are loaded in
    compute_dtype: torch.dtype | None      # FSDP2's mixed-precision compute dtype (None: the weights' own)

    @classmethod
    def from_config(cls, cfg: Config, dist: distributed.Dist) -> Placement:
        sharded = cfg.fsdp and dist.enabled
        if sharded and cfg.merge_lora:
            raise DPOError("--merge-lora is not supported with --fsdp; save the adapter and merge it afterwards")
        if (cfg.ref_sync_every or cfg.ref_update == "bema") and cfg.fsdp and (cfg.save_every or cfg.resume):
            raise DPOError("--ref-sync-every / --ref-update bema with --fsdp cannot be checkpointed yet (the moving "
                           "reference is not saved sharded); drop --save-every/--resume or run without --fsdp")
        from_rank0 = sharded and not (cfg.lora_adapter or cfg.precompute_ref)
        return cls(sharded=sharded, from_rank0=from_rank0, on_meta=from_rank0 and not dist.is_main,
                   lean=cfg.lean_layers and not cfg.compile, load_dtype="float32" if sharded else cfg.dtype,
                   compute_dtype=models.DTYPES[cfg.dtype] if cfg.dtype != "float32" else None)


@dataclass
class Models:
    """The policy as it trains (`policy`: the Hugging Face / PEFT model the optimizer and checkpoints see), as the
    loop calls it (`scorer`: wrapped by DDP / FSDP2 / compile), the reference, and the trainable weights at the
    start (`initial`, on rank 0 only, for the end-of-run report of how far they moved; None when too large)."""

    policy: torch.nn.Module
    scorer: torch.nn.Module
    reference: Reference
    initial: Mapping[str, torch.Tensor] | None


def build_models(cfg: Config, strategy: str, plan: Placement, dist: distributed.Dist,
                 scored_pairs: Sequence[TokenizedPair], pad_id: int) -> Models:
    """Policy, reference (by `strategy`, see `reference.reference_strategy`) and their placement.
    `scored_pairs` (train then eval) are what `--precompute-ref` scores once."""
    policy = build_policy(cfg, plan, dist)
    reference, reference_weights = build_reference(cfg, strategy, policy, plan, dist)
    if cfg.precompute_ref and strategy != "none":
        assert reference_weights is not None
        reference = precompute_reference_once(cfg, reference, reference_weights, scored_pairs, pad_id, dist)
    policy.train()
    # A frozen copy of the start already holds the starting weights: no second snapshot.
    reference_is_start = strategy == "copy" and not (cfg.ref_sync_every or cfg.ref_update == "bema"
                                                     or cfg.precompute_ref or plan.sharded)
    initial = (dict(reference_weights.named_parameters()) if reference_is_start and reference_weights is not None
               else snapshot_parameters(policy) if dist.is_main else None)
    scorer = SequenceScorer(policy, cfg.logprob_chunk_size)
    if cfg.compile:
        scorer = torch.compile(scorer)  # type: ignore[assignment]
    # Rank 0's full weights (policy, then reference), taken before sharding to fill every rank's shards after it.
    filled = [scorer, *reference.filled_from_rank0()] if plan.from_rank0 else []
    full_states = [module.state_dict() if dist.is_main else {} for module in filled]
    wrapped = distributed.wrap(scorer, dist, fsdp=cfg.fsdp, param_dtype=plan.compute_dtype)
    reference.place(wrapped, dist, sharded=plan.sharded, param_dtype=plan.compute_dtype)
    for module, state in zip(filled, full_states):
        distributed.fill_from_rank0(module, state, dist)
    return Models(policy, wrapped, reference, initial)


def build_policy(cfg: Config, plan: Placement, dist: distributed.Dist) -> torch.nn.Module:
    """The policy on its device (or the meta device), with gradient checkpointing and LoRA as asked.

    On a quantized base (QLoRA, `--load-in-4bit`) only the LoRA adapter trains. Of PEFT's k-bit preparation
    (`prepare_model_for_kbit_training`) nothing is needed here: PEFT freezes the base itself; its input-grad hook
    exists for reentrant checkpointing, and ours is non-reentrant (gradients reach the adapters inside each
    checkpointed layer without it); and its cast of every bf16 weight to float32 is left out so that the
    embeddings, norms and LM head stay in the compute dtype (`--dtype`), as in a LoRA run.
    """
    policy = models.load_model(cfg.model, dtype=plan.load_dtype, seed=cfg.seed,
                               attn_implementation=cfg.attn_implementation, empty=plan.on_meta, lean=plan.lean,
                               quantization=models.Quantization.from_config(cfg), device=dist.device)
    policy = policy if plan.on_meta else policy.to(dist.device)
    if cfg.freeze_vision and vision.is_vision_model(policy):
        vision.freeze_vision(policy)
    if cfg.gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora_adapter:
        return models.load_lora_adapter(policy, cfg.lora_adapter, r=cfg.lora_r, lean=plan.lean)
    if cfg.lora_r:
        language_only = (vision.language_lora_targets(policy, cfg.lora_target_modules)
                         if vision.is_vision_model(policy) else None)  # not the vision tower nor the projector
        return models.apply_lora(policy, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                                 target_modules=cfg.lora_target_modules, pattern=language_only, lean=plan.lean)
    return policy


def build_reference(cfg: Config, strategy: str, policy: torch.nn.Module, plan: Placement, dist: distributed.Dist,
                    ) -> tuple[Reference, torch.nn.Module | None]:
    """The reference for `strategy`, and the module holding its weights (None for a reference-free loss)."""
    if strategy == "adapter":
        return AdapterReference(policy, chunk_size=cfg.logprob_chunk_size, ld_alpha=cfg.ld_alpha), policy
    if strategy not in ("copy", "model"):
        return NoReference(), None
    # A --ref-model is quantized like the policy's base: a QLoRA run has no room for a full-precision second model.
    weights = (models.load_model(cfg.ref_model, dtype=cfg.dtype, attn_implementation=cfg.attn_implementation,
                                 empty=plan.on_meta, lean=plan.lean, quantization=models.Quantization.from_config(cfg),
                                 device=dist.device)
               if cfg.ref_model else models.frozen_copy(policy))
    if not plan.on_meta:
        weights = weights.to(dist.device)
    if cfg.ref_sync_every:
        paired_parameters(weights, policy)  # refuse a --ref-model that TR-DPO cannot update, before training
    bema = (BemaSchedule(cfg.bema_update_every, cfg.bema_ema_power, cfg.bema_bias_power, cfg.bema_lag,
                         cfg.bema_multiplier) if cfg.ref_update == "bema" else None)
    return ModelReference(weights, chunk_size=cfg.logprob_chunk_size, ld_alpha=cfg.ld_alpha,
                          sync_every=cfg.ref_sync_every, sync_alpha=cfg.ref_sync_alpha, bema=bema), weights


def precompute_reference_once(cfg: Config, reference: Reference, weights: torch.nn.Module,
                              pairs: Sequence[TokenizedPair], pad_id: int, dist: distributed.Dist) -> Reference:
    """`--precompute-ref`: the reference's log-probs for every pair, read from the on-disk cache when an
    earlier run computed them with the same reference weights, token ids and settings (else computed now,
    each process scoring its share of the batches)."""
    settings = {"dtype": cfg.dtype, "attn": cfg.attn_implementation, "ld_alpha": cfg.ld_alpha}
    quantization = models.Quantization.from_config(cfg)
    if quantization is not None:  # the packed 4-bit codes do not show how their scales were stored (double quant)
        settings["quantization"] = quantization.describe()
    cache_file = None
    if cfg.cache:
        key = reference_cache_key(weights, pairs, settings)
        cache_file = Path(cfg.cache_dir or data_cache.default_dir()) / "reference" / f"{key}.safetensors"
    with torch.autocast(dist.device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16"):
        return precompute_reference(reference, pairs, layout=run_layout(cfg), pad_id=pad_id,
                                    batch_size=cfg.eval_batch_size or cfg.batch_size, device=dist.device,
                                    cache_file=cache_file, progress=cfg.progress and dist.is_main, rank=dist.rank,
                                    world_size=dist.world_size,
                                    reduce_sum=lambda t: distributed.reduce_sums(t, dist),
                                    warn=functools.partial(print, flush=True) if dist.is_main else None)


def run_layout(cfg: Config) -> str:
    """The batch layout the flags ask for (see `batching.layout_for`)."""
    return layout_for(prefix_sharing=cfg.prefix_sharing, packing=cfg.packing,
                      attn_implementation=cfg.attn_implementation, compile=cfg.compile,
                      max_tokens_per_batch=cfg.max_tokens_per_batch)


def snapshot_parameters(model: torch.nn.Module, limit: int = 200_000_000) -> SpilledWeights | None:
    """The trainable weights as they are now, in float32, to report how far they moved (skipped for big models,
    or when the temporary folder cannot take them: the report then leaves the movement out)."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if sum(p.numel() for _, p in trainable) > limit:
        return None
    try:
        return SpilledWeights(trainable)
    except OSError as err:
        print(f"warning: could not keep the starting weights in a temporary file ({err}); the end-of-run report "
              "leaves out how far the weights moved", file=sys.stderr, flush=True)
        return None


class SpilledWeights(Mapping[str, torch.Tensor]):
    """Float32 CPU copies of tensors, kept in an unnamed temporary file rather than in memory; each is read back
    when asked for.

    The end-of-run report compares the trained weights with the starting ones. Held in memory, that float32 copy
    is as large as the trainable weights for the whole run, which on CPU costs what a reference copy costs, the
    memory `--precompute-ref` and reference-free losses exist to save. Written once at the start, the file's
    pages belong to the OS page cache, which does not count against the process and is dropped under pressure.
    """

    def __init__(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        self._file = tempfile.TemporaryFile(prefix="dpokit-start-weights-")
        self._index: dict[str, tuple[int, torch.Size]] = {}   # name -> (byte offset, shape)
        for name, tensor in tensors:
            array = tensor.detach().float().cpu().contiguous().numpy()
            self._index[name] = (self._file.tell(), tensor.shape)
            array.tofile(self._file)
        self._file.flush()

    def __getitem__(self, name: str) -> torch.Tensor:
        offset, shape = self._index[name]
        self._file.seek(offset)
        return torch.from_numpy(np.fromfile(self._file, dtype=np.float32, count=shape.numel())).view(shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)
