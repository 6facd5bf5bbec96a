"""The GPU-side checks (`pytest -m gpu`, skipped without CUDA): compiled FlexAttention on a `blocks` row, and the
lean layers and the fused head in bfloat16.

bfloat16 keeps 8 significant bits, so no fixed tolerance against float32 means much across layers and sizes.
The bf16 checks instead hold dpokit's paths to transformers' own: computed on the same device, each one's error
against the float32 computation of the same weights must be at most 1.5x that of transformers' stock bf16 path
(plus 1e-3 of the reference's norm for the cases where both are near exact): no worse than what users already get.
"""

from __future__ import annotations

import copy

import pytest
import torch

from dpokit import accelerator, lean_layers
from dpokit.batching import make_batch
from dpokit.fused_head import fused_sequence_loss
from dpokit.logprobs import SequenceScorer, sequence_logps

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm().clamp(min=1e-12))


def _no_worse(got: torch.Tensor, stock: torch.Tensor, want: torch.Tensor, name: str = "") -> None:
    assert _error(got, want) <= 1.5 * _error(stock, want) + 1e-3, (name, _error(got, want), _error(stock, want))


def test_this_gpu_runs_bfloat16():
    accelerator.check_device("cuda", "bfloat16")
    assert accelerator.choose_attention(torch.device("cuda")) == "flex_attention"


@pytest.mark.parametrize("num_blocks", [8, 64])
def test_compiled_flex_blocks_equal_the_naive_forward(num_blocks):
    """float32, tolerance 1e-4: the fused kernel sums each row's softmax online, 128 keys at a time."""
    from test_flex_attention import _rows

    model = _tiny_llama().cuda()
    pairs = _rows(num_blocks)
    weights = torch.randn(2, len(pairs), generator=torch.Generator().manual_seed(num_blocks)).cuda()
    params = list(model.parameters())
    chosen = torch.stack([_naive(model, p.prompt_ids, p.chosen_ids) for p in pairs])
    rejected = torch.stack([_naive(model, p.prompt_ids, p.rejected_ids) for p in pairs])
    want_grads = torch.autograd.grad((weights[0] * chosen + weights[1] * rejected).sum(), params)
    model.set_attn_implementation("flex_attention")
    logps = sequence_logps(SequenceScorer(model), make_batch(pairs, layout="blocks").to("cuda"))
    got_grads = torch.autograd.grad((weights[0] * logps.chosen + weights[1] * logps.rejected).sum(), params)
    torch.testing.assert_close(logps.chosen, chosen.detach(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logps.rejected, rejected.detach(), rtol=1e-4, atol=1e-4)
    for (name, _), got, want in zip(model.named_parameters(), got_grads, want_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=name)


def _tiny_llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def _naive(model: torch.nn.Module, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """`naive_sequence_logps` on the model's device: full logits of prompt+completion, completion tokens only."""
    ids = torch.tensor([prompt + completion], device="cuda")
    logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float()
    return logits.log_softmax(-1).gather(-1, ids[0, len(prompt):, None]).sum()


def _logits_and_grads(model: torch.nn.Module, ids: torch.Tensor, autocast: bool):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        logits = model(input_ids=ids).logits
    torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:]).backward()
    return logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("model_type", sorted(lean_layers.FAMILIES))
def test_lean_layers_in_bfloat16_are_no_worse_than_transformers(model_type, monkeypatch):
    from test_lean_layers import _stock_rotary, _tiny

    stock, modeling = _tiny(model_type)
    stock = stock.cuda()
    lean = copy.deepcopy(stock)
    monkeypatch.setattr(modeling, "apply_rotary_pos_emb", _stock_rotary)   # restored after the test
    ids = torch.randint(0, 50, (1, 200), generator=torch.Generator().manual_seed(1)).cuda()
    want_logits, want_grads = _logits_and_grads(stock, ids, autocast=False)
    stock_logits, stock_grads = _logits_and_grads(stock, ids, autocast=True)
    lean_layers.apply(lean)
    lean_logits, lean_grads = _logits_and_grads(lean, ids, autocast=True)
    _no_worse(lean_logits, stock_logits, want_logits, "logits (autocast)")
    for name, want in want_grads.items():
        assert lean_grads[name].dtype == torch.float32                 # float32 master weights under autocast
        _no_worse(lean_grads[name], stock_grads[name], want, name)
    with torch.no_grad():                                               # bfloat16 weights
        lean_bf16 = lean.to(torch.bfloat16)(input_ids=ids).logits
        monkeypatch.setattr(modeling, "apply_rotary_pos_emb", _stock_rotary)
        stock_bf16 = stock.to(torch.bfloat16)(input_ids=ids).logits
    _no_worse(lean_bf16, stock_bf16, want_logits, "logits (bf16 weights)")


def test_fused_head_in_bfloat16_is_no_worse_than_the_naive_head():
    from test_batching import make_pairs
    from test_fused_head import _dpo, _reference

    model = _tiny_llama().cuda()
    pairs = make_pairs(model.config.vocab_size)
    reference = _reference(pairs)
    reference = type(reference)(*(t.cuda() if t is not None else None for t in vars(reference).values()))
    batch = make_batch(pairs, layout="blocks").to("cuda")
    scorer, params = SequenceScorer(model, chunk_size=16), list(model.parameters())
    naive_loss = lambda: _dpo(sequence_logps(scorer, batch), reference, False).sum()  # noqa: E731
    want_total = naive_loss()
    want = torch.autograd.grad(want_total, params)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        stock_total = naive_loss()
    stock = torch.autograd.grad(stock_total, params)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        total, _ = fused_sequence_loss(scorer, batch, lambda p, ids: _dpo(p, reference.select(ids), False), 16)
    got = torch.autograd.grad(total, params)
    _no_worse(total.detach(), stock_total.detach(), want_total.detach(), "loss")
    for (name, _), g, s, w in zip(model.named_parameters(), got, stock, want):
        assert g.dtype == torch.float32
        _no_worse(g, s, w, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_table_on_the_gpu_equals_the_whole_dequantized_table(dtype, monkeypatch):
    """On a GPU the head dequantizes each slice into one reused buffer (bitsandbytes' `out=` kernel)."""
    bnb = pytest.importorskip("bitsandbytes")
    from dpokit import quantized_tables

    monkeypatch.setattr(quantized_tables, "SLICE_ROWS", 96)   # several slices, the last one short
    weight = torch.randn(1000, 256, device="cuda", dtype=dtype)
    table = quantized_tables.QuantizedTable(weight, "nf4")
    packed, state = bnb.functional.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=False)
    want = bnb.functional.dequantize_4bit(packed, state)
    ids = torch.tensor([0, 999, 17], device="cuda")
    assert torch.equal(table.lookup(ids), want[ids])
    hidden = torch.randn(7, 256, device="cuda", dtype=dtype, requires_grad=True)
    logits = quantized_tables.QuantizedLMHead(table)(hidden)
    tolerance = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits, (hidden @ want.T).float(), **tolerance)
    upstream = torch.randn(7, 1000, device="cuda")
    (grad,) = torch.autograd.grad(logits, hidden, upstream)
    torch.testing.assert_close(grad.float(), (upstream.to(dtype) @ want).float(), **tolerance)
