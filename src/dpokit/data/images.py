"""Images of vision-language pairs: the `images` / `image` column read into sources, each source opened and checked.

Images belong to the prompt. A source is what a record gives for one image, made self-contained: an absolute path
(a path in the record is relative to the data file's folder), or the encoded image's bytes (the `{"bytes": ...,
"path": ...}` dict `datasets` stores an `Image` feature as, or a decoded PIL image from a `datasets` source, saved
as PNG). Nothing is downloaded: a URL is refused. In chat messages an image's place is a `{"type": "image"}`
content part (TRL's format); a record needs exactly one image per placeholder.

Torch-free: PIL only (the `vision` extra).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from ..errors import import_extra

IMAGE_COLUMNS = ("images", "image")
ImageSource = str | bytes  # an absolute path, or an encoded image


class BadImage(ValueError):
    """One line on what is wrong with a record's image (the caller says which record)."""


def column_sources(record: dict[str, Any], base: Path) -> tuple[ImageSource, ...]:
    """The record's images as sources, in order; () when it has no image column (or an empty one). Each path
    must exist and open as an image."""
    name = "images" if "images" in record else "image"
    value = record.get(name)
    if value is None or value == "" or value == []:
        return ()
    items = value if name == "images" and isinstance(value, list) else [value]
    sources = tuple(_source(item, f"field '{name}', image {i}", base) for i, item in enumerate(items))
    for i, source in enumerate(sources):
        check(source, f"field '{name}', image {i}")
    return sources


def open_image(source: ImageSource, label: str = "image") -> Any:
    """The image as an RGB `PIL.Image`, decoded in full (a truncated or corrupt file fails here)."""
    pil = import_extra("PIL.Image", "vision", "an image column")
    try:
        with pil.open(source if isinstance(source, str) else io.BytesIO(source)) as image:
            return image.convert("RGB")
    except (OSError, ValueError, SyntaxError) as err:
        raise BadImage(f"{label}: {describe(source)} is not a readable image ({err})") from None


def check(source: ImageSource, label: str) -> None:
    """Refuse a missing or unreadable image (the structure check PIL's `verify` makes, without decoding it)."""
    pil = import_extra("PIL.Image", "vision", "an image column")
    if isinstance(source, str) and not Path(source).is_file():
        raise BadImage(f"{label}: file not found: {source}")
    try:
        with pil.open(source if isinstance(source, str) else io.BytesIO(source)) as image:
            image.verify()
    except (OSError, ValueError, SyntaxError) as err:
        raise BadImage(f"{label}: {describe(source)} is not a readable image ({err})") from None


def size(source: ImageSource) -> tuple[int, int]:
    """(width, height) in pixels, from the image's header (the pixels are not decoded)."""
    pil = import_extra("PIL.Image", "vision", "an image column")
    with pil.open(source if isinstance(source, str) else io.BytesIO(source)) as image:
        return image.size  # type: ignore[no-any-return]


def describe(source: ImageSource) -> str:
    return source if isinstance(source, str) else f"<{len(source)} bytes>"


def is_image_part(part: Any) -> bool:
    return isinstance(part, dict) and part.get("type") == "image"


def placeholder_count(messages: list[dict[str, Any]]) -> int:
    """`{"type": "image"}` content parts in a message list."""
    return sum(is_image_part(part) for message in messages if isinstance(message.get("content"), list)
               for part in message["content"])


def as_parts(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages with every string content as one text part, as vision chat templates iterate contents."""
    return [{**m, "content": [{"type": "text", "text": m["content"]}]} if isinstance(m.get("content"), str) else m
            for m in messages]


def _source(item: Any, label: str, base: Path) -> ImageSource:
    if isinstance(item, dict):  # datasets' Image feature: {"bytes": b"..." or None, "path": "..." or None}
        if item.get("bytes"):
            return bytes(item["bytes"])
        item = item.get("path")
    if isinstance(item, (bytes, bytearray)):
        return bytes(item)
    if hasattr(item, "save") and hasattr(item, "mode"):  # a PIL image, as `datasets` decodes an Image column
        buffer = io.BytesIO()
        item.save(buffer, format="PNG")
        return buffer.getvalue()
    if not isinstance(item, str) or not item.strip():
        raise BadImage(f"{label}: expected a file path, image bytes or {{\"bytes\", \"path\"}}, got {item!r:.60}")
    if "://" in item:
        raise BadImage(f"{label}: {item} is a URL; dpokit reads images offline: download it and give its path")
    path = Path(item).expanduser()
    return str(path if path.is_absolute() else (base / path).resolve())
