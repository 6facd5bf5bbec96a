"""Bad image data through `dpo train`, as a user meets it: each case is one line on stderr naming the record (its
file and line, or the pair and its images) and the image's path, exit status 2, no traceback, nothing trained.
The first record of every file is a good one, so the bad one is never the first read."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from conftest import build_tiny_llama, build_tokenizer, run_cli
from test_vision import PIL, assistant, build_tiny_llava, user, write_image


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    build_tiny_llava(root / "llava")
    tokenizer = build_tokenizer(root / "llama")
    build_tiny_llama(root / "llama", len(tokenizer), tokenizer=tokenizer)
    return {"vlm": root / "llava", "text": root / "llama"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """img/good.png; img/text.png (bytes that are not an image); img/cut.jpg (a JPEG cut in half: its header and
    markers read, its pixels do not decode); img/folder.png (a folder)."""
    root = tmp_path_factory.mktemp("bad-images")
    (root / "img").mkdir()
    write_image(root / "img" / "good.png", 0)
    (root / "img" / "text.png").write_bytes(b"this is a text file, not an image\n")
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    PIL.fromarray(pixels).save(root / "img" / "full.jpg", quality=90)
    whole = (root / "img" / "full.jpg").read_bytes()
    (root / "img" / "cut.jpg").write_bytes(whole[:len(whole) // 2])
    (root / "img" / "folder.png").mkdir()
    return root


GOOD = {"prompt": user("Fine?"), "chosen": assistant("A."), "rejected": assistant("B."), "images": ["img/good.png"]}
PLAIN_GOOD = {"prompt": "<image>Fine?", "chosen": " A.", "rejected": " B.", "images": ["img/good.png"]}


def chat(images: list[str], prompt: list[dict] | None = None) -> dict:
    return {"prompt": prompt or user("What?"), "chosen": assistant("A."), "rejected": assistant("B."),
            "images": images}


def plain(prompt: str, images: list[str], chosen: str = " A.") -> dict:
    return {"prompt": prompt, "chosen": chosen, "rejected": " B.", "images": images}


def train(model: Path, records: list[dict], folder: Path, tmp_path: Path, capsys) -> tuple[int, str, Path]:
    """`dpo train` on `records` (written next to `folder`'s images); (exit status, stderr, data file)."""
    data = tmp_path / "pairs.jsonl"
    (tmp_path / "img").symlink_to(folder / "img")
    data.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    code, _, err = run_cli(["train", "--model", str(model), "--data", str(data), "--output", str(tmp_path / "run"),
                            "--max-steps", "1", "--batch-size", "2", "--eval-fraction", "0", "--device", "cpu",
                            "--no-progress", "--report-to", "none"], capsys)
    return code, err, data


def assert_one_line(code: int, err: str, tmp_path: Path, *parts: str) -> None:
    assert code == 2 and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    for part in parts:
        assert part in err, (part, err)
    assert not (tmp_path / "run" / "model").exists()                    # nothing trained


@pytest.mark.parametrize("name, problem", [
    ("missing.png", "file not found: "),
    ("folder.png", "file not found: "),
    ("text.png", "is not a readable image (cannot identify image file"),
])
def test_missing_or_unreadable_image_names_the_line_and_the_path(models, folder, tmp_path, capsys, name, problem):
    code, err, data = train(models["vlm"], [GOOD, chat([f"img/{name}"])], folder, tmp_path, capsys)
    assert_one_line(code, err, tmp_path, f"{data}:2: field 'images', image 0: ", problem,
                    str((tmp_path / "img" / name).resolve()))


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads a file whatever its mode")
def test_image_without_read_permission(models, folder, tmp_path, capsys):
    locked = tmp_path / "locked.png"
    locked.write_bytes((folder / "img" / "good.png").read_bytes())
    locked.chmod(0)
    code, err, data = train(models["vlm"], [GOOD, chat([str(locked)])], folder, tmp_path, capsys)
    assert_one_line(code, err, tmp_path, f"{data}:2: ", str(locked), "is not a readable image")


def test_image_whose_pixels_do_not_decode(models, folder, tmp_path, capsys):
    """A JPEG cut in half passes the structure check at load (PIL's `verify` reads markers only) and fails when
    the processor's image is decoded: still one line, with its path."""
    cut = str((folder / "img" / "cut.jpg").resolve())
    code, err, _ = train(models["vlm"], [GOOD, chat(["img/cut.jpg"])], folder, tmp_path, capsys)
    assert_one_line(code, err, tmp_path, f"(images {cut}), image 0: {cut} is not a readable image",
                    "image file is truncated")


@pytest.mark.parametrize("record, message", [
    (chat(["img/good.png", "img/good.png"]), ":2: the prompt has 1 image placeholders ({\"type\": \"image\"}) for 2"),
    (chat([]), ":2: the prompt has 1 image placeholders ({\"type\": \"image\"}) for 0 images"),
    (chat(["img/good.png"], user("Two?", images=2)), ":2: the prompt has 2 image placeholders"),
])
def test_chat_placeholders_and_images_differ(models, folder, tmp_path, capsys, record, message):
    code, err, data = train(models["vlm"], [GOOD, record], folder, tmp_path, capsys)
    assert_one_line(code, err, tmp_path, f"{data}{message}")


@pytest.mark.parametrize("record, message", [
    (plain("<image>What?", ["img/good.png", "img/good.png"]), "the prompt holds 1 image placeholders (<image>) for 2"),
    (plain("<image><image>What?", ["img/good.png"]), "the prompt holds 2 image placeholders (<image>) for 1 images"),
    (plain("<image>What?", ["img/good.png"], chosen=" A <image>."),
     "the chosen completion holds the image token <image>; images belong to the prompt"),
    (chat(["img/good.png"], [{"role": "user", "content": [{"type": "image"},
                                                          {"type": "text", "text": "Is <image> it?"}]}]),
     "the prompt holds 2 image placeholders (<image>) for 1 images; its text writes <image> itself 1 times"),
])
def test_image_tokens_in_the_text_and_images_differ(models, folder, tmp_path, capsys, record, message):
    """Placeholders the processor counts (its image token written in the text): named with the pair's images."""
    good = GOOD if isinstance(record["prompt"], list) else PLAIN_GOOD
    code, err, _ = train(models["vlm"], [good, record], folder, tmp_path, capsys)
    assert_one_line(code, err, tmp_path, f"(images {(folder / 'img' / 'good.png').resolve()}", message)


def test_image_column_with_a_text_only_model(models, folder, tmp_path, capsys):
    code, err, data = train(models["text"], [GOOD, GOOD], folder, tmp_path, capsys)
    assert_one_line(code, err, tmp_path, f"{data}: the data has images", "has no image processor (a text-only model)")


def test_inspect_with_a_text_only_model_refuses_images_too(models, folder, tmp_path, capsys):
    """`dpo data inspect --model TEXT_MODEL` on image data: the same line as training, not image parts as text."""
    data = tmp_path / "pairs.jsonl"
    (tmp_path / "img").symlink_to(folder / "img")
    data.write_text(json.dumps(GOOD) + "\n", encoding="utf-8")
    code, _, err = run_cli(["data", "inspect", str(data), "--model", str(models["text"])], capsys)
    assert_one_line(code, err, tmp_path, f"{data}: the data has images", "has no image processor (a text-only model)")
