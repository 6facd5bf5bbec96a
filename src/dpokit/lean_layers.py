"""RMSNorm, rotary embedding and SwiGLU of Llama-family decoders with fewer passes over memory: same numbers.

transformers writes these three layers as chains of small tensor operations: RMSNorm as pow, mean, rsqrt and two
multiplications; the rotary embedding as two multiplications, a negation, a concatenation and an addition, for
the queries and again for the keys; SwiGLU as silu(gate) * up. Each operation reads and writes a whole
`[tokens, width]` tensor, autograd keeps several of them for the backward pass, and on CPU each fresh tensor of a
few MiB is fresh memory that the kernel must fault in and zero. Written as autograd functions with hand-derived
backward passes, the same layers touch memory less and keep less (which is also what lets `host_memory` keep
activations on the heap without raising the peak):

- RMSNorm, y = w * x * r with r = 1 / sqrt(mean(x^2) + eps): one reduction and one output tensor; keeps x
  (which the layer before keeps anyway) and r `[tokens, 1]`; dx = r (w dy - x^ mean(w dy x^)), dw = sum(dy x^).
- rotary embedding, y = q cos + rotate_half(q) sin: one output tensor written in place, keeps only cos and sin;
  dq = dy cos + rotate_half^T(dy sin).
- SwiGLU, silu(g) * u: keeps g and u, not silu(g) (one `[tokens, intermediate]` tensor less per layer), which the
  backward recomputes.

`apply(model)` swaps the classes of the model's RMSNorm and MLP modules for subclasses whose `forward` uses these
functions (so copies of the model, FSDP2's wrapping and PEFT's adapters keep working), and points the modeling
module's `apply_rotary_pos_emb`, which its attention calls by name, at the version here: process-wide, but
equal in value. Only for the families whose three layers are the code above (`FAMILIES`); a RMSNorm fed in
another dtype than float32 runs transformers' own forward. torch.compile fuses these layers itself (`--compile`
leaves them alone).

`apply_lora(model)` does the same for PEFT's LoRA linear layers (Hu et al. 2021, arXiv 2106.09685), whose
`base(x) + lora_B(lora_A(x)) * scaling` makes three `[tokens, out]` tensors besides the base's output (lora_B's
output, its scaled copy, the sum), freed at once but interleaved on the heap with the activations autograd keeps:
on CPU, glibc keeps those holes resident (a 1,024-token Llama batch of 6,144 tokens, 4 layers: ~0.6 GiB above
full fine-tuning's peak). The lean forward adds the adapter's product into the base's output in place (one
`addmm_`/`baddbmm_`): no temporary, the same tensors kept for the backward pass, the same numbers. On a bf16 base
with float32 adapters (PEFT's default) it sums into a float32 copy of the base's output, as PEFT does.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

# model_type -> the class-name prefix of its modeling module (transformers/models/<type>/modeling_<type>.py).
FAMILIES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}


def apply(model: torch.nn.Module) -> bool:
    """Give `model`'s RMSNorm, rotary embedding and SwiGLU layers the lean forward; True if it has any."""
    replaced = False
    for model_type, prefix in FAMILIES.items():
        modeling = sys.modules.get(f"transformers.models.{model_type}.modeling_{model_type}")
        if modeling is None:  # no model of this family was built in this process
            continue
        norm_class, mlp_class = getattr(modeling, f"{prefix}RMSNorm"), getattr(modeling, f"{prefix}MLP")
        attention_class = getattr(modeling, f"{prefix}Attention")
        for module in model.modules():
            if type(module) is norm_class:
                module.__class__ = _lean_subclass(norm_class, _rms_norm_forward)
            elif type(module) is mlp_class and type(module.act_fn).__name__ in ("SiLUActivation", "SiLU"):
                module.__class__ = _lean_subclass(mlp_class, _swiglu_forward)
            elif isinstance(module, attention_class):
                modeling.apply_rotary_pos_emb = apply_rotary_pos_emb
            else:
                continue
            replaced = True
    return replaced


def apply_lora(model: torch.nn.Module) -> bool:
    """Give the LoRA linear layers of PEFT's wrap `model` (full-precision and bitsandbytes bases) the lean
    forward; True if it has any."""
    lora_classes = [getattr(sys.modules.get(name), cls, None)
                    for name, cls in (("peft.tuners.lora.layer", "Linear"), ("peft.tuners.lora.bnb", "Linear4bit"),
                                      ("peft.tuners.lora.bnb", "Linear8bitLt"))]
    replaced = False
    for module in model.modules():
        if type(module) in lora_classes:
            module.__class__ = _lean_subclass(type(module), _lora_forward, prefix="LeanLora")
            replaced = True
    return replaced


_subclasses: dict[type, type] = {}


def _lean_subclass(cls: type, make_forward: Callable[[type], Callable[..., torch.Tensor]],
                   prefix: str = "Lean") -> type:
    """`cls` with the forward that `make_forward(cls)` returns; one subclass per class, named in this module so
    that `torch.save(model)` can pickle it."""
    if cls not in _subclasses:
        name = f"{prefix}{cls.__name__}"
        _subclasses[cls] = globals()[name] = type(name, (cls,), {"forward": make_forward(cls), "__module__": __name__,
                                                                 "__qualname__": name})
    return _subclasses[cls]


def _rms_norm_forward(cls: type) -> Callable[..., torch.Tensor]:
    def forward(self: Any, hidden_states: torch.Tensor) -> torch.Tensor:
        if hidden_states.dtype != torch.float32 or self.weight.dtype != torch.float32:
            return cls.forward(self, hidden_states)  # transformers' own, whose casts between dtypes matter
        return RMSNorm.apply(hidden_states, self.weight, self.variance_epsilon)
    return forward


def _swiglu_forward(cls: type) -> Callable[..., torch.Tensor]:
    def forward(self: Any, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(SwiGLU.apply(self.gate_proj(x), self.up_proj(x)))
    return forward


def _lora_forward(cls: type) -> Callable[..., torch.Tensor]:
    def forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        active = [name for name in self.active_adapters if name in self.lora_A]
        variants = getattr(self, "lora_variant", {})  # DoRA and other variants: PEFT's own forward
        dtypes = {layer.weight.dtype for name in active for layer in (self.lora_A[name], self.lora_B[name])}
        if (args or kwargs or self.disable_adapters or self.merged or len(dtypes) != 1
                or any(name in variants or self.lora_B[name].bias is not None for name in active)
                or torch.is_autocast_enabled(x.device.type)):
            return cls.forward(self, x, *args, **kwargs)
        (adapter_dtype,) = dtypes   # float32 adapters on a bf16 base (PEFT's default): summed in float32, as PEFT
        result = self.base_layer(x)
        dtype = result.dtype
        if dtype != adapter_dtype or result._is_view() or not result.is_contiguous():
            # a fresh tensor to add into: autograd refuses in-place writes to some views
            result = result.to(adapter_dtype, memory_format=torch.contiguous_format, copy=True)
        x = x.to(adapter_dtype)
        for name in active:
            h = self.lora_A[name](self.lora_dropout[name](x))
            weight, scaling = self.lora_B[name].weight.t(), self.scaling[name]
            if result.dim() == 2:
                result = result.addmm_(h, weight, alpha=scaling)
            elif result.dim() == 3:
                result = result.baddbmm_(h, weight.expand(result.shape[0], -1, -1), alpha=scaling)
            else:
                result = result.add_(self.lora_B[name](h), alpha=scaling)
        return result.to(dtype)
    return forward


def apply_rotary_pos_emb(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         unsqueeze_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' `apply_rotary_pos_emb` (same signature, same values) through `Rotary`."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return Rotary.apply(q, cos, sin), Rotary.apply(k, cos, sin)


class RMSNorm(torch.autograd.Function):
    """`(x [..., width], weight [width], eps) -> weight * x / sqrt(mean(x^2) + eps)`, all float32."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:  # type: ignore[override]
        width = x.shape[-1]
        rstd = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(width).add_(eps).rsqrt_()
        ctx.save_for_backward(x, weight, rstd)
        return (x * rstd).mul_(weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        x, weight, rstd = ctx.saved_tensors
        width = x.shape[-1]
        normed = x * rstd                                                          # x^
        grad_weight = (grad * normed).reshape(-1, width).sum(0)
        grad_normed = grad * weight
        # mean over the width of grad_normed * x^, row by row, as a batch of dot products (no temporary)
        mean = (grad_normed.unsqueeze(-2) @ normed.unsqueeze(-1)).squeeze(-1).div_(width)   # [..., 1]
        grad_x = grad_normed.sub_(normed.mul_(mean)).mul_(rstd)
        return grad_x, grad_weight, None


class Rotary(torch.autograd.Function):
    """`(q [..., dim], cos, sin) -> q cos + rotate_half(q) sin` with rotate_half(q) = [-q2, q1] (halves of dim)."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        half = q.shape[-1] // 2
        out = q * cos
        out[..., :half].addcmul_(q[..., half:], sin[..., :half], value=-1)
        out[..., half:].addcmul_(q[..., :half], sin[..., half:])
        ctx.save_for_backward(cos, sin)
        ctx.q_dtype = q.dtype
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        cos, sin = ctx.saved_tensors
        half = grad.shape[-1] // 2
        # the transpose of rotate_half maps [z1, z2] to [z2, -z1]
        grad_q = grad * cos
        grad_q[..., :half].addcmul_(grad[..., half:], sin[..., half:])
        grad_q[..., half:].addcmul_(grad[..., :half], sin[..., :half], value=-1)
        return grad_q.to(ctx.q_dtype), None, None


class SwiGLU(torch.autograd.Function):
    """`(gate, up) -> silu(gate) * up`, keeping gate and up only."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(gate, up)
        return F.silu(gate).mul_(up)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        gate, up = ctx.saved_tensors
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate)
        grad_up = F.silu(gate).mul_(grad)
        return grad_gate, grad_up
