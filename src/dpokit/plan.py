"""`dpo plan`: a run's peak memory per process and its FLOPs per step, predicted from the model's config alone.

    dpo plan --model Qwen/Qwen2.5-0.5B --data pairs.jsonl --batch-size 4 --memory 24GB
    dpo plan --model PATH --lora-r 16 --nproc 8 --fsdp --json

The prediction is a model with named parts, each a formula of the model's shape (`ModelShape`, read from its
config: no weights are loaded), the run's flags (`RunSettings`) and the largest micro-batch the data can make
(`Workload`, from the tokenized data's lengths, or from `--max-length` without `--data`):

    framework      the process before any model: torch, transformers and dpokit imported (measured); CUDA's context
    loading        what loading a tokenizer and a model leaves behind (host memory)
    data           the tokenized pairs held in Python lists (host memory)
    weights        parameters x bytes (float32 4, bfloat16 2); FSDP2: float32 shards / N + the gathered groups
    reference      a frozen copy (or --ref-model), the disabled LoRA adapter (0), a precomputed table, or none
    gradients      trainable parameters x bytes; FSDP2: / N
    ddp buckets    DDP's copy of the gradients it all-reduces (several processes, no --fsdp)
    AdamW states   2 x trainable x bytes; FSDP2: / N
    activations    what autograd keeps per layer for the micro-batch's tokens, x layers (one layer input per layer
                   with --gradient-checkpointing, and one layer recomputed at a time in the backward pass)
    LM head logits one chunk of float32 logits (--logprob-chunk-size x vocab), freed before the next is made
    head gradient  the float32 LM-head weight gradient, held from the head's pass to the end of the backward pass
    layer backward the transient gradients of one layer in the backward pass
    micro-batches  with several per step: the head gradient being added, and (CPU) the heap glibc keeps from the
                   previous micro-batch until the optimizer step's malloc_trim
    tied gradient  the embedding's gradient while it is summed into the tied LM head's
    reduce-scatter FSDP2: the root group's whole float32 gradients and their reduce-scatter copy
    report         the end of the run: plotting imported, the movement report's temporaries (host memory)
    unsharded      FSDP2: rank 0's whole float32 policy and reference, before they are sharded

The peak is the largest of the phases in which different parts coexist (`PHASES`): the LM head's pass, the
backward pass (every layer's activations and the held head gradient, with the logits or one layer's gradients),
the end of the backward pass (all gradients, the tied sum), the `--precompute-ref` pass (policy and reference
together), the end of the run, FSDP2's sharding. Constants were fitted to peak RSS measured on CPU
(`benchmarks/plan_check.py`, results in benchmarks/RESULTS.md); on CUDA the same parts predict what PyTorch's
allocator holds, plus the CUDA context (not yet checked against a GPU).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from .errors import DPOError
from .model_shape import FAMILIES, LEAN_FAMILIES, ModelShape, read_shape, shape_from_config  # noqa: F401 (API)

GiB = 2**30
MiB = 2**20
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}

# ---- measured constants (benchmarks/plan_check.py, CPU, torch 2.13, transformers 5.23) ------------------------
FRAMEWORK_CPU = 224 * MiB        # torch, transformers and dpokit's training modules imported
PEFT_IMPORT = 168 * MiB          # importing peft (LoRA runs)
LOADING_CPU = 187 * MiB          # what loading a tokenizer and a model leaves behind, whatever their size
PRESET_LOADING_CPU = 118 * MiB   # the same for a preset (built in memory, no files read)
TOKENIZER_BYTES_PER_TOKEN = 230  # a loaded fast tokenizer, per vocabulary entry
REPORT_CPU = 60 * MiB            # the end of a run: matplotlib imported, the curves drawn, the model card written
CUDA_CONTEXT = 600 * MiB         # CUDA context and kernels, outside PyTorch's allocator
DATA_BYTES_PER_TOKEN = 36        # a token id in a Python list: an int object (28 B) and its slot (8 B)
LAYER_BACKWARD_WIDTHS = 3        # transient [tokens, intermediate] tensors in one layer's backward pass
MMAP_THRESHOLD = 32 * MiB         # host_memory's glibc mmap threshold: smaller blocks come from the heap


# ---- the run ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSettings:
    """The flags that decide memory, per process."""

    dtype: str = "float32"
    device: str = "cpu"                  # cpu or cuda
    nproc: int = 1
    fsdp: bool = False
    lora_r: int = 0
    lora_targets: str = "all-linear"
    quantized_bits: int = 0              # 4 or 8 for a bitsandbytes base (QLoRA), 0 otherwise
    quantized_tables: bool = False       # --quantize-embeddings: the embeddings and LM head in 4 bits too
    reference: str = "copy"              # copy, model (--ref-model), adapter (LoRA's disabled adapter), none
    precompute: bool = False             # --precompute-ref: the reference scores once, then only a table is kept
    ref_sync: bool = False               # TR-DPO: the reference moves with the policy
    preset: bool = False                 # the model is a preset, built in memory
    lean_host_memory: bool = True        # CPU: glibc maps blocks from 32 MiB up and trims after each step
    ref_shape: ModelShape | None = None  # --ref-model's shape (None: the policy's)
    gradient_checkpointing: bool = False
    lean_layers: bool = True
    layout: str = "blocks"               # batching.LAYOUTS
    attention: str = "sdpa"
    chunk_size: int = 512
    fused_head: bool = True
    batch_size: int = 8
    grad_accum: int = 1
    micro_batch_tokens: int | None = None
    max_tokens_per_batch: int | None = None
    eval_batch_size: int = 8

    @property
    def sharded(self) -> bool:
        return self.fsdp and self.nproc > 1

    def flags(self, base: RunSettings | None = None) -> str:
        """The memory levers set here and not in `base` (the run planned), as `dpo train` flags."""
        base = base or RunSettings(dtype="float32")
        out = []
        if self.lora_r and not base.lora_r:
            out.append(f"--lora-r {self.lora_r}")
        if self.precompute and not base.precompute:
            out.append("--precompute-ref")
        if self.gradient_checkpointing and not base.gradient_checkpointing:
            out.append("--gradient-checkpointing")
        if self.micro_batch_tokens != base.micro_batch_tokens:
            out.append(f"--micro-batch-tokens {self.micro_batch_tokens}")
        if self.fsdp and not base.fsdp:
            out.append(f"--fsdp (torchrun --nproc-per-node {self.nproc})")
        if self.dtype != base.dtype:
            out.append(f"--dtype {self.dtype}")
        return " ".join(out)


@dataclass(frozen=True)
class Block:
    """A prompt and its distinct completions, forwarded together (prefix sharing), serving `pairs` pairs."""

    prompt: int
    completions: tuple[int, ...]
    pairs: int = 1

    @property
    def size(self) -> int:
        return self.prompt + sum(self.completions)


@dataclass(frozen=True)
class Workload:
    """The largest micro-batch a step can hold, the step around it, and the data behind them."""

    blocks: tuple[Block, ...]              # of the largest micro-batch
    micro_batches: int = 1                 # per optimizer step
    step_tokens: int = 0                   # tokens forwarded per step (prompt once per block), for FLOPs
    step_scored: int = 0                   # completion tokens per step
    step_attention: int = 0                # query-key pairs computed per layer per step
    data_tokens: int = 0                   # tokens held in memory (train + eval pairs)
    data_pairs: int = 0
    source: str = ""                       # where the lengths came from
    percentiles: dict[str, list[int]] = field(default_factory=dict)   # prompt/chosen/rejected: p50, p90, p99, max


def layout_tokens(blocks: Sequence[Block], settings: RunSettings) -> tuple[int, int, int]:
    """(tokens forwarded with padding, rows, row length) of a micro-batch in the run's layout."""
    if settings.layout == "blocks":
        total = sum(b.size for b in blocks)
        return total, 1, total
    if settings.layout == "concatenated":  # one padded row per completion
        rows = sum(len(b.completions) for b in blocks)
        width = max(b.prompt + c for b in blocks for c in b.completions)
        return rows * width, rows, width
    if settings.layout == "shared":        # one padded row per block
        width = max(b.size for b in blocks)
        return len(blocks) * width, len(blocks), width
    width = max([b.size for b in blocks] + [settings.max_tokens_per_batch or 0])   # packed, first fit decreasing
    room: list[int] = []
    for size in sorted((b.size for b in blocks), reverse=True):
        slot = next((i for i, free in enumerate(room) if size <= free), None)
        if slot is None:
            room.append(width - size)
        else:
            room[slot] -= size
    return len(room) * width, len(room), width


def attention_pairs(blocks: Sequence[Block]) -> int:
    """Query-key pairs one layer computes for these blocks under block attention: the prompt and the first
    completion as one causal sequence, each further completion against the prompt and itself."""
    total = 0
    for b in blocks:
        first = b.prompt + b.completions[0]
        total += first * (first + 1) // 2 + sum(c * b.prompt + c * (c + 1) // 2 for c in b.completions[1:])
    return total


# ---- the parts and the phases ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Part:
    name: str
    bytes: int
    detail: str
    host: bool = False   # host memory: counted on CPU, not on a CUDA device


# Which parts coexist in each phase of a run; the peak is the largest phase.
_HELD = ("framework", "loading", "data", "weights", "reference", "AdamW states", "ddp buckets")
_STEP = _HELD + ("accumulated gradients", "micro-batch heap", "activations", "head gradient")
PHASES = {
    "LM head pass": _STEP + ("LM head logits",),
    "backward": _STEP + ("recomputed layer", "layer backward"),
    "end of backward": _HELD + ("gradients", "freed activations", "added head gradient", "tied gradient",
                                "reduce-scatter"),
    "reference precompute": ("framework", "loading", "data", "weights", "reference copy", "reference pass"),
    "end of run": _HELD[:-1] + ("report",),
    "sharding": ("framework", "loading", "data", "unsharded models"),
}


@dataclass
class Plan:
    shape: ModelShape
    settings: RunSettings
    workload: Workload
    parts: dict[str, Part]
    phases: dict[str, int]
    peak_phase: str
    flops: dict[str, float]
    unpredicted: list[str]
    budget: int | None = None
    fix: RunSettings | None = None
    fix_peak: int | None = None

    @property
    def peak(self) -> int:
        return self.phases[self.peak_phase]

    @property
    def fits(self) -> bool | None:
        return None if self.budget is None else self.peak <= self.budget

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": asdict(self.shape) | {"params": self.shape.params},
            "settings": {k: v for k, v in asdict(self.settings).items() if k != "ref_shape"},
            "workload": {k: v for k, v in asdict(self.workload).items() if k != "blocks"}
            | {"micro_batch_tokens": layout_tokens(self.workload.blocks, self.settings)[0]},
            "peak_bytes": self.peak, "peak_phase": self.peak_phase,
            "parts": {name: part.bytes for name, part in self.parts.items()},
            "phases": self.phases, "flops_per_step": sum(self.flops.values()), "flops": self.flops,
            "unpredicted": self.unpredicted, "memory_bytes": self.budget, "fits": self.fits,
            "fix": None if self.fix is None else self.fix.flags(self.settings), "fix_peak_bytes": self.fix_peak,
        }


def estimate(shape: ModelShape, run: RunSettings, work: Workload) -> Plan:
    """The named parts, the phases they make up and the FLOPs per step: pure arithmetic."""
    unpredicted: list[str] = []
    params = shape.params
    if params is None:
        unpredicted.append(f"weights, gradients, AdamW states and reference: {shape.model_type} is an architecture "
                           "transformers cannot build here, so its parameters could not be counted")
    if not shape.known:
        unpredicted.append(f"activations: {shape.model_type} is not a decoder the planner knows "
                           f"({', '.join(FAMILIES)})")
    params = params or 0
    cuda = run.device == "cuda"
    b = DTYPE_BYTES[run.dtype]      # weights as loaded, activations, gathered weights (FSDP2's shards: float32)
    n = run.nproc if run.sharded else 1
    lora = run.lora_r > 0
    adapter = shape.lora_params(run.lora_r, run.lora_targets) if lora else 0
    trainable = adapter if lora else params
    b_t = 4 if lora or run.sharded else b                    # trainable weights, their gradients and AdamW states
    tokens, rows, width = layout_tokens(work.blocks, run)
    scored = sum(sum(b.completions) for b in work.blocks)
    parts: list[Part] = []

    def add(name: str, size: float, detail: str, host: bool = False) -> None:
        parts.append(Part(name, int(size), detail, host))

    # -- fixed --
    if cuda:
        add("framework", CUDA_CONTEXT, "CUDA context and kernels (outside PyTorch's allocator)")
    else:
        add("framework", FRAMEWORK_CPU + (PEFT_IMPORT if lora else 0),
            "torch, transformers and dpokit imported" + (", and peft" if lora else "") + " (measured)")
    add("data", DATA_BYTES_PER_TOKEN * work.data_tokens, f"{work.data_pairs:,} tokenized pairs, "
        f"{work.data_tokens:,} token ids", host=True)
    in_bits = shape.matmul_params if run.quantized_bits else 0          # QLoRA: the layers' linears, + block scales
    frozen, quantized = params - in_bits, in_bits * run.quantized_bits / 8 * 1.07
    if run.quantized_tables:  # 4-bit codes and a float32 scale per 64 weights (quantized_tables)
        tables = shape.embedding_params * (1 if shape.tied else 2)
        frozen, quantized = frozen - tables, quantized + tables * (0.5 + 4 / 64)
    if run.sharded:
        gathered = (_root_params(shape) + 2 * shape.layer_params) * b
        add("weights", params * 4 / n + gathered + adapter * 4,
            f"float32 shards of {params / 1e6:.1f}M parameters / {n} + the embeddings, head and two layers gathered")
    else:
        stored = f" ({run.quantized_bits}-bit linears{' and tables' if run.quantized_tables else ''})"
        add("weights", frozen * b + quantized + adapter * 4,
            f"{params / 1e6:.1f}M parameters x {b} B" + (stored if quantized else "")
            + (f" + {adapter / 1e6:.2f}M LoRA parameters x 4 B" if lora else ""))
    add("loading", 0 if cuda else (PRESET_LOADING_CPU if run.preset else LOADING_CPU)
        + TOKENIZER_BYTES_PER_TOKEN * shape.vocab,
        f"what loading the model and a {shape.vocab:,}-token tokenizer leaves behind", host=True)
    ref_params = (run.ref_shape.params or 0) if run.ref_shape else params
    ref_bytes = ref_params * (4 if run.sharded and run.reference == "copy" else b)
    ref_held = run.reference in ("copy", "model") and not run.precompute
    if ref_held and run.sharded:
        add("reference", ref_bytes / n + _root_params(run.ref_shape or shape) * b,
            f"frozen {'copy' if run.reference == 'copy' else '--ref-model'}, sharded / {n}, its root group gathered")
    elif ref_held:
        add("reference", ref_bytes, f"frozen {'copy of the policy' if run.reference == 'copy' else '--ref-model'}")
    elif run.precompute:
        add("reference", 16 * work.data_pairs, "a table of log-probs (the reference model is freed after the pass)")
    else:
        add("reference", 0, {"adapter": "the policy with its adapter disabled: no copy",
                             "none": "reference-free loss"}[run.reference])
    # FSDP2: rank 0 holds the whole float32 policy and reference on its device until they are sharded.
    add("unsharded models", (params + (ref_params if ref_held else 0)) * 4 if run.sharded else 0,
        "rank 0's whole float32 policy and reference, before sharding")
    add("gradients", trainable * b_t / n, f"{trainable / 1e6:.1f}M trainable x {b_t} B" + (f" / {n}" if n > 1 else ""))
    add("accumulated gradients", trainable * b_t / n if work.micro_batches > 1 else 0,
        f"kept across {work.micro_batches} micro-batches")
    add("ddp buckets", trainable * b_t if run.nproc > 1 and not run.fsdp else 0, "DDP's all-reduce copy")
    add("AdamW states", 2 * trainable * b_t / n, f"2 x {trainable / 1e6:.1f}M x {b_t} B" + (f" / {n}" if n > 1 else ""))

    # -- per micro-batch --
    per_layer, per_layer_heap = _layer_bytes(shape, run, tokens, rows, width, work.blocks) if shape.known else (0, 0)
    layer_input = tokens * shape.hidden * b
    if run.gradient_checkpointing:   # each layer keeps its input; the backward pass recomputes one layer at a time
        kept, kept_heap = shape.layers * layer_input, shape.layers * layer_input * (layer_input < MMAP_THRESHOLD)
        detail = f"{shape.layers} layer inputs (checkpointed)"
    else:
        kept, kept_heap = shape.layers * per_layer, shape.layers * per_layer_heap
        detail = f"{shape.layers} layers x {per_layer / MiB:,.0f} MiB"
    add("recomputed layer", per_layer if run.gradient_checkpointing else 0, "one layer's activations, recomputed")
    outside = [layer_input, layer_input, scored * shape.hidden * b]      # final norm in and out, scored states
    add("activations", kept + sum(outside) if shape.known else 0, f"{tokens:,} tokens: {detail}")
    # On CPU, activations freed during the backward pass stay resident while they came from glibc's heap (blocks
    # under the mmap threshold) until the step's malloc_trim (host_memory); without it, all of them may.
    heap = kept_heap + sum(size for size in outside if size < MMAP_THRESHOLD) if run.lean_host_memory else \
        kept + sum(outside)
    add("freed activations", heap if shape.known and not cuda else 0,
        "freed in the backward pass, kept by glibc's heap until the optimizer step")
    # The head scores `chunk_size` tokens at a time, one chunk alive at a time: its float32 logits become the
    # softmax and then the logits' gradient in place (`logprobs.chunk_logits`). A trainable head keeps its float32
    # weight gradient from the head's pass to the end of the backward pass, and the scored states' one.
    # (In bf16 the head's output is bf16 beside its float32 upcast, and the logits' gradient is multiplied in bf16:
    # 2 B more per logit.)
    chunk = min(run.chunk_size, max(scored, 1)) * shape.vocab
    add("LM head logits", chunk * 4 + (chunk * 2 if b == 2 else 0),
        f"{min(run.chunk_size, scored)} x {shape.vocab:,} float32 logits")
    head_trainable = not lora
    held = shape.vocab * shape.hidden * 4 if head_trainable else 0
    add("head gradient", held + scored * shape.hidden * b,
        ("float32 LM-head weight gradient + " if held else "") + f"gradient of {scored:,} scored states")
    # Gradient accumulation: later micro-batches' head and embedding gradients are summed into the kept ones, and
    # on CPU glibc keeps what the previous micro-batch freed until the step's malloc_trim (host_memory).
    accumulating = work.micro_batches > 1
    add("added head gradient", held if accumulating else 0, "a later micro-batch's head gradient, being added")
    add("micro-batch heap", heap if accumulating and shape.known and not cuda else 0,
        "the previous micro-batch's freed activations, kept by glibc's heap until the optimizer step")
    add("layer backward", LAYER_BACKWARD_WIDTHS * tokens * max(shape.intermediate, shape.attention_width) * b
        if shape.known else 0, f"{LAYER_BACKWARD_WIDTHS} x [{tokens:,} x {shape.intermediate}]")
    # FSDP2 reduce-scatters the root group's gradients (embeddings, head) from whole float32 tensors and a flat copy.
    add("reduce-scatter", 2 * _root_params(shape) * 4 if run.sharded and head_trainable else 0,
        "the root group's whole float32 gradients and their reduce-scatter copy")
    add("tied gradient", shape.embedding_params * b_t if shape.tied and head_trainable else 0,
        "the embedding's gradient, summed into the LM head's")
    largest = max(shape.embedding_params, shape.layer_params) if head_trainable else 0
    add("report", 0 if cuda else REPORT_CPU + 2 * largest * 4,
        "end of run: plotting imported, the movement report's float32 temporaries", host=True)

    # -- --precompute-ref: the policy and the reference (a copy, or the policy with its adapter off), no gradients --
    precompute = run.precompute and run.reference != "none"
    copied = precompute and run.reference in ("copy", "model")
    add("reference copy", ref_bytes if copied else 0, "held during the pass only")
    pass_tokens = tokens * run.eval_batch_size // max(1, sum(b.pairs for b in work.blocks))
    add("reference pass", (pass_tokens * (3 * shape.intermediate + 4 * shape.attention_width) * b
                           + run.chunk_size * shape.vocab * 4) if precompute else 0, "one batch, no gradients")

    by_name = {p.name: p for p in parts}
    counted = [p for p in parts if not (cuda and p.host)]
    phases = {phase: sum(p.bytes for p in counted if p.name in names) for phase, names in PHASES.items()}
    for phase, needed in (("reference precompute", precompute), ("sharding", run.sharded)):
        if not needed:
            del phases[phase]
    peak_phase = max(phases, key=phases.__getitem__)
    return Plan(shape, run, work, by_name, phases, peak_phase, step_flops(shape, run, work), unpredicted)


def _root_params(shape: ModelShape) -> int:
    """FSDP2's root group: embeddings, final norm and (untied) LM head."""
    return shape.embedding_params * (1 if shape.tied else 2) + shape.hidden


def _saved_per_token(shape: ModelShape, run: RunSettings) -> list[tuple[str, int]]:
    """What one decoder layer keeps for its backward pass: (tensor, bytes per token).

    Lean layers: the layer input and the normed input (h each), queries after the rotary embedding, keys and values
    as attention reads them (repeated to every head under grouped-query attention), attention's output and the
    concatenated heads (attention width each), the residual after attention and its norm (h each), the MLP's gate,
    up and their product (intermediate each), attention's logsumexp (one float32 per head). transformers' own
    layers keep each norm's normalised input and silu(gate) too; in bf16 its norms (the lean one is float32 only)
    keep a float32 copy of their input and a bf16 normalised one. LoRA keeps each adapter's r-wide activation.
    """
    h, a, i, b = shape.hidden, shape.attention_width, shape.intermediate, DTYPE_BYTES[run.dtype]
    kv = a if shape.kv_heads < shape.heads and run.layout == "blocks" else shape.kv_width
    saved = [("layer input", h * b), ("normed input", h * b), ("queries", a * b), ("keys", kv * b), ("values", kv * b),
             ("attention output", a * b), ("heads", a * b), ("residual", h * b), ("normed residual", h * b),
             ("gate", i * b), ("up", i * b), ("gate x up", i * b), ("logsumexp", shape.heads * 4)]
    if not (run.lean_layers and shape.model_type in LEAN_FAMILIES):
        saved += [("normalised input", h * b), ("normalised residual", h * b), ("silu(gate)", i * b)]
    if run.dtype != "float32":
        saved += [("float32 input", 4 * h), ("bf16 normalised input", 2 * h), ("float32 residual", 4 * h),
                  ("bf16 normalised residual", 2 * h)]
    if run.lora_r:
        saved += [(f"LoRA {name}", run.lora_r * b) for name in shape.linears()]
    return saved


def _layer_bytes(shape: ModelShape, run: RunSettings, tokens: int, rows: int, width: int,
                 blocks: Sequence[Block]) -> tuple[int, int]:
    """(bytes one decoder layer keeps for `tokens` tokens, the share of them in tensors under the mmap threshold).

    Besides `_saved_per_token`: block attention keeps each later completion's copy of its prompt's keys and
    values; dense masks cost [rows, seq, seq] floats per layer, eager attention its softmax probabilities."""
    b = DTYPE_BYTES[run.dtype]
    sizes = [tokens * per_token for _, per_token in _saved_per_token(shape, run)]
    if run.layout == "blocks":
        sizes += [(block.prompt + c) * shape.attention_width * b for block in blocks for c in block.completions[1:]
                  for _ in ("keys", "values")]
    else:
        sizes.append(rows * width * width * 4)
    if run.attention == "eager":
        sizes.append(rows * shape.heads * width * width * b)
    return sum(sizes), sum(size for size in sizes if size < MMAP_THRESHOLD)


def step_flops(shape: ModelShape, run: RunSettings, work: Workload) -> dict[str, float]:
    """FLOPs per optimizer step, per process: 2 per weight per token forward, twice that backward (once without
    weight gradients: LoRA's frozen base), attention's 4 x width per query-key pair forward and 8 backward, the
    LM head at completion tokens only (3 matmuls fused, 4 otherwise; one less for a frozen head)."""
    t, s = work.step_tokens, work.step_scored
    body = 2 * shape.matmul_params * t + 4 * shape.attention_width * work.step_attention * shape.layers
    head = 2 * shape.vocab * shape.hidden * s
    lora = run.lora_r > 0
    matmuls = (3 if run.fused_head else 4) - lora
    flops = {"policy forward": body, "policy backward": body * (1.5 if lora else 2.0), "LM head": head * matmuls}
    if run.gradient_checkpointing:
        flops["recomputation"] = body
    if run.reference != "none" and not run.precompute:
        flops["reference forward"] = body + head
    return flops


# ---- from a data set or the length limits -------------------------------------------------------------------------


@dataclass(frozen=True)
class DataProfile:
    """What the plan needs from a data set, computed once: each prompt group (or pair) as one block, the blocks
    with the most tokens per pair first, and totals for the mean step."""

    units: tuple[Block, ...]
    pairs: int
    tokens: int = 0                        # every unit's tokens, prompt once per unit
    scored: int = 0
    attention: int = 0                     # query-key pairs per layer over every unit
    held_tokens: int = 0                   # train + eval token ids in memory
    held_pairs: int = 0
    source: str = ""
    percentiles: dict[str, list[int]] = field(default_factory=dict)
    uniform: bool = False                  # every pair is `units[0]` (from the length limits)

    @classmethod
    def from_pairs(cls, pairs: Sequence[Any], *, source: str, eval_pairs: Sequence[Any] = ()) -> DataProfile:
        """From `TokenizedPair`s: pairs of one prompt group share a block (its prompt and distinct responses)."""
        groups: dict[Any, list[Any]] = {}
        for index, pair in enumerate(pairs):
            groups.setdefault(("group", pair.group) if pair.group is not None else ("pair", index), []).append(pair)
        units = []
        for members in groups.values():
            if len(members) == 1:
                pair = members[0]
                lengths = [len(pair.chosen_ids)] + ([len(pair.rejected_ids)] if pair.rejected_ids != pair.chosen_ids
                                                    else [])
            else:
                lengths = [len(r) for r in {tuple(ids) for p in members for ids in (p.chosen_ids, p.rejected_ids)}]
            units.append(Block(len(members[0].prompt_ids), tuple(sorted(lengths, reverse=True)), len(members)))
        units.sort(key=lambda u: u.size / u.pairs, reverse=True)
        sides = {side: [len(getattr(p, f"{side}_ids")) for p in pairs] for side in ("prompt", "chosen", "rejected")}
        return cls(tuple(units), len(pairs), sum(u.size for u in units), sum(sum(u.completions) for u in units),
                   attention_pairs(units), sum(p.num_tokens for p in [*pairs, *eval_pairs]),
                   len(pairs) + len(eval_pairs), source, {k: _percentiles(v) for k, v in sides.items()})

    @classmethod
    def from_limits(cls, max_length: int, max_prompt_length: int | None, max_completion_length: int | None,
                    ) -> DataProfile:
        """Without data: every pair as long as the limits allow (the prompt length that forwards the most)."""
        def completion(prompt: int) -> int:
            return max(1, min(max_completion_length or max_length, max_length - prompt))

        candidates = {1, max_prompt_length or 1, max_length - (max_completion_length or max_length)}
        prompt = max((p for p in candidates if 1 <= p <= (max_prompt_length or max_length - 1)),
                     key=lambda p: p + 2 * completion(p))
        block = Block(prompt, (completion(prompt), completion(prompt)))
        return cls((block,), 1, block.size, sum(block.completions), attention_pairs([block]), uniform=True,
                   source=f"no --data: every pair at the length limits (prompt {prompt}, completions "
                          f"{block.completions[0]})")


def workload(data: DataProfile, run: RunSettings) -> Workload:
    """The largest micro-batch the data can make under `run`: the batch's worth of pairs that forward the most
    tokens (an upper bound over every shuffle); with --micro-batch-tokens N, those of the step's pairs that fit N
    (or one block alone, when larger). Step totals are the data's means times the pairs per step."""
    per_step = run.batch_size * run.grad_accum
    per_micro = per_step if run.micro_batch_tokens else run.batch_size
    blocks: list[Block] = []
    taken = 0
    for unit in (data.units * per_micro if data.uniform else data.units):
        if taken >= per_micro:
            break
        if taken + unit.pairs > per_micro:   # part of a group: its prompt and as many responses as its pairs need
            keep = per_micro - taken
            unit = Block(unit.prompt, unit.completions[:min(len(unit.completions), 2 * keep)], keep)
        blocks.append(unit)
        taken += unit.pairs
    micro_batches = run.grad_accum
    scale = per_step / data.pairs
    if run.micro_batch_tokens:
        kept: list[Block] = []
        tokens = 0
        for block in sorted(blocks, key=lambda b: b.size, reverse=True):
            if not kept or tokens + block.size <= run.micro_batch_tokens:
                kept.append(block)
                tokens += block.size
        blocks, micro_batches = kept, max(1, math.ceil(data.tokens * scale / run.micro_batch_tokens))
    return Workload(tuple(blocks), micro_batches, int(data.tokens * scale), int(data.scored * scale),
                    int(data.attention * scale), data.held_tokens, data.held_pairs, data.source, data.percentiles)


def _percentiles(values: Sequence[int]) -> list[int]:
    ordered = sorted(values)
    return [ordered[min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1)] for q in (50, 90, 99)] + [ordered[-1]]


# ---- fitting a budget ----------------------------------------------------------------------------------------------

# The changes that lower memory. The first four train the same model (token budgets and checkpointing cost time,
# FSDP2 more devices); bf16 changes the numerics and LoRA the method, so they come last.
LEVERS = ("micro_batch_tokens", "precompute", "checkpointing", "fsdp", "bf16", "lora")
CHANGES_RESULTS = ("bf16", "lora")


def fit(shape: ModelShape, run: RunSettings, work_for: Any, budget: int) -> tuple[RunSettings, int] | None:
    """The cheapest settings whose plan fits `budget`, and their peak: the fewest levers that change the results,
    then the fewest levers, then the cheapest; FSDP2 over as few processes as fit (2, 4, 8, or --nproc).

    `work_for(settings)` rebuilds the workload for changed settings (a token budget changes the micro-batches).
    """
    combinations = [[lever for k, lever in enumerate(LEVERS) if mask >> k & 1] for mask in range(1, 2 ** len(LEVERS))]
    combinations.sort(key=lambda chosen: (sum(c in CHANGES_RESULTS for c in chosen), len(chosen),
                                          sum(2 ** LEVERS.index(c) for c in chosen)))
    for chosen in combinations:
        for settings in _apply(run, chosen):
            if "micro_batch_tokens" in chosen:
                found = _largest_token_budget(shape, settings, work_for, budget)
            else:
                peak = estimate(shape, settings, work_for(settings)).peak
                found = (settings, peak) if peak <= budget else None
            if found is not None:
                return found
    return None


def _apply(run: RunSettings, levers: Sequence[str]) -> list[RunSettings]:
    """`run` with the levers pulled (one variant per process count for FSDP2), or none when a lever does not
    apply (already on, or meaningless here)."""
    changes: dict[str, Any] = {}
    for lever in levers:
        if lever == "precompute" and run.reference != "none" and not run.precompute and not run.ref_sync:
            changes["precompute"] = True
        elif lever == "checkpointing" and not run.gradient_checkpointing:
            changes["gradient_checkpointing"] = True
        elif lever == "fsdp" and not run.fsdp:
            changes["fsdp"] = True
        elif lever == "bf16" and run.dtype == "float32":
            changes["dtype"] = "bfloat16"
        elif lever == "lora" and not run.lora_r:
            changes.update(lora_r=16, reference="adapter" if run.reference == "copy" else run.reference)
        elif lever == "micro_batch_tokens" and run.layout == "blocks" and not run.micro_batch_tokens:
            changes["micro_batch_tokens"] = 1
        else:
            return []
    if "fsdp" not in levers:
        return [replace(run, **changes)]
    return [replace(run, **changes, nproc=n) for n in ([run.nproc] if run.nproc > 1 else [2, 4, 8])]


def _largest_token_budget(shape: ModelShape, run: RunSettings, work_for: Any, budget: int,
                          ) -> tuple[RunSettings, int] | None:
    """The largest --micro-batch-tokens (a multiple of 256) under which `run` fits, and its peak."""
    full = work_for(replace(run, micro_batch_tokens=None))
    top = layout_tokens(full.blocks, run)[0]
    best = None
    low, high = 1, max(1, math.ceil(top / 256))
    while low <= high:
        middle = (low + high) // 2
        settings = replace(run, micro_batch_tokens=256 * middle)
        work = work_for(settings)
        peak = estimate(shape, settings, work).peak
        if peak <= budget and layout_tokens(work.blocks, settings)[0] < top:
            best, low = (settings, peak), middle + 1
        else:
            high = middle - 1
    return best


# ---- from a Config ------------------------------------------------------------------------------------------------


def settings_from_config(cfg: Any, *, nproc: int = 1, device: str | None = None) -> RunSettings:
    """The plan's view of a `Config` (validated: the same losses, reference and layout `dpo train` would use)."""
    from . import models
    from .batching import layout_for
    from .objective import Objective

    objective = Objective.from_config(cfg)
    lora_r, targets = cfg.lora_r, cfg.lora_target_modules
    adapter_config = Path(cfg.lora_adapter or "") / "adapter_config.json"
    if cfg.lora_adapter and adapter_config.is_file():   # an existing adapter: its own rank and targets
        adapter = json.loads(adapter_config.read_text(encoding="utf-8"))
        lora_r = int(adapter.get("r") or lora_r or 8)
        modules = adapter.get("target_modules") or targets
        targets = modules if isinstance(modules, str) else ",".join(modules)
    if device is None:
        device = cfg.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    bits = 4 if getattr(cfg, "load_in_4bit", False) else 8 if getattr(cfg, "load_in_8bit", False) else 0
    return RunSettings(
        dtype=cfg.dtype, device=device.split(":")[0], nproc=nproc, fsdp=cfg.fsdp, lora_r=lora_r, lora_targets=targets,
        quantized_bits=bits, quantized_tables=bits == 4 and getattr(cfg, "quantize_embeddings", False),
        reference=objective.strategy, precompute=cfg.precompute_ref,
        ref_sync=bool(cfg.ref_sync_every), preset=models.is_preset(cfg.model), lean_host_memory=cfg.lean_host_memory,
        ref_shape=read_shape(cfg.ref_model) if cfg.ref_model else None,
        gradient_checkpointing=cfg.gradient_checkpointing, lean_layers=cfg.lean_layers and not cfg.compile,
        layout=layout_for(prefix_sharing=cfg.prefix_sharing, packing=cfg.packing,
                          attn_implementation=cfg.attn_implementation, compile=cfg.compile,
                          max_tokens_per_batch=cfg.max_tokens_per_batch),
        attention=cfg.attn_implementation, chunk_size=cfg.logprob_chunk_size, fused_head=objective.fused,
        batch_size=cfg.batch_size, grad_accum=cfg.grad_accum, micro_batch_tokens=cfg.micro_batch_tokens,
        max_tokens_per_batch=cfg.max_tokens_per_batch, eval_batch_size=cfg.eval_batch_size or cfg.batch_size)


def plan_run(cfg: Any, *, nproc: int = 1, budget: int | None = None, device: str | None = None,
             shape: ModelShape | None = None, pairs: Sequence[Any] | None = None) -> Plan:
    """The plan of `dpo train` with `cfg` over `nproc` processes; with `budget` (bytes), whether it fits and
    the cheapest change that makes it fit. `shape` and `pairs` (tokenized train pairs) are read when not given:
    the data through the data preparation of `dpo train` when `cfg.data` is set, else the length limits."""
    from . import models

    run = settings_from_config(cfg, nproc=nproc, device=device)
    shape = shape or read_shape(cfg.model)
    if pairs is None and cfg.data == "synthetic" and not models.is_preset(cfg.model):
        pairs = []   # no --data for a model of one's own: plan for the length limits, not the demo task
    if pairs is None:
        prepared = _prepare(cfg)
        data = DataProfile.from_pairs(prepared.train, source=f"{cfg.data}: {len(prepared.train):,} train pairs",
                                      eval_pairs=prepared.eval)
    elif pairs:
        data = DataProfile.from_pairs(pairs, source=f"{cfg.data}: {len(pairs):,} train pairs")
    else:
        data = DataProfile.from_limits(cfg.max_length, cfg.max_prompt_length, cfg.max_completion_length)

    def work_for(settings: RunSettings) -> Workload:
        return workload(data, settings)

    plan = estimate(shape, run, work_for(run))
    plan.budget = budget
    if budget is not None and plan.peak > budget and not plan.unpredicted:
        found = fit(shape, run, work_for, budget)
        if found is not None:
            plan.fix, plan.fix_peak = found
    return plan


def _prepare(cfg: Any) -> Any:
    from . import models
    from .data import preparation

    tokenizer = models.load_tokenizer(cfg.tokenizer or cfg.model)
    settings = preparation.DataSettings.from_settings(cfg.to_dict(), unpaired=False, sft=None)
    return preparation.prepare(settings, tokenizer, cache=cfg.cache, cache_dir=cfg.cache_dir, progress=False)


# ---- what the user reads --------------------------------------------------------------------------------------------


def parse_memory(text: str) -> int:
    """`80GB`, `24GiB`, `512M`, `1.5T` -> bytes. Units are binary (GB = GiB = 2^30 bytes, as GPU memory is
    counted); a bare number is GiB."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", text)
    if not match or float(match.group(1)) <= 0:
        raise DPOError(f"--memory {text}: expected a size such as 80GB, 24GiB or 512MB")
    power = {"k": 1, "m": 2, "g": 3, "t": 4, "": 3}[match.group(2).lower()]
    return int(float(match.group(1)) * 1024 ** power)


def gib(size: float) -> str:
    """Bytes for people: GiB from 1 GiB up, MiB below."""
    return f"{size / GiB:.2f} GiB" if size >= GiB else f"{size / MiB:,.0f} MiB"


def flop(count: float) -> str:
    return f"{count / 1e12:,.2f} TFLOP" if count >= 1e11 else f"{count / 1e9:,.2f} GFLOP"


def describe(plan: Plan) -> list[str]:
    """The plan as lines: what was planned, the peak with its parts, the phases, FLOPs, and the fit."""
    run, work, shape = plan.settings, plan.workload, plan.shape
    tokens, rows, width = layout_tokens(work.blocks, run)
    procs = f"{run.nproc} process{'es' if run.nproc > 1 else ''}" + (" (FSDP2)" if run.sharded else
                                                                       " (DDP)" if run.nproc > 1 else "")
    method = f"LoRA r={run.lora_r}" if run.lora_r else "full fine-tuning"
    if run.quantized_bits:
        method += f" on a {run.quantized_bits}-bit base" + (" and tables" if run.quantized_tables else "")
    lines = [f"model: {shape.describe()}",
             f"run: {method}, reference {run.reference}{' (precomputed)' if run.precompute else ''}, {run.dtype} "
             f"on {run.device}, {procs}, layout {run.layout}"
             f"{', gradient checkpointing' if run.gradient_checkpointing else ''}, LM-head chunk {run.chunk_size}",
             f"data: {work.source}"]
    for side, values in work.percentiles.items():
        lines.append(f"  {side:<9} tokens p50 {values[0]:,}  p90 {values[1]:,}  p99 {values[2]:,}  max {values[3]:,}")
    pairs = sum(b.pairs for b in work.blocks)
    lines.append(f"largest micro-batch: {pairs} pair{'s' if pairs > 1 else ''}, {tokens:,} tokens forwarded "
                 f"({rows} row{'s' if rows > 1 else ''}), {sum(sum(b.completions) for b in work.blocks):,} scored; "
                 f"{work.micro_batches} micro-batch{'es' if work.micro_batches > 1 else ''} per step")
    where = "per process" + (" (rank 0)" if run.nproc > 1 else "")
    lines.append(f"predicted peak {where}: {gib(plan.peak)}, in the {plan.peak_phase} phase"
                 + (" (CUDA: allocator + context)" if run.device == "cuda" else " (CPU: resident memory)"))
    in_peak = PHASES[plan.peak_phase]
    on_host = run.device == "cuda"   # host-memory parts are not on the GPU
    for part in plan.parts.values():
        if part.bytes and not (on_host and part.host):
            mark = " " if part.name in in_peak else "-"
            lines.append(f"  {mark} {part.name:<22}{gib(part.bytes):>12}  {part.detail}")
    lines.append("  (- : not held at the peak)")
    host = [p for p in plan.parts.values() if on_host and p.host and p.bytes]
    if host:
        lines.append("host memory besides: " + ", ".join(f"{p.name} {gib(p.bytes)}" for p in host))
    lines.append("phases: " + ", ".join(f"{name} {gib(size)}" for name, size in plan.phases.items()))
    lines.append(f"FLOPs per step (per process): {flop(sum(plan.flops.values()))} ("
                 + ", ".join(f"{k} {flop(v)}" for k, v in plan.flops.items()) + ")")
    lines += [f"not predicted: {item}" for item in plan.unpredicted]
    if plan.budget is not None:
        if plan.unpredicted:
            lines.append(f"--memory {gib(plan.budget)}: cannot say whether it fits (parts not predicted)")
        elif plan.fits:
            lines.append(f"fits in {gib(plan.budget)} ({gib(plan.budget - plan.peak)} to spare)")
        elif plan.fix is not None and plan.fix_peak is not None:
            lines.append(f"does not fit in {gib(plan.budget)} (needs {gib(plan.peak)}); the cheapest change that "
                         f"fits: {plan.fix.flags(run)} -> {gib(plan.fix_peak)}")
        else:
            lines.append(f"does not fit in {gib(plan.budget)} (needs {gib(plan.peak)}), with any of "
                         "--micro-batch-tokens, --precompute-ref, --gradient-checkpointing, --fsdp, bf16 or LoRA")
    return lines


def one_line_summary(cfg: Any, *, pairs: Sequence[Any] | None = None, nproc: int = 1,
                     device: str | None = None) -> str:
    """One line for `dpo train` to print at start-up: the predicted peak and its largest parts. Never raises
    (a model the planner cannot size gets a line saying so)."""
    return startup_summary(cfg, pairs=pairs, nproc=nproc, device=device)[0]


def startup_summary(cfg: Any, *, pairs: Sequence[Any] | None = None, nproc: int = 1, device: str | None = None,
                    ) -> tuple[str, int | None]:
    """`one_line_summary`'s line and the predicted peak in bytes (None when there is none), for `peak_line` at
    the end of the run."""
    try:
        plan = plan_run(cfg, nproc=nproc, device=device, pairs=pairs)
    except Exception as err:  # the summary must never stop a run
        return f"plan: no prediction ({str(err).splitlines()[0] if str(err) else type(err).__name__})", None
    held = [p for p in plan.parts.values() if p.name in PHASES[plan.peak_phase] and p.bytes
            and not (p.host and plan.settings.device == "cuda")]
    largest = sorted(held, key=lambda p: p.bytes, reverse=True)[:4]
    unknown = " (some parts not predicted: see dpo plan)" if plan.unpredicted else ""
    line = (f"plan: peak ~{gib(plan.peak)} per process ({plan.peak_phase}: "
            + ", ".join(f"{p.name} {gib(p.bytes)}" for p in largest)
            + f"); {flop(sum(plan.flops.values()))} per step{unknown}")
    return line, None if plan.unpredicted else plan.peak


def peak_line(device: str = "cpu", predicted: int | None = None) -> str:
    """The line `dpo train` prints at the end: this process's measured peak, beside the plan's."""
    measured = measured_peak_bytes(device)
    kind = "GPU allocator + CUDA context" if device.startswith("cuda") else "resident"
    versus = f"; plan {gib(predicted)}, {100 * (predicted - measured) / measured:+.0f}%" if predicted else ""
    return f"peak memory: {gib(measured)} measured ({kind}{versus})"


def measured_peak_bytes(device: str = "cpu") -> int:
    """This process's measured peak, as the plan counts it, to print beside the plan at the end of a run: PyTorch's
    allocator peak plus the CUDA context on CUDA; elsewhere peak resident memory, from /proc/self/status's VmHWM on
    Linux (ru_maxrss would start from the launching process's high-water mark)."""
    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.max_memory_allocated()) + CUDA_CONTEXT
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError):
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)   # bytes on macOS, KiB on Linux
