"""The lean RMSNorm, rotary embedding and SwiGLU (dpokit.lean_layers) against numerical Jacobians and against
transformers' own layers written out here, for every family they are applied to."""

from __future__ import annotations

import copy
import importlib
import json

import pytest
import torch
import torch.nn.functional as F

from dpokit import lean_layers, models
from dpokit.lean_layers import RMSNorm, Rotary, SwiGLU


def test_rms_norm_gradients_match_finite_differences():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, w: RMSNorm.apply(a, w, 1e-6), (x, weight))
    expected = weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(RMSNorm.apply(x, weight, 1e-6), expected)


def test_rotary_gradients_match_finite_differences():
    torch.manual_seed(0)
    q = torch.randn(1, 2, 5, 8, dtype=torch.float64, requires_grad=True)
    cos, sin = torch.randn(1, 1, 5, 8, dtype=torch.float64), torch.randn(1, 1, 5, 8, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a: Rotary.apply(a, cos, sin), (q,))
    rotated = torch.cat([-q[..., 4:], q[..., :4]], dim=-1)
    torch.testing.assert_close(Rotary.apply(q, cos, sin), q * cos + rotated * sin)


def test_swiglu_gradients_match_finite_differences():
    torch.manual_seed(0)
    gate, up = (torch.randn(3, 7, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(SwiGLU.apply, (gate, up))
    torch.testing.assert_close(SwiGLU.apply(gate, up), gate * torch.sigmoid(gate) * up)


def _stock_rotary(q, k, cos, sin, unsqueeze_dim=1):
    """transformers' apply_rotary_pos_emb, written out: q cos + [-q2, q1] sin."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    half = q.shape[-1] // 2
    rotate = lambda t: torch.cat([-t[..., half:], t[..., :half]], dim=-1)  # noqa: E731
    return q * cos + rotate(q) * sin, k * cos + rotate(k) * sin


def _tiny(model_type: str):
    config_class = getattr(importlib.import_module("transformers"), f"{lean_layers.FAMILIES[model_type]}Config")
    config = config_class(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                          tie_word_embeddings=False, attn_implementation="sdpa")
    torch.manual_seed(0)
    model_class = getattr(importlib.import_module("transformers"), f"{lean_layers.FAMILIES[model_type]}ForCausalLM")
    return model_class(config), importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")


def _loss_and_gradients(model, ids):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids).logits
    loss = F.cross_entropy(logits[0, :-1], ids[0, 1:]) + logits.square().mean()
    loss.backward()
    return logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("model_type", sorted(lean_layers.FAMILIES))
def test_lean_model_equals_the_stock_model(model_type, monkeypatch):
    stock, modeling = _tiny(model_type)
    lean = copy.deepcopy(stock)
    monkeypatch.setattr(modeling, "apply_rotary_pos_emb", _stock_rotary)  # restored after the test
    ids = torch.randint(0, 50, (1, 23), generator=torch.Generator().manual_seed(1))
    stock_logits, stock_grads = _loss_and_gradients(stock, ids)

    assert lean_layers.apply(lean)
    assert modeling.apply_rotary_pos_emb is lean_layers.apply_rotary_pos_emb
    names = {type(m).__name__ for m in lean.modules()}
    assert {f"Lean{lean_layers.FAMILIES[model_type]}RMSNorm", f"Lean{lean_layers.FAMILIES[model_type]}MLP"} <= names
    lean_logits, lean_grads = _loss_and_gradients(lean, ids)
    torch.testing.assert_close(lean_logits, stock_logits, rtol=1e-5, atol=1e-5)
    for name, grad in stock_grads.items():
        torch.testing.assert_close(lean_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_lean_model_under_bfloat16_autocast_and_in_bfloat16(monkeypatch):
    stock, modeling = _tiny("llama")
    lean = copy.deepcopy(stock)
    monkeypatch.setattr(modeling, "apply_rotary_pos_emb", _stock_rotary)
    ids = torch.randint(0, 50, (1, 17), generator=torch.Generator().manual_seed(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        stock_logits, stock_grads = _loss_and_gradients(stock, ids)
    lean_layers.apply(lean)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lean_logits, lean_grads = _loss_and_gradients(lean, ids)
    torch.testing.assert_close(lean_logits, stock_logits, rtol=0.02, atol=0.02)
    for name, grad in stock_grads.items():
        assert lean_grads[name].dtype == grad.dtype == torch.float32
        torch.testing.assert_close(lean_grads[name], grad, rtol=0.05, atol=0.02, msg=name)
    # bfloat16 weights: the norms take transformers' own forward (its casts), the rest agrees to bf16 rounding
    with torch.no_grad():
        lean_bf16 = lean.to(torch.bfloat16)(input_ids=ids).logits
        monkeypatch.setattr(modeling, "apply_rotary_pos_emb", _stock_rotary)
        stock_bf16 = stock.to(torch.bfloat16)(input_ids=ids).logits
    torch.testing.assert_close(lean_bf16.float(), stock_bf16.float(), rtol=0.02, atol=0.05)


def test_a_copy_of_a_lean_model_computes_with_its_own_weights():
    model, _ = _tiny("llama")
    lean_layers.apply(model)
    frozen = models.frozen_copy(model)
    ids = torch.randint(0, 50, (1, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = frozen(input_ids=ids).logits
        for p in model.parameters():
            p.add_(0.5)
        assert not torch.allclose(model(input_ids=ids).logits, before)
        torch.testing.assert_close(frozen(input_ids=ids).logits, before, rtol=0, atol=0)
    assert type(frozen.model.norm).__name__ == "LeanLlamaRMSNorm"


def test_a_lean_model_pickles(tmp_path):
    model, _ = _tiny("qwen2")
    lean_layers.apply(model)
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert type(loaded.model.norm).__name__ == "LeanQwen2RMSNorm"
    ids = torch.randint(0, 50, (1, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)


def test_other_architectures_are_left_alone():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=32))
    classes = [type(m) for m in model.modules()]
    assert not lean_layers.apply(model)
    assert [type(m) for m in model.modules()] == classes


def test_training_with_and_without_lean_layers_gives_the_same_run(tmp_path, monkeypatch):
    from dpokit import loop
    from dpokit.config import Config

    rows = {}
    for lean in (True, False):
        if not lean:  # the lean run pointed transformers' Llama at the lean rotary function: undo it
            monkeypatch.setattr(_tiny("llama")[1], "apply_rotary_pos_emb", _stock_rotary)
        out = tmp_path / f"lean-{lean}"
        loop.train(Config(max_steps=2, batch_size=4, output=str(out), progress=False, eval_fraction=0.0,
                          lean_layers=lean))
        rows[lean] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
                      if '"loss"' in line]
    assert len(rows[True]) == len(rows[False]) == 2
    for lean_row, stock_row in zip(rows[True], rows[False]):
        for key in ("loss", "logps/chosen", "logps/rejected", "grad_norm"):
            assert lean_row[key] == pytest.approx(stock_row[key], rel=1e-5, abs=1e-6), key
