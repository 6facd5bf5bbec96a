"""The fast boundary (data/encoding.py: each completion tokenized behind the prompt's tail only, chunks in forked
processes) gives the ids of the full-text method on every pair.

The reference here tokenizes the prompt, prompt + chosen and prompt + rejected in full, text by text with the
tokenizer's own `__call__`, and cuts at their common prefix: the method `tokenization` describes. The pairs are
random text with non-ASCII words, emoji, runs of spaces, tabs and newlines, and every kind of boundary (prompts
ending in a space, a newline, mid-script; completions starting with one), on byte-level BPE and on Metaspace
tokenizers (SentencePiece-style with byte fallback; Llama 2's normaliser), plain and through chat templates.
"""

from __future__ import annotations

import json
import random

import pytest

from dpokit.data import encoding
from dpokit.data.formats import PreferencePair
from dpokit.data.tokenization import common_prefix_length, tokenize_pairs
from test_chat_families import CORPUS, FAMILIES, build

WORDS = ["the", "capital", "of", "France", "is", "Paris", "Human", "Assistant", "spider", "legs", "eight", "return",
         "Café", "naïve", "résumé", "東京", "Привет", "мир", "🙂", "ß", "1234", "3.14", "def", "a+b", "'s", "don't",
         "—", ".", ",", "?", "!", ":", "(", ")", "\"", "Tokyo", "Japan", "maybe", "Kyoto"]
SEPARATORS = [" "] * 8 + ["  ", "\n", "\n\n", "\t", "", " \n"]
PROMPT_ENDS = ["", " ", "  ", "\n", "\n\n", ":", "\n\nAssistant:", "Assistant: ", "東京", "🙂", " 🙂", "\t", "é"]
COMPLETION_STARTS = ["", " ", "  ", "\n", "P", "東", "🙂", ",", "Paris", "\t", "s", "'s"]
# The chat families' Metaspace vocabularies (test_chat_families) were trained without a split at whitespace, so
# they hold pieces ending in "▁" ("be▁") that SentencePiece never makes: behind the "▁" these tokenizers prepend,
# their tails rarely come back the same, and their pairs mostly take the full path (with the same ids).
FULL_PATH_MOSTLY = {"mistral", "zephyr"}


def random_text(rng: random.Random, words: int) -> str:
    return "".join(rng.choice(WORDS) + rng.choice(SEPARATORS) for _ in range(words)).rstrip()


def random_pairs(seed: int, n: int) -> list[PreferencePair]:
    rng = random.Random(seed)
    return [PreferencePair(random_text(rng, rng.randint(12, 40)) + rng.choice(PROMPT_ENDS),
                           rng.choice(COMPLETION_STARTS) + random_text(rng, rng.randint(1, 12)),
                           rng.choice(COMPLETION_STARTS) + random_text(rng, rng.randint(0, 12)))
            for _ in range(n)]


def random_chats(seed: int, n: int, system: bool) -> list[PreferencePair]:
    rng = random.Random(seed)
    out = []
    for pair in random_pairs(seed, n):
        turns = [{"role": "system", "content": random_text(rng, 5)}] if system else []
        for _ in range(rng.randint(0, 2)):
            turns += [{"role": "user", "content": random_text(rng, 8)},
                      {"role": "assistant", "content": random_text(rng, 8)}]
        turns.append({"role": "user", "content": pair.prompt})
        out.append(PreferencePair(turns, [{"role": "assistant", "content": pair.chosen}],
                                  [{"role": "assistant", "content": pair.rejected}]))
    return out


def sentencepiece_like():
    """A SentencePiece-style BPE in Mistral v0.3's tokenizer.json layout (Metaspace, "▁" before the first word,
    no split; byte fallback), trained as SentencePiece trains, split at whitespace: pieces start with "▁"."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    tok.train_from_iterator(CORPUS + [" ".join(WORDS)] * 5,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"]))
    spec = json.loads(tok.to_str())
    for byte in range(256):
        spec["model"]["vocab"].setdefault(f"<0x{byte:02X}>", len(spec["model"]["vocab"]))
    spec["pre_tokenizer"]["split"] = False
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>")


def llama2_style(tokenizer):
    """The Metaspace tokenizer with Llama 2's tokenizer.json layout: a normaliser that prepends "▁" and replaces
    spaces, no pre-tokenizer, and a decoder that strips the leading space."""
    from tokenizers import Tokenizer, normalizers
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    spec["pre_tokenizer"] = None
    backend = Tokenizer.from_str(json.dumps(spec))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="</s>")


@pytest.fixture(scope="module")
def tokenizers(tokenizer):
    built = {name: build(FAMILIES[name]) for name in ("llama3", "qwen2_5", "mistral", "gemma", "zephyr")}
    sentencepiece = sentencepiece_like()
    return {"byte-level (conftest)": tokenizer, **built, "sentencepiece": sentencepiece,
            "llama2-normaliser": llama2_style(sentencepiece)}


def full_text_ids(tokenizer, pair: PreferencePair) -> tuple[list[int], list[int], list[int]]:
    """The reference: prompt, prompt + chosen, prompt + rejected tokenized in full, text by text."""
    if isinstance(pair.prompt, str):
        return tuple(tokenizer(text)["input_ids"] for text in (pair.prompt, pair.prompt + pair.chosen,
                                                               pair.prompt + pair.rejected))
    texts = (tokenizer.apply_chat_template(pair.prompt, tokenize=False, add_generation_prompt=True),
             tokenizer.apply_chat_template(pair.prompt + pair.chosen, tokenize=False),
             tokenizer.apply_chat_template(pair.prompt + pair.rejected, tokenize=False))
    bos = tokenizer.bos_token_id
    adds_bos = bos is not None and tokenizer("x")["input_ids"][:1] == [bos]
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    return tuple([bos, *seq] if adds_bos and seq[:1] != [bos] else seq for seq in ids)


def full_text_pair(tokenizer, pair: PreferencePair) -> tuple[list[int], list[int], list[int]]:
    """Prompt, chosen and rejected ids cut at the common prefix of the full texts, EOS after plain text."""
    prompt, chosen, rejected = full_text_ids(tokenizer, pair)
    cut = min(common_prefix_length(prompt, chosen), common_prefix_length(prompt, rejected))
    eos = [tokenizer.eos_token_id] if isinstance(pair.prompt, str) else []
    return chosen[:cut], chosen[cut:] + eos, rejected[cut:] + eos


def test_encode_triples_equals_the_full_texts_on_every_pair(tokenizers):
    for seed, (name, tokenizer) in enumerate(tokenizers.items()):
        pairs = random_pairs(seed, 150)
        triples = [(p.prompt, p.prompt + p.chosen, p.prompt + p.rejected) for p in pairs]
        got, fallbacks = encoding.encode_triples(tokenizer, triples, special=True)
        for pair, ids in zip(pairs, got):
            assert ids == full_text_ids(tokenizer, pair), (name, pair)
        # About half the prompts end in whitespace, which may merge with the completion: those fall back.
        if name not in FULL_PATH_MOSTLY:
            assert fallbacks < len(pairs) / 2, f"{name}: the tail was used for too few pairs to test it"


@pytest.mark.parametrize("name", ["byte-level (conftest)", "llama3", "qwen2_5", "mistral", "gemma", "zephyr"])
def test_chat_pairs_equal_the_full_conversations(tokenizers, name):
    tokenizer = tokenizers[name]
    pairs = random_chats(7, 60, system=name not in ("gemma", "mistral"))  # see test_chat_families
    got, report = tokenize_pairs(pairs, tokenizer, max_length=10**6, workers=1)
    assert report.template_mismatches == 0 and len(got) == len(pairs)
    for pair, tokenized in zip(pairs, got):
        assert (tokenized.prompt_ids, tokenized.chosen_ids, tokenized.rejected_ids) == full_text_pair(tokenizer, pair)
    if name not in FULL_PATH_MOSTLY:
        assert report.tail_fallbacks < len(pairs) / 2


def test_forked_workers_give_the_same_pairs_and_counts_in_order(tokenizers):
    tokenizer = tokenizers["byte-level (conftest)"]
    pairs = random_pairs(3, 400)
    serial, serial_report = tokenize_pairs(pairs, tokenizer, max_length=10**6, workers=1)
    forked, forked_report = tokenize_pairs(pairs, tokenizer, max_length=10**6, workers=2)
    assert forked == serial and vars(forked_report) == vars(serial_report)
    for pair, tokenized in zip(pairs, forked):
        assert (tokenized.prompt_ids, tokenized.chosen_ids, tokenized.rejected_ids) == full_text_pair(tokenizer, pair)
    assert serial_report.pairs_in == 400 and 0 < serial_report.boundary_mismatches
    assert 0 < serial_report.tail_fallbacks < 400 / 3  # prompts ending in a space fall back, and are counted
    assert any("tokenized" in line and "in full" in line for line in serial_report.lines())
