"""Turn `PreferencePair`s into token ids with an exact prompt/completion boundary.

The boundary is where most silent DPO bugs live. We tokenize `prompt` and `prompt + completion` and cut at
their common token prefix, so a BPE merge across the boundary never makes the scored completion differ from
what the model sees at inference; the prompt is the prefix common to the prompt and both full texts, so chosen
and rejected share it token for token (which is what lets the prompt be forwarded once). The full texts' ids
come from `encoding`, which tokenizes each completion behind the prompt's last few tokens only, and chunks of
pairs are tokenized in forked processes (`tokenize_pairs`): the same ids, about half the tokens, every CPU.

Special tokens: plain text gets the tokenizer's own special tokens (BOS) once; a doubled BOS (text that already
starts with it) is collapsed. Plain completions end with EOS exactly once, and a tokenizer without one is refused
rather than worked around: without it a completion is scored as a prefix, never on stopping where it stops, so
where replies end (length, rambling: often what the preference is about) is not learned, and no stand-in token
would be the one the model stops on at inference. Chat messages are rendered with the
tokenizer's chat template (`apply_chat_template`, with the pair's `tools`; the generation prompt for the prompt
part) and tokenized without adding special tokens, since the template writes them; a tokenizer that adds a BOS
the template does not write (Zephyr, Llama 2 style templates) gets it once in front. The template's end-of-turn
ends the completion and no EOS is appended after it (as at inference, where generation stops at the end-of-turn).

Chat completions are cut from the rendering of the whole conversation (prompt + completion), never concatenated,
because templates render a turn differently depending on what follows it (Qwen3 drops the reasoning of turns
before the last user query; Mistral's puts the system message into the last user turn only). When the
generation-prompt rendering is not a prefix of the full one, the pair is counted (`template_mismatches`) and
the prompt is taken as the full rendering shows it: everything before the first completion message's content.

A pair's gold response (`PreferencePair.gold`, for TPO) is tokenized by the same rules as its chosen and rejected,
and the prompt is the prefix common to all three full texts, so the gold shares the prompt block too.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from ..errors import DPOError
from . import encoding
from .formats import PreferencePair, Text

CHUNK = 4096  # pairs per batched tokenizer call: bounds memory, drives the progress bar
PARALLEL_MIN = 4096  # fewer pairs are tokenized in this process: starting workers would cost more than it saves
MAX_WORKERS = 16
GOLD = "gold"  # the extras flag of a pair with a gold response
BOUNDARY_MARK = "\u2063dpokit-boundary\u2063"  # message content no template rewrites, found again in its rendering


@dataclass
class TokenizedPair:
    """Token ids of one pair: the shared prompt, then each completion (ending with EOS or the end-of-turn).

    `image_inputs`: for a prompt with images, the image processor's arrays for them (`pixel_values`, and e.g.
    `image_grid_thw`), each with the prompt's images along its first axis (`multimodal`); empty for text.
    `gold_ids`: the gold response's ids (a third completion of the same prompt, for TPO); None without one. A
    pair with one also has `extras[GOLD]` = 1, which is how losses' data checks see that every pair has one.
    """

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    extras: dict[str, float] = field(default_factory=dict)
    group: int | None = None
    image_inputs: dict[str, Any] = field(default_factory=dict)
    gold_ids: list[int] | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids) + len(self.gold_ids or ())


@dataclass
class TruncationReport:
    """Counts of everything tokenization changed or dropped, shown to the user."""

    pairs_in: int = 0
    truncated_prompts: int = 0
    truncated_completions: int = 0
    dropped: int = 0
    boundary_mismatches: int = 0
    template_mismatches: int = 0
    doubled_bos: int = 0
    tail_fallbacks: int = 0  # pairs tokenized in full: their prompt's tail failed `encoding`'s checks
    boundary_example: str = ""  # the prompt tail left out of the first mismatched pair, decoded

    def add(self, other: TruncationReport) -> None:
        """Count `other`'s pairs too (a later chunk of the same data)."""
        for name in ("pairs_in", "truncated_prompts", "truncated_completions", "dropped", "boundary_mismatches",
                     "template_mismatches", "doubled_bos", "tail_fallbacks"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.boundary_example = self.boundary_example or other.boundary_example

    def lines(self) -> list[str]:
        out = []
        if self.truncated_prompts:
            out.append(f"truncated {self.truncated_prompts} of {self.pairs_in} prompts to --max-prompt-length")
        if self.truncated_completions:
            out.append(f"truncated completions of {self.truncated_completions} pairs to fit --max-length / "
                       "--max-completion-length")
        if self.dropped:
            out.append(f"dropped {self.dropped} pairs whose prompt leaves no room for a completion")
        if self.boundary_mismatches:
            out.append(f"warning: in {self.boundary_mismatches} of {self.pairs_in} pairs the prompt's own tokens are "
                       f"not a prefix of prompt+completion (e.g. {self.boundary_example!r} merges with the "
                       "completion); they were cut at the common token prefix")
        if self.template_mismatches:
            out.append(f"warning: in {self.template_mismatches} of {self.pairs_in} pairs the chat template renders "
                       "the prompt differently with the generation prompt than inside the full conversation (e.g. "
                       "a system message or reasoning it shows only in the last turn); the prompt was taken from "
                       "the full conversation, as training sees it")
        if self.doubled_bos:
            out.append(f"removed a doubled BOS token in {self.doubled_bos} pairs (the text already started with it)")
        if self.tail_fallbacks:
            out.append(f"tokenized {self.tail_fallbacks} of {self.pairs_in} pairs in full (slower, same ids): their "
                       "prompt's last tokens came out differently when tokenized with the completion")
        return out


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    if len(a) <= len(b) and b[:len(a)] == a:  # the usual case, compared in C
        return len(a)
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def split_at_boundary(prompt_ids: list[int], chosen_full: list[int], rejected_full: list[int],
                      ) -> tuple[list[int], list[int], list[int], bool]:
    """Cut two full tokenizations at the prefix they share with the prompt's tokens.

    Returns `(prompt, chosen_completion, rejected_completion, mismatch)`; `mismatch` is True when the prompt's
    own tokens are not a prefix of a full text (a BPE merge across the boundary).
    """
    k = min(common_prefix_length(prompt_ids, chosen_full), common_prefix_length(prompt_ids, rejected_full))
    return chosen_full[:k], chosen_full[k:], rejected_full[k:], k < len(prompt_ids)


def with_eos(ids: list[int], eos_id: int | None) -> list[int]:
    """End a completion with EOS exactly once."""
    if eos_id is None or (ids and ids[-1] == eos_id):
        return ids
    return [*ids, eos_id]


def truncate_pair(pair: TokenizedPair, *, max_length: int, max_prompt_length: int | None,
                  max_completion_length: int | None, truncation_mode: str, report: TruncationReport,
                  ) -> TokenizedPair | None:
    """Apply the length limits; None when nothing of the completion would be left."""
    prompt = pair.prompt_ids
    if max_prompt_length is not None and len(prompt) > max_prompt_length:
        report.truncated_prompts += 1
        prompt = prompt[-max_prompt_length:] if truncation_mode == "keep_end" else prompt[:max_prompt_length]
    room = max_length - len(prompt)
    if max_completion_length is not None:
        room = min(room, max_completion_length)
    if room <= 0:
        report.dropped += 1
        return None
    chosen, rejected = pair.chosen_ids[:room], pair.rejected_ids[:room]
    gold = None if pair.gold_ids is None else pair.gold_ids[:room]
    if (len(chosen), len(rejected), len(gold or ())) != \
            (len(pair.chosen_ids), len(pair.rejected_ids), len(pair.gold_ids or ())):
        report.truncated_completions += 1
    return replace(pair, prompt_ids=prompt, chosen_ids=chosen, rejected_ids=rejected, gold_ids=gold)


def tokenize_pairs(pairs: Sequence[PreferencePair], tokenizer: Any, *, max_length: int,
                   max_prompt_length: int | None = None, max_completion_length: int | None = None,
                   truncation_mode: str = "keep_end", progress: bool = False, workers: int | None = None,
                   ) -> tuple[list[TokenizedPair], TruncationReport]:
    """Tokenize pairs (batched, with the fast tokenizer) with the exact boundary, EOS and truncation rules above.

    `workers`: processes tokenizing chunks of pairs at once (1: this process only; None: one per CPU this
    process may use, shared with the other ranks on the node, from PARALLEL_MIN pairs on, on Linux). Chunks
    come back in order and are tokenized the same way wherever they run, so the result does not depend on it.
    """
    from tqdm import tqdm

    limits = dict(max_length=max_length, max_prompt_length=max_prompt_length,
                  max_completion_length=max_completion_length, truncation_mode=truncation_mode)
    report = TruncationReport()
    out: list[TokenizedPair] = []
    with tqdm(total=len(pairs), desc="tokenize", unit="pair", disable=None if progress else True,
              mininterval=0.5) as bar:
        for kept, part in _prepared_chunks(pairs, tokenizer, limits, workers):
            out.extend(kept)
            report.add(part)
            bar.update(part.pairs_in)
    return out, report


def default_workers(num_pairs: int) -> int:
    """Processes `tokenize_pairs` uses by default (see there)."""
    if num_pairs < PARALLEL_MIN or not sys.platform.startswith("linux") or multiprocessing.current_process().daemon:
        return 1
    cpus = len(os.sched_getaffinity(0))
    return max(1, min(MAX_WORKERS, cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))))


_FORKED: tuple[Sequence[PreferencePair], Any, dict[str, Any], int] | None = None  # what forked workers read


def _prepared_chunks(pairs: Sequence[PreferencePair], tokenizer: Any, limits: dict[str, Any], workers: int | None,
                     ) -> Iterator[tuple[list[TokenizedPair], TruncationReport]]:
    """`_prepare_chunk` over consecutive chunks of `pairs`, in order, in `workers` forked processes.

    Forked, the workers find the pairs and the tokenizer in memory (nothing is pickled on the way in). Each is
    one process tokenizing on one thread: `TOKENIZERS_PARALLELISM=false` while they fork, since a Rust thread
    pool does not survive a fork (the tokenizers library would otherwise turn it off itself, with a warning).
    """
    global _FORKED
    workers = workers or default_workers(len(pairs))
    if workers <= 1:
        for start in range(0, len(pairs), CHUNK):
            yield _prepare_chunk(pairs[start:start + CHUNK], tokenizer, limits)
        return
    size = min(CHUNK, max(PARALLEL_MIN // 8, -(-len(pairs) // (4 * workers))))  # ~4 chunks a worker: balanced
    _FORKED = (pairs, tokenizer, limits, size)
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        pool = multiprocessing.get_context("fork").Pool(workers)
    finally:
        if before is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before
    try:
        with pool:
            yield from pool.imap(_prepare_chunk_in_worker, range(0, len(pairs), size))
    finally:
        _FORKED = None


def _prepare_chunk_in_worker(start: int) -> tuple[list[TokenizedPair], TruncationReport]:
    assert _FORKED is not None, "only forked by _prepared_chunks"
    pairs, tokenizer, limits, size = _FORKED
    return _prepare_chunk(pairs[start:start + size], tokenizer, limits)


def _prepare_chunk(pairs: Sequence[PreferencePair], tokenizer: Any, limits: dict[str, Any],
                   ) -> tuple[list[TokenizedPair], TruncationReport]:
    """The kept pairs of one chunk, tokenized and truncated, and what that did."""
    report = TruncationReport(pairs_in=len(pairs))
    kept = []
    for tokenized in _tokenize_chunk(pairs, tokenizer, report):
        pair = None if tokenized is None else truncate_pair(tokenized, report=report, **limits)
        if pair is not None:
            kept.append(pair)
    return kept, report


def encode_prompts(tokenizer: Any, prompts: Sequence[Text]) -> list[list[int]]:
    """Prompt ids as training makes them, for sampling: plain text with the tokenizer's special tokens (BOS once),
    message lists rendered with the generation prompt (BOS once)."""
    plain = [p for p in prompts if isinstance(p, str)]
    chat = [_render(tokenizer, p, generation_prompt=True) for p in prompts if not isinstance(p, str)]
    plain_ids = iter(encoding.encode(tokenizer, plain, special=True))
    chat_ids = iter(_chat_ids(tokenizer, chat))
    bos = tokenizer.bos_token_id
    out = []
    for prompt in prompts:
        ids = next(plain_ids) if isinstance(prompt, str) else next(chat_ids)
        out.append(ids[1:] if bos is not None and ids[:2] == [bos, bos] else ids)
    return out


def end_of_turn_id(tokenizer: Any) -> int | None:
    """The token the chat template writes right after an assistant message's content (`<|eot_id|>`,
    `<|im_end|>`, `<end_of_turn>`, `</s>`), where sampling a chat reply stops; None when it is not one token."""
    text = _render(tokenizer, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": BOUNDARY_MARK}])
    after = text[text.find(BOUNDARY_MARK) + len(BOUNDARY_MARK):] if BOUNDARY_MARK in text else ""
    ids, = encoding.encode(tokenizer, [after], special=False) if after else ([],)
    if ids and tokenizer.convert_ids_to_tokens(ids[0]) in {*tokenizer.all_special_tokens, *tokenizer.get_added_vocab()}:
        return int(ids[0])
    return None


def _tokenize_chunk(pairs: Sequence[PreferencePair], tokenizer: Any, report: TruncationReport,
                    ) -> list[TokenizedPair | None]:
    """Ids of prompt, prompt+chosen and prompt+rejected of every pair (`encoding.encode_triples`), and of
    prompt+gold for the pairs with a gold response, cut at the boundary all of them share."""
    is_chat = [_is_chat(p) for p in pairs]
    texts = [_render_pair(tokenizer, p, report) if chat else (f"{p.prompt}", f"{p.prompt}{p.chosen}",
                                                                f"{p.prompt}{p.rejected}")  # all strings here
             for p, chat in zip(pairs, is_chat)]
    gold_texts = [_render_gold(tokenizer, p) if chat else None if p.gold is None else f"{p.prompt}{p.gold}"
                  for p, chat in zip(pairs, is_chat)]
    first_chat = next((t[0] for t, chat in zip(texts, is_chat) if chat), None)
    lead = _leading_special_ids(tokenizer, first_chat) if first_chat is not None else []
    encoded: list[encoding.Triple | None] = [None] * len(pairs)
    gold_fulls: list[list[int] | None] = [None] * len(pairs)
    for chat in (False, True):
        kind = [i for i, c in enumerate(is_chat) if c == chat]
        triples, fallbacks = encoding.encode_triples(tokenizer, [texts[i] for i in kind], special=not chat,
                                                     lead=lead if chat else ())
        # The gold goes in as a triple's chosen, with the bare prompt as its rejected (an empty completion, which
        # passes the tail check by itself): the same boundary rules, for the gold's tokens and the prompt's again.
        with_gold = [i for i in kind if gold_texts[i] is not None]
        golds, gold_fallbacks = encoding.encode_triples(
            tokenizer, [(texts[i][0], gold_texts[i] or "", texts[i][0]) for i in with_gold],
            special=not chat, lead=lead if chat else ())
        report.tail_fallbacks += fallbacks + gold_fallbacks
        for i, found in zip(kind, triples):
            encoded[i] = found
        for i, gold_triple in zip(with_gold, golds):
            gold_fulls[i] = gold_triple[1]
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    if eos is None and not all(is_chat):
        raise DPOError(f"the tokenizer ({getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__}) has no "
                       "EOS token, which ends every plain-text completion so that DPO scores where it stops: set "
                       "eos_token in its tokenizer_config.json, or give the pairs as chat messages")
    out: list[TokenizedPair | None] = []
    for pair, chat_pair, triple, gold_full in zip(pairs, is_chat, encoded, gold_fulls):
        assert triple is not None, "every pair was encoded, as text or chat"
        prompt_ids, chosen_full, rejected_full = triple
        if bos is not None and prompt_ids[:2] == [bos, bos]:  # the text itself starts with BOS
            report.doubled_bos += 1
            prompt_ids, chosen_full, rejected_full = (ids[1:] if ids[:2] == [bos, bos] else ids
                                                      for ids in (prompt_ids, chosen_full, rejected_full))
            if gold_full is not None and gold_full[:2] == [bos, bos]:
                gold_full = gold_full[1:]
        # With a gold response, the prompt is the prefix that prompt + gold shares too.
        shared = prompt_ids if gold_full is None else prompt_ids[:common_prefix_length(prompt_ids, gold_full)]
        prompt, chosen, rejected, mismatch = split_at_boundary(shared, chosen_full, rejected_full)
        gold = None if gold_full is None else gold_full[len(prompt):]
        if mismatch or len(shared) < len(prompt_ids):
            report.boundary_mismatches += 1
            report.boundary_example = report.boundary_example or tokenizer.decode(prompt_ids[len(prompt):])
        if not chat_pair:
            chosen, rejected = with_eos(chosen, eos), with_eos(rejected, eos)
            gold = None if gold is None else with_eos(gold, eos)
        if not prompt:  # no BOS and an empty prompt: the first token has nothing to be predicted from
            firsts = {c[0] if c else None for c in (chosen, rejected, *([gold] if gold is not None else []))}
            if len(firsts) != 1 or None in firsts:
                report.dropped += 1
                out.append(None)
                continue
            prompt, chosen, rejected = chosen[:1], chosen[1:], rejected[1:]
            gold = None if gold is None else gold[1:]
        extras = dict(pair.extras) if gold is None else {**pair.extras, GOLD: 1.0}
        out.append(TokenizedPair(prompt, chosen, rejected, extras, pair.group, gold_ids=gold))
    return out


def _render_pair(tokenizer: Any, pair: PreferencePair, report: TruncationReport) -> tuple[str, str, str]:
    """The prompt (with the generation prompt) and the two full conversations, as text."""
    prompt = _as_messages(pair.prompt, "user")
    chosen, rejected = _as_messages(pair.chosen, "assistant"), _as_messages(pair.rejected, "assistant")
    prompt_text = _render(tokenizer, prompt, generation_prompt=True, tools=pair.tools)
    chosen_text = _render(tokenizer, prompt + chosen, tools=pair.tools)
    rejected_text = _render(tokenizer, prompt + rejected, tools=pair.tools)
    if not (chosen_text.startswith(prompt_text) and rejected_text.startswith(prompt_text)):
        report.template_mismatches += 1
        prompt_text = _prompt_as_in_conversation(tokenizer, prompt, chosen, pair.tools) or prompt_text
    return prompt_text, chosen_text, rejected_text


def _render_gold(tokenizer: Any, pair: PreferencePair) -> str | None:
    """The full conversation prompt + gold response as text (None for a pair without one)."""
    if pair.gold is None:
        return None
    return _render(tokenizer, _as_messages(pair.prompt, "user") + _as_messages(pair.gold, "assistant"),
                   tools=pair.tools)


def _prompt_as_in_conversation(tokenizer: Any, prompt: list[dict[str, Any]], completion: list[dict[str, Any]],
                               tools: list[dict[str, Any]] | None) -> str | None:
    """The text before the completion's first message content in the full rendering (None if not found)."""
    marked = [{**completion[0], "content": BOUNDARY_MARK}]
    for key in ("reasoning_content", "tool_calls"):
        marked[0].pop(key, None)
    text = _render(tokenizer, prompt + marked, tools=tools)
    cut = text.find(BOUNDARY_MARK)
    return text[:cut] if cut >= 0 else None


def _chat_ids(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Rendered conversations' ids: the template's own special tokens, plus the BOS the tokenizer adds when the
    template does not write it, so there is exactly one."""
    if not texts:
        return []
    return encoding.encode_with_lead(tokenizer, texts, special=False, lead=_leading_special_ids(tokenizer, texts[0]))


def _leading_special_ids(tokenizer: Any, probe: str) -> list[int]:
    """The ids the tokenizer puts before `probe` when adding special tokens (`[bos]`, or none)."""
    with_special, = encoding.encode(tokenizer, [probe], special=True)
    without, = encoding.encode(tokenizer, [probe], special=False)
    for start in range(len(with_special) - len(without) + 1):
        if with_special[start:start + len(without)] == without:
            return with_special[:start]
    return []


def _is_chat(pair: PreferencePair) -> bool:
    return any(isinstance(part, list) for part in (pair.prompt, pair.chosen, pair.rejected))


def _as_messages(text: Text, role: str) -> list[dict[str, Any]]:
    return text if isinstance(text, list) else [{"role": role, "content": text}]


def _render(tokenizer: Any, messages: list[dict[str, Any]], *, generation_prompt: bool = False,
            tools: list[dict[str, Any]] | None = None) -> str:
    from jinja2 import TemplateError

    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    if not getattr(tokenizer, "chat_template", None):
        raise DPOError(f"the tokenizer ({name}) has no chat template, which conversational (message list) data "
                       "needs: use a tokenizer that has one (--tokenizer PATH), or give prompt/chosen/rejected as "
                       "plain text")
    try:
        return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,  # type: ignore[no-any-return]
                                             add_generation_prompt=generation_prompt)
    except (TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError) as err:
        # a template is a program run on the record: `raise_exception(...)` or its own bug, both the record's
        # or the template's to fix, so the record is named by its roles and first words
        roles = "/".join(str(m.get("role", "?")) for m in messages)
        first = next((m["content"] for m in messages if isinstance(m.get("content"), str)), "")
        reason = " ".join(str(err).split()) or type(err).__name__
        raise DPOError(f"the chat template of {name} refused the messages ({roles}): {reason} (in the record "
                       f"starting {first[:60]!r}: fix the record, or the template)") from None
