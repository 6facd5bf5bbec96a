"""`dpo data inspect FILE [--model PATH]`: what `dpo train` would make of a data file, before training on it.

Reports the pair count and detected format (of each source of a mixture, and the pairs taken from each),
length percentiles of prompt / chosen / rejected (in tokens with a tokenizer, in characters without), how many
pairs the length limits would truncate or drop, duplicate pairs, pairs whose chosen equals rejected, how many
pairs have a gold response (a `reference` or `gold` column, for TPO), and examples rendered with the
prompt/completion boundary marked.

Pairs with images (an `images` / `image` column) add the image counts and sizes; with a vision-language model's
processor (`--model VLM_FOLDER`), token lengths count the image tokens the processor expands each image into, and
the image tokens per prompt get a line of their own (a run of them is shown as `<image>×N` in the examples).

Data that is not pairs is described as what it is: unpaired (KTO) examples by their desirable / undesirable
counts, with one completion and its label each (the mismatched completion that `to_unpaired` pairs an example
with, for KTO's KL estimate, is another example's: not shown); SFT records by prompt and completion.
"""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np

from . import formats, images, mixture, multimodal, tokenization

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
        reports, lines = [report], report.lines()
    kind = _kind(loaded, reports)
    sides = SIDES[kind]
    lines += _kind_lines(loaded, kind)
    lines += _image_lines(loaded)
    if tokenizer is None:
        lengths = [[_chars(getattr(p, side)) for p in loaded] for side in sides]
        lines += _percentile_table(lengths, sides, unit="characters; pass --model PATH to count tokens and truncation")
        lines += _examples_text(loaded, examples, kind)
        return lines
    multimodal.check_model_takes_images(path, loaded, tokenizer)
    processor = multimodal.is_processor(tokenizer)
    tokenize = multimodal.tokenize_pairs if processor else tokenization.tokenize_pairs
    tokenized, untruncated = tokenize(loaded, tokenizer, max_length=10**9)
    lengths = [[len(getattr(p, f"{side}_ids")) for p in tokenized] for side in sides]
    lines += _percentile_table(lengths, sides, unit="tokens" + (", image tokens included" if processor else ""))
    if processor:
        lines += _image_token_lines(tokenized, tokenizer, max_length, max_prompt_length)
        tokenizer = _ImageRuns(tokenizer)
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
        counts = " | ".join(str(len(getattr(pair, f"{side}_ids"))) for side in sides)
        lines.append(f"example {k + 1} ({BOUNDARY} marks where the prompt ends; tokens {counts}):")
        lines += [_labelled(name, prompt + BOUNDARY + tokenizer.decode(getattr(pair, f"{side}_ids")))
                  for name, side in _shown_sides(pair, kind)]
    return lines


SIDES = {"pairs": ("prompt", "chosen", "rejected"), "unpaired": ("prompt", "chosen"), "sft": ("prompt", "chosen")}
WIDTH = 10  # the example lines' label column (a longer label is followed by one space)


def _kind(loaded: list[formats.PreferencePair], reports: list[formats.DataReport]) -> str:
    """"unpaired" (every example labelled, KTO), "sft" (every source SFT records) or "pairs"."""
    if all("label" in p.extras for p in loaded):
        return "unpaired"
    return "sft" if all(r.format == "sft" for r in reports) else "pairs"


def _kind_lines(loaded: list[formats.PreferencePair], kind: str) -> list[str]:
    if kind == "unpaired":
        desirable = sum(p.extras["label"] > 0.5 for p in loaded)
        duplicates = _duplicates([(p.prompt, p.chosen, p.extras["label"]) for p in loaded])
        return [f"  {desirable} desirable, {len(loaded) - desirable} undesirable examples (label true / false): "
                "for an unpaired loss such as --loss kto",
                f"  duplicate examples (same prompt, completion and label as an earlier one): {duplicates}"]
    if kind == "sft":
        duplicates = _duplicates([(p.prompt, p.chosen) for p in loaded])
        return ["  SFT records (prompt and completion, no rejected side): for `dpo sft` (or --loss sft)",
                f"  duplicate records (same prompt and completion as an earlier one): {duplicates}"]
    duplicates = _duplicates([(p.prompt, p.chosen, p.rejected) for p in loaded])
    gold = sum(p.gold is not None for p in loaded)
    return [f"  duplicate pairs (same prompt, chosen and rejected as an earlier pair): {duplicates}"] + (
        [f"  gold responses (`reference` / `gold` column, for --loss tpo, tpo-l): {gold} of {len(loaded)} pairs"]
        if gold else [])


def _shown_sides(pair: formats.PreferencePair | tokenization.TokenizedPair, kind: str) -> list[tuple[str, str]]:
    """(label, side) of the texts an example shows: an unpaired example's one completion is named by its label."""
    if kind == "unpaired":
        return [("desirable" if pair.extras["label"] > 0.5 else "undesirable", "chosen")]
    if kind == "sft":
        return [("completion", "chosen")]
    has_gold = (pair.gold if isinstance(pair, formats.PreferencePair) else pair.gold_ids) is not None
    return [("chosen", "chosen"), ("rejected", "rejected")] + ([("gold", "gold")] if has_gold else [])


def _percentile_table(lengths: list[list[int]], sides: tuple[str, ...], *, unit: str) -> list[str]:
    lines = [f"lengths ({unit}):", f"  {'':<10}" + "".join(f"{'p' + str(q):>8}" for q in PERCENTILES) + f"{'max':>8}"]
    for name, values in zip(("prompt", "completion") if len(sides) == 2 else sides, lengths):
        cells = [int(np.percentile(values, q, method="higher")) for q in PERCENTILES] + [max(values)]
        lines.append(f"  {name:<10}" + "".join(f"{c:>8}" for c in cells))
    return lines


def _examples_text(pairs: list[formats.PreferencePair], count: int, kind: str) -> list[str]:
    lines = []
    for k, pair in enumerate(pairs[:count]):
        prompt = _plain(pair.prompt)
        lines.append(f"example {k + 1} ({BOUNDARY} marks where the prompt ends):")
        lines += _tools_line(pair)
        lines += [_labelled(name, prompt + BOUNDARY + _plain(getattr(pair, side)))
                  for name, side in _shown_sides(pair, kind)]
    return lines


def _image_lines(loaded: list[formats.PreferencePair]) -> list[str]:
    """How many images, in how many pairs, and their sizes (read from each file's header)."""
    counts = [len(p.images) for p in loaded]
    if not any(counts):
        return []
    sizes = np.array([images.size(source) for p in loaded for source in p.images])      # [images, 2]
    distinct = len({source for p in loaded for source in p.images})
    with_images = [c for c in counts if c]
    lines = [f"images: {sum(counts)} in {len(with_images)} of {len(loaded)} pairs ({min(with_images)} to "
             f"{max(with_images)} per pair with images), {distinct} distinct",
             f"  {'pixels':<10}" + "".join(f"{'p' + str(q):>8}" for q in PERCENTILES) + f"{'max':>8}{'min':>8}"]
    for axis, name in enumerate(("width", "height")):
        cells = [int(np.percentile(sizes[:, axis], q, method="higher")) for q in PERCENTILES]
        lines.append(f"  {name:<10}" + "".join(f"{c:>8}" for c in [*cells, sizes[:, axis].max(), sizes[:, axis].min()]))
    return lines


def _image_token_lines(tokenized: list[tokenization.TokenizedPair], processor: Any, max_length: int,
                       max_prompt_length: int | None) -> list[str]:
    """Image tokens per prompt after the processor's expansion, and the prompts with images over the limits
    (training stops on those: image tokens cannot be truncated)."""
    image_id = multimodal.image_token_id(processor)
    counts = [p.prompt_ids.count(image_id) for p in tokenized]
    limit = min(max_length - 1, max_prompt_length or max_length)
    over = sum(bool(p.image_inputs) and len(p.prompt_ids) > limit for p in tokenized)
    cells = [int(np.percentile(counts, q, method="higher")) for q in PERCENTILES] + [max(counts)]
    return [f"  {'image tok':<10}" + "".join(f"{c:>8}" for c in cells) + "  (image tokens per prompt)"] + (
        [f"  {over} prompts with images are over --max-length / --max-prompt-length: training stops on them (image "
         "tokens cannot be truncated); raise the limits"] if over else [])


class _ImageRuns:
    """A processor's tokenizer whose `decode` shows a run of image tokens as `<image>×N`."""

    def __init__(self, processor: Any) -> None:
        self.tokenizer, self.token = multimodal.text_tokenizer(processor), processor.image_token

    def decode(self, ids: list[int]) -> str:
        text = self.tokenizer.decode(ids)
        return re.sub(f"(?:{re.escape(self.token)})+",
                      lambda run: f"{self.token}×{len(run.group()) // len(self.token)}", text)


def _duplicates(keys: list[tuple[Any, ...]]) -> int:
    """How many of `keys` repeat an earlier one."""
    return len(keys) - len({json.dumps(key, ensure_ascii=False) for key in keys})


def _chars(text: formats.Text) -> int:
    return len(text) if isinstance(text, str) else len(_plain(text))


def _plain(text: formats.Text) -> str:
    """Messages on one line: `[role] <think>reasoning</think> content [tool call name({...})]`."""
    return text if isinstance(text, str) else " ".join(_message(m) for m in text)


def _message(message: dict[str, Any]) -> str:
    parts = [f"[{message['role']}]"]
    if message.get("reasoning_content"):
        parts.append(f"<think>{message['reasoning_content']}</think>")
    content = message.get("content")
    if isinstance(content, list):  # parts: an image placeholder shown as <image>
        content = "".join("<image>" if images.is_image_part(part) else part.get("text", "") for part in content)
    if content:
        parts.append(content)
    for call in message.get("tool_calls") or []:
        function = call.get("function", call)
        parts.append(f"[tool call {function.get('name')}({json.dumps(function.get('arguments'), ensure_ascii=False)})]")
    return " ".join(parts)


def _tools_line(pair: formats.PreferencePair) -> list[str]:
    names = [tool.get("function", tool).get("name", "?") for tool in pair.tools or []]
    return [_labelled("tools", ", ".join(names))] if names else []


def _labelled(name: str, text: str) -> str:
    return f"  {(name + ':').ljust(WIDTH - 1)} {_show(text)}"


def _show(text: str, limit: int = 400) -> str:
    """One line, newlines visible, long texts shortened in the middle."""
    text = text.replace("\n", "\\n")
    return text if len(text) <= limit else text[:limit // 2] + " ... " + text[-limit // 2:]
