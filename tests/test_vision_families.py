"""Vision-language DPO on tiny random Qwen2-VL, Qwen2.5-VL, Idefics3 and SmolVLM models, built here (no download):
in every layout, the log-probs and gradients equal each model's own forward on prompt + completion.

Qwen2-VL's images take as many tokens as their resolution gives, and its multimodal RoPE puts them on a 3-axis
grid; Idefics3 splits each image into tiles plus a global view, `pixel_values` `(batch, images, C, H, W)` with a
`pixel_attention_mask`. The reference forward gets the image arrays straight from each family's image processor
and lets the model place everything itself (Qwen2-VL's positions from its own `get_rope_index`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dpokit import vision
from dpokit.batching import LAYOUTS, make_batch
from dpokit.data import formats, multimodal
from dpokit.logprobs import SequenceScorer, sequence_logps

from conftest import build_tokenizer
from test_vision import write_image_pairs

PIL = pytest.importorskip("PIL.Image")

# The families' chat templates (content parts; `{"type": "image"}` is the image placeholder), as they ship them.
QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for part in message['content'] %}{% if part['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
IDEFICS3_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
FAMILIES = ("qwen2_vl", "qwen2_5_vl", "idefics3", "smolvlm")


def _images_only(processor_class):
    """`processor_class` without its video processor: transformers builds Qwen's only with torchvision, which
    this environment lacks (images never reach it)."""
    return type(processor_class.__name__, (processor_class,), {"get_attributes": classmethod(
        lambda cls: ["image_processor", "tokenizer"])})


def build_qwen(family: str, path: Path, seed: int = 0):
    """A random Qwen2-VL / Qwen2.5-VL (1-layer vision tower with 14x14 patches merged 2x2, 2-layer text model,
    multimodal RoPE sections 2+1+1 of a 8-wide head) and its processor (images resized between 28x28 and 56x84:
    1 to 6 image tokens, on non-square grids)."""
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                              Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor)
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = build_tokenizer(path)
    tokenizer.add_tokens(["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                          "<|video_pad|>"], special_tokens=True)
    ids = {name: tokenizer.convert_tokens_to_ids(f"<|{name}|>") for name in
           ("image_pad", "video_pad", "vision_start", "vision_end")}
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
                bos_token_id=1, eos_token_id=2, pad_token_id=0)
    vision_common = dict(depth=1, num_heads=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    tokens = dict(image_token_id=ids["image_pad"], video_token_id=ids["video_pad"],
                  vision_start_token_id=ids["vision_start"], vision_end_token_id=ids["vision_end"])
    if family == "qwen2_vl":
        config = Qwen2VLConfig(vision_config=dict(embed_dim=16, hidden_size=32, mlp_ratio=2, **vision_common),
                               text_config=text, **tokens)
        model_class, processor_class = Qwen2VLForConditionalGeneration, Qwen2VLProcessor
    else:
        config = Qwen2_5_VLConfig(vision_config=dict(hidden_size=16, intermediate_size=32, out_hidden_size=32,
                                                     window_size=28, fullatt_block_indexes=[0], **vision_common),
                                  text_config=text, **tokens)
        model_class, processor_class = Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
    torch.manual_seed(seed)
    model = model_class(config)
    image_processor = Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=56 * 84, patch_size=14, merge_size=2,
                                               temporal_patch_size=2)
    processor = _images_only(processor_class)(image_processor=image_processor, tokenizer=tokenizer,
                                              chat_template=QWEN_TEMPLATE)
    return model, processor


def build_idefics3(path: Path, seed: int = 0, family: str = "idefics3"):
    """A random Idefics3 (1-layer SigLIP tower on 32x32 tiles of 8x8 patches, pixel shuffle 2: 4 image tokens per
    tile; 2-layer Llama) and its processor (images resized to 64 on the long side, split into 32x32 tiles plus a
    32x32 global view). `family="smolvlm"`: the same as a SmolVLM model, with Idefics3's processor (SmolVLM's own
    lays the images out alike, but transformers builds it only with torchvision and num2words)."""
    from transformers import (Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor, SmolVLMConfig,
                              SmolVLMForConditionalGeneration)
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    tokenizer = build_tokenizer(path)
    tokenizer.add_tokens(["<|im_start|>", "<fake_token_around_image>", "<image>", "<end_of_utterance>",
                          "<global-img>", *(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7))],
                         special_tokens=True)
    config_class, model_class = ((SmolVLMConfig, SmolVLMForConditionalGeneration) if family == "smolvlm" else
                                 (Idefics3Config, Idefics3ForConditionalGeneration))
    config = config_class(
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        text_config=dict(model_type="llama", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0),
        scale_factor=2, image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    torch.manual_seed(seed)
    model = model_class(config)
    image_processor = Idefics3ImageProcessorPil(size={"longest_edge": 64}, max_image_size={"longest_edge": 32})
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=4,
                                  chat_template=IDEFICS3_TEMPLATE)
    return model, processor


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    model, processor = (build_qwen(request.param, path) if request.param.startswith("qwen")
                        else build_idefics3(path, family=request.param))
    model.eval()
    return request.param, model, processor


@pytest.fixture(scope="module")
def image_data(tmp_path_factory) -> Path:
    """Images of several sizes and aspect ratios: two pairs with the same prompt and image, one with a tall
    image, one with two images."""
    return write_image_pairs(tmp_path_factory.mktemp("image-data"), [(40, 60), (80, 30), (30, 30)],
                             ["img/2.png", "img/1.png"])


def tokenized(image_data, processor):
    """The file's pairs, a plain-text pair with the processor's image placeholder and a pair without images."""
    pairs, _ = formats.load_pairs(str(image_data))
    placeholder = ("<|vision_start|><|image_pad|><|vision_end|>" if processor.image_token == "<|image_pad|>"
                   else processor.image_token)
    plain = formats.PreferencePair(f"{placeholder}Question: what is it? Answer:", " eight legs.", " Paris.",
                                   images=(str(image_data.parent / "img" / "1.png"),))
    text = formats.PreferencePair("Question: how many legs? Answer:", " eight legs.", " Paris.")
    out, report = multimodal.tokenize_pairs([*pairs, plain, text], processor, max_length=512)
    assert report.boundary_mismatches == 0
    return out, [list(p.images) for p in pairs] + [list(plain.images), []]


def own_forward_logps(model, processor, prompt_ids, completion, images) -> torch.Tensor:
    """The model's own forward on prompt + completion, the image arrays straight from the image processor (the
    positions, for Qwen2-VL, from the model): the completion tokens' summed log-probs."""
    ids = torch.tensor([prompt_ids + completion])
    inputs: dict = {"input_ids": ids}
    if images:
        opened = [PIL.open(path).convert("RGB") for path in images]
        arrays = processor.image_processor(images=[opened] if "pixel_attention_mask" in
                                           processor.image_processor.model_input_names else opened,
                                           return_tensors="pt")
        inputs.update({k: v for k, v in arrays.items() if k in ("pixel_values", "image_grid_thw",
                                                                  "pixel_attention_mask")})
        if "image_grid_thw" in inputs:  # Qwen2-VL's processor marks image tokens with 1
            inputs["mm_token_type_ids"] = (ids == processor.image_token_id).int()
    logits = model(**inputs).logits[0, :-1].float()
    per_token = logits.log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
    return per_token[len(prompt_ids) - 1:].sum()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_logps_and_gradients_equal_the_models_own_forward(family, image_data, layout, one_thread):
    name, model, processor = family
    pairs, images = tokenized(image_data, processor)
    weights = torch.linspace(0.5, 1.5, 2 * len(pairs))
    model.zero_grad(set_to_none=True)
    expected = torch.stack([own_forward_logps(model, processor, p.prompt_ids, c, i)
                            for p, i in zip(pairs, images) for c in (p.chosen_ids, p.rejected_ids)])
    (expected * weights).sum().backward()
    expected_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    batch = make_batch(pairs, layout=layout, pad_id=0)
    logps = sequence_logps(SequenceScorer(model), batch)
    got = torch.stack([logps.chosen, logps.rejected], dim=1).reshape(-1)
    torch.testing.assert_close(got, expected.detach(), atol=1e-5, rtol=1e-6)  # |log p| ~ 60: rtol alone would pass 6e-4
    (got * weights).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == expected_grads.keys()
    tower = vision.vision_tower(model)
    assert tower is not None and any(p.grad is not None for p in tower.parameters())
    for param, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[param], atol=1e-5, rtol=1e-5, msg=param)
    model.zero_grad(set_to_none=True)


def test_each_prompts_images_are_encoded_once_per_batch(family, image_data, one_thread):
    """One vision tower call per forward, in every layout, over each distinct prompt's images once: 4 images for
    the 5 pairs with images (two pairs share their prompt; two other prompts show the same image)."""
    name, model, processor = family
    pairs, images = tokenized(image_data, processor)
    distinct = [["img/0.png"], ["img/1.png"], ["img/2.png", "img/1.png"]]
    expected = sum(tiles(processor, image_data.parent / path) for paths in distinct for path in paths)
    calls = []
    tower = vision.vision_tower(model)
    handle = tower.register_forward_hook(lambda module, args, kwargs, output: calls.append(1), with_kwargs=True)
    try:
        with torch.no_grad():
            for layout in LAYOUTS:
                batch = make_batch(pairs, layout=layout, pad_id=0)
                sequence_logps(SequenceScorer(model), batch)
                assert batch.images.inputs["pixel_values"].shape[0] == expected
    finally:
        handle.remove()
    assert len(calls) == len(LAYOUTS)


def tiles(processor, path: Path) -> int:
    """Rows of `pixel_values` for one image alone: Qwen2-VL's patches, Idefics3's tiles and global view."""
    arrays = processor.image_processor(images=[[PIL.open(path).convert("RGB")]], return_tensors="np")
    shape = arrays["pixel_values"].shape
    return shape[1] if len(shape) == 5 else shape[0]


def test_freeze_vision_and_lora_on_the_language_model_only(family, image_data, one_thread):
    """`--freeze-vision` leaves each family's tower without gradients; LoRA adapts the text model's layers only
    (Idefics3 calls its language model `text_model`)."""
    peft = pytest.importorskip("peft")
    name, model, processor = family
    language = "language_model" if name.startswith("qwen") else "text_model"
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=vision.language_lora_targets(
        model, "all-linear")))
    try:
        adapted = [n for n, _ in wrapped.named_parameters() if "lora_A" in n]
        assert adapted and all(f".{language}." in n for n in adapted)
        assert {"q_proj", "down_proj"} <= {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n in adapted}
    finally:
        wrapped.unload()
        model.requires_grad_(True)  # PEFT froze the base model's weights; the fixture's model is shared
    vision.freeze_vision(model)
    try:
        pairs, _ = tokenized(image_data, processor)
        logps = sequence_logps(SequenceScorer(model), make_batch(pairs, layout="blocks", pad_id=0))
        (logps.chosen - logps.rejected).sum().backward()
        tower = list(vision.vision_tower(model).parameters())
        assert tower and all(p.grad is None for p in tower)
        assert any(p.grad is not None for n, p in model.named_parameters() if f".{language}." in n)
    finally:
        vision.vision_tower(model).requires_grad_(True)
        model.zero_grad(set_to_none=True)


def test_a_pairs_image_arrays_feed_the_models_own_forward(family, image_data, one_thread):
    """`vision.model_image_inputs` turns a pair's kept arrays (images first, Idefics3's text axis dropped) back
    into what the model's forward takes (as generation needs them): the same log-probs as the image processor's."""
    name, model, processor = family
    pairs, images = tokenized(image_data, processor)
    with torch.no_grad():
        for pair, paths in zip(pairs[2:5], images[2:5]):
            ids = torch.tensor([pair.prompt_ids + pair.chosen_ids])
            inputs = vision.model_image_inputs(model, pair.image_inputs)
            if name.startswith("qwen"):
                inputs["mm_token_type_ids"] = (ids == processor.image_token_id).int()
            logits = model(input_ids=ids, **inputs).logits[0, :-1].float()
            got = logits.log_softmax(-1).gather(-1, ids[0, 1:, None])[len(pair.prompt_ids) - 1:].sum()
            expected = own_forward_logps(model, processor, pair.prompt_ids, pair.chosen_ids, paths)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-6)
