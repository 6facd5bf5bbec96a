"""`dpo data inspect FILE [--model PATH]`: what `dpo train` would make of a data file, before training on it.

Reports the pair count and detected format (of each source of a mixture, and the pairs taken from each),
length percentiles of prompt / chosen / rejected (in tokens with a tokenizer, in characters without), how many
pairs the length limits would truncate or drop, duplicate pairs, pairs whose chosen equals rejected, and
examples rendered with the prompt/completion boundary marked.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from . import formats, mixture, tokenization

BOUNDARY = "┃"  # printed where the prompt ends and the completion begins
PERCENTILES = (50, 90, 99)


def inspect(path: str, *, tokenizer: Any = None, format: str | None = None, columns: str | None = None,
            split: str = "train", pairs: str = "best-worst", max_pairs: int | None = None,
            skip_invalid: bool = False, max_length: int = 1024, max_prompt_length: int | None = None,
            max_completion_length: int | None = None, truncation_mode: str = "keep_end", examples: int = 2,
            ) -> list[str]:
    """The report's lines. A mixture (`a.jsonl:0.7,b.jsonl:0.3`) is reported source by source, then mixed as
    `dpo train` mixes it with its default --seed (42)."""
    options = dict(format=format, columns=columns, split=split, pairs=pairs, max_pairs=max_pairs,
                   skip_invalid=skip_invalid)
    sources = mixture.parse(path)
    if mixture.is_mixture(sources):
        loaded, reports, notes = mixture.load(sources, seed=42, **options)
        lines = [line for report in reports for line in report.lines()] + notes
    else:
        loaded, report = formats.load_pairs(path, **options)
        lines = report.lines()
    lines.append(f"  duplicate pairs (same prompt, chosen and rejected as an earlier pair): {_duplicates(loaded)}")
    if tokenizer is None:
        lengths = [[_chars(getattr(p, side)) for p in loaded] for side in ("prompt", "chosen", "rejected")]
        lines += _percentile_table(lengths, unit="characters; pass --model PATH to count tokens and truncation")
        lines += _examples_text(loaded, examples)
        return lines
    tokenized, untruncated = tokenization.tokenize_pairs(loaded, tokenizer, max_length=10**9)
    lengths = [[len(getattr(p, f"{side}_ids")) for p in tokenized] for side in ("prompt", "chosen", "rejected")]
    lines += _percentile_table(lengths, unit="tokens")
    limits = tokenization.TruncationReport(  # boundary counts come from tokenizing; truncation counts below
        pairs_in=len(loaded), dropped=untruncated.dropped, boundary_mismatches=untruncated.boundary_mismatches,
        template_mismatches=untruncated.template_mismatches, doubled_bos=untruncated.doubled_bos,
        boundary_example=untruncated.boundary_example)
    for pair in tokenized:
        tokenization.truncate_pair(pair, max_length=max_length, max_prompt_length=max_prompt_length,
                                   max_completion_length=max_completion_length, truncation_mode=truncation_mode,
                                   report=limits)
    lines.append(f"with --max-length {max_length} --max-prompt-length {max_prompt_length} --max-completion-length "
                 f"{max_completion_length} --truncation-mode {truncation_mode}:")
    lines += [f"  {line}" for line in limits.lines()] or ["  nothing truncated or dropped"]
    for k, pair in enumerate(tokenized[:examples]):  # tools and tool calls show as the template renders them
        prompt = tokenizer.decode(pair.prompt_ids)
        lines.append(f"example {k + 1} ({BOUNDARY} marks where the prompt ends; tokens {len(pair.prompt_ids)} | "
                     f"{len(pair.chosen_ids)} | {len(pair.rejected_ids)}):")
        lines.append(f"  chosen:   {_show(prompt + BOUNDARY + tokenizer.decode(pair.chosen_ids))}")
        lines.append(f"  rejected: {_show(prompt + BOUNDARY + tokenizer.decode(pair.rejected_ids))}")
    return lines


def _percentile_table(lengths: list[list[int]], *, unit: str) -> list[str]:
    lines = [f"lengths ({unit}):", f"  {'':<10}" + "".join(f"{'p' + str(q):>8}" for q in PERCENTILES) + f"{'max':>8}"]
    for name, values in zip(("prompt", "chosen", "rejected"), lengths):
        cells = [int(np.percentile(values, q, method="higher")) for q in PERCENTILES] + [max(values)]
        lines.append(f"  {name:<10}" + "".join(f"{c:>8}" for c in cells))
    return lines


def _examples_text(pairs: list[formats.PreferencePair], count: int) -> list[str]:
    lines = []
    for k, pair in enumerate(pairs[:count]):
        prompt = _plain(pair.prompt)
        lines.append(f"example {k + 1} ({BOUNDARY} marks where the prompt ends):")
        lines += _tools_line(pair)
        lines.append(f"  chosen:   {_show(prompt + BOUNDARY + _plain(pair.chosen))}")
        lines.append(f"  rejected: {_show(prompt + BOUNDARY + _plain(pair.rejected))}")
    return lines


def _duplicates(pairs: list[formats.PreferencePair]) -> int:
    seen = {json.dumps([p.prompt, p.chosen, p.rejected], ensure_ascii=False) for p in pairs}
    return len(pairs) - len(seen)


def _chars(text: formats.Text) -> int:
    return len(text) if isinstance(text, str) else len(_plain(text))


def _plain(text: formats.Text) -> str:
    """Messages on one line: `[role] <think>reasoning</think> content [tool call name({...})]`."""
    return text if isinstance(text, str) else " ".join(_message(m) for m in text)


def _message(message: dict[str, Any]) -> str:
    parts = [f"[{message['role']}]"]
    if message.get("reasoning_content"):
        parts.append(f"<think>{message['reasoning_content']}</think>")
    if message.get("content"):
        parts.append(message["content"])
    for call in message.get("tool_calls") or []:
        function = call.get("function", call)
        parts.append(f"[tool call {function.get('name')}({json.dumps(function.get('arguments'), ensure_ascii=False)})]")
    return " ".join(parts)


def _tools_line(pair: formats.PreferencePair) -> list[str]:
    names = [tool.get("function", tool).get("name", "?") for tool in pair.tools or []]
    return [f"  tools:    {', '.join(names)}"] if names else []


def _show(text: str, limit: int = 400) -> str:
    """One line, newlines visible, long texts shortened in the middle."""
    text = text.replace("\n", "\\n")
    return text if len(text) <= limit else text[:limit // 2] + " ... " + text[-limit // 2:]
