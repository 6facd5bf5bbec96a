"""Vision-language models: the language model's input embeddings with each prompt's image features in place.

A LLaVA-style model turns the image into features (vision tower, then projector) and writes them over the
embeddings of the prompt's image tokens; the language model then runs on `inputs_embeds`. Here the features of a
batch are computed once per distinct prompt (an `ImageBatch` holds each prompt's images once) and copied to
every place that prompt appears, so the vision encoder runs once per pair, or once per prompt for several
responses, instead of once per sequence and per model as TRL runs it. With the prompt's image tokens holding the
same vectors, the decoder sees exactly what the model's own forward would give it, in every layout.

`freeze_vision` keeps the vision tower out of training (`--freeze-vision`, on by default), and
`language_lora_targets` points LoRA at the language model's layers only.
"""

from __future__ import annotations

from typing import Any

import torch

from .batching import ImageBatch

VISION_TOWERS = ("vision_tower", "visual", "vision_model")  # LLaVA; Qwen2-VL; Idefics3 / SmolVLM


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
    for start, length, prompt in shown_at:
        counts.setdefault(prompt, int(is_image[start:start + length].sum()))
    offsets, total = {}, 0
    for prompt in sorted(counts):
        offsets[prompt], total = total, total + counts[prompt]
    if total != features.shape[0]:
        raise ValueError(f"the batch's prompts hold {total} image tokens for {features.shape[0]} image features; "
                         "the data was tokenized with another processor than this model's")
    positions, sources = [], []
    for start, length, prompt in shown_at:
        where = start + torch.nonzero(is_image[start:start + length]).view(-1)
        positions.append(where)
        sources.append(torch.arange(offsets[prompt], offsets[prompt] + where.numel()))
    positions_t = torch.cat(positions).to(embeds.device)
    sources_t = torch.cat(sources).to(embeds.device)
    flat = embeds.view(-1, embeds.shape[-1]).index_copy(0, positions_t, features.index_select(0, sources_t))
    return flat.view_as(embeds)


def image_features(model: torch.nn.Module, images: ImageBatch) -> torch.Tensor:
    """The projected features of every image in `images`, concatenated in order: `[feature rows, hidden]`."""
    inputs: dict[str, Any] = dict(images.inputs)
    inputs["pixel_values"] = inputs["pixel_values"].to(_dtype(model))
    output = model.get_image_features(**inputs)
    features = getattr(output, "pooler_output", output)                 # transformers 5 returns an output object
    if isinstance(features, (list, tuple)):
        features = torch.cat([f.reshape(-1, f.shape[-1]) for f in features])
    return features.reshape(-1, features.shape[-1])


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
                        if isinstance(module, torch.nn.Linear) and ".language_model." in f".{name}"})
    else:
        names = [name.strip() for name in target_modules.split(",") if name.strip()]
    return rf".*\blanguage_model\b.*\.({'|'.join(names)})$"


def _dtype(model: torch.nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype
