"""Batched sampling from a causal LM: left-padded prompts, a KV cache, temperature and nucleus (top-p) sampling.

    dpo generate --model runs/sft/model --prompts prompts.jsonl --out samples.jsonl --num-samples 2 --seed 0

A prompt is text, or a list of chat messages rendered with the model's chat template and its generation prompt
(exactly as training renders prompts); a chat reply stops at the template's end of turn as well as at EOS.

With a vision-language model, a prompt record may carry images (`images` / `image`, as training data does; paths
relative to the prompts file): the processor renders the prompt (its chat template, content as parts with a
`{"type": "image"}` placeholder per image) and expands each image's tokens; the first step's input embeddings
get the image features written at those tokens (`vision.input_embeddings`, the code training scores with), and
decoding then runs on the KV cache as for text.

Reproducible: each sampled sequence draws its noise from its own generator, seeded from (seed, prompt index,
sample index), so a rerun with the same seed gives the same samples whatever else runs in the process, and a
different --batch-size gives the same samples too (up to float rounding of batched matmuls). A token is drawn
with the Gumbel-max trick: argmax(logits / T + Gumbel noise) is a sample from softmax(logits / T)
(Maddison, Tarlow & Minka 2014, "A* Sampling", Sec. 2), which needs exactly one uniform per vocabulary entry per
step and row, independent of what the other rows do.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import distributed, models, vision
from .batching import ImageBatch
from .errors import DPOError
from .data import images as image_column, multimodal, tokenization
from .data.formats import Text
from .data.sources import read_records

ImageArrays = dict[str, Any]  # a prompt's image processor arrays (`pixel_values`, ...), as `TokenizedPair.image_inputs`


@dataclass(frozen=True)
class Sample:
    """One sampled completion. `completion_ids` ends with a stop token (EOS, or the end of turn of a chat
    prompt) unless it was cut at `max_new_tokens`."""

    prompt_index: int
    sample_index: int
    prompt_ids: list[int]
    completion_ids: list[int]
    image_inputs: ImageArrays = field(default_factory=dict)  # the prompt's images, to score the sample with them


def sample(model: torch.nn.Module, prompt_ids: Sequence[list[int]], *, eos_id: int | Sequence[int] | None, pad_id: int,
           num_samples: int = 1, max_new_tokens: int = 64, temperature: float = 1.0, top_p: float = 1.0,
           seed: int = 0, batch_size: int = 32, images: Sequence[ImageArrays] | None = None,
           progress: Callable[[int], object] | None = None, first_prompt: int = 0) -> list[Sample]:
    """`num_samples` completions of every prompt, in order (prompt 0's samples first), `batch_size` rows at a time.

    `temperature` 0 is greedy decoding. `eos_id`: the token, or tokens, that end a completion. `images`: each
    prompt's image arrays (empty for a prompt without), for a vision-language model. `progress` is told how many
    samples each finished batch of rows adds (a progress bar's `update`). The model is put in eval mode and left
    there. `first_prompt`: the position of `prompt_ids[0]` in a longer list: rows are seeded as one call over that
    list seeds them, so processes sampling slices of it draw exactly its samples (`Sample.prompt_index` stays the
    position in `prompt_ids`).
    """
    if any(not ids for ids in prompt_ids):
        raise DPOError("generate: a prompt tokenized to nothing (give the tokenizer a BOS token, or a non-empty prompt)")
    model.eval()
    arrays = list(images) if images is not None else [{} for _ in prompt_ids]
    jobs = [(i, k) for i in range(len(prompt_ids)) for k in range(num_samples)]
    samples = []
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start:start + batch_size]
        completions = _sample_rows(
            model, [prompt_ids[i] for i, _ in chunk], [_row_seed(seed, first_prompt + i, k) for i, k in chunk],
            eos_id=eos_id, pad_id=pad_id, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
            images=[arrays[i] for i, _ in chunk])
        samples += [Sample(i, k, list(prompt_ids[i]), c, arrays[i]) for (i, k), c in zip(chunk, completions)]
        if progress is not None:
            progress(len(chunk))
    return samples


def nucleus_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches `top_p` (Holtzman et al. 2020, Eq. 2).

    `logits` `[rows, vocab]`; filtered entries become -inf. The most likely token is always kept.
    """
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)                 # [rows, vocab]
    probs = sorted_logits.softmax(dim=-1)
    # A token is dropped when the tokens ranked above it already hold top_p of the mass.
    dropped = probs.cumsum(dim=-1) - probs >= top_p
    sorted_logits = sorted_logits.masked_fill(dropped, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def choose_tokens(logits: torch.Tensor, temperature: float, top_p: float,
                  generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Next token per row `[rows]` from `logits` `[rows, vocab]`, one generator per row."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = nucleus_filter(logits / temperature, top_p)
    uniform = torch.stack([torch.rand(logits.shape[-1], generator=g, device=logits.device) for g in generators])
    tiny = torch.finfo(uniform.dtype).tiny
    gumbel = -torch.log(-torch.log(uniform.clamp(min=tiny, max=1 - 1e-7)))      # [rows, vocab]
    return (logits + gumbel).argmax(dim=-1)


@torch.no_grad()
def _sample_rows(model: torch.nn.Module, prompts: list[list[int]], seeds: list[int], *, eos_id: int | Sequence[int] | None,
                 pad_id: int, max_new_tokens: int, temperature: float, top_p: float, images: list[ImageArrays],
                 ) -> list[list[int]]:
    device = next(model.parameters()).device
    rows, width = len(prompts), max(len(p) for p in prompts)
    input_ids = torch.full((rows, width), pad_id, dtype=torch.long)
    mask = torch.zeros((rows, width), dtype=torch.long)
    for r, prompt in enumerate(prompts):                                         # left padding
        input_ids[r, width - len(prompt):] = torch.tensor(prompt)
        mask[r, width - len(prompt):] = 1
    input_ids, mask = input_ids.to(device), mask.to(device)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)                            # [rows, width], 0 at the first real token
    generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    stops = _stop_ids(eos_id)
    stop_tensor = torch.tensor(stops, dtype=torch.long, device=device)
    new_tokens = []
    cache = None
    tokens_in: dict[str, torch.Tensor] = {"input_ids": input_ids}
    if any(images):  # the prompts' image tokens hold their features from the first step on (then in the cache)
        image_batch = _image_batch(images, prompts, width).to(device)
        tokens_in = {"inputs_embeds": vision.input_embeddings(model, input_ids, image_batch)}
        # Under multimodal RoPE (Qwen2-VL) `[3, rows, width]`; the prompt ends in text, whose 3 axes are equal, so
        # each new token is the last position + 1 on every axis, as for 1-axis positions.
        position_ids = vision.decoder_position_ids(model, input_ids, position_ids, image_batch)
    for _ in range(max_new_tokens):
        out = model(**tokens_in, attention_mask=mask, position_ids=position_ids, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        next_ids = choose_tokens(out.logits[:, -1].float(), temperature, top_p, generators)   # [rows]
        next_ids = next_ids.masked_fill(finished, pad_id)
        new_tokens.append(next_ids)
        finished |= torch.isin(next_ids, stop_tensor)
        if finished.all():
            break
        tokens_in = {"input_ids": next_ids[:, None]}
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        position_ids = position_ids[..., -1:] + 1
    tokens = torch.stack(new_tokens, dim=1).tolist() if new_tokens else [[] for _ in prompts]
    return [_cut_after_stop(row, stops) for row in tokens]


def _image_batch(images: list[ImageArrays], prompts: list[list[int]], width: int) -> ImageBatch:
    """The left-padded rows' images as training batches them: row r's prompt ends at the row's end, and each row
    with images is a prompt block of its own (numbered in row order, as its arrays are concatenated) whose
    completion is still to come."""
    rows = [r for r, arrays in enumerate(images) if arrays]
    inputs = {name: torch.from_numpy(np.concatenate([images[r][name] for r in rows])) for name in images[rows[0]]}
    shown_at = [(r * width + width - len(prompts[r]), len(prompts[r]), number, len(prompts[r]))
                for number, r in enumerate(rows)]
    return ImageBatch(inputs, torch.tensor(shown_at, dtype=torch.long).view(-1, 4))


def _stop_ids(eos_id: int | Sequence[int] | None) -> list[int]:
    return [] if eos_id is None else [eos_id] if isinstance(eos_id, int) else list(eos_id)


def _cut_after_stop(tokens: list[int], stops: list[int]) -> list[int]:
    first = next((i for i, token in enumerate(tokens) if token in stops), None)
    return tokens if first is None else tokens[:first + 1]


def _row_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """A distinct 63-bit seed per (seed, prompt, sample), stable across runs and batch sizes."""
    return (seed * 1_000_003 + prompt_index * 9_176 + sample_index * 7_919_113) % (2**63 - 1)


# ---- text in, text out --------------------------------------------------------------------------------------


def encode_prompts(tokenizer: Any, prompts: Sequence[Text]) -> list[list[int]]:
    """Prompt token ids exactly as training tokenizes prompts (BOS once; messages through the chat template)."""
    try:
        return tokenization.encode_prompts(tokenizer, prompts)
    except DPOError:
        raise
    except Exception as err:  # the Rust tokenizer raises a bare Exception for text it cannot encode
        raise DPOError(f"generate: could not tokenize a prompt ({str(err).strip() or type(err).__name__})") from None


def encode_image_prompts(processor: Any, prompts: Sequence[Text], images: Sequence[Sequence[image_column.ImageSource]],
                         ) -> tuple[list[list[int]], list[ImageArrays]]:
    """Prompt ids and image arrays through a vision-language model's processor, as training encodes a prompt
    (`data.multimodal`): messages through its chat template with the generation prompt (content as parts),
    plain text with its image token once per image and the tokenizer's BOS; the image tokens expanded."""
    bos = multimodal.text_tokenizer(processor).bos_token_id
    all_ids, all_arrays = [], []
    for index, (prompt, sources) in enumerate(zip(prompts, images)):
        try:
            opened = [image_column.open_image(source, f"prompt {index}, image {i}") for i, source in enumerate(sources)]
        except image_column.BadImage as bad:
            raise DPOError(f"generate: {bad}") from None
        if isinstance(prompt, str):
            if prompt.count(processor.image_token) != len(opened):
                raise DPOError(f"generate: prompt {index} holds {prompt.count(processor.image_token)} image "
                               f"placeholders ({processor.image_token}) for {len(opened)} images; put one where each "
                               "image goes")
            text = prompt
        else:
            text = processor.apply_chat_template(image_column.as_parts(prompt), add_generation_prompt=True,
                                                 tokenize=False)
        encoded = processor(text=[text], images=[opened] if opened else None, add_special_tokens=isinstance(prompt, str),
                            return_tensors="np")
        ids = encoded["input_ids"][0].tolist()
        all_ids.append(ids[1:] if bos is not None and ids[:2] == [bos, bos] else ids)
        all_arrays.append(multimodal.image_arrays(encoded) if opened else {})
    return all_ids, all_arrays


def stop_ids(tokenizer: Any, prompts: Sequence[Text]) -> list[int]:
    """EOS, and for chat prompts the template's end of turn: where a completion ends."""
    stops = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    end_of_turn = (tokenization.end_of_turn_id(tokenizer) if any(not isinstance(p, str) for p in prompts)
                   else None)
    return stops + ([end_of_turn] if end_of_turn is not None and end_of_turn not in stops else [])


def completion_text(tokenizer: Any, prompt_ids: list[int], completion_ids: list[int]) -> str:
    """The completion as text that continues the prompt: decode(prompt + completion) minus decode(prompt).

    Decoding the completion alone loses the separator some tokenizers put between words (word-level and
    SentencePiece ones); the difference keeps it, so `prompt + completion` re-tokenizes to the same ids.
    """
    prompt = tokenizer.decode(prompt_ids, skip_special_tokens=True)
    full = tokenizer.decode(prompt_ids + completion_ids, skip_special_tokens=True)
    if full.startswith(prompt):
        return full[len(prompt):]
    return tokenizer.decode(completion_ids, skip_special_tokens=True)


def sample_texts(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[Text],
                 images: Sequence[Sequence[image_column.ImageSource]] | None = None, **options: Any,
                 ) -> list[tuple[Sample, str]]:
    """`sample` on text or message-list prompts, with each prompt's images (`images`, for a vision-language
    model's processor); each sample with its completion text. `options` as `sample`'s keywords."""
    arrays = None
    if multimodal.is_processor(tokenizer):
        ids, arrays = encode_image_prompts(tokenizer, prompts, images or [()] * len(prompts))
        tokenizer = multimodal.text_tokenizer(tokenizer)
    elif images and any(images):
        raise DPOError("generate: the prompts have images but the model's tokenizer has no image processor (a "
                       "text-only model); use a vision-language model, or drop the image column")
    else:
        ids = encode_prompts(tokenizer, prompts)
    samples = sample(model, ids, eos_id=stop_ids(tokenizer, prompts), pad_id=tokenizer.pad_token_id, images=arrays,
                     **options)
    return [(s, completion_text(tokenizer, s.prompt_ids, s.completion_ids)) for s in samples]


def read_prompts(path: str, field: str = "prompt") -> list[Text]:
    """The `field` of every record of a JSONL/JSON/Parquet file: a string, or a list of chat messages. Records
    with images are refused here (nothing dropped silently): `read_image_prompts` reads them."""
    prompts, images = read_image_prompts(path, field)
    if any(images):
        raise DPOError(f"{path}: prompt {next(i for i, found in enumerate(images) if found)} has images, which "
                       "this command does not take; give text prompts")
    return prompts


def read_image_prompts(path: str, field: str = "prompt",
                       ) -> tuple[list[Text], list[tuple[image_column.ImageSource, ...]]]:
    """The `field` of every record (a string, or chat messages whose contents may be parts with `{"type":
    "image"}` placeholders) and the record's images (`images` / `image`: paths relative to the file, checked
    to open; one per placeholder of a message-list prompt)."""
    base = Path(path) if Path(path).is_dir() else Path(path).parent
    prompts: list[Text] = []
    images = []
    for where, record in read_records(path):
        value = record.get(field)
        is_messages = isinstance(value, list) and value and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and _is_content(m.get("content")) for m in value)
        if not isinstance(value, str) and not is_messages:
            raise DPOError(f"{where}: field '{field}' must be a string or a non-empty list of "
                           f"{{\"role\": str, \"content\": str}} messages, got {json.dumps(value)[:80]}")
        try:
            sources = image_column.column_sources(record, base)
        except image_column.BadImage as bad:
            raise DPOError(f"{where}: {bad}") from None
        if isinstance(value, list) and image_column.placeholder_count(value) != len(sources):
            raise DPOError(f"{where}: the prompt has {image_column.placeholder_count(value)} image placeholders "
                           f"({{\"type\": \"image\"}}) for {len(sources)} images; give one image per placeholder")
        prompts.append(value)
        images.append(sources)
    if not prompts:
        raise DPOError(f"{path}: no prompts found")
    return prompts, images


def _is_content(content: Any) -> bool:
    """A message content: text, or parts (`{"type": "text", "text": ...}` and `{"type": "image"}`)."""
    return isinstance(content, str) or isinstance(content, list) and all(
        image_column.is_image_part(part) or isinstance(part, dict) and part.get("type") == "text"
        and isinstance(part.get("text"), str) for part in content)


def write_samples(path: str | Path, prompts: Sequence[Text], texts: Sequence[tuple[Sample, str]],
                  images: Sequence[Sequence[image_column.ImageSource]] | None = None) -> Path:
    """One JSON line per sample: prompt, completion, prompt_index, sample_index, completion_tokens; for a prompt
    with images, `images` (absolute paths), or `images_as_bytes` (their count) when some came as bytes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for s, text in texts:
            record = {"prompt": prompts[s.prompt_index], "completion": text, "prompt_index": s.prompt_index,
                      "sample_index": s.sample_index, "completion_tokens": len(s.completion_ids)}
            record |= _image_fields(images[s.prompt_index] if images else ())
            handle.write(json.dumps(record) + "\n")
    return path


def _image_fields(sources: Sequence[image_column.ImageSource]) -> dict[str, Any]:
    if not sources:
        return {}
    if all(isinstance(source, str) for source in sources):
        return {"images": list(sources)}
    return {"images_as_bytes": len(sources)}  # JSON holds no bytes: the prompt_index finds them in the prompts file


def generate_file(*, model: str, prompts: str, out: str, field: str = "prompt", device: str = "auto",
                  dtype: str = "float32", batch_size: int = 32, **sampling: Any) -> Path:
    """`dpo generate`: sample completions of every prompt in a file from a saved model, write them as JSONL."""
    texts_in, images = read_image_prompts(prompts, field)
    tokenizer = models.load_tokenizer(model)
    policy = models.load_model(model, dtype=dtype).to(distributed.resolve_device(device))
    texts = sample_texts(policy, tokenizer, texts_in, images, batch_size=batch_size, **sampling)
    path = write_samples(out, texts_in, texts, images)
    print(f"wrote {len(texts)} samples of {len(texts_in)} prompts to {path}", flush=True)
    return path
