"""Frozen vocabulary tables (the input embeddings and the LM head) stored in 4 bits, dequantized a few rows at a time.

QLoRA (Dettmers et al. 2023, arXiv 2305.14314) quantizes a model's linear layers; transformers' bitsandbytes
integration leaves the embeddings and the LM head in the compute dtype. On a small model with a large vocabulary
these two tables are much of the weights (Qwen2.5-0.5B: 136M of its 494M parameters, tied; the ~106M model of
`benchmarks/memory.py`: 49M, untied), and under LoRA neither trains. `--quantize-embeddings` stores them as the
linears are stored: 4-bit codes (NF4 or FP4) in blocks of 64 along each row, one float32 scale per block (the
scales are not double-quantized: a table's scales are 0.5 bits per weight). No full-precision copy of either table
exists at any time after loading:

- an input embedding dequantizes the rows it looks up (blocks never straddle rows: the width is a multiple of 64);
- the LM head multiplies `SLICE_ROWS` vocabulary rows at a time, dequantized into a transient slice, in the forward
  pass (`logits`, into the chunk's float32 logits) and in the backward one (`hidden_gradient`); the head's
  weight gets no gradient.

Dequantization is bitsandbytes' own (`dequantize_4bit`), so each row equals the one the whole table dequantizes
to (tests compare with that). bitsandbytes is imported only when a table is built.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from .errors import DPOError

BLOCK = 64           # weights per scale, as bitsandbytes' Linear4bit
# Vocabulary rows dequantized at once by the LM head: a 1024 x 896 float32 slice is 3.5 MiB. Larger slices
# leave larger holes in glibc's heap on CPU (benchmarks/memory.py's qlora+embeddings step: ~620 MiB with 4096
# rows, ~510 with 1024, at the same speed).
SLICE_ROWS = 1024


class QuantizedTable(torch.nn.Module):
    """A frozen `[rows, width]` table in 4 bits: `packed` codes (two per byte, row-major) and a float32 `absmax`
    per block of 64 weights, both buffers (they move with the model; not saved in its state dict)."""

    def __init__(self, weight: torch.Tensor, quant_type: str) -> None:
        super().__init__()
        from bitsandbytes.functional import quantize_4bit

        rows, width = weight.shape
        packed = torch.empty(rows, width // 2, dtype=torch.uint8, device=weight.device)
        absmax = torch.empty(rows, width // BLOCK, dtype=torch.float32, device=weight.device)
        # Slice by slice: bitsandbytes' CPU quantizer holds ~2.6x its input in temporaries (1.3 GiB for
        # Qwen2.5's 151,936 x 896 float32 table). Blocks never straddle rows, so the codes are the same.
        for start in range(0, rows, SLICE_ROWS):
            stop = min(start + SLICE_ROWS, rows)
            codes, state = quantize_4bit(weight[start:stop].detach(), blocksize=BLOCK, quant_type=quant_type,
                                         compress_statistics=False)
            packed[start:stop] = codes.view(stop - start, width // 2)
            absmax[start:stop] = state.absmax.view(stop - start, width // BLOCK)
        self.register_buffer("packed", packed, persistent=False)    # [rows, width / 2] uint8, two codes a byte
        self.register_buffer("absmax", absmax, persistent=False)    # [rows, width / 64] float32
        self.register_buffer("code", state.code, persistent=False)  # [16] the data type's values
        self.rows, self.width, self.dtype = rows, width, weight.dtype
        self._state = state     # bitsandbytes' QuantState: block size and data type

    def _dequantize(self, packed: torch.Tensor, absmax: torch.Tensor, out: torch.Tensor | None = None,
                    ) -> torch.Tensor:
        """`packed` `[n, width / 2]` and its `absmax` `[n, blocks]` as a `[n, width]` tensor in the table's
        dtype (into `out` when given)."""
        from bitsandbytes.functional import dequantize_4bit

        state = copy.copy(self._state)
        state.absmax, state.shape = absmax.reshape(-1).float(), torch.Size((packed.shape[0], self.width))
        state.code, state.dtype = self.code.float(), self.dtype   # float32 even if the model was cast
        return dequantize_4bit(packed.reshape(-1, 1), state, out=out)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """The rows `ids` `[...]` as `[..., width]` in the table's dtype (an embedding lookup)."""
        flat = ids.reshape(-1)
        rows = self._dequantize(self.packed.index_select(0, flat), self.absmax.index_select(0, flat))
        return rows.view(*ids.shape, self.width)

    def dequantize(self) -> torch.Tensor:
        """The whole table in its dtype (for merging into a full-precision model)."""
        return self._dequantize(self.packed, self.absmax)

    def _slices(self, dtype: torch.dtype) -> Iterator[tuple[int, int, torch.Tensor]]:
        """`(start, stop, rows [start, stop) in dtype)` over the table. On a GPU each slice is dequantized into one
        buffer reused by the next (bitsandbytes 0.50 has no such `out=` kernel on CPU)."""
        buffer = (self.absmax.new_empty(min(SLICE_ROWS, self.rows), self.width, dtype=self.dtype)
                  if self.packed.is_cuda else None)
        for start in range(0, self.rows, SLICE_ROWS):
            stop = min(start + SLICE_ROWS, self.rows)
            rows = self._dequantize(self.packed[start:stop], self.absmax[start:stop],
                                    None if buffer is None else buffer[:stop - start])
            yield start, stop, rows.to(dtype)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """`h @ table.T` as float32 `[n, rows]`, from `h` `[n, width]` in the compute dtype, a slice of rows at a
        time (the head's forward)."""
        out = h.new_empty(h.shape[0], self.rows, dtype=torch.float32)
        for start, stop, rows in self._slices(h.dtype):
            out[:, start:stop] = F.linear(h, rows)
        return out

    def hidden_gradient(self, grad_logits: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """`grad_logits @ table` `[n, width]` from `grad_logits` `[n, rows]`, a slice of rows at a time (the head's
        backward), summed in float32; written into `out` when given."""
        total = grad_logits.new_zeros(grad_logits.shape[0], self.width, dtype=torch.float32)
        for start, stop, rows in self._slices(grad_logits.dtype):
            if grad_logits.dtype == torch.float32:
                total.addmm_(grad_logits[:, start:stop], rows)
            else:
                total.add_(grad_logits[:, start:stop] @ rows)
        return total.to(grad_logits.dtype) if out is None else out.copy_(total)


class QuantizedEmbedding(torch.nn.Module):
    """A model's input embeddings from a `QuantizedTable` (frozen: its lookups carry no gradient to the table)."""

    def __init__(self, table: QuantizedTable, padding_idx: int | None = None) -> None:
        super().__init__()
        self.table, self.padding_idx = table, padding_idx
        self.num_embeddings, self.embedding_dim = table.rows, table.width

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.table.lookup(input_ids)


class QuantizedLMHead(torch.nn.Module):
    """A model's bias-free LM head from a `QuantizedTable`: `forward(h [..., width]) -> float32 logits
    [..., vocab]`, differentiable with respect to `h` (the table is frozen). The log-prob paths of `logprobs` and
    `fused_head` multiply with `table` directly, chunk by chunk."""

    def __init__(self, table: QuantizedTable) -> None:
        super().__init__()
        self.table = table
        self.in_features, self.out_features = table.width, table.rows

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        flat = hidden.reshape(-1, hidden.shape[-1])
        return _TableLinear.apply(flat, self.table).view(*hidden.shape[:-1], self.table.rows)


class _TableLinear(torch.autograd.Function):
    """`h [n, width] -> h @ table.T [n, rows]` (float32); the backward multiplies by the table again, slice by
    slice, so nothing of the table's size is saved."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, table: QuantizedTable) -> torch.Tensor:  # type: ignore[override]
        ctx.table, ctx.hidden_dtype = table, hidden.dtype
        return table.logits(hidden)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return ctx.table.hidden_gradient(grad.to(ctx.hidden_dtype)), None


def quantize_embeddings(model: torch.nn.Module, quant_type: str, source: str) -> None:
    """Replace `model`'s input embeddings and LM head by 4-bit `QuantizedTable`s (one shared table when they are
    tied), in place, freeing the full-precision ones. `source` names the model in errors."""
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if type(embedding) is not torch.nn.Embedding or type(head) is not torch.nn.Linear or head.bias is not None:
        raise DPOError(f"{source}: --quantize-embeddings needs a plain embedding table and a bias-free linear LM "
                       f"head (this model has {type(embedding).__name__} and {type(head).__name__})")
    width = embedding.weight.shape[1]
    if width % BLOCK:
        raise DPOError(f"{source}: --quantize-embeddings needs a hidden size divisible by {BLOCK} (this model's is "
                       f"{width}); drop the flag")
    tied = head.weight is embedding.weight
    table = QuantizedTable(embedding.weight.data, quant_type)
    head_table = table if tied else QuantizedTable(head.weight.data, quant_type)
    model.set_input_embeddings(QuantizedEmbedding(table, embedding.padding_idx))
    model.set_output_embeddings(QuantizedLMHead(head_table))


def dequantize_embeddings(model: torch.nn.Module) -> None:
    """Undo `quantize_embeddings`: plain `nn.Embedding` and `nn.Linear` modules holding the dequantized tables
    (one shared weight when tied), so that the model saves and loads as any full-precision one."""
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if not isinstance(embedding, QuantizedEmbedding):
        return
    weight = torch.nn.Parameter(embedding.table.dequantize(), requires_grad=False)
    plain = torch.nn.Embedding(embedding.num_embeddings, embedding.embedding_dim, embedding.padding_idx,
                               _weight=weight, _freeze=True)
    model.set_input_embeddings(plain)
    if isinstance(head, QuantizedLMHead):
        linear = torch.nn.Linear(head.in_features, head.out_features, bias=False, device="meta")
        linear.weight = (weight if head.table is embedding.table
                         else torch.nn.Parameter(head.table.dequantize(), requires_grad=False))
        model.set_output_embeddings(linear)
