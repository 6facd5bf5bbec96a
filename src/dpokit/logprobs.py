"""Sequence log-probs: run the backbone once, apply the LM head only where a completion token is scored.

`SequenceScorer` wraps a causal LM. Its forward runs the decoder over the whole batch, gathers the hidden
states at `Batch.score_index` (completion positions only: prompt and padding never reach the LM head), and
computes `log_softmax(h @ W.T)[target]` in chunks of `chunk_size` tokens, so that the `[tokens, vocab]` logits
exist for one chunk at a time, in the forward and (by recomputation) in the backward pass. Wrapping the model in
an `nn.Module` is what lets DDP and FSDP2 wrap the scorer and see every parameter used. A batch with images
(`Batch.images`) reaches the decoder as input embeddings with each prompt's image features in place (`vision`).
Asked for it (`with_accuracy`, SFT runs), the same pass counts the tokens whose logits' argmax is the target.

`naive_sequence_logps` is the textbook computation (full logits, `log_softmax`, `gather`, mask) kept for tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from . import vision
from .batching import Batch, BlockLayout, ImageBatch
from .block_attention import decoder_hidden_states
from .quantized_tables import QuantizedLMHead, QuantizedTable


@dataclass
class PairLogps:
    """Per-pair summed completion log-probs and completion lengths, all `[pairs]`."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_lengths: torch.Tensor
    rejected_lengths: torch.Tensor
    # WPO (Zhou et al. 2024): mean over tokens of log p(y_t) - log sum_v p(v)^2, no grad; only when asked for.
    chosen_wpo: torch.Tensor | None = None
    rejected_wpo: torch.Tensor | None = None
    # Tokens of the chosen completion where the policy's argmax is the target (TRL's SFT token accuracy, counted
    # in the log-probs' pass), no grad; only when asked for.
    chosen_correct: torch.Tensor | None = None

    def select(self, pairs: torch.Tensor) -> PairLogps:
        """The same numbers for the pairs at indices `pairs` only."""
        return PairLogps(*(t[pairs] if t is not None else None for t in self._fields()))

    def detach(self) -> PairLogps:
        return PairLogps(*(t.detach() if t is not None else None for t in self._fields()))

    def _fields(self) -> tuple[torch.Tensor | None, ...]:
        return (self.chosen, self.rejected, self.chosen_lengths, self.rejected_lengths, self.chosen_wpo,
                self.rejected_wpo, self.chosen_correct)


class SequenceScorer(torch.nn.Module):
    """`forward(batch tensors) -> token log-probs [scored]` for a Hugging Face causal LM (or a PEFT wrap of one)."""

    def __init__(self, model: torch.nn.Module, chunk_size: int = 512) -> None:
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor | BlockLayout,
                score_index: torch.Tensor, target_ids: torch.Tensor, with_wpo: bool = False,
                pair_loss: Callable[..., Any] | None = None, images: ImageBatch | None = None,
                with_accuracy: bool = False) -> tuple[torch.Tensor | None, ...]:
        """`(token log-probs [scored], WPO terms or None)`, and the argmax hits as a third output only
        `with_accuracy` (see `chunked_target_logps`); with `pair_loss` (a `fused_loss.FusedPairLoss`),
        `pair_loss(hidden, head, softcap)` takes over from the backbone's output: LM head and loss in one pass.
        `images`: the batch's images, for a vision-language model."""
        decoder = self.model.get_decoder()
        head = self.model.get_output_embeddings()
        # The tokens as the decoder takes them: ids, or embeddings with the image features written in.
        tokens = ({"input_ids": input_ids} if images is None
                  else {"inputs_embeds": vision.input_embeddings(self.model, input_ids, images)})
        if images is not None:  # a model with multimodal RoPE (Qwen2-VL) takes 3-axis positions
            position_ids = vision.decoder_position_ids(self.model, input_ids, position_ids, images)
        if isinstance(attention_mask, BlockLayout):
            hidden = decoder_hidden_states(decoder, input_ids, position_ids, attention_mask,
                                           inputs_embeds=tokens.get("inputs_embeds"))
        else:
            if attention_mask.dim() == 4 and self._attn_implementation() == "eager":
                attention_mask = _additive(attention_mask, self._dtype())
            elif attention_mask.dim() == 4 and self._attn_implementation() == "flex_attention":
                attention_mask = _block_mask(attention_mask)  # transformers would add a bool tensor to the scores
            hidden = decoder(**tokens, position_ids=position_ids, attention_mask=attention_mask,
                             use_cache=False).last_hidden_state       # [rows, seq, hidden]
        hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, score_index)  # [scored, hidden]
        softcap = getattr(getattr(self.model, "config", None), "final_logit_softcapping", None)
        if pair_loss is not None:
            return pair_loss(hidden, head, softcap)
        logps, wpo, correct = chunked_target_logps(hidden, head, target_ids, self.chunk_size, softcap, with_wpo,
                                                   with_accuracy)
        return (logps, wpo, correct) if with_accuracy else (logps, wpo)

    def _attn_implementation(self) -> str | None:
        return getattr(getattr(self.model, "config", None), "_attn_implementation", None)

    def _dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


def chunked_target_logps(hidden: torch.Tensor, head: torch.nn.Module, target_ids: torch.Tensor, chunk_size: int,
                         softcap: float | None = None, with_wpo: bool = False, with_accuracy: bool = False,
                         ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """`log_softmax(head(hidden))[target]` per row of `hidden`, chunk by chunk; `[scored]` in float32. With
    `with_wpo`, WPO's per-token terms; with `with_accuracy`, 1.0 where the logits' argmax is the target (else
    0.0), from the same chunks of logits; both without gradient (None when not asked for).

    A plain bias-free `nn.Linear` head (every causal LM we know), or its 4-bit table (`--quantize-embeddings`),
    goes through `_LinearTargetLogps`, which keeps only `hidden`, the weight and one float per token for the
    backward and rebuilds each chunk's softmax there; each chunk gives its log-probs and WPO terms in one pass
    (without a gradient to compute, as for the reference and evaluation, autograd keeps nothing of it). Any other
    head is checkpointed chunk by chunk (the backward recomputes that chunk's logits). Either way the peak memory
    of this part is O(chunk x vocab) rather than O(tokens x vocab).
    """
    matrix = head_matrix(head)
    if matrix is not None:
        logps, wpo_terms, correct = _LinearTargetLogps.apply(hidden, matrix, target_ids, chunk_size, softcap,
                                                             with_wpo, with_accuracy)
        return logps, wpo_terms if with_wpo else None, correct if with_accuracy else None
    pieces, hits = [], []
    for start in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[start:start + chunk_size], target_ids[start:start + chunk_size]
        if torch.is_grad_enabled() and h.requires_grad:
            piece, hit = checkpoint(_head_logps, h, head, t, softcap, with_accuracy, use_reentrant=False)
        else:
            piece, hit = _head_logps(h, head, t, softcap, with_accuracy)
        pieces.append(piece)
        hits.append(hit)
    logps = torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)
    correct = (torch.cat(hits) if hits else torch.zeros_like(logps)) if with_accuracy else None
    if not with_wpo:
        return logps, None, correct
    wpo = []  # another kind of head: its log-softmax again, without gradient
    with torch.no_grad():
        for start in range(0, hidden.shape[0], chunk_size):
            # One expression: this chunk's [chunk, vocab] log-softmax is gone before the next one's is made.
            wpo.append(logps[start:start + chunk_size].detach()
                       - torch.logsumexp(2 * _head_log_softmax(hidden[start:start + chunk_size], head, softcap), -1))
    return logps, (torch.cat(wpo) if wpo else logps.new_zeros(0)), correct


class _LinearTargetLogps(torch.autograd.Function):
    """Target log-probs through a linear head, one chunk of logits at a time, forward and backward.

    With z = softcap(h W^T) and p = softmax(z), d log p_y / d z = onehot(y) - p; so for upstream weights g the
    backward needs only each chunk's p, rebuilt from h, W and the saved logsumexp (no second reduction over the
    vocabulary), then grad_h = (g (onehot - p)) W and grad_W = (g (onehot - p))^T h, chunk by chunk, in place.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,  # type: ignore[override]
                chunk_size: int, softcap: float | None, with_wpo: bool, with_accuracy: bool,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logps = hidden.new_empty(hidden.shape[0], dtype=torch.float32)   # [scored]
        lse = torch.empty_like(logps)                                   # [scored]
        # No gradient flows through these two.
        wpo_terms = torch.zeros_like(logps) if with_wpo else logps.new_zeros(0)
        correct = torch.zeros_like(logps) if with_accuracy else logps.new_zeros(0)
        dtype = head_dtype(hidden)
        w = in_dtype(weight, dtype)

        def score(start: int, stop: int) -> None:  # the chunk's logits die with this call, before the next's exist
            parts = softmax_parts(*chunk_logits(hidden[start:stop].to(dtype), w, softcap, with_tanh=False),
                                  targets[start:stop], with_accuracy)
            lse[start:stop], logps[start:stop] = parts.lse, parts.target_logps
            if with_wpo:
                wpo_terms[start:stop] = parts.wpo()
            if parts.correct is not None:
                correct[start:stop] = parts.correct

        for start in range(0, hidden.shape[0], chunk_size):
            score(start, start + chunk_size)
        if isinstance(weight, QuantizedTable):  # a frozen buffer, not an autograd input
            ctx.save_for_backward(hidden, targets, lse)
            ctx.table = weight
        else:
            ctx.save_for_backward(hidden, targets, lse, weight)
            ctx.table = None
        ctx.chunk_size, ctx.softcap, ctx.compute_dtype = chunk_size, softcap, dtype
        ctx.mark_non_differentiable(wpo_terms, correct)
        return logps, wpo_terms, correct

    @staticmethod
    def backward(ctx, grad: torch.Tensor, *_: torch.Tensor):  # type: ignore[override]
        hidden, targets, lse, *saved_weight = ctx.saved_tensors
        weight = saved_weight[0] if saved_weight else ctx.table
        dtype, softcap = ctx.compute_dtype, ctx.softcap
        w = in_dtype(weight, dtype)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            stop = start + ctx.chunk_size
            h = hidden[start:stop].to(dtype)
            # One expression: the rebuilt softmax is a temporary, freed before the next chunk's logits exist.
            head_gradients(*rebuilt_softmax(*chunk_logits(h, w, softcap), lse[start:stop]), grad[start:stop],
                           targets[start:stop], h, w, None if grad_hidden is None else grad_hidden[start:stop],
                           grad_weight)
        return (grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype), None, None, None, None,
                None)


@dataclass
class SoftmaxParts:
    """One chunk of a linear head's output, reduced over the vocabulary without a second `[chunk, vocab]` buffer.

    `exps` holds exp(z - max z) in the logits' own (float32) buffer, so softmax(z) = exps / sums[:, None];
    `tanh` is tanh(raw / softcap) for soft-capped heads (for the gradient), else None.
    """

    exps: torch.Tensor           # [chunk, vocab]
    sums: torch.Tensor           # [chunk]
    lse: torch.Tensor            # [chunk] logsumexp of the logits
    target_logps: torch.Tensor   # [chunk] log-prob of each target
    tanh: torch.Tensor | None
    correct: torch.Tensor | None = None   # [chunk] 1.0 where the logits' argmax is the target; when asked for

    def wpo(self) -> torch.Tensor:
        """WPO's per-token term, log p(y) - log sum_v p(v)^2 (Zhou et al. 2024, arXiv 2406.11827, Eq. 4)."""
        squares = (self.exps.unsqueeze(1) @ self.exps.unsqueeze(2)).view(-1)   # sum_v exp(z - max)^2, no temporary
        return self.target_logps - (squares.log() - 2 * self.sums.log())


def head_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype the LM head multiplies in: autocast's when it is on, else the hidden states' own."""
    device = hidden.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype


WEIGHT_GRADIENT_ROWS = 8192   # vocabulary rows of a low-precision head's weight gradient multiplied at once


def head_matrix(head: torch.nn.Module) -> torch.Tensor | QuantizedTable | None:
    """What a bias-free linear LM head multiplies by: its weight `[vocab, hidden]`, or its 4-bit table
    (`--quantize-embeddings`, dequantized a slice at a time); None for any other kind of head."""
    if type(head) is torch.nn.Linear and head.bias is None:
        return head.weight
    return head.table if isinstance(head, QuantizedLMHead) else None


def in_dtype(weight: torch.Tensor | QuantizedTable, dtype: torch.dtype) -> torch.Tensor | QuantizedTable:
    """The head's matrix in the dtype it multiplies in (a table dequantizes each slice into the hidden states'
    dtype as it goes)."""
    return weight if isinstance(weight, QuantizedTable) else weight.to(dtype)


def chunk_logits(h: torch.Tensor, weight: torch.Tensor | QuantizedTable, softcap: float | None,
                 with_tanh: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One chunk's float32 logits `[chunk, vocab]` from its hidden states and the head's weight (both in the
    head's dtype), with Gemma-style soft-capping `softcap * tanh(raw / softcap)` when the model has it; and
    tanh(raw / softcap) when a gradient is to be taken here (`with_tanh`; else None).

    The head's low-precision output is upcast in the same expression, so it is freed as soon as the float32 copy
    exists: a chunk holds one float32 `[chunk, vocab]` buffer (two when soft-capped with `with_tanh`). Nothing of
    it is kept for the backward pass, which multiplies again: keeping a bf16 chunk's float32 upcast would cost 4
    bytes per logit for every chunk of the batch, redoing it costs one chunk's matmul."""
    logits = weight.logits(h) if isinstance(weight, QuantizedTable) else F.linear(h, weight).float()
    if not softcap:
        return logits, None
    if not with_tanh:
        return logits.div_(softcap).tanh_().mul_(softcap), None
    tanh = logits.div_(softcap).tanh_()
    return tanh * softcap, tanh


def softmax_parts(logits: torch.Tensor, tanh: torch.Tensor | None, targets: torch.Tensor,
                  with_accuracy: bool = False) -> SoftmaxParts:
    """Target log-probs and logsumexp of one chunk's float32 `logits` `[chunk, vocab]` (from `chunk_logits`),
    in place: the logits are overwritten by `exps` (`torch.logsumexp` would allocate two more `[chunk, vocab]`
    tensors). `with_accuracy`: the max's index comes with the max the softmax needs anyway (the first of tied
    maxima, as `argmax`), and whether it is the target."""
    target = logits.gather(-1, targets[:, None])[:, 0]
    correct = None
    if with_accuracy:
        top, best = logits.max(-1)
        correct = (best == targets).float()
    else:
        top = logits.amax(-1)
    exps = logits.sub_(top[:, None]).exp_()
    sums = exps.sum(-1)
    lse = top + sums.log()
    return SoftmaxParts(exps, sums, lse, target - lse, tanh, correct)


def rebuilt_softmax(logits: torch.Tensor, tanh: torch.Tensor | None, lse: torch.Tensor,
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """softmax of a chunk's float32 `logits` (from `chunk_logits`) again, with the logsumexp kept from the forward
    (no second reduction over the vocabulary), in the logits' buffer; `tanh` passes through (for the gradient)."""
    return logits.sub_(lse[:, None]).exp_(), tanh


def logit_gradient(exps: torch.Tensor, g: torch.Tensor, targets: torch.Tensor, tanh: torch.Tensor | None,
                   scale: torch.Tensor | None = None) -> torch.Tensor:
    """d(sum_t g_t log p_t(y_t)) / d(raw logits) = g (onehot(y) - p) (times 1 - tanh^2 for a soft-capped head),
    with p = exps * scale[:, None] (p = exps without `scale`); computed in the buffer of `exps` (and of `tanh`)."""
    grad = exps.mul_((-g if scale is None else -g * scale)[:, None])
    grad[torch.arange(g.shape[0], device=g.device), targets] += g
    if tanh is not None:
        grad.mul_(tanh.square_().neg_().add_(1))                         # d softcap(x)/dx = 1 - tanh^2
    return grad


def head_gradients(exps: torch.Tensor, tanh: torch.Tensor | None, g: torch.Tensor, targets: torch.Tensor,
                   h: torch.Tensor, weight: torch.Tensor | QuantizedTable, grad_hidden: torch.Tensor | None,
                   grad_weight: torch.Tensor | None, scale: torch.Tensor | None = None) -> None:
    """One chunk's share of a linear head's gradients for upstream weights `g` `[chunk]`, from its softmax
    (`exps`, see `logit_gradient`, whose buffer it consumes): writes `grad_hidden` (the chunk's rows
    `[chunk, hidden]`) and adds into `grad_weight`. `h` and `weight` are in the head's dtype; so is the logits'
    gradient they are multiplied with (one more `[chunk, vocab]` buffer below float32)."""
    grad_logits = logit_gradient(exps, g, targets, tanh, scale).to(h.dtype)
    if grad_hidden is not None and isinstance(weight, QuantizedTable):
        weight.hidden_gradient(grad_logits, out=grad_hidden)
    elif grad_hidden is not None:
        grad_hidden.copy_(grad_logits @ weight)
    if grad_weight is not None:
        accumulate_weight_gradient(grad_weight, grad_logits, h)


def accumulate_weight_gradient(grad_weight: torch.Tensor, grad_logits: torch.Tensor, h: torch.Tensor) -> None:
    """grad_W += grad_logits^T h, in place in float32 (no [vocab, hidden] temporary). Low-precision chunks are
    multiplied in their dtype, `WEIGHT_GRADIENT_ROWS` vocabulary rows at a time, and summed in float32: the whole
    product would be a [vocab, hidden] temporary, 272 MiB in bf16 on Qwen2.5's 151,936 x 896 head, 816 MiB with
    its float32 upcast, at every chunk."""
    if grad_logits.dtype == torch.float32:
        grad_weight.addmm_(grad_logits.T, h)
        return
    for start in range(0, grad_weight.shape[0], WEIGHT_GRADIENT_ROWS):
        stop = start + WEIGHT_GRADIENT_ROWS
        grad_weight[start:stop].add_(grad_logits[:, start:stop].T @ h)


def _capped(raw: torch.Tensor, softcap: float | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Float32 logits from a head's output `raw` (its own buffer when already float32), with Gemma-style final
    soft-capping `softcap * tanh(raw / softcap)` when the model has it; and tanh(raw / softcap) (else None)."""
    logits = raw.float()
    if not softcap:
        return logits, None
    tanh = torch.tanh(logits / softcap)
    return tanh * softcap, tanh


def _head_log_softmax(h: torch.Tensor, head: torch.nn.Module, softcap: float | None) -> torch.Tensor:
    return _capped(head(h), softcap)[0].log_softmax(-1)


def _head_logps(h: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor, softcap: float | None,
                with_accuracy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A chunk's target log-probs and (`with_accuracy`) 1.0 where its argmax is the target, from one head pass."""
    logits = _capped(head(h), softcap)[0]                                # [chunk, vocab]
    correct = (logits.detach().argmax(-1) == targets).float() if with_accuracy else None
    return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1), correct


def pair_logps(batch: Batch, token_logps: torch.Tensor, token_wpo: torch.Tensor | None = None,
               ld_alpha: float | None = None, token_correct: torch.Tensor | None = None) -> PairLogps:
    """Sum token log-probs per completion, then pick each pair's chosen and rejected (see `select_pair_logps`)."""
    return select_pair_logps(token_logps, batch.sequence_index, batch.token_position, batch.chosen_index,
                             batch.rejected_index, batch.num_sequences, token_wpo, ld_alpha, token_correct)


def select_pair_logps(token_logps: torch.Tensor, sequence_index: torch.Tensor, token_position: torch.Tensor,
                      chosen_index: torch.Tensor, rejected_index: torch.Tensor, num_sequences: int,
                      token_wpo: torch.Tensor | None = None, ld_alpha: float | None = None,
                      token_correct: torch.Tensor | None = None) -> PairLogps:
    """`PairLogps` of the pairs `(chosen_index, rejected_index)` from the scored tokens given (each with its
    sequence and position); every token of those pairs' completions must be among them.

    `ld_alpha` (LD-DPO, Liu et al. 2024, Eq. 11): tokens past the shorter completion of the pair count with
    weight alpha, so the length difference stops dominating the reward. `token_correct` `[scored]` (1.0 where the
    argmax is the target) is summed per chosen completion into `chosen_correct`.
    """
    n = num_sequences
    lengths = torch.zeros(n, device=token_logps.device).index_add_(0, sequence_index, torch.ones_like(token_logps))
    sums = token_logps.new_zeros(n).index_add(0, sequence_index, token_logps)
    chosen_len, rejected_len = lengths[chosen_index], lengths[rejected_index]
    chosen, rejected = sums[chosen_index], sums[rejected_index]
    if ld_alpha is not None:
        # log p of each sequence's first m tokens, from a [sequences, max_len] table of running sums.
        width = int(token_position.max()) + 1 if token_logps.numel() else 1
        table = token_logps.new_zeros(n, width).index_put((sequence_index, token_position), token_logps).cumsum(-1)
        shorter = torch.minimum(chosen_len, rejected_len).long()                   # [pairs]
        chosen_public = table[chosen_index, shorter - 1]
        rejected_public = table[rejected_index, shorter - 1]
        chosen = chosen_public + ld_alpha * (chosen - chosen_public)
        rejected = rejected_public + ld_alpha * (rejected - rejected_public)
    chosen_wpo = rejected_wpo = None
    if token_wpo is not None:
        wpo = token_wpo.new_zeros(n).index_add(0, sequence_index, token_wpo) / lengths.clamp(min=1)
        chosen_wpo, rejected_wpo = wpo[chosen_index], wpo[rejected_index]
    chosen_correct = None
    if token_correct is not None:
        chosen_correct = token_correct.new_zeros(n).index_add(0, sequence_index, token_correct)[chosen_index]
    return PairLogps(chosen, rejected, chosen_len, rejected_len, chosen_wpo, rejected_wpo, chosen_correct)


def sequence_logps(scorer: torch.nn.Module, batch: Batch, *, ld_alpha: float | None = None,
                   with_wpo: bool = False, with_accuracy: bool = False) -> PairLogps:
    """Per-pair completion log-probs of `batch` under the model wrapped by `scorer` (or a DDP/FSDP wrap of it);
    `with_accuracy`: with `chosen_correct`, counted in the same pass over the LM head."""
    token_logps, token_wpo, token_correct = token_scores(scorer, batch, with_wpo=with_wpo, with_accuracy=with_accuracy)
    return pair_logps(batch, token_logps, token_wpo, ld_alpha, token_correct)


def token_scores(scorer: torch.nn.Module, batch: Batch, *, with_wpo: bool = False, with_accuracy: bool = False,
                 ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The scored tokens' log-probs `[scored]`, WPO terms and argmax hits (each None unless asked for) of `batch`
    under the model wrapped by `scorer`."""
    outputs = scorer(batch.input_ids, batch.position_ids, batch.attention_mask, batch.score_index, batch.target_ids,
                     with_wpo, with_accuracy=with_accuracy, **image_inputs(batch))
    return outputs[0], outputs[1], outputs[2] if with_accuracy else None


def image_inputs(batch: Batch) -> dict[str, ImageBatch]:
    """The scorer's `images` keyword for a batch with images; none for text (so that any scorer takes it)."""
    return {} if batch.images is None else {"images": batch.images}


def naive_sequence_logps(model: torch.nn.Module, prompt_ids: list[int], completion_ids: list[int]) -> torch.Tensor:
    """The tutorial's way, for tests: full logits of prompt+completion, log_softmax, gather, mask the prompt."""
    input_ids = torch.tensor([prompt_ids + completion_ids])
    logits = model(input_ids=input_ids).logits[:, :-1].float()                 # [1, seq-1, vocab]
    per_token = logits.log_softmax(-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    mask = torch.zeros_like(per_token)
    mask[:, len(prompt_ids) - 1:] = 1.0                                          # completion tokens only
    return (per_token * mask).sum(-1)[0]


def _block_mask(mask: torch.Tensor) -> Any:
    """Boolean allow-mask `[rows, 1, seq, seq]` -> FlexAttention `BlockMask`, which skips every block of the
    score matrix that the mask rules out entirely (other pairs' tokens in a packed row, chosen for rejected)."""
    from torch.nn.attention.flex_attention import create_block_mask

    dense = mask[:, 0]                                                   # [rows, seq, seq]
    rows, seq = dense.shape[0], dense.shape[-1]
    return create_block_mask(lambda b, h, q, k: dense[b, q, k], rows, None, seq, seq, device=mask.device)


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean allow-mask -> additive float mask, for attention kernels that add the mask to the scores."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
