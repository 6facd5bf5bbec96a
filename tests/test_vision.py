"""Vision-language DPO on a tiny random LLaVA (a CLIP vision tower and a Llama text model, built here, no
download): images read from the data, tokenized with the processor, scored with the features computed once per
prompt, against the model's own forward on each prompt + completion."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dpokit import vision
from dpokit.batching import LAYOUTS, make_batch
from dpokit.data import formats, multimodal
from dpokit.data.preparation import DataSettings, prepare
from dpokit.errors import DPOError
from dpokit.logprobs import SequenceScorer, sequence_logps

from conftest import build_tokenizer

PIL = pytest.importorskip("PIL.Image")

# The tokenizer's chat template, with content parts: `{"type": "image"}` renders as the image token.
VISION_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def build_tiny_llava(path: Path, seed: int = 0) -> None:
    """A random LLaVA: CLIP tower (28x28 images, 14x14 patches: 4 image tokens) -> projector -> 2-layer Llama,
    and its processor (CLIP image processor + the test BPE tokenizer with an `<image>` token), saved."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tokenizer = build_tokenizer(path)
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    vision_config = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     image_size=28, patch_size=14, projection_dim=16)
    text_config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                              bos_token_id=1, eos_token_id=2, pad_token_id=0)
    config = LlavaConfig(vision_config=vision_config, text_config=text_config,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
                         vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    LlavaForConditionalGeneration(config).save_pretrained(path)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                   vision_feature_select_strategy="default", chat_template=VISION_TEMPLATE,
                   num_additional_image_tokens=1).save_pretrained(path)


def write_image(path: Path, seed: int, size: tuple[int, int] = (40, 30)) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    PIL.fromarray(pixels).save(path)
    return path


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llava")
    build_tiny_llava(path)
    return path


@pytest.fixture(scope="module")
def processor(llava_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(llava_dir)


@pytest.fixture
def llava(llava_dir):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(llava_dir, dtype=torch.float32)
    model.eval()
    return model


def user(text: str, images: int = 1) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": text}]}]


def assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def write_image_pairs(folder: Path, sizes: list[tuple[int, int]], two_images: list[str]) -> Path:
    """`folder/pairs.jsonl`: conversational pairs with images (paths relative to the file), the three images
    `img/0.png`.. drawn at `sizes`: two prompts with two responses each over `img/0.png`, one over `img/1.png`,
    one over `two_images`."""
    (folder / "img").mkdir()
    for i, size in enumerate(sizes):
        write_image(folder / "img" / f"{i}.png", i, size)
    rows = [
        {"prompt": user("What shape is this?"), "chosen": assistant("A red square."),
         "rejected": assistant("A blue fox."), "images": ["img/0.png"]},
        {"prompt": user("What shape is this?"), "chosen": assistant("A red square."),
         "rejected": assistant("Of course!"), "images": ["img/0.png"]},
        {"prompt": user("What shape is this?"), "chosen": assistant("A circle."),
         "rejected": assistant("A dog."), "images": ["img/1.png"]},
        {"prompt": user("Which is larger?", images=2), "chosen": assistant("The first."),
         "rejected": assistant("Paris."), "images": two_images},
    ]
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def image_data(tmp_path_factory) -> Path:
    """Two prompts with two responses each over the same image, one with another image, one with two images."""
    return write_image_pairs(tmp_path_factory.mktemp("image-data"), [(40, 30)] * 3, ["img/1.png", "img/2.png"])


def tokenized(image_data, processor):
    """The file's pairs and a plain-text pair (its image token written in the prompt), tokenized."""
    pairs, _ = formats.load_pairs(str(image_data))
    plain = formats.PreferencePair("<image>Question: what is it? Answer:", " eight legs.", " Paris.",
                                   images=(str(image_data.parent / "img" / "2.png"),))
    return multimodal.tokenize_pairs([*pairs, plain], processor, max_length=256)[0]


# ---- data -----------------------------------------------------------------------------------------------------


def test_images_are_read_relative_to_the_data_file(image_data):
    pairs, report = formats.load_pairs(str(image_data))
    assert report.format == "conversational" and len(pairs) == 4
    assert pairs[0].images == (str(image_data.parent / "img" / "0.png"),)
    assert len(pairs[3].images) == 2


def test_image_bytes_as_datasets_stores_them(tmp_path):
    """A Parquet file whose `images` column is `datasets`' Image feature: `{"bytes", "path"}` structs."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    image = write_image(tmp_path / "a.png", 0).read_bytes()
    table = pa.table({"prompt": ["<image>What?"], "chosen": [" A."], "rejected": [" B."],
                      "images": [[{"bytes": image, "path": None}]]})
    pq.write_table(table, tmp_path / "pairs.parquet")
    pairs, _ = formats.load_pairs(str(tmp_path / "pairs.parquet"))
    assert pairs[0].images == (image,)


def test_tokenized_prompt_holds_every_image_token(image_data, processor):
    image_id = multimodal.image_token_id(processor)
    for pair in tokenized(image_data, processor):
        n_images = pair.image_inputs["pixel_values"].shape[0]
        assert pair.prompt_ids.count(image_id) == 4 * n_images          # 2x2 patches per image
        assert image_id not in pair.chosen_ids and image_id not in pair.rejected_ids
    first = tokenized(image_data, processor)[0]
    text = processor.apply_chat_template(user("What shape is this?") + [
        {"role": "assistant", "content": [{"type": "text", "text": "A red square."}]}], tokenize=False)
    full = processor(text=[text], images=[PIL.open(image_data.parent / "img" / "0.png")], add_special_tokens=False)
    assert first.prompt_ids + first.chosen_ids == full["input_ids"][0]


@pytest.mark.parametrize("row, message", [
    ({"images": ["img/missing.png"]}, "image 0: file not found: "),
    ({"images": ["https://example.com/cat.png"]}, "is a URL; dpokit reads images offline"),
    ({"images": ["img/bad.png"]}, "is not a readable image"),
    ({"images": ["img/0.png", "img/0.png"]}, "the prompt has 1 image placeholders ({\"type\": \"image\"}) for 2 images"),
    ({"images": []}, "the prompt has 1 image placeholders ({\"type\": \"image\"}) for 0 images"),
])
def test_bad_images_are_one_line_naming_the_record(tmp_path, row, message):
    (tmp_path / "img").mkdir()
    write_image(tmp_path / "img" / "0.png", 0)
    (tmp_path / "img" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    record = {"prompt": user("What?"), "chosen": assistant("A."), "rejected": assistant("B."), **row}
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps(record) + "\n", encoding="utf-8")
    with pytest.raises(DPOError) as err:
        formats.load_pairs(str(data))
    assert str(err.value).startswith(f"{data}:1: ") and message in str(err.value) and "\n" not in str(err.value)


def test_plain_prompt_needs_one_image_token_per_image(tmp_path, processor):
    image = write_image(tmp_path / "a.png", 0)
    pair = formats.PreferencePair("Question: what?", " A.", " B.", images=(str(image),))
    with pytest.raises(DPOError, match=r"pair 0 \(images .*a\.png\): the prompt holds 0 image placeholders "
                                       r"\(<image>\) for 1 images"):
        multimodal.tokenize_pairs([pair], processor, max_length=64)


def test_image_column_with_a_text_only_model_is_refused(image_data, tokenizer):
    with pytest.raises(DPOError, match="has no image processor \\(a text-only model\\)"):
        prepare(DataSettings(str(image_data)), tokenizer, cache=False)


def test_prepare_with_the_processor(image_data, processor):
    data = prepare(DataSettings(str(image_data), eval_fraction=0.2), processor)
    assert len(data.train) + len(data.eval) == 4 and data.counts["images"] == 5
    assert data.pad_id == processor.tokenizer.pad_token_id


# ---- scoring --------------------------------------------------------------------------------------------------


def naive_logps(model, pair, completion) -> torch.Tensor:
    """The model's own forward on prompt + completion with the prompt's images: completion tokens' log-probs."""
    ids = torch.tensor([pair.prompt_ids + completion])
    pixel_values = torch.from_numpy(pair.image_inputs["pixel_values"])
    logits = model(input_ids=ids, pixel_values=pixel_values).logits[0, :-1].float()
    per_token = logits.log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
    return per_token[len(pair.prompt_ids) - 1:].sum()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_logps_and_gradients_equal_the_models_own_forward(llava, image_data, processor, layout, one_thread):
    pairs = tokenized(image_data, processor)
    weights = torch.linspace(0.5, 1.5, 2 * len(pairs))
    expected = torch.stack([naive_logps(llava, p, c) for p in pairs for c in (p.chosen_ids, p.rejected_ids)])
    (expected * weights).sum().backward()
    expected_grads = {n: p.grad.clone() for n, p in llava.named_parameters() if p.grad is not None}
    llava.zero_grad(set_to_none=True)

    batch = make_batch(pairs, layout=layout, pad_id=0)
    logps = sequence_logps(SequenceScorer(llava), batch)
    got = torch.stack([logps.chosen, logps.rejected], dim=1).reshape(-1)
    torch.testing.assert_close(got, expected.detach(), atol=1e-5, rtol=1e-5)
    (got * weights).sum().backward()
    grads = {n: p.grad for n, p in llava.named_parameters() if p.grad is not None}
    assert grads.keys() == expected_grads.keys()
    assert any("vision_tower" in n for n in grads) and any("multi_modal_projector" in n for n in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_image_is_encoded_once_per_batch(llava, image_data, processor, layout):
    pairs = tokenized(image_data, processor)   # 6 images; pairs 0 and 1 share their prompt and its image
    encoded = []
    llava.model.vision_tower.register_forward_hook(lambda module, args, output: encoded.append(args[0].shape[0]))
    with torch.no_grad():
        sequence_logps(SequenceScorer(llava), make_batch(pairs, layout=layout, pad_id=0))
    assert encoded == [5]


def test_same_ids_other_image_is_another_prompt(llava, image_data, processor):
    pairs = tokenized(image_data, processor)
    first, other = pairs[0], pairs[2]
    swapped = type(first)(first.prompt_ids, first.chosen_ids, first.rejected_ids,
                          image_inputs=other.image_inputs)
    batch = make_batch([first, swapped], layout="shared", pad_id=0)
    assert batch.input_ids.shape[0] == 2 and batch.images.inputs["pixel_values"].shape[0] == 2
    with torch.no_grad():
        logps = sequence_logps(SequenceScorer(llava), batch)
        assert torch.allclose(logps.chosen[1], naive_logps(llava, swapped, first.chosen_ids), atol=1e-5)


def test_image_tokens_are_never_scored(image_data, processor):
    image_id = multimodal.image_token_id(processor)
    for layout in LAYOUTS:
        batch = make_batch(tokenized(image_data, processor), layout=layout, pad_id=0)
        assert image_id not in batch.target_ids.tolist()


def test_freeze_vision_keeps_the_tower_out_of_training(llava, image_data, processor):
    vision.freeze_vision(llava)
    batch = make_batch(tokenized(image_data, processor), layout="blocks", pad_id=0)
    logps = sequence_logps(SequenceScorer(llava), batch)
    (logps.chosen - logps.rejected).sum().backward()
    tower = [p for n, p in llava.named_parameters() if "vision_tower" in n]
    assert tower and all(p.grad is None and not p.requires_grad for p in tower)
    assert all(p.grad is not None for n, p in llava.named_parameters() if "multi_modal_projector" in n)


def test_lora_on_the_language_model_only(llava):
    peft = pytest.importorskip("peft")
    for targets in ("all-linear", "q_proj,v_proj"):
        config = peft.LoraConfig(r=2, target_modules=vision.language_lora_targets(llava, targets))
        wrapped = peft.get_peft_model(llava, config)
        adapted = [n for n, _ in wrapped.named_parameters() if "lora_A" in n]
        assert adapted and all(".language_model." in n for n in adapted), targets
        assert any("q_proj" in n for n in adapted)
        wrapped.unload()


# ---- through the loop -----------------------------------------------------------------------------------------


def test_dpo_train_on_pairs_with_images(llava_dir, image_data, tmp_path, capsys):
    """`dpo train --model <tiny llava> --data pairs_with_images.jsonl`: two steps, then a saved model and processor
    that load back; the vision tower is where it started (frozen by default)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from dpokit.cli import main

    out = tmp_path / "run"
    main(["train", "--model", str(llava_dir), "--data", str(image_data), "--output", str(out), "--max-steps", "2",
          "--batch-size", "2", "--eval-fraction", "0.25", "--lr", "1e-2", "--device", "cpu", "--no-progress"])
    printed = "".join(capsys.readouterr())
    assert "5 images, encoded with the model's processor" in printed
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "loss" in row] == [1, 2]
    AutoProcessor.from_pretrained(out / "model")
    trained = dict(AutoModelForImageTextToText.from_pretrained(out / "model").named_parameters())
    moved = {name for name, before in AutoModelForImageTextToText.from_pretrained(llava_dir).named_parameters()
             if not torch.equal(before, trained[name])}
    assert not any("vision_tower" in name for name in moved)
    assert any("projector" in name for name in moved) and any("language_model" in name for name in moved)


def test_precomputed_reference_key_covers_the_images(llava, image_data, processor):
    from dpokit.reference import reference_cache_key

    first = tokenized(image_data, processor)[0]
    other = type(first)(first.prompt_ids, first.chosen_ids, first.rejected_ids,
                        image_inputs=tokenized(image_data, processor)[2].image_inputs)
    assert reference_cache_key(llava, [first], {}) != reference_cache_key(llava, [other], {})
