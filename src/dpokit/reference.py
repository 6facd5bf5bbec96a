"""The reference model, whatever the strategy: it answers `logps(batch)` with the reference's `PairLogps`.

- `ModelReference`: a frozen, eval-mode model (a copy of the starting policy, or `--ref-model`), run under
  `torch.no_grad()` with the same layout as the policy (prefix sharing and packing included); with
  `sync_every`, TR-DPO moves it towards the policy during training.
- `AdapterReference`: with LoRA, the policy itself with its adapter switched off (the frozen base): no second
  copy of the weights is kept.
- `NoReference`: for reference-free losses (SimPO, ORPO, CPO); nothing is loaded, kept or run.
- `PrecomputedReference` (`--precompute-ref`): per-pair log-probs computed once by `precompute_reference`,
  cached on disk under a key of (reference weights, token ids, settings), looked up by `Batch.pair_ids`; the
  reference model itself can then be freed.

The training loop talks to every kind through the `Reference` interface: `place` it beside the wrapped policy,
`after_step` (TR-DPO's update), and `state_dict` / `load_state_dict` for checkpoints (only a reference that moves
has a state to save). `reference_strategy` picks the kind from the options and refuses combinations that cannot
work.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import distributed
from .batching import Batch, make_batch
from .data.cache import write_atomically
from .errors import DPOError
from .logprobs import PairLogps, SequenceScorer, sequence_logps
from .pair_sampler import even_shares


class Reference:
    """The interface, with what a reference that never moves and holds no weights of its own does."""

    def logps(self, batch: Batch) -> PairLogps | None:
        raise NotImplementedError

    def place(self, policy_scorer: torch.nn.Module, dist: distributed.Dist, *, sharded: bool,
              param_dtype: torch.dtype | None) -> None:
        """Put the reference beside `policy_scorer`, the policy as the loop calls it (wrapped by DDP/FSDP2)."""

    def filled_from_rank0(self) -> list[torch.nn.Module]:
        """Modules that, when only rank 0 read the weights, receive them from rank 0 after sharding."""
        return []

    def after_step(self, step: int, policy: torch.nn.Module) -> None:
        """Called after every optimizer step."""

    def state_dict(self) -> dict[str, torch.Tensor] | None:
        """What a checkpoint must keep for an exact resume: None when the reference does not move."""
        return None

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        raise DPOError("--resume: the checkpoint holds a moved (TR-DPO) reference but this run's reference does "
                       "not move; resume with the same --ref-sync-every")


class NoReference(Reference):
    """Reference-free losses get `None`."""

    def logps(self, batch: Batch) -> PairLogps | None:
        return None


class ModelReference(Reference):
    """A frozen model scored like the policy, without gradients; with `sync_every`, TR-DPO's moving reference."""

    def __init__(self, model: torch.nn.Module, *, chunk_size: int = 512, ld_alpha: float | None = None,
                 sync_every: int | None = None, sync_alpha: float = 1.0, bema: BemaSchedule | None = None) -> None:
        model.eval()
        model.requires_grad_(False)
        self.model = model
        self.scorer = SequenceScorer(model, chunk_size)
        self.ld_alpha = ld_alpha
        self.sync_every, self.sync_alpha = sync_every, sync_alpha
        self.bema = bema
        self.bema_state: BemaState | None = None

    @torch.no_grad()
    def logps(self, batch: Batch) -> PairLogps | None:
        return sequence_logps(self.scorer, batch, ld_alpha=self.ld_alpha).detach()

    def place(self, policy_scorer: torch.nn.Module, dist: distributed.Dist, *, sharded: bool,
              param_dtype: torch.dtype | None) -> None:
        if sharded:  # sharded like the policy, so that TR-DPO updates each rank's shard in place
            distributed.shard(self.scorer, dist, param_dtype=param_dtype)

    def filled_from_rank0(self) -> list[torch.nn.Module]:
        return [self.scorer]

    @property
    def moves(self) -> bool:
        return bool(self.sync_every) or self.bema is not None

    def after_step(self, step: int, policy: torch.nn.Module) -> None:
        if self.sync_every and step % self.sync_every == 0:
            self.sync(policy, self.sync_alpha)
        if self.bema is not None:
            self.bema_step(step, policy)

    def state_dict(self) -> dict[str, torch.Tensor] | None:
        if not self.moves:
            return None
        state = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        if self.bema_state is not None:
            state |= self.bema_state.flat()
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if not self.moves:
            super().load_state_dict(state)
        weights = {k: v for k, v in state.items() if not k.startswith(BemaState.PREFIX)}
        self.model.load_state_dict(weights)
        if self.bema is not None and len(weights) < len(state):
            self.bema_state = BemaState.from_flat(state, like=dict(self.model.named_parameters()))

    @torch.no_grad()
    def bema_step(self, step: int, policy: torch.nn.Module) -> None:
        """BEMA (Block & Zhang 2025, arXiv 2508.00180, Algorithm 1) as TRL's `BEMACallback` applies it to the
        reference: every `update_every` steps, EMA <- (1 - beta_t) EMA + beta_t theta_t, then
        ref <- EMA + alpha_t (theta_t - theta_0), with beta_t = (lag + multiplier t)^-ema_power and
        alpha_t = (lag + multiplier t)^-bias_power. theta_0 and the EMA start at the starting policy: the reference
        itself before its first move (`reference_strategy` allows BEMA only on a copy of the starting policy).
        """
        assert self.bema is not None
        if self.bema_state is None:  # nothing has moved the reference yet: it is the starting policy
            self.bema_state = BemaState.start(dict(self.model.named_parameters()))
        if step % self.bema.update_every:
            return
        beta, alpha = self.bema.factors(step)
        for name, reference_param, value in self._paired_with(policy):
            theta0, ema = self.bema_state.theta0[name], self.bema_state.ema[name]
            value = value.to(ema.dtype)
            ema.mul_(1 - beta).add_(value, alpha=beta)
            reference_param.copy_(ema + alpha * (value - theta0))

    def _paired_with(self, policy: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter, torch.Tensor]]:
        """(name, reference parameter, the policy's value for it), sharded alike under FSDP2. The reference is
        resharded first: after a no-grad forward FSDP2 leaves the root group (embeddings, final norm, LM head)
        gathered, and an update to that temporary (compute-dtype) copy would never reach the sharded weights."""
        from torch.distributed.fsdp import FSDPModule

        for module in self.scorer.modules():
            if isinstance(module, FSDPModule):
                module.reshard()
        names = [name for name, _ in policy.named_parameters()]  # paired_parameters' order
        pairs = []
        for name, (reference_param, policy_param) in zip(names, paired_parameters(self.model, policy)):
            value = policy_param.detach()
            if hasattr(policy_param, "full_tensor") and not hasattr(reference_param, "full_tensor"):
                value = policy_param.full_tensor()  # sharded policy, whole reference: gather the policy's shard
            pairs.append((name, reference_param, value))
        return pairs

    @torch.no_grad()
    def sync(self, policy: torch.nn.Module, alpha: float) -> None:
        """TR-DPO (Gorbatovski et al. 2024, Sec. 3): `ref <- alpha * policy + (1 - alpha) * ref`, per parameter.

        alpha = 1 is the hard update (the reference becomes a copy of the policy); below 1 the soft update.
        Under FSDP2 both are sharded alike, so each rank updates its own shard of each DTensor in place.
        """
        for _, reference_param, value in self._paired_with(policy):
            if alpha == 1.0:
                reference_param.copy_(value)
            else:
                reference_param.lerp_(value.to(reference_param.dtype), alpha)


@dataclass(frozen=True)
class BemaSchedule:
    """BEMA's schedules (arXiv 2508.00180; TRL's `BEMACallback` names in brackets): move every `update_every`
    steps [update_freq], EMA weight beta_t = (lag + multiplier t)^-ema_power [ema_power, kappa], bias correction
    alpha_t = (lag + multiplier t)^-bias_power [bias_power, eta]."""

    update_every: int = 400
    ema_power: float = 0.5
    bias_power: float = 0.2
    lag: float = 10.0
    multiplier: float = 1.0

    def factors(self, step: int) -> tuple[float, float]:
        """(beta_t, alpha_t) at optimizer step `step`."""
        base = self.lag + self.multiplier * step
        return base ** -self.ema_power, base ** -self.bias_power


@dataclass
class BemaState:
    """BEMA's running tensors, one per reference parameter (sharded like it under FSDP2): the starting weights
    theta_0 and the EMA. Saved in checkpoints beside the reference's weights, under `PREFIX` names."""

    theta0: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor]
    PREFIX = "bema."

    @classmethod
    def start(cls, params: dict[str, torch.Tensor]) -> BemaState:
        copies = [{name: p.detach().clone() for name, p in params.items()} for _ in range(2)]
        return cls(*copies)

    def flat(self) -> dict[str, torch.Tensor]:
        return {f"{self.PREFIX}{kind}.{name}": tensor.detach().cpu().clone()
                for kind, tensors in (("theta0", self.theta0), ("ema", self.ema)) for name, tensor in tensors.items()}

    @classmethod
    def from_flat(cls, state: dict[str, torch.Tensor], like: dict[str, torch.Tensor]) -> BemaState:
        """The state `flat` wrote, on the device and in the dtype of the parameters in `like`."""
        def read(kind: str) -> dict[str, torch.Tensor]:
            return {n: state[f"{cls.PREFIX}{kind}.{n}"].to(device=p.device, dtype=p.dtype) for n, p in like.items()}

        return cls(read("theta0"), read("ema"))


class AdapterReference(Reference):
    """The LoRA policy with its adapter disabled, i.e. the frozen base model, scored without gradients.

    PEFT's `disable_adapter()` skips every LoRA branch for the duration of the call, so the reference costs no
    memory beyond the policy's own weights (TRL does the same when no `ref_model` is given with PEFT).
    """

    def __init__(self, policy: torch.nn.Module, *, chunk_size: int = 512, ld_alpha: float | None = None) -> None:
        self.policy = policy
        self.scorer: torch.nn.Module = SequenceScorer(policy, chunk_size)
        self.ld_alpha = ld_alpha

    @torch.no_grad()
    def logps(self, batch: Batch) -> PairLogps | None:
        with self.policy.disable_adapter():
            return sequence_logps(self.scorer, batch, ld_alpha=self.ld_alpha).detach()

    def place(self, policy_scorer: torch.nn.Module, dist: distributed.Dist, *, sharded: bool,
              param_dtype: torch.dtype | None) -> None:
        if dist.enabled:  # the same wrapped scorer, so DDP/FSDP2 hooks see the call (adapter off inside)
            self.scorer = policy_scorer


def paired_parameters(reference: torch.nn.Module, policy: torch.nn.Module,
                      ) -> list[tuple[torch.nn.Parameter, torch.nn.Parameter]]:
    """`(reference, policy)` parameters matched by name; a `DPOError` when the two models differ in shape."""
    reference_params = dict(reference.named_parameters())
    pairs = []
    for name, param in policy.named_parameters():
        ref = reference_params.pop(name, None)
        if ref is None or ref.shape != param.shape:
            raise DPOError(f"--ref-sync-every: the reference and the policy differ at {name}; TR-DPO needs the "
                           "same architecture (drop --ref-model or --ref-sync-every)")
        pairs.append((ref, param))
    if reference_params:
        extra = next(iter(reference_params))
        raise DPOError(f"--ref-sync-every: the reference has parameters the policy lacks ({extra})")
    return pairs


def reference_strategy(*, loss_names: list[str], needs_reference: bool, lora: bool, ref_model: str | None,
                       precompute_ref: bool, ref_sync_every: int | None, ref_update: str = "start") -> str:
    """Which reference to build: "none", "copy" (frozen copy of the starting policy), "model" (`--ref-model`) or
    "adapter" (LoRA policy with the adapter disabled). Incompatible options raise a one-line `DPOError`.

    With LoRA, `--ref-model` is honoured (the user asked for that model), at the cost of a second model.
    """
    if ref_update == "round":
        raise DPOError("--ref-update round is dpo online's (the policy at the start of each round); dpo train takes "
                       "start or bema")
    if not needs_reference:
        given = [flag for flag, on in (("--ref-model", ref_model), ("--precompute-ref", precompute_ref),
                                       ("--ref-sync-every", ref_sync_every),
                                       ("--ref-update bema", ref_update == "bema")) if on]
        if given:
            raise DPOError(f"{', '.join(given)}: loss {','.join(loss_names)} is reference-free and uses no reference; "
                           "drop the flag or pick a loss that needs one")
        return "none"
    if ref_sync_every and precompute_ref:
        raise DPOError("--ref-sync-every changes the reference during training, so its log-probs cannot be "
                       "precomputed; drop --precompute-ref or --ref-sync-every")
    if ref_sync_every and lora:
        raise DPOError("--ref-sync-every updates a full reference copy from the policy; with LoRA the policy is an "
                       "adapter on a frozen base, so use full fine-tuning (--lora-r 0) for TR-DPO")
    if ref_update == "bema":
        given = [flag for flag, on in (("--ref-sync-every", ref_sync_every), ("--precompute-ref", precompute_ref),
                                       ("--ref-model", ref_model), ("LoRA", lora)) if on]
        if given:
            raise DPOError(f"--ref-update bema moves a full copy of the starting policy towards the policy's average; "
                           f"it cannot be combined with {', '.join(given)}")
    if ref_model:
        return "model"
    return "adapter" if lora else "copy"


# ---- precomputed reference log-probs (--precompute-ref) ------------------------------------------------------

CACHE_VERSION = 1
_FIELDS = ("chosen", "rejected", "chosen_lengths", "rejected_lengths")


class PrecomputedReference(Reference):
    """Reference log-probs read from a table `[dataset pairs]` by `Batch.pair_ids`: no model, no forward."""

    def __init__(self, table: dict[str, torch.Tensor]) -> None:
        self.table = table  # _FIELDS -> [pairs] float32, on CPU

    def logps(self, batch: Batch) -> PairLogps | None:
        ids = batch.pair_ids.cpu()
        device = batch.chosen_index.device
        return PairLogps(*(self.table[name][ids].to(device) for name in _FIELDS))


def reference_cache_key(model: torch.nn.Module, pairs: Sequence[Any], settings: dict[str, Any]) -> str:
    """Hex key of everything the reference log-probs depend on: the reference's weights (every parameter and
    buffer, by bytes), the token ids of every pair (so data, tokenizer and truncation settings are all
    covered) and the arrays of its prompt's images, and `settings` (dtype, attention kernel, LD-DPO alpha, ...)."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(json.dumps([CACHE_VERSION, settings], sort_keys=True, default=str).encode())
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        data = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{data.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes())
    for pair in pairs:
        for ids in (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids):
            digest.update(np.asarray(ids, dtype=np.int64).tobytes() + b"|")
        for name, array in sorted(getattr(pair, "image_inputs", {}).items()):
            digest.update(f"{name}:{array.dtype}:{array.shape}".encode() + np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


@torch.no_grad()
def precompute_reference(reference: Reference, pairs: Sequence[Any], *, layout: str, pad_id: int,
                         batch_size: int, device: torch.device | str, cache_file: Path | None = None,
                         progress: bool = False, rank: int = 0, world_size: int = 1,
                         reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
                         warn: Callable[[str], None] | None = None) -> PrecomputedReference:
    """Run `reference` once over `pairs` (batched, same layout as training, no grad) and keep the per-pair
    log-probs; `pair_ids` of later batches index `pairs`. With `cache_file`, a file written by an earlier run
    (same key, see `reference_cache_key`) is read instead, and a fresh result is written there atomically.

    Under torchrun, each of the `world_size` processes scores its `even_shares` of the batches (all run the same
    number of forwards, as a sharded reference needs), `reduce_sum` (an all-reduce) assembles the table on all of
    them, and rank 0 writes the cache. The cache is used only when every process can read it, so that all of them
    take the same path. A cache file that is there but truncated, foreign or for other pairs is recomputed and
    replaced, and `warn` (rank 0's printer; None on the other ranks) says so in one line; it also says when the
    cache was used, and where a fresh result was cached. The bar is drawn on a terminal only (tqdm's own check): a
    log gets no frames.
    """
    from safetensors.torch import save_file

    cached, damage = _read_table(cache_file, len(pairs))
    if damage and warn is not None:
        warn(f"warning: the reference cache {cache_file} {damage}; computing the reference log-probs again and "
             "replacing it")
    missing = torch.tensor([float(cached is None)], device=device)
    if not (reduce_sum(missing) if reduce_sum else missing).item():
        assert cached is not None
        if warn is not None:
            warn(f"reference log-probs: reused {cache_file} (computed by an earlier run with the same reference, "
                 "pairs and settings; --no-cache recomputes them)")
        return PrecomputedReference(cached)
    from tqdm.auto import tqdm

    table = torch.zeros(len(_FIELDS), len(pairs), device=device)
    for ids in tqdm(even_shares(len(pairs), batch_size, rank, world_size), desc="reference log-probs",
                    unit="batch", disable=None if progress else True):
        scored = ids or [0]  # a spare round: score pair 0 and drop it
        batch = make_batch([pairs[i] for i in scored], layout=layout, pad_id=pad_id, pair_ids=scored).to(device)
        logps = reference.logps(batch)
        assert logps is not None, "precompute_reference needs a reference that gives log-probs"
        if ids:
            table[:, ids] = torch.stack([getattr(logps, name).float() for name in _FIELDS])
    if reduce_sum is not None:
        table = reduce_sum(table)  # each pair was scored by exactly one process
    result = {name: table[i].cpu() for i, name in enumerate(_FIELDS)}
    if cache_file is not None and rank == 0:
        write_atomically(cache_file, lambda partial: save_file(result, partial))
        if warn is not None:
            warn(f"reference log-probs: cached in {cache_file} for later runs with the same reference and pairs")
    return PrecomputedReference(result)


def _read_table(cache_file: Path | None, num_pairs: int) -> tuple[dict[str, torch.Tensor] | None, str | None]:
    """The cached table (None when there is none or it cannot be used) and, for a file that is there but cannot
    be used, why: unreadable (truncated, or not a safetensors file), or not a table of `num_pairs` pairs."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if cache_file is None or not cache_file.is_file():
        return None, None
    try:
        table = load_file(cache_file)
    except (OSError, RuntimeError, SafetensorError) as err:
        return None, f"is unreadable ({str(err).splitlines()[0][:120] or type(err).__name__})"
    if not all(name in table and table[name].shape == (num_pairs,) for name in _FIELDS):
        return None, f"is not a table of these {num_pairs} pairs (written by another tool or version)"
    return table, None
