"""A causal LM's shape as `dpo plan` needs it (`ModelShape`), read from its config alone: no weights are loaded.

Llama-like families (`FAMILIES`) are sized from the config's numbers; any other architecture is built on the meta
device to count its parameters, and the plan says what it cannot predict for it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .errors import DPOError

# Families whose decoder layer is Llama's (q, k, v, o projections; gated MLP of gate, up, down; two RMSNorms)
# and the extras each adds. `lean_layers` serves the first four (fewer saved activations).
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma")
LEAN_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class ModelShape:
    """What memory and FLOPs depend on, read from a model's config."""

    model_type: str
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    tied: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    counted_params: int | None = None   # for an architecture outside FAMILIES: counted on the meta device

    @property
    def known(self) -> bool:
        return self.model_type in FAMILIES

    @property
    def attention_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    def linears(self) -> dict[str, tuple[int, int]]:
        """Each decoder layer's linear layers, `name: (in_features, out_features)` (LoRA's targets)."""
        h, a, kv, i = self.hidden, self.attention_width, self.kv_width, self.intermediate
        return {"q_proj": (h, a), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (a, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def layer_params(self) -> int:
        linear = sum(n_in * n_out for n_in, n_out in self.linears().values())
        bias = ((self.attention_width + 2 * self.kv_width) * self.qkv_bias + self.hidden * self.o_bias
                + (2 * self.intermediate + self.hidden) * self.mlp_bias)
        return linear + bias + 2 * self.hidden + 2 * self.head_dim * self.qk_norm   # + RMSNorm weights

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def params(self) -> int | None:
        if not self.known:
            return self.counted_params
        head = 0 if self.tied else self.vocab * self.hidden
        return self.embedding_params + self.layers * self.layer_params + self.hidden + head

    @property
    def matmul_params(self) -> int:
        """Decoder weights that multiply every token (FLOPs): the layers' linears."""
        return self.layers * sum(n_in * n_out for n_in, n_out in self.linears().values())

    def lora_params(self, r: int, targets: str) -> int:
        """LoRA adapter parameters: r x (in + out) for each targeted linear of each layer."""
        names = set(self.linears()) if targets == "all-linear" else {t.strip() for t in targets.split(",")}
        return self.layers * sum(r * (n_in + n_out) for name, (n_in, n_out) in self.linears().items() if name in names)

    def describe(self) -> str:
        params = f"{self.params / 1e9:.2f}B parameters" if self.params else "parameters unknown"
        return (f"{self.model_type}: {params}, vocab {self.vocab:,}, hidden {self.hidden}, {self.layers} layers, "
                f"{self.heads}/{self.kv_heads} heads, MLP {self.intermediate}{', tied' if self.tied else ''}")


def shape_from_config(config: Any) -> ModelShape:
    """A `ModelShape` from a transformers config object (or the dict of a config.json)."""
    def get(name: str, default: Any = None) -> Any:
        return config.get(name, default) if isinstance(config, Mapping) else getattr(config, name, default)

    model_type = str(get("model_type") or "unknown")
    missing = [n for n in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads") if not get(n)]
    if missing:
        raise DPOError(f"model config ({model_type}) has no {', '.join(missing)}: dpo plan cannot size this model")
    hidden, heads = int(get("hidden_size")), int(get("num_attention_heads"))
    qwen2 = model_type == "qwen2"
    return ModelShape(
        model_type=model_type, vocab=int(get("vocab_size")), hidden=hidden, layers=int(get("num_hidden_layers")),
        heads=heads, kv_heads=int(get("num_key_value_heads") or heads),
        head_dim=int(get("head_dim") or hidden // heads),
        intermediate=int(get("intermediate_size") or 4 * hidden), tied=bool(get("tie_word_embeddings", False)),
        qkv_bias=qwen2 or bool(get("attention_bias", False)), o_bias=not qwen2 and bool(get("attention_bias", False)),
        mlp_bias=bool(get("mlp_bias", False)), qk_norm=model_type == "qwen3")


def read_shape(name_or_path: str) -> ModelShape:
    """The shape of a preset, a folder holding a config.json, or a hub model (its config only)."""
    from . import models
    from transformers import AutoConfig, LlamaConfig

    if models.is_preset(name_or_path):
        return shape_from_config(LlamaConfig(**models.PRESETS[name_or_path]))
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    path = Path(name_or_path)
    if path.exists() and not (path / "config.json").is_file():
        raise DPOError(f"{name_or_path}: no config.json here; dpo plan reads only a model's config.json (written by "
                       "save_pretrained; no weights needed)")
    if not path.exists():
        try:
            validate_repo_id(name_or_path)
        except HFValidationError:
            raise DPOError(f"{name_or_path}: no such folder; give a folder holding a config.json, a hub name "
                           f"(org/name) or a preset ({', '.join(models.PRESETS)})") from None
    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError, KeyError) as err:
        if not (path / "config.json").is_file():
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise DPOError(f"{name_or_path}: could not read a model config ({first})") from None
        raw = json.loads((path / "config.json").read_text(encoding="utf-8"))  # an architecture transformers lacks
        return shape_from_config(raw.get("text_config") or raw)
    config = getattr(config, "text_config", None) or config
    shape = shape_from_config(config)
    return shape if shape.known else replace(shape, counted_params=_count_on_meta(config))


def _count_on_meta(config: Any) -> int | None:
    """Parameters of an architecture outside FAMILIES, built on the meta device (no memory, no weights)."""
    try:
        import torch
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        return int(sum(p.numel() for p in model.parameters()))
    except Exception:  # any architecture's constructor may refuse; the plan then says what it cannot predict
        return None
