"""Token ids of a prompt and of prompt + each completion, without tokenizing the prompt three times.

The exact boundary (`tokenization`) compares a prompt's ids with the ids of `prompt + chosen` and
`prompt + rejected`. Tokenized in full, that is three prompts' worth of tokens per pair. Here the prompt is
tokenized once, and each completion with only the prompt's last few tokens in front (their text, as the
tokenizer's own decoder writes it): `prompt + completion` is the prompt's ids before that tail, then the ids of
tail + completion. That holds when the tail starts where the tokenizer splits the text anyway, which is checked
on every pair: the tail's text must end the prompt and start next to a space or at a special token, and tail +
completion must start with the tail's own tokens again, for both completions. A pair that fails is tokenized in
full and counted, so every pair gets the ids the full text has (tests/test_fast_encoding.py holds this pair by
pair on byte-level BPE and Metaspace tokenizers, non-ASCII text, spaces at the boundary and chat templates).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..errors import DPOError

TAIL_TOKENS = 6   # the prompt's last tokens re-tokenized with each completion
TAIL_SEARCH = 16  # how many tokens further back to look for a tail that starts where the tokenizer splits

Triple = tuple[list[int], list[int], list[int]]  # ids of prompt, prompt + chosen, prompt + rejected


def encode(tokenizer: Any, texts: list[str], *, special: bool) -> list[list[int]]:
    """Token ids of `texts`. For a fast tokenizer, call its Rust backend directly: the same ids as
    `tokenizer(texts)` (which calls the same `encode_batch`), without computing offsets or building a
    `BatchEncoding`, and in parallel across texts."""
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    try:
        if backend is not None and hasattr(backend, "encode_batch_fast"):
            return [encoding.ids for encoding in backend.encode_batch_fast(texts, add_special_tokens=special)]
        return tokenizer(texts, add_special_tokens=special, return_attention_mask=False,
                         return_token_type_ids=False)["input_ids"]
    except Exception as err:  # the Rust tokenizer raises a bare Exception for text it cannot encode
        raise DPOError(f"the tokenizer could not tokenize the data ({str(err).strip() or type(err).__name__}); "
                       "give --model (or --tokenizer) the model the data is meant for") from None


def encode_with_lead(tokenizer: Any, texts: list[str], *, special: bool, lead: Sequence[int]) -> list[list[int]]:
    """`encode`, with `lead` (the BOS a chat template does not write) in front of each text not starting with it."""
    ids = encode(tokenizer, texts, special=special)
    lead = list(lead)
    return ids if not lead else [seq if seq[:len(lead)] == lead else lead + seq for seq in ids]


def encode_triples(tokenizer: Any, triples: Sequence[tuple[str, str, str]], *, special: bool,
                   lead: Sequence[int] = ()) -> tuple[list[Triple], int]:
    """The ids of each `(prompt, prompt + chosen, prompt + rejected)` text triple, as `encode_with_lead` gives
    them text by text, and how many triples failed the tail checks and were tokenized in full.

    Prompts of a few tokens, full texts that do not start with the prompt (a chat template that renders the
    prompt differently inside the conversation) and slow tokenizers are tokenized in full without trying.
    """
    prompts = encode_with_lead(tokenizer, [prompt for prompt, _, _ in triples], special=special, lead=lead)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    candidates = [i for i, (prompt, chosen, rejected) in enumerate(triples)
                  if len(prompts[i]) > len(lead) + TAIL_TOKENS and chosen.startswith(prompt)
                  and rejected.startswith(prompt)] if hasattr(backend, "decode_batch") else []
    tails = _find_tails(backend, {i: (triples[i][0], prompts[i]) for i in candidates}, len(lead))
    texts = [text + full[len(triples[i][0]):] for i, (_, text) in tails.items() for full in triples[i][1:]]
    encoded = iter(encode(tokenizer, texts, special=False))
    out: list[Triple | None] = [None] * len(triples)
    for i, (start, _) in tails.items():
        prompt, tail = prompts[i], prompts[i][start:]
        chosen, rejected = next(encoded), next(encoded)
        if chosen[:len(tail)] == tail and rejected[:len(tail)] == tail:
            out[i] = (prompt, prompt[:start] + chosen, prompt[:start] + rejected)
    fallbacks = sum(out[i] is None for i in candidates)
    rest = [i for i, triple in enumerate(out) if triple is None]
    full = iter(encode_with_lead(tokenizer, [text for i in rest for text in triples[i][1:]], special=special,
                                 lead=lead))
    for i in rest:
        out[i] = (prompts[i], next(full), next(full))
    return out, fallbacks  # type: ignore[return-value]


def _find_tails(backend: Any, prompts: dict[int, tuple[str, list[int]]], lead: int) -> dict[int, tuple[int, str]]:
    """For each `i: (prompt text, prompt ids)`, `(start, text)`: the ids from `start` on decode to `text`, which
    ends the prompt and starts where the tokenizer splits anyway (`_split_point`). The search steps back one
    token at a time from TAIL_TOKENS before the end, TAIL_SEARCH times, never into `lead` or the first token; a
    prompt with no such tail is left out."""
    specials = set(backend.get_added_tokens_decoder())
    start = {i: len(ids) - TAIL_TOKENS for i, (_, ids) in prompts.items()}
    found: dict[int, tuple[int, str]] = {}
    for _ in range(TAIL_SEARCH):
        pending = [i for i in start if i not in found and start[i] > lead]
        if not pending:
            break
        decoded = backend.decode_batch([prompts[i][1][start[i]:] for i in pending], skip_special_tokens=False)
        for i, text in zip(pending, decoded):
            prompt, ids = prompts[i]
            at = len(prompt) - len(text)
            if text and prompt.endswith(text) and _split_point(prompt, at, ids[start[i]] in specials):
                found[i] = (start[i], text)
            else:
                start[i] -= 1
    return found


def _split_point(text: str, at: int, special: bool) -> bool:
    """Whether the tokenizer splits `text` at `at` whatever follows: before an added (special) token, or next to
    a space, where byte-level BPE starts a word (" word") and SentencePiece-style tokenizers start one after the
    space ("▁word", which their decoders write without the space at the start of a text)."""
    return special or at == 0 or " " in text[at - 1:at + 1]
