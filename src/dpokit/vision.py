"""Vision-language models: the language model's input embeddings with each prompt's image features in place.

A LLaVA-style model turns the image into features (vision tower, then projector) and writes them over the
embeddings of the prompt's image tokens; the language model then runs on `inputs_embeds`. Here the features of a
batch are computed once per distinct prompt (an `ImageBatch` holds each prompt's images once) and copied to
every place that prompt appears, so the vision encoder runs once per pair, or once per prompt for several
responses, instead of once per sequence and per model as TRL runs it. With the prompt's image tokens holding the
same vectors, the decoder sees exactly what the model's own forward would give it, in every layout.

Qwen2-VL and Qwen2.5-VL place tokens with multimodal RoPE: three position axes (time, height, width), on which an
image's tokens sit on its grid and the text after it continues from the largest position so far + 1 on all three.
`decoder_position_ids` gives every token the 3-axis position it has in the unshared forward: each prompt's from
the model's own `get_rope_index` (once per distinct prompt), and each completion token its layout position (which
restarts at the prompt's length in every layout) plus the prompt's shift, max position + 1 - length: a completion
is text only, so it continues the prompt exactly as in prompt + completion forwarded alone.

A prompt's image arrays are kept with its images along the first axis (`data.multimodal`); `model_image_inputs`
gives them back in the shapes the model's own forward takes (Idefics3 / SmolVLM: a batch axis), as generation
needs them. `freeze_vision` keeps the vision tower out of training (`--freeze-vision`, on by default), and
`language_lora_targets` points LoRA at the language model's layers only.
"""

from __future__ import annotations

from typing import Any

import torch

from .batching import ImageBatch

VISION_TOWERS = ("vision_tower", "visual", "vision_model")  # LLaVA; Qwen2-VL; Idefics3 / SmolVLM
LANGUAGE_MODELS = ("language_model", "text_model")          # LLaVA, Qwen2-VL; Idefics3 / SmolVLM


def is_vision_model(model: torch.nn.Module) -> bool:
    """Whether `model` (or the model a PEFT wrap holds) takes images: a config with a `vision_config`."""
    return getattr(getattr(model, "config", None), "vision_config", None) is not None


def image_token_id(model: torch.nn.Module) -> int:
    config = model.config
    token_id = getattr(config, "image_token_id", None)
    return int(token_id if token_id is not None else config.image_token_index)


def input_embeddings(model: torch.nn.Module, input_ids: torch.Tensor, images: ImageBatch) -> torch.Tensor:
    """`inputs_embeds` `[rows, seq, hidden]` of `input_ids`, each image token's embedding replaced by its feature:
    the k-th image token of a prompt segment gets the k-th feature row of that prompt's images."""
    embeds = model.get_input_embeddings()(input_ids)                    # [rows, seq, hidden]
    features = image_features(model, images).to(embeds.dtype)           # [feature rows, hidden]
    is_image = (input_ids == image_token_id(model)).view(-1).cpu()
    shown_at = images.shown_at.tolist()
    counts: dict[int, int] = {}
    for start, length, prompt, _ in shown_at:
        counts.setdefault(prompt, int(is_image[start:start + length].sum()))
    offsets, total = {}, 0
    for prompt in sorted(counts):
        offsets[prompt], total = total, total + counts[prompt]
    if total != features.shape[0]:
        raise ValueError(f"the batch's prompts hold {total} image tokens for {features.shape[0]} image features; "
                         "the data was tokenized with another processor than this model's")
    positions, sources = [], []
    for start, length, prompt, _ in shown_at:
        where = start + torch.nonzero(is_image[start:start + length]).view(-1)
        positions.append(where)
        sources.append(torch.arange(offsets[prompt], offsets[prompt] + where.numel()))
    positions_t = torch.cat(positions).to(embeds.device)
    sources_t = torch.cat(sources).to(embeds.device)
    flat = embeds.view(-1, embeds.shape[-1]).index_copy(0, positions_t, features.index_select(0, sources_t))
    return flat.view_as(embeds)


def image_features(model: torch.nn.Module, images: ImageBatch) -> torch.Tensor:
    """The projected features of every image in `images`, concatenated in order: `[feature rows, hidden]`."""
    output = model.get_image_features(**model_image_inputs(model, images.inputs))
    features = getattr(output, "pooler_output", output)                 # transformers 5 returns an output object
    if isinstance(features, (list, tuple)):
        features = torch.cat([f.reshape(-1, f.shape[-1]) for f in features])
    return features.reshape(-1, features.shape[-1])


def model_image_inputs(model: torch.nn.Module, arrays: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Image arrays as kept per prompt (`TokenizedPair.image_inputs`, or a batch's concatenated in an
    `ImageBatch`: images along the first axis) -> as the model's forward and `get_image_features` take them:
    tensors, `pixel_values` in the model's dtype; for Idefics3 / SmolVLM, which take (batch, images, C, H, W),
    all the images as one row (the model flattens them back into one image list)."""
    inputs = {name: torch.as_tensor(value) for name, value in arrays.items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(_dtype(model))
    if "pixel_attention_mask" in inputs:
        inputs = {name: value[None] for name, value in inputs.items()}
    return inputs


def decoder_position_ids(model: torch.nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor,
                         images: ImageBatch) -> torch.Tensor:
    """The position ids the decoder takes for a batch with images: the layout's `position_ids` `[rows, seq]`, or
    for a model with multimodal RoPE (a `get_rope_index`: Qwen2-VL, Qwen2.5-VL) `[3, rows, seq]` (see above)."""
    rope = _rope_index_owner(model)
    if rope is None:
        return position_ids
    prompt_positions, shifts, row_of = prompt_rope_positions(rope, input_ids, images)
    flat = position_ids.reshape(1, -1).repeat(3, 1)                      # [3, rows*seq]
    for (start, length, _, span), row in zip(images.shown_at.tolist(), row_of):
        flat[:, start:start + length] = prompt_positions[:, row, :length]
        flat[:, start + length:start + span] += shifts[row]
    return flat.view(3, *position_ids.shape)


def prompt_rope_positions(rope: torch.nn.Module, input_ids: torch.Tensor, images: ImageBatch,
                          ) -> tuple[torch.Tensor, list[int], list[int]]:
    """The model's `get_rope_index` on the batch's distinct prompts (token ids and images; two prompts may show
    the same images in other text), each a padded row with its own images' grids: their positions
    `[3, prompts, longest]`, each one's shift (max position + 1 - length), and the row of each `shown_at` segment."""
    flat_ids = input_ids.view(-1)
    is_image = flat_ids == image_token_id(rope)
    rows: dict[tuple[int, tuple[int, ...]], int] = {}
    row_of, row_ids, images_of = [], [], {}
    for start, length, number, _ in images.shown_at.tolist():
        ids = flat_ids[start:start + length]
        key = (number, tuple(ids.tolist()))
        if key not in rows:
            rows[key] = len(rows)
            row_ids.append(ids)
        row_of.append(rows[key])
        # One image is one run of image tokens: the prompt's images are that many `image_grid_thw` rows.
        runs = is_image[start:start + length].int().diff(prepend=is_image.new_zeros(1).int())
        images_of[number] = int((runs == 1).sum())
    grids = images.inputs["image_grid_thw"].split([images_of[n] for n in sorted(images_of)])
    ids = flat_ids.new_zeros(len(row_ids), max(len(r) for r in row_ids))
    mask = torch.zeros_like(ids)
    for i, r in enumerate(row_ids):
        ids[i, :len(r)], mask[i, :len(r)] = r, 1
    token_types = (ids == image_token_id(rope)).int() * mask             # 1 marks an image token, as Qwen's processor
    positions, shifts = rope.get_rope_index(ids, mm_token_type_ids=token_types, attention_mask=mask,
                                            image_grid_thw=torch.cat([grids[number] for number, _ in rows]))
    return positions, shifts.view(-1).tolist(), row_of


def _rope_index_owner(model: torch.nn.Module) -> torch.nn.Module | None:
    """The module of `model` (or of a PEFT wrap of it) that computes multimodal RoPE positions, or None."""
    return next((m for m in model.modules() if callable(getattr(type(m), "get_rope_index", None))), None)


def vision_tower(model: torch.nn.Module) -> torch.nn.Module | None:
    """The vision encoder inside `model` (found by its attribute name in the families we know), or None."""
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in VISION_TOWERS:
            return module
    return None


def freeze_vision(model: torch.nn.Module) -> None:
    """No gradient for the vision tower: it keeps its weights (the projector still trains)."""
    tower = vision_tower(model)
    if tower is not None:
        tower.requires_grad_(False)


def language_lora_targets(model: torch.nn.Module, target_modules: str) -> str:
    """A PEFT `target_modules` regex for the same layers in the language model only (not the vision tower nor
    the projector): "all-linear" or `q_proj,v_proj`-style names, as `--lora-target-modules` takes them."""
    if target_modules == "all-linear":
        names = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                        if isinstance(module, torch.nn.Linear)
                        and any(f".{part}." in f".{name}" for part in LANGUAGE_MODELS)})
    else:
        names = [name.strip() for name in target_modules.split(",") if name.strip()]
    return rf".*\b({'|'.join(LANGUAGE_MODELS)})\b.*\.({'|'.join(names)})$"


def _dtype(model: torch.nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype
