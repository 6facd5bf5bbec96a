"""The lean LoRA forward (dpokit.lean_layers.apply_lora): the adapter's product added into the base's output in
place, against PEFT's own forward (same outputs and gradients) and against a count of the bytes each forward
allocates (the base's output and the rank-r product, nothing else)."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from dpokit import lean_layers, models
from test_reference import randomize_lora

peft = pytest.importorskip("peft")


class FreshBytes(TorchDispatchMode):
    """Counts the bytes of every tensor an operation returns in new memory (not a view of, nor written into,
    one of its inputs): what a forward allocates, temporaries included."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        self.bytes += sum(t.untyped_storage().nbytes() for t in tree_flatten(out)[0]
                          if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs)
        return out


def lora_linear(*, lean: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    wrapped = peft.get_peft_model(torch.nn.Sequential(torch.nn.Linear(16, 24, bias=False)),
                                  peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0"]))
    randomize_lora(wrapped)
    if lean:
        assert lean_layers.apply_lora(wrapped)
    return wrapped


@pytest.mark.parametrize("shape", [(50, 16), (2, 50, 16)], ids=["2d", "3d"])
def test_lean_lora_linear_allocates_its_output_and_the_rank_r_product_only(shape):
    """PEFT's `base(x) + lora_B(lora_A(x)) * scaling` allocates four `[tokens, out]` tensors; the lean forward
    one (the base's output, which the product is added into) and lora_A's `[tokens, r]`."""
    x = torch.randn(*shape, requires_grad=True)
    tokens = x.numel() // 16
    lean_layer, stock_layer = lora_linear(lean=True), lora_linear(lean=False)
    with FreshBytes() as lean:
        lean_layer(x)
    assert lean.bytes == tokens * 24 * 4 + tokens * 4 * 4
    with FreshBytes() as stock:  # the counter sees PEFT's temporaries (peft 0.21: three)
        stock_layer(x)
    assert stock.bytes >= 3 * tokens * 24 * 4 + tokens * 4 * 4


@pytest.mark.parametrize("shape", [(50, 16), (2, 50, 16)], ids=["2d", "3d"])
def test_lean_lora_linear_computes_w_x_plus_scaled_b_a_x(shape):
    """Output and gradients against the LoRA formula written out: W x + (alpha / r) B A x (Hu et al. 2021)."""
    x = torch.randn(*shape, dtype=torch.float32, requires_grad=True)
    wrapped = lora_linear(lean=True)
    layer = wrapped.base_model.model[0]
    out = wrapped(x)
    w, a, b = layer.base_layer.weight, layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = x @ w.T + (8 / 4) * (x @ a.T) @ b.T
    torch.testing.assert_close(out, expected)
    grads = torch.autograd.grad(out.square().sum(), (x, a, b))
    expected_grads = torch.autograd.grad(expected.square().sum(), (x, a, b))
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want)
    with wrapped.disable_adapter():  # the reference pass: the base alone
        torch.testing.assert_close(wrapped(x), x @ w.T)


def test_lean_lora_model_matches_peft_and_allocates_what_the_plain_model_does_plus_the_rank_r_products(
        tiny_model_dir):
    """The tiny Llama with LoRA on every linear: the lean model's logits and adapter gradients are PEFT's own; and
    its forward allocates exactly what the same model without LoRA allocates, plus one `[tokens, r]` product per
    adapted layer (PEFT's forward: three `[tokens, out]` tensors more per layer)."""
    def lora(lean: bool) -> torch.nn.Module:
        torch.manual_seed(0)
        model = models.apply_lora(models.load_model(str(tiny_model_dir)), r=4, alpha=8, dropout=0.0,
                                  target_modules="all-linear", lean=lean)
        randomize_lora(model)
        return model

    lean, stock = lora(True), lora(False)
    assert {type(m).__name__ for m in lean.modules()} >= {"LeanLoraLinear"}
    assert "LeanLoraLinear" not in {type(m).__name__ for m in stock.modules()}
    ids = torch.randint(3, lean.config.vocab_size, (2, 40))
    outs = []
    for model in (lean, stock):
        logits = model(input_ids=ids).logits
        adapter = [p for n, p in model.named_parameters() if "lora_" in n]
        outs.append((logits, torch.autograd.grad(logits.square().mean(), adapter)))
    torch.testing.assert_close(outs[0][0], outs[1][0])
    for got, want in zip(outs[0][1], outs[1][1]):
        torch.testing.assert_close(got, want)

    plain = models.load_model(str(tiny_model_dir))
    plain.requires_grad_(False)
    adapted = sum(1 for m in lean.modules() if type(m).__name__ == "LeanLoraLinear")
    counts = []
    for model in (plain, lean):
        with FreshBytes() as fresh:
            model(input_ids=ids)
        counts.append(fresh.bytes)
    assert counts[1] == counts[0] + adapted * ids.numel() * 4 * 4


def test_lean_lora_on_a_bf16_base_sums_in_float32_as_peft_does():
    """PEFT keeps the adapter in float32 on a bf16 base and sums in float32 before rounding to bf16. The lean
    forward does the same with two `[tokens, out]` tensors (the float32 sum, the bf16 result) besides the base's
    output and the float32 copy of x that PEFT makes too; PEFT's forward, four."""
    def layer(lean: bool) -> torch.nn.Module:
        wrapped = lora_linear(lean=lean)
        wrapped.base_model.model[0].base_layer.to(torch.bfloat16)
        return wrapped

    lean_layer, stock_layer = layer(True), layer(False)
    x = torch.randn(2, 50, 16, dtype=torch.bfloat16, requires_grad=True)
    outs = []
    for wrapped in (lean_layer, stock_layer):
        with FreshBytes() as fresh:
            out = wrapped(x)
        adapter = [p for n, p in wrapped.named_parameters() if "lora_" in n]
        assert out.dtype == torch.bfloat16 and {p.dtype for p in adapter} == {torch.float32}
        outs.append((out, torch.autograd.grad(out.float().square().sum(), [x, *adapter]), fresh.bytes))
    torch.testing.assert_close(outs[0][0], outs[1][0])
    for got, want in zip(outs[0][1], outs[1][1]):
        torch.testing.assert_close(got, want)
    tokens = 100
    base_output, x_float32, product = tokens * 24 * 2, tokens * 16 * 4, tokens * 4 * 4
    assert outs[0][2] == base_output + x_float32 + product + tokens * 24 * 4 + tokens * 24 * 2
    assert outs[1][2] >= base_output + x_float32 + product + 3 * tokens * 24 * 4 + tokens * 24 * 2
