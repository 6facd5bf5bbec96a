"""The commands around training, with images, through the CLI on the tiny random LLaVA of test_vision: `dpo
generate` equals the model's own `generate`, `dpo eval`'s log-ratios equal the model's own forward with the
images, `dpo data inspect` counts images and their expanded tokens, training with a precomputed reference, a
reference-free loss, exact resume and 2-process DDP, and the saved folder with its model card."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import run_cli
from test_vision import llava_dir  # noqa: F401  (a fixture, shared)
from test_vision import PIL, assistant, build_tiny_llava, user, write_image

IMAGE_SIZES = [(40, 30), (30, 50), (28, 28), (64, 32)]  # (height, width) of img/0.png ... img/3.png


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Images, prompts (chat with one and two images, plain text with `<image>`, text only) and 8 pairs."""
    root = tmp_path_factory.mktemp("vision-commands")
    (root / "img").mkdir()
    for i, size in enumerate(IMAGE_SIZES):
        write_image(root / "img" / f"{i}.png", i, size)
    prompts = [
        {"prompt": user("What shape is this?"), "images": ["img/0.png"]},
        {"prompt": user("Which is larger?", images=2), "images": ["img/1.png", "img/2.png"]},
        {"prompt": "<image>Question: what is it? Answer:", "image": "img/3.png"},
        {"prompt": [{"role": "user", "content": "What is the capital of France?"}]},
    ]
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prompts), encoding="utf-8")
    pairs = [{"prompt": user(f"What shape is {i}?"), "chosen": assistant("A red square."),
              "rejected": assistant("A blue fox."), "images": [f"img/{i % 4}.png"]} for i in range(8)]
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs), encoding="utf-8")
    return root


def load_llava(path: Path):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---- dpo generate -----------------------------------------------------------------------------------------------


def own_inputs(processor, record: dict, base: Path):
    """The processor's tensors for one prompt record with its images, rendered independently of dpokit."""
    names = record.get("images") or ([record["image"]] if "image" in record else [])
    images = [PIL.open(base / name).convert("RGB") for name in names]
    prompt = record["prompt"]
    if isinstance(prompt, str):
        return processor(text=[prompt], images=[images], return_tensors="pt")
    parts = [{**m, "content": [{"type": "text", "text": m["content"]}]} if isinstance(m["content"], str) else m
             for m in prompt]
    text = processor.apply_chat_template(parts, add_generation_prompt=True, tokenize=False)
    return processor(text=[text], images=[images] if images else None, add_special_tokens=False, return_tensors="pt")


def own_generate(model, processor, record: dict, base: Path, max_new_tokens: int, stops: list[int]) -> list[int]:
    """transformers' `generate` (greedy) on one prompt record with its images: the new tokens."""
    inputs = own_inputs(processor, record, base)
    out = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=stops, pad_token_id=0)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def test_generate_with_images_equals_the_models_own_generate(llava_dir, folder, tmp_path, capsys):
    from transformers import AutoProcessor

    out = tmp_path / "samples.jsonl"
    code, _, err = run_cli(["generate", "--model", str(llava_dir), "--prompts", str(folder / "prompts.jsonl"),
                            "--out", str(out), "--temperature", "0", "--max-new-tokens", "6", "--batch-size", "4",
                            "--device", "cpu"], capsys)
    assert code == 0, err
    samples = read_jsonl(out)
    processor, model = AutoProcessor.from_pretrained(llava_dir), load_llava(llava_dir)
    stops = [processor.tokenizer.eos_token_id, processor.tokenizer.convert_tokens_to_ids("<|end|>")]
    for record, sample in zip(read_jsonl(folder / "prompts.jsonl"), samples, strict=True):
        expected = own_generate(model, processor, record, folder, 6, stops)
        assert sample["completion_tokens"] == len(expected)
        assert sample["completion"] == processor.tokenizer.decode(expected, skip_special_tokens=True)
    assert samples[1]["images"] == [str(folder / "img" / "1.png"), str(folder / "img" / "2.png")]
    assert "images" not in samples[3]


def test_generate_sees_the_image(llava_dir, folder, tmp_path):
    """The same prompt over two images: the first step's logits differ (the features reach the decoder)."""
    from dpokit import generate, models

    processor, model = models.load_tokenizer(str(llava_dir)), load_llava(llava_dir)
    prompts = [user("What shape is this?")] * 2
    ids, arrays = generate.encode_image_prompts(processor, prompts, [(str(folder / "img" / "0.png"),),
                                                                     (str(folder / "img" / "1.png"),)])
    assert ids[0] == ids[1] and not (arrays[0]["pixel_values"] == arrays[1]["pixel_values"]).all()
    with torch.no_grad():
        logits = [model(input_ids=torch.tensor([ids[0]]), pixel_values=torch.from_numpy(a["pixel_values"])).logits
                  for a in arrays]
    assert not torch.allclose(logits[0], logits[1])


@pytest.mark.parametrize("record, message", [
    ({"prompt": user("What?"), "images": ["img/missing.png"]}, "prompts.jsonl:1: field 'images', image 0: file not found"),
    ({"prompt": user("What?", images=2), "images": ["img/0.png"]}, "the prompt has 2 image placeholders"),
    ({"prompt": "Question: what?", "images": ["img/0.png"]}, "prompt 0 holds 0 image placeholders (<image>)"),
])
def test_bad_image_prompts_are_one_line(llava_dir, folder, tmp_path, capsys, record, message):
    (tmp_path / "img").symlink_to(folder / "img")
    (tmp_path / "prompts.jsonl").write_text(json.dumps(record) + "\n", encoding="utf-8")
    code, _, err = run_cli(["generate", "--model", str(llava_dir), "--prompts", str(tmp_path / "prompts.jsonl"),
                            "--out", str(tmp_path / "out.jsonl"), "--device", "cpu"], capsys)
    assert code == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


# ---- dpo eval ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory) -> Path:
    """Another random LLaVA (seed 1) with the same processor: a policy that differs from the reference."""
    path = tmp_path_factory.mktemp("tiny-llava-policy")
    build_tiny_llava(path, seed=1)
    return path


def own_logps(model, ids: list[int], prompt_length: int, pixel_values) -> float:
    """Summed log-probs of `ids[prompt_length:]` from the model's own forward with the prompt's images."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids]), pixel_values=pixel_values).logits[0, :-1].double()
    per_token = logits.log_softmax(-1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
    return per_token[prompt_length - 1:].sum().item()


def test_eval_preference_metrics_on_image_pairs(llava_dir, policy_dir, folder, tmp_path, capsys):
    from dpokit.data import formats, multimodal
    from transformers import AutoProcessor

    out = tmp_path / "eval.json"
    code, _, err = run_cli(["eval", "--model", str(policy_dir), "--ref-model", str(llava_dir), "--data",
                            str(folder / "pairs.jsonl"), "--beta", "0.5", "--out", str(out), "--device", "cpu"], capsys)
    assert code == 0, err
    metrics = json.loads(out.read_text())
    processor = AutoProcessor.from_pretrained(llava_dir)
    pairs, _ = formats.load_pairs(str(folder / "pairs.jsonl"))
    tokenized, _ = multimodal.tokenize_pairs(pairs, processor, max_length=1024)
    policy, reference = load_llava(policy_dir), load_llava(llava_dir)
    margins = []
    for pair in tokenized:
        pixels = torch.from_numpy(pair.image_inputs["pixel_values"])
        rewards = [0.5 * (own_logps(policy, pair.prompt_ids + c, len(pair.prompt_ids), pixels)
                          - own_logps(reference, pair.prompt_ids + c, len(pair.prompt_ids), pixels))
                   for c in (pair.chosen_ids, pair.rejected_ids)]
        margins.append(rewards[0] - rewards[1])
    assert metrics["eval/pairs"] == 8
    assert metrics["eval/rewards/margins"] == pytest.approx(sum(margins) / 8, abs=1e-4)
    assert metrics["eval/rewards/accuracies"] == pytest.approx(sum(m > 0 for m in margins) / 8)


def test_eval_samples_on_image_prompts(llava_dir, policy_dir, folder, tmp_path, capsys):
    """Greedy samples of the policy: each one's log-ratio is the two models' own forward with the images, and a
    reward function taking `images` gets the prompt's."""
    from transformers import AutoProcessor

    (tmp_path / "reward.py").write_text(
        "def count_images(prompts, completions, images):\n    return [float(len(i)) for i in images]\n")
    samples = tmp_path / "samples.jsonl"
    code, _, err = run_cli(["eval", "--model", str(policy_dir), "--ref-model", str(llava_dir), "--prompts",
                            str(folder / "prompts.jsonl"), "--reward", f"{tmp_path / 'reward.py'}:count_images",
                            "--temperature", "0", "--max-new-tokens", "5", "--samples-out", str(samples),
                            "--device", "cpu"], capsys)
    assert code == 0, err
    processor = AutoProcessor.from_pretrained(llava_dir)
    stops = [processor.tokenizer.eos_token_id, processor.tokenizer.convert_tokens_to_ids("<|end|>")]
    policy, reference = load_llava(policy_dir), load_llava(llava_dir)
    records = read_jsonl(samples)
    assert [r["reward"] for r in records] == [1.0, 2.0, 1.0, 0.0]
    for record, prompt in zip(records, read_jsonl(folder / "prompts.jsonl"), strict=True):
        completion = own_generate(policy, processor, prompt, folder, 5, stops)
        inputs = own_inputs(processor, prompt, folder)
        ids, pixels = inputs["input_ids"][0].tolist(), inputs.get("pixel_values")
        expected = (own_logps(policy, ids + completion, len(ids), pixels)
                    - own_logps(reference, ids + completion, len(ids), pixels))
        assert record["log_ratio"] == pytest.approx(expected, abs=1e-4)


# ---- training with images ---------------------------------------------------------------------------------------

TIMING = {"pairs_per_s", "tokens_per_s", "elapsed_s"}


def train_args(llava_dir: Path, folder: Path, output: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(llava_dir), "--data", str(folder / "pairs.jsonl"), "--output", str(output),
            "--max-steps", "2", "--batch-size", "4", "--eval-fraction", "0", "--lr", "1e-2", "--device", "cpu",
            "--no-progress", "--report-to", "none", *extra]


def metric_rows(output: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in read_jsonl(output / "metrics.jsonl")]


def weights(output: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(output / "model" / "model.safetensors")


@pytest.fixture(scope="module")
def trained(llava_dir, folder, tmp_path_factory) -> Path:
    """`dpo train` on the image pairs, 2 steps of 4 pairs, in this process."""
    output = tmp_path_factory.mktemp("trained")
    code = run_cli(train_args(llava_dir, folder, output), _NoCapture())[0]
    assert code == 0
    return output


class _NoCapture:
    """`run_cli`'s capsys for a module fixture (which cannot take capsys): output stays where it goes."""

    def readouterr(self) -> tuple[str, str]:
        return "", ""


def test_precomputed_reference_with_images_equals_the_live_one(llava_dir, folder, trained, tmp_path, capsys):
    code, _, err = run_cli(train_args(llava_dir, folder, tmp_path, "--precompute-ref"), capsys)
    assert code == 0, err
    live, precomputed = metric_rows(trained), metric_rows(tmp_path)
    assert [row["step"] for row in precomputed] == [1, 2]
    for one, other in zip(live, precomputed):
        assert other == pytest.approx(one, abs=1e-5)
    for name, tensor in weights(trained).items():
        torch.testing.assert_close(weights(tmp_path)[name], tensor, atol=1e-5, rtol=0, msg=name)


def test_reference_free_loss_with_images_is_simpos_formula(llava_dir, folder, tmp_path, capsys):
    """One step over all 8 pairs: the logged loss is SimPO's (Meng et al. 2024, arXiv 2405.14734, Eq. 6) from
    the model's own forward with each prompt's images, length-normalised over the completion tokens."""
    from dpokit.data import formats, multimodal
    from transformers import AutoProcessor

    code, _, err = run_cli(train_args(llava_dir, folder, tmp_path, "--loss", "simpo", "--beta", "2",
                                      "--simpo-gamma", "0.5", "--batch-size", "8", "--max-steps", "1"), capsys)
    assert code == 0, err
    pairs, _ = formats.load_pairs(str(folder / "pairs.jsonl"))
    tokenized, _ = multimodal.tokenize_pairs(pairs, AutoProcessor.from_pretrained(llava_dir), max_length=1024)
    model = load_llava(llava_dir)
    losses = []
    for pair in tokenized:
        pixels = torch.from_numpy(pair.image_inputs["pixel_values"])
        mean = [own_logps(model, pair.prompt_ids + c, len(pair.prompt_ids), pixels) / len(c)
                for c in (pair.chosen_ids, pair.rejected_ids)]
        losses.append(-torch.nn.functional.logsigmoid(torch.tensor(2 * (mean[0] - mean[1]) - 0.5)).item())
    assert metric_rows(tmp_path)[0]["loss"] == pytest.approx(sum(losses) / len(losses), abs=1e-5)


def run_dpo(args: list[str], *, torchrun: bool = False) -> None:
    """`python -m dpokit ARGS` (or under `torchrun --nproc-per-node 2`) in a fresh process, one thread each."""
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"] if torchrun else []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, *launcher, "-m", "dpokit", *args], capture_output=True, text=True, env=env,
                         timeout=240)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]


def test_stopped_at_step_2_and_resumed_with_images_is_the_same_run(llava_dir, folder, tmp_path):
    """4 steps straight (saving at 2) against a run resumed from that checkpoint: the same weights, bit for bit,
    and the same rows (both in fresh processes with the same thread count)."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_dpo(train_args(llava_dir, folder, straight, "--max-steps", "4", "--batch-size", "2", "--save-every", "2"))
    run_dpo(train_args(llava_dir, folder, resumed, "--max-steps", "4", "--batch-size", "2", "--save-every", "2",
                       "--resume", str(straight / "checkpoints" / "step-2")))
    expected, got = weights(straight), weights(resumed)
    assert expected.keys() == got.keys()
    assert [name for name in expected if not torch.equal(expected[name], got[name])] == []
    assert metric_rows(resumed) == metric_rows(straight)


def test_two_ddp_processes_with_images_match_one(llava_dir, folder, trained, tmp_path):
    """`torchrun --nproc-per-node 2` (gloo on CPU) x batch 2 against one process x batch 4."""
    run_dpo(train_args(llava_dir, folder, tmp_path, "--batch-size", "2"), torchrun=True)
    single, multi = metric_rows(trained), metric_rows(tmp_path)
    assert [row["step"] for row in multi] == [1, 2]
    for one, two in zip(single, multi):
        assert two == pytest.approx(one, abs=1e-5)
    from safetensors.torch import load_file

    before = load_file(llava_dir / "model.safetensors")
    assert before.keys() == weights(trained).keys()
    for name, tensor in weights(trained).items():
        torch.testing.assert_close(weights(tmp_path)[name], tensor, atol=2e-5, rtol=0, msg=name)
    assert max((weights(trained)[name] - before[name]).abs().max() for name in before) > 1e-3  # training moved them


# ---- dpo data inspect -------------------------------------------------------------------------------------------


def row(values: list[int], *extra: int) -> list[int]:
    """p50, p90, p99 ("higher", as the report rounds) and max, then `extra`."""
    import numpy as np

    return [int(np.percentile(values, q, method="higher")) for q in (50, 90, 99)] + [max(values), *extra]


def cells(lines: list[str], label: str) -> list[int]:
    line, = [line for line in lines if line.split()[:len(label.split())] == label.split()]
    return [int(cell) for cell in line.split()[len(label.split()):] if cell.isdigit()]


def test_inspect_counts_images_sizes_and_expanded_tokens(llava_dir, folder, capsys):
    from transformers import AutoProcessor

    code, out, err = run_cli(["data", "inspect", str(folder / "pairs.jsonl")], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert "images: 8 in 8 of 8 pairs (1 to 1 per pair with images), 4 distinct" in lines
    widths, heights = [w for _, w in IMAGE_SIZES] * 2, [h for h, _ in IMAGE_SIZES] * 2
    assert cells(lines, "width") == row(widths, min(widths))
    assert cells(lines, "height") == row(heights, min(heights))

    code, out, err = run_cli(["data", "inspect", str(folder / "pairs.jsonl"), "--model", str(llava_dir)], capsys)
    assert code == 0, err
    lines = out.splitlines()
    processor = AutoProcessor.from_pretrained(llava_dir)
    prompts = [len(own_inputs(processor, record, folder)["input_ids"][0])
               for record in read_jsonl(folder / "pairs.jsonl")]
    assert "lengths (tokens, image tokens included):" in lines
    assert cells(lines, "prompt") == row(prompts) and min(prompts) > 4
    assert cells(lines, "image tok") == [4, 4, 4, 4]                   # 28x28 crops of 14x14 patches: 2 x 2
    assert "<|user|>\\n<image>×4What shape is 0?" in out


# ---- the saved folder and its card ------------------------------------------------------------------------------


def test_saved_model_loads_with_its_processor_and_the_card_names_them(llava_dir, folder, trained):
    from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration

    record = read_jsonl(folder / "prompts.jsonl")[1]
    saved, original = (AutoProcessor.from_pretrained(path) for path in (trained / "model", llava_dir))
    got, expected = own_inputs(saved, record, folder), own_inputs(original, record, folder)
    assert torch.equal(got["input_ids"], expected["input_ids"])
    assert torch.equal(got["pixel_values"], expected["pixel_values"])
    model = AutoModelForImageTextToText.from_pretrained(trained / "model")
    assert isinstance(model, LlavaForConditionalGeneration)
    with torch.no_grad():
        assert model(**got).logits.isfinite().all()

    card = (trained / "model" / "README.md").read_text()
    meta = card.split("---")[1]
    assert f"base_model: {llava_dir}" in meta and "pipeline_tag: image-text-to-text" in meta
    assert "- processor: `LlavaProcessor (CLIPImageProcessor)`, saved with the model" in card
    assert "on preference pairs with images" in card and "| images | 8 |" in card
    assert "AutoModelForImageTextToText.from_pretrained" in card


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "idefics3", "smolvlm"])
def test_generate_equals_the_models_own_generate_in_other_families(family, folder, tmp_path, one_thread):
    """Qwen2-VL / Qwen2.5-VL (multimodal RoPE positions) and Idefics3 / SmolVLM (tiles), a batch of 3 left-padded
    prompts (one image, two images, none): each greedy sample equals the model's own `generate` on its prompt."""
    from dpokit import generate
    from test_vision_families import build_idefics3, build_qwen

    model, processor = build_qwen(family, tmp_path) if family.startswith("qwen") else build_idefics3(tmp_path,
                                                                                                     family=family)
    model.eval()
    if processor.tokenizer.pad_token_id is None:
        processor.tokenizer.pad_token = processor.tokenizer.eos_token
    records = [read_jsonl(folder / "prompts.jsonl")[i] for i in (0, 1, 3)]
    prompts = [record["prompt"] for record in records]
    images = [tuple(str(folder / name) for name in record.get("images", [])) for record in records]
    texts = generate.sample_texts(model, processor, prompts, images, temperature=0, max_new_tokens=5, batch_size=3)
    stops = [processor.tokenizer.eos_token_id, processor.tokenizer.convert_tokens_to_ids(
        "<|im_end|>" if family.startswith("qwen") else "<end_of_utterance>")]
    for (sample, _), record in zip(texts, records, strict=True):
        assert sample.completion_ids == own_generate(model, processor, record, folder, 5, stops), record["prompt"]
