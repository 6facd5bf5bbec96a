"""The visual task and its tiny model: images of one coloured shape, "What colour is the shape?", and a random
LLaVA (CLIP vision tower -> projector -> Llama) with its processor, built here from parts (nothing downloaded).

The answer is in the image only: the prompt's text is the same for every record, so a model that answers right
more often than chance reads the colour from the image features.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (235, 215, 30),
           "purple": (140, 40, 170), "orange": (245, 140, 20)}
SHAPES = ("square", "circle", "triangle")
QUESTION = "What colour is the shape?"

# Content parts, TRL's format: `{"type": "image"}` renders as the processor's image token.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def answer(colour: str) -> str:
    return f"The shape is {colour}."


def draw(path: Path, colour: str, shape: str, rng: random.Random, size: int) -> None:
    """One shape of a random size (a third to two thirds of the image) at a random place, on a light grey
    background with pixel noise."""
    from PIL import Image, ImageDraw

    image = Image.effect_noise((size, size), 24).convert("RGB")
    image = Image.blend(Image.new("RGB", (size, size), (200, 200, 200)), image, 0.25)
    side = rng.randint(size // 3, 2 * size // 3)
    x, y = rng.randint(0, size - side), rng.randint(0, size - side)
    box = (x, y, x + side - 1, y + side - 1)
    pen = ImageDraw.Draw(image)
    if shape == "square":
        pen.rectangle(box, fill=COLOURS[colour])
    elif shape == "circle":
        pen.ellipse(box, fill=COLOURS[colour])
    else:
        pen.polygon([(x + side // 2, y), (x, y + side - 1), (x + side - 1, y + side - 1)], fill=COLOURS[colour])
    image.save(path)


def write_records(folder: Path, name: str, count: int, rng: random.Random, size: int) -> dict[str, Path]:
    """`count` images under `folder/img/`, and three files over them: `{name}_sft.jsonl` (prompt + the right
    answer), `{name}_pairs.jsonl` (chosen the right colour, rejected another drawn at random) and
    `{name}_prompts.jsonl` (the prompts alone, with each image's colour as `colour`)."""
    (folder / "img").mkdir(parents=True, exist_ok=True)
    sft, pairs, prompts = [], [], []
    for i in range(count):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        image = f"img/{name}-{i}.png"
        draw(folder / image, colour, shape, rng, size)
        prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
        wrong = rng.choice([c for c in COLOURS if c != colour])
        sft.append({"prompt": prompt, "completion": [{"role": "assistant", "content": answer(colour)}],
                    "images": [image]})
        pairs.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": answer(colour)}],
                      "rejected": [{"role": "assistant", "content": answer(wrong)}], "images": [image]})
        prompts.append({"prompt": prompt, "images": [image], "colour": colour, "shape": shape})
    files = {}
    for kind, rows in (("sft", sft), ("pairs", pairs), ("prompts", prompts)):
        files[kind] = folder / f"{name}_{kind}.jsonl"
        files[kind].write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return files


def build_model(path: Path, *, image_size: int, vision_width: int, text_width: int, layers: int = 2,
                seed: int = 0) -> int:
    """A random LLaVA and its processor, saved with `save_pretrained`: a CLIP tower on `image_size` images of
    14x14 patches ((image_size / 14)^2 image tokens per image) and a Llama, `layers` deep each, and a byte-level
    BPE tokenizer trained here on the task's sentences. Returns the model's parameter count."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast)

    specials = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|end|>", "<image>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = [QUESTION] + [answer(c) for c in COLOURS] + [f"It is a {s}." for s in SHAPES]
    bpe.train_from_iterator(corpus * 10, trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bos = bpe.token_to_id("<s>")
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                        additional_special_tokens=specials[3:])
    assert image_size % 14 == 0, "image_size must be a multiple of the 14-pixel patch"
    vision = CLIPVisionConfig(hidden_size=vision_width, intermediate_size=2 * vision_width,
                              num_hidden_layers=layers,
                              num_attention_heads=4, image_size=image_size, patch_size=14,
                              projection_dim=vision_width)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=text_width, intermediate_size=2 * text_width,
                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=1024,
                       bos_token_id=bos, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids(
        "<image>"), vision_feature_layer=-1, vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.save_pretrained(path)
    images = CLIPImageProcessor(size={"shortest_edge": image_size},
                                crop_size={"height": image_size, "width": image_size})
    LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy="default",
                   chat_template=CHAT_TEMPLATE, num_additional_image_tokens=1).save_pretrained(path)
    return sum(p.numel() for p in model.parameters())
