"""Load the policy, reference and tokenizer: named presets or any Hugging Face causal LM.

Presets build a random-init Llama in memory (nothing downloaded). `seed` is the tutorial's exact
`LlamaConfig(vocab_size=32, hidden_size=512, num_attention_heads=4, num_key_value_heads=4)` with every other
default; `tiny` is the same family, shallow and narrow enough to train on a laptop CPU in seconds.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from .errors import DPOError

SYNTHETIC_VOCAB = 32

PRESETS: dict[str, dict[str, Any]] = {
    # The tutorial's model: LlamaConfig defaults (32 layers, intermediate 11008) apart from the four fields it set.
    "seed": dict(vocab_size=SYNTHETIC_VOCAB, hidden_size=512, num_attention_heads=4, num_key_value_heads=4),
    # Same width and heads, 2 layers and a 1024-wide MLP: ~6M parameters, fast on 2 CPU cores.
    "tiny": dict(vocab_size=SYNTHETIC_VOCAB, hidden_size=512, num_attention_heads=4, num_key_value_heads=4,
                 num_hidden_layers=2, intermediate_size=1024, max_position_embeddings=256),
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def is_preset(name: str) -> bool:
    return name in PRESETS


def build_preset(name: str, seed: int, attn_implementation: str = "sdpa") -> torch.nn.Module:
    """A random-init Llama from a preset, initialised from `seed` so runs repeat exactly."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**PRESETS[name])
    config._attn_implementation = attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def load_model(name_or_path: str, *, dtype: str = "float32", seed: int = 0,
               attn_implementation: str = "sdpa") -> torch.nn.Module:
    """Load a causal LM: a preset name, a local folder or a hub name (`AutoModelForCausalLM.from_pretrained`)."""
    if is_preset(name_or_path):
        model = build_preset(name_or_path, seed, attn_implementation)
    else:
        from transformers import AutoModelForCausalLM

        _check_model_path(name_or_path)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                name_or_path, dtype=DTYPES[dtype], attn_implementation=attn_implementation)
        except (OSError, ValueError, KeyError) as err:
            raise DPOError(f"{name_or_path}: could not load a causal LM ({_first_line(err)})") from None
    model.to(DTYPES[dtype])
    disable_dropout(model)
    return model


def load_tokenizer(name_or_path: str) -> Any:
    """The model's tokenizer (`AutoTokenizer`), with a pad token (EOS when it has none)."""
    from transformers import AutoTokenizer

    _check_model_path(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError, KeyError) as err:
        raise DPOError(f"{name_or_path}: could not load a tokenizer ({_first_line(err)})") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """An eval-mode, no-grad deep copy: the DPO reference model."""
    reference = copy.deepcopy(model)
    reference.eval()
    reference.requires_grad_(False)
    return reference


def disable_dropout(model: torch.nn.Module) -> None:
    """DPO compares log-probs of two models; dropout would make them noisy. TRL does the same."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    config = getattr(model, "config", None)
    for name in ("attention_dropout", "hidden_dropout", "dropout"):
        if config is not None and isinstance(getattr(config, name, None), float):
            setattr(config, name, 0.0)


def _check_model_path(name_or_path: str) -> None:
    """A path that looks local must hold a model; otherwise the hub would be asked, which fails offline."""
    path = Path(name_or_path)
    looks_local = path.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_local and not (path / "config.json").is_file():
        raise DPOError(f"{name_or_path}: no model here (no config.json); give a folder written by save_pretrained, "
                       f"a hub name, or a preset ({', '.join(PRESETS)})")


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
