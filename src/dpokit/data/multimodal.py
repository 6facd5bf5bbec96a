"""Tokenize pairs with images through a vision-language model's processor, with the exact prompt boundary.

The processor (`AutoProcessor`: an image processor and a tokenizer) expands each image placeholder into the
image tokens the model fills with vision features (LLaVA: one `<image>` per patch feature; Qwen2-VL: as many as
the image's resolution gives). As in `tokenization`, the prompt and each prompt + completion are tokenized with
the images and cut at their common token prefix; every image token must then lie in the prompt (images belong
to it), and a prompt with images is never truncated (cutting image tokens would leave features with no place).
The prompt's image arrays (`pixel_values`, ...) go with the pair (`TokenizedPair.image_inputs`), computed once,
each with the prompt's images (Idefics3: its tiles) along the first axis, so that a batch's prompts concatenate.

Chat messages are rendered with the processor's chat template, each content given as parts (`{"type": "image"}`,
`{"type": "text", "text": ...}`) as vision templates expect; a plain-text prompt holds the processor's image
token (`<image>`) once per image. Torch-free: the processor returns numpy arrays.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from ..errors import DPOError
from . import images as image_column
from .formats import PreferencePair, Text
from .tokenization import TokenizedPair, TruncationReport, _render_pair, split_at_boundary, truncate_pair, with_eos

ARRAY_KEYS_SKIPPED = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")


def is_processor(tokenizer: Any) -> bool:
    """Whether `tokenizer` is a multimodal processor (an image processor beside a tokenizer)."""
    return hasattr(tokenizer, "image_processor") and hasattr(tokenizer, "tokenizer")


def text_tokenizer(tokenizer: Any) -> Any:
    """The tokenizer inside a processor, or `tokenizer` itself."""
    return tokenizer.tokenizer if is_processor(tokenizer) else tokenizer


def check_model_takes_images(data: str, pairs: Sequence[PreferencePair], tokenizer: Any) -> None:
    """Refuse data with images for a text-only model's tokenizer (the images would be lost, or rendered as text)."""
    if not is_processor(tokenizer) and (with_images := next((p for p in pairs if p.images), None)):
        raise DPOError(f"{data}: the data has images (an images/image column, {len(with_images.images)} in its first "
                       "such pair) but the model's tokenizer has no image processor (a text-only model); use a "
                       "vision-language model, or drop the image column")


def image_token_id(processor: Any) -> int:
    """The id of the token each image feature replaces."""
    token_id = getattr(processor, "image_token_id", None)
    return int(token_id if token_id is not None else processor.tokenizer.convert_tokens_to_ids(processor.image_token))


def tokenize_pairs(pairs: Sequence[PreferencePair], processor: Any, *, max_length: int,
                   max_prompt_length: int | None = None, max_completion_length: int | None = None,
                   truncation_mode: str = "keep_end", progress: bool = False, workers: int | None = None,
                   ) -> tuple[list[TokenizedPair], TruncationReport]:
    """`tokenization.tokenize_pairs` for a processor: the same rules, with the images (one pair at a time)."""
    report = TruncationReport(pairs_in=len(pairs))
    out = []
    for index, pair in enumerate(pairs):
        tokenized = _tokenize_pair(index, pair, processor, report)
        too_long = len(tokenized.prompt_ids) > min(max_length - 1, max_prompt_length or max_length)
        if tokenized.image_inputs and too_long:
            raise DPOError(f"pair {index}: its prompt with its images is {len(tokenized.prompt_ids)} tokens, over "
                           "--max-prompt-length / --max-length, and image tokens cannot be truncated; raise them")
        kept = truncate_pair(tokenized, report=report, max_length=max_length, max_prompt_length=max_prompt_length,
                             max_completion_length=max_completion_length, truncation_mode=truncation_mode)
        if kept is not None:
            out.append(kept)
    return out, report


def _tokenize_pair(index: int, pair: PreferencePair, processor: Any, report: TruncationReport) -> TokenizedPair:
    try:
        images = [image_column.open_image(source, f"{_which(index, pair)}, image {i}")
                  for i, source in enumerate(pair.images)]
    except image_column.BadImage as bad:  # the load's check reads the structure only (a truncated JPEG passes it)
        raise DPOError(str(bad)) from None
    chat = any(isinstance(part, list) for part in (pair.prompt, pair.chosen, pair.rejected))
    if chat:
        as_parts = replace(pair, prompt=_parts(pair.prompt, "user"), chosen=_parts(pair.chosen, "assistant"),
                           rejected=_parts(pair.rejected, "assistant"))
        texts = _render_pair(processor, as_parts, report)
    else:
        assert isinstance(pair.prompt, str) and isinstance(pair.chosen, str) and isinstance(pair.rejected, str)
        texts = (pair.prompt, pair.prompt + pair.chosen, pair.prompt + pair.rejected)
    _check_placeholders(index, pair, texts, processor.image_token, len(images))
    # The chat template writes its own special tokens; plain text gets the tokenizer's (BOS) once. The prompt
    # alone gives the image arrays; the full texts, with the same images, only their ids.
    options = dict(return_tensors="np", add_special_tokens=not chat, padding=True)
    prompt_encoded = processor(text=[texts[0]], images=[images] if images else None, **options)
    full = processor(text=list(texts[1:]), images=[images] * 2 if images else None, **options)
    ids = [row[mask.astype(bool)].tolist() for encoded in (prompt_encoded, full)
           for row, mask in zip(encoded["input_ids"], encoded["attention_mask"])]
    bos = processor.tokenizer.bos_token_id
    ids = [row[1:] if bos is not None and row[:2] == [bos, bos] else row for row in ids]
    prompt, chosen, rejected, mismatch = split_at_boundary(*ids)
    if mismatch:
        report.boundary_mismatches += 1
    image_id = image_token_id(processor)
    if image_id in chosen or image_id in rejected or prompt.count(image_id) != ids[0].count(image_id):
        raise DPOError(f"pair {index}: image tokens fall outside the prompt after tokenization (the chat template "
                       "puts the prompt's images elsewhere in the full conversation)")
    if not chat:
        eos = processor.tokenizer.eos_token_id
        chosen, rejected = with_eos(chosen, eos), with_eos(rejected, eos)
    image_inputs = image_arrays(prompt_encoded) if images else {}
    return TokenizedPair(prompt, chosen, rejected, dict(pair.extras), pair.group, image_inputs)


def _check_placeholders(index: int, pair: PreferencePair, texts: tuple[str, str, str], token: str,
                        images: int) -> None:
    """One image token per image in the prompt, none in a completion: the processor expands each into the
    image's tokens, and a count that differs would fail there (or, in a completion, be scored)."""
    in_prompt = texts[0].count(token)
    if in_prompt != images:
        written = "" if isinstance(pair.prompt, str) else (
            f"; its text writes {token} itself {in_prompt - images} times" if in_prompt > images else "")
        raise DPOError(f"{_which(index, pair)}: the prompt holds {in_prompt} image placeholders ({token}) for "
                       f"{images} images{written}; put one where each image goes")
    for side, text in zip(("chosen", "rejected"), texts[1:]):
        if text.count(token) != in_prompt:
            raise DPOError(f"{_which(index, pair)}: the {side} completion holds the image token {token}; images "
                           "belong to the prompt (remove it from the completion's text)")


def _which(index: int, pair: PreferencePair) -> str:
    """The pair, named by its index and its images (the record's line is not kept past loading)."""
    shown = ", ".join(image_column.describe(source) for source in pair.images[:2])
    more = f" and {len(pair.images) - 2} more" if len(pair.images) > 2 else ""
    return f"pair {index}" + (f" (images {shown}{more})" if pair.images else "")


def image_arrays(encoded: Any) -> dict[str, Any]:
    """The image arrays of one prompt the processor encoded with its images (`dpo generate` encodes its prompts
    alike), each with the prompt's images along the first axis."""
    arrays = {k: v for k, v in encoded.items() if k not in ARRAY_KEYS_SKIPPED}
    if arrays["pixel_values"].ndim == 5:
        # Idefics3 / SmolVLM give (texts, tiles, C, H, W) and a pixel_attention_mask alike: the one text's axis
        # dropped, the prompt's tiles come first, as every family's images do (`vision.image_features` restores it).
        arrays = {k: v[0] for k, v in arrays.items()}
    return arrays


def _parts(text: Text, role: str) -> list[dict[str, Any]]:
    """Messages with every content as a list of parts, as vision chat templates iterate them."""
    messages = text if isinstance(text, list) else [{"role": role, "content": text}]
    return [{**m, "content": [{"type": "text", "text": m["content"]}]} if isinstance(m.get("content"), str) else m
            for m in messages]

