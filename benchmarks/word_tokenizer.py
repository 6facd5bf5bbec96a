"""The benchmarks' word-level tokenizer: token `wN` is id N, so a text of N words is exactly N tokens (+ BOS)."""

from __future__ import annotations

from pathlib import Path


def save_word_tokenizer(vocab_size: int, folder: Path) -> None:
    """Write a `PreTrainedTokenizerFast` of `vocab_size` words (<pad> 0, <s> 1, </s> 2, then w3, w4, ...) to
    `folder`; BOS is added to every text, EOS by dpokit's tokenization."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>"] + [f"w{i}" for i in range(3, vocab_size)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(folder)
