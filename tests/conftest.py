"""Shared fixtures: a BPE tokenizer trained here (with a chat template) and a tiny random-init Llama saved with
`save_pretrained`, so every loading path is the real one and nothing is downloaded."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
torch.set_num_threads(min(2, torch.get_num_threads()))

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

CORPUS = [
    "Human: What is the capital of France?\n\nAssistant: The capital of France is Paris.",
    "Human: Can you help me write a poem?\n\nAssistant: Of course! Roses are red, violets are blue.",
    "The quick brown fox jumps over the lazy dog. Preference optimization aligns language models.",
    "Café, naïve, résumé, 東京, Привет — non-ASCII text appears in real datasets too.",
    "def add(a, b):\n    return a + b\n",
    "Question: how many legs does a spider have? Answer: eight legs. A spider has eight.",
] * 20


def build_tokenizer(path: Path):
    """Train a small byte-level BPE (merges across spaces and the prompt/response boundary do occur)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   additional_special_tokens=["<|user|>", "<|assistant|>", "<|system|>", "<|end|>"])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return fast


def build_tiny_llama(path: Path, vocab_size: int, seed: int = 0, tokenizer=None):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return model


@pytest.fixture(scope="session", autouse=True)
def _data_cache_dir(tmp_path_factory) -> None:
    """Tokenized-data cache (dpokit.data.cache) in a temp folder, never the user's ~/.cache."""
    os.environ["DPOKIT_CACHE_DIR"] = str(tmp_path_factory.mktemp("dpokit-cache"))


@pytest.fixture
def one_thread():
    """Tiny matmuls run fastest on one thread, and far faster than two on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A folder holding a random-init 2-layer Llama (hidden 32) and the BPE tokenizer, as save_pretrained writes."""
    path = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_llama(path, vocab_size=len(tokenizer), tokenizer=tokenizer)
    return path


@pytest.fixture
def tiny_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.eval()
    return model


@pytest.fixture(scope="session")
def pairs_jsonl(tmp_path_factory) -> Path:
    """A small explicit-format preference file (prompt/chosen/rejected strings)."""
    import json

    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    rows = []
    for i in range(48):
        rows.append({"prompt": f"Human: What is {i} plus {i}?\n\nAssistant:",
                     "chosen": f" {i} plus {i} is {2 * i}.", "rejected": f" I do not know, maybe {i + 3}?"})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def prompts_file(tmp_path_factory) -> Path:
    """Four prompts for `dpo online` (the `prompt` field of a JSONL file), worded as `pairs_jsonl`'s."""
    import json

    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Human: What is {i} plus {i}?\n\nAssistant:"}) + "\n"
                            for i in range(4)), encoding="utf-8")
    return path


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """`dpo ARGS` through `dpokit.cli.main`, as a user runs it: (exit status, stdout, stderr)."""
    from dpokit.cli import main

    try:
        main(args)
        code = 0
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    out, err = capsys.readouterr()
    return code, out, err
