"""Read preference records from files and datasets and normalise them into `PreferencePair`s.

This room knows sources and record schemas, nothing about tokens or tensors. Formats (detected from the first
record, or forced with `format=`):

- `explicit`: `prompt`, `chosen`, `rejected` strings.
- `implicit` (Anthropic HH-RLHF): `chosen`, `rejected` full transcripts; the prompt is their shared prefix up to
  the last `\\n\\nAssistant:` both share, so the cut is at a turn boundary, never inside a word.
- `conversational`: `chosen` / `rejected` (and optionally `prompt`) as `{"role", "content"}` message lists; full
  conversations that share their leading turns (UltraFeedback-binarized) are split after the shared turns.
- `ranked`: `prompt`, `responses` and `scores` (higher is better) or `ranking` (rank of each response, 1 = best),
  turned into pairs that share a `group` id (`pairs=best-worst|all|adjacent`).
- `unpaired` (KTO): `prompt`, `completion`, `label` (bool). See `to_unpaired` for the representation.
- `sft`: `prompt` + `completion`, or `text` alone (empty prompt): `PreferencePair(prompt, completion, completion)`.

`explicit` and `conversational` records may carry a third, gold response in a `reference` column (the TPO
data's name, arXiv 2405.16681) or a `gold` column, in the form of their `chosen`; losses that read it (`tpo`) train
on it, the others ignore it.

Any format may carry the prompt's images in an `images` (list) or `image` column (see `images`); in chat messages
a content may then be a list of parts, `{"type": "image"}` where an image goes and `{"type": "text", "text": ...}`.

Every bad record is reported as `file:line: field ...: what is wrong`, or skipped and counted (`skip_invalid`).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import DPOError
from . import images as image_column
from .sources import Malformed, read_records_or_malformed

Text = str | list[dict[str, Any]]  # plain text, or chat messages [{"role": ..., "content": ...}]

FORMATS = ("explicit", "implicit", "conversational", "ranked", "unpaired", "sft")
PAIRING = ("best-worst", "all", "adjacent")
EXTRA_FIELDS = ("score_chosen", "score_rejected", "margin")
HH_TURN = "\n\nAssistant:"
GOLD_COLUMNS = ("reference", "gold")  # the gold response's column: TPO's data calls it `reference`


@dataclass(frozen=True)
class PreferencePair:
    """One preference: `chosen` is preferred over `rejected` as a completion of `prompt`.

    `extras` holds optional per-pair numbers that some losses use (score_chosen, score_rejected, margin, label).
    `group` is the same for pairs that share a prompt (several ranked responses), so it can be computed once.
    `tools`: function definitions (JSON schemas) the chat template shows the model, from a `tools` column.
    `images`: the prompt's images (`images.ImageSource`: an absolute path or encoded bytes), in order.
    `gold`: a third, best response to `prompt` (a `reference` or `gold` column), for losses that clone it (TPO).
    """

    prompt: Text
    chosen: Text
    rejected: Text
    extras: dict[str, float] = field(default_factory=dict)
    group: int | None = None
    tools: list[dict[str, Any]] | None = None
    images: tuple[image_column.ImageSource, ...] = ()
    gold: Text | None = None


@dataclass
class DataReport:
    """What loading did, for the user: nothing is dropped without being counted here."""

    source: str
    format: str
    records: int = 0
    pairs: int = 0
    skipped_invalid: int = 0
    identical_pairs: int = 0
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        noun = "examples" if self.format in ("unpaired", "sft") else "pairs"  # neither holds preference pairs
        out = [f"{self.source}: {self.pairs} {noun} from {self.records} records ({self.format} format)"]
        if self.skipped_invalid:
            out.append(f"  skipped {self.skipped_invalid} invalid records (--skip-invalid)")
        if self.identical_pairs:
            out.append(f"  {self.identical_pairs} pairs have chosen identical to rejected (they carry no signal)")
        out.extend(f"  {note}" for note in self.notes)
        return out


def load_pairs(path: str, *, format: str | None = None, split: str = "train", columns: str | None = None,
               max_pairs: int | None = None, skip_invalid: bool = False, pairs: str = "best-worst",
               seed: int = 0) -> tuple[list[PreferencePair], DataReport]:
    """Load preference pairs from a file, a folder of files, a `save_to_disk` folder or a hub dataset name."""
    report = DataReport(source=path, format=format or "?")
    out: list[PreferencePair] = []
    for pair in iter_pairs(path, report, split=split, columns=columns, skip_invalid=skip_invalid, pairs=pairs):
        out.append(pair)
        if max_pairs is not None and len(out) >= max_pairs:
            report.notes.append(f"stopped at --max-pairs {max_pairs}")
            break
    if not out:
        raise DPOError(f"{path}: no usable preference pairs found ({report.records} records read)")
    if report.format == "unpaired":
        out = to_unpaired(out, seed)
    report.pairs = len(out)
    return out, report


def iter_pairs(path: str, report: DataReport, *, split: str = "train", columns: str | None = None,
               skip_invalid: bool = False, pairs: str = "best-worst") -> Iterator[PreferencePair]:
    """`load_pairs` one pair at a time, for data larger than memory: counts go to `report` as records are read
    (its `format`, "?" until the first record, or the format to force). Unpaired records come as they are read,
    without `to_unpaired`'s partners."""
    if report.format != "?" and report.format not in FORMATS:
        raise DPOError(f"--format must be one of {', '.join(FORMATS)}, got {report.format!r}")
    if pairs not in PAIRING:
        raise DPOError(f"--pairs must be one of {', '.join(PAIRING)}, got {pairs!r}")
    rename = _parse_columns(columns)
    image_base = _image_base(path)
    for where, record in read_records_or_malformed(path, split=split):
        report.records += 1
        try:
            if isinstance(record, Malformed):
                raise _BadRecord(record.problem)
            record = {rename.get(k, k): v for k, v in record.items()}
            if report.format == "?":  # detected from the first readable record
                report.format = detect_format(record, where)
            made = _CONVERTERS[report.format](record, pairs)
            made = _with_images(made, record, image_base)
        except _BadRecord as bad:
            if skip_invalid:
                report.skipped_invalid += 1
                continue
            raise DPOError(f"{where}: {bad} (fix the record, or pass --skip-invalid to skip such records)") from None
        for pair in made:
            if report.format == "ranked":  # pairs from one record share its prompt
                pair = replace(pair, group=report.records - 1)
            if report.format != "sft" and pair.chosen == pair.rejected and "label" not in pair.extras:
                report.identical_pairs += 1
            yield pair


def detect_format(record: dict[str, Any], where: str = "") -> str:
    """The format a record is in, from its field names (and whether chosen/rejected are message lists)."""
    keys = set(record)
    if "responses" in keys:
        return "ranked"
    if {"completion", "label"} <= keys:
        return "unpaired"
    if "completion" in keys or (keys & {"text"} and not keys & {"chosen", "rejected"}):
        return "sft"
    if {"chosen", "rejected"} <= keys:
        if any(isinstance(record[k], list) for k in ("prompt", "chosen", "rejected") if k in record):
            return "conversational"
        return "explicit" if "prompt" in keys else "implicit"
    raise DPOError(f"{where}: cannot tell the data format from the fields {sorted(keys)}; expected prompt/chosen/"
                   "rejected, chosen/rejected, prompt/responses/scores, prompt/completion/label, prompt/completion "
                   "or text (rename columns with --columns chosen=good,..., or force one with --format)")


def to_unpaired(pairs: list[PreferencePair], seed: int) -> list[PreferencePair]:
    """Examples for unpaired losses (KTO, Ethayarajh et al. 2024): `chosen` = the example's own completion,
    `rejected` = a mismatched completion, `extras["label"]` = 1.0 (desirable) or 0.0 (undesirable).

    A paired record gives two examples (chosen with label 1, rejected with label 0). The mismatched completion is
    the completion of the next example in a seeded shuffle (a shift by one, as KTO's KL estimate z0 uses), so it
    is never the example's own unless there is only one example. Examples of one pair share a `group`.
    """
    examples: list[PreferencePair] = []
    next_group = 1 + max((p.group for p in pairs if p.group is not None), default=-1)
    for i, pair in enumerate(pairs):
        group = pair.group if pair.group is not None else next_group + i
        if "label" in pair.extras:
            examples.append(replace(pair, group=group))
        else:
            examples.append(replace(pair, rejected=pair.chosen, extras={**pair.extras, "label": 1.0}, group=group))
            examples.append(replace(pair, chosen=pair.rejected, extras={**pair.extras, "label": 0.0}, group=group))
    partner = mismatch_partners(len(examples), seed)
    return [replace(ex, rejected=examples[partner[i]].chosen) for i, ex in enumerate(examples)]


def mismatch_partners(n: int, seed: int) -> list[int]:
    """`partner[i]` != i (for n > 1): the next index in a seeded shuffle, wrapping around (a shift by one)."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    partner = [0] * n
    for k, i in enumerate(order):
        partner[i] = order[(k + 1) % n]
    return partner


def split_pairs(pairs: list[PreferencePair], eval_fraction: float, seed: int) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """A seeded random held-out split; pairs that share a prompt group stay on the same side."""
    if eval_fraction <= 0:
        return pairs, []
    keys = sorted({p.group if p.group is not None else -1 - i for i, p in enumerate(pairs)})
    random.Random(seed).shuffle(keys)
    n_eval = max(1, round(len(keys) * eval_fraction))
    if n_eval >= len(keys):
        raise DPOError(f"--eval-fraction {eval_fraction} leaves no training data from {len(pairs)} pairs")
    eval_keys = set(keys[:n_eval])
    train, held_out = [], []
    for i, pair in enumerate(pairs):
        key = pair.group if pair.group is not None else -1 - i
        (held_out if key in eval_keys else train).append(pair)
    return train, held_out


# ---- record kinds -------------------------------------------------------------------------------------------


class _BadRecord(Exception):
    pass


def _explicit(record: dict[str, Any], _: str) -> list[PreferencePair]:
    prompt, chosen, rejected = (_text(record, name, allow_empty=name == "prompt") for name in ("prompt", "chosen", "rejected"))
    return [PreferencePair(prompt, chosen, rejected, _extras(record), gold=_gold(record, str))]


def _implicit(record: dict[str, Any], _: str) -> list[PreferencePair]:
    """HH-RLHF: cut both transcripts after the last `\\n\\nAssistant:` inside their common prefix."""
    chosen, rejected = _text(record, "chosen"), _text(record, "rejected")
    shared = _common_prefix(chosen, rejected)
    cut = shared.rfind(HH_TURN)
    if cut < 0:
        raise _BadRecord("fields 'chosen' and 'rejected' share no '\\n\\nAssistant:' turn, so the prompt cannot be "
                         "found (give a 'prompt' field, or use the explicit format)")
    end = cut + len(HH_TURN)
    prompt = chosen[:end]
    if not chosen[end:].strip() or not rejected[end:].strip():
        raise _BadRecord("field 'chosen' or 'rejected' has an empty last assistant turn")
    return [PreferencePair(prompt, chosen[end:], rejected[end:], _extras(record))]


def _conversational(record: dict[str, Any], _: str) -> list[PreferencePair]:
    chosen, rejected = _messages(record, "chosen"), _messages(record, "rejected")
    prompt: Any = record.get("prompt")
    if isinstance(prompt, list):
        prompt = _messages(record, "prompt")
        n = len(prompt)
        if chosen[:n] == prompt and rejected[:n] == prompt:  # full conversations that repeat the prompt
            chosen, rejected = chosen[n:], rejected[n:]
    elif chosen[0]["role"] != "assistant" or rejected[0]["role"] != "assistant":
        # UltraFeedback-binarized: full conversations; the prompt is their shared leading turns up to the last
        # non-assistant one (the `prompt` string, if any, repeats the first user turn).
        n = _common_prefix(chosen, rejected)
        n = min(n, len(chosen) - 1, len(rejected) - 1)
        while n > 0 and chosen[n - 1]["role"] == "assistant":
            n -= 1
        if n == 0:
            raise _BadRecord("fields 'chosen' and 'rejected' share no leading user turn to use as the prompt")
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    elif isinstance(prompt, str) and prompt.strip():
        prompt = [{"role": "user", "content": prompt}]
    else:
        raise _BadRecord("field 'prompt' is missing or empty (the completions hold only assistant turns)")
    gold = _gold(record, list)
    if isinstance(gold, list) and gold[:len(prompt)] == prompt and len(gold) > len(prompt):
        gold = gold[len(prompt):]  # a full conversation that repeats the prompt, as chosen/rejected may
    return [PreferencePair(prompt, chosen, rejected, _extras(record), tools=_tools(record), gold=gold)]


def _ranked(record: dict[str, Any], mode: str) -> list[PreferencePair]:
    prompt = _prompt_or_messages(record)
    responses = record.get("responses")
    if not isinstance(responses, list) or len(responses) < 2:
        raise _BadRecord("field 'responses' must be a list of at least two responses")
    for i, response in enumerate(responses):
        name = f"responses[{i}]"
        _messages({name: response}, name) if isinstance(response, list) else _text({name: response}, name)
    if "scores" in record:
        scores = [_number(record, "scores", s) for s in _list_of(record, "scores", len(responses))]
    elif "ranking" in record:  # rank of each response, 1 = best
        scores = [-_number(record, "ranking", r) for r in _list_of(record, "ranking", len(responses))]
    else:
        raise _BadRecord("field 'scores' (or 'ranking') is missing")
    kept, _ = rank_pairs(scores, mode)
    with_scores = "scores" in record  # ranks are not scores: no score_* extras from a ranking
    made = [PreferencePair(prompt, responses[a], responses[b],
                           {"score_chosen": scores[a], "score_rejected": scores[b]} if with_scores else {})
            for a, b in kept]
    if not made:
        raise _BadRecord("field 'scores': all responses score the same, so no pair can be formed")
    return made


def _unpaired(record: dict[str, Any], _: str) -> list[PreferencePair]:
    prompt, completion = _prompt_or_messages(record), _completion(record)
    label = record.get("label")
    if isinstance(label, str) and label.strip().lower() in ("true", "false", "1", "0"):
        label = label.strip().lower() in ("true", "1")
    if label not in (True, False):  # also accepts 0 / 1
        raise _BadRecord(f"field 'label' must be true or false, got {label!r}")
    return [PreferencePair(prompt, completion, completion, {**_extras(record), "label": float(label)})]


def _sft(record: dict[str, Any], _: str) -> list[PreferencePair]:
    if "completion" not in record and "text" in record:
        text = _text(record, "text")
        return [PreferencePair("", text, text)]
    prompt, completion = _prompt_or_messages(record), _completion(record)
    return [PreferencePair(prompt, completion, completion)]


_CONVERTERS = {"explicit": _explicit, "implicit": _implicit, "conversational": _conversational, "ranked": _ranked,
               "unpaired": _unpaired, "sft": _sft}


# ---- field checks -------------------------------------------------------------------------------------------


def _text(record: dict[str, Any], name: str, *, allow_empty: bool = False) -> str:
    if name not in record or record[name] is None:
        raise _BadRecord(f"field '{name}' is missing")
    value = record[name]
    if not isinstance(value, str):
        raise _BadRecord(f"field '{name}' must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise _BadRecord(f"field '{name}' is empty")
    return value


def _messages(record: dict[str, Any], name: str) -> list[dict[str, Any]]:
    value = record.get(name)
    if not isinstance(value, list) or not value:
        raise _BadRecord(f"field '{name}' must be a non-empty list of messages, got {type(value).__name__}")
    for i, message in enumerate(value):
        calls = isinstance(message, dict) and isinstance(message.get("tool_calls"), list)
        if isinstance(message, dict) and isinstance(message.get("content"), list):
            message = value[i] = {**message, "content": _content_parts(message["content"], name, i)}
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                or not (isinstance(message.get("content"), (str, list)) or calls and message.get("content") is None):
            raise _BadRecord(f"field '{name}', message {i}: expected {{\"role\": str, \"content\": str}} (content "
                             f"may be null beside \"tool_calls\"), got {message!r:.80}")
        if message.get("reasoning_content") is not None and not isinstance(message["reasoning_content"], str):
            raise _BadRecord(f"field '{name}', message {i}: \"reasoning_content\" must be a string")
    return value


def _content_parts(parts: list[Any], name: str, i: int) -> str | list[dict[str, Any]]:
    """A message's content given as parts: image and text parts kept as they are; text parts alone joined into
    the plain string a text-only chat template expects."""
    for part in parts:
        if not (image_column.is_image_part(part) or isinstance(part, dict) and part.get("type") == "text"
                and isinstance(part.get("text"), str)):
            raise _BadRecord(f"field '{name}', message {i}: a content part must be {{\"type\": \"image\"}} or "
                             f"{{\"type\": \"text\", \"text\": str}}, got {part!r:.80}")
    if any(image_column.is_image_part(part) for part in parts):
        return [{"type": "image"} if image_column.is_image_part(part) else {"type": "text", "text": part["text"]}
                for part in parts]
    return "".join(part["text"] for part in parts)


def _with_images(made: list[PreferencePair], record: dict[str, Any], base: Path) -> list[PreferencePair]:
    """The record's pairs with the prompt's images, one per `{"type": "image"}` placeholder of a chat prompt (a
    plain-text prompt's placeholders are the processor's image token, checked when it tokenizes them)."""
    try:
        sources = image_column.column_sources(record, base)
    except image_column.BadImage as bad:
        raise _BadRecord(str(bad)) from None
    for pair in made:
        for name in ("chosen", "rejected"):
            completion = getattr(pair, name)
            if isinstance(completion, list) and image_column.placeholder_count(completion):
                raise _BadRecord(f"field '{name}' holds an image placeholder; images belong to the prompt")
        if isinstance(pair.prompt, list) and image_column.placeholder_count(pair.prompt) != len(sources):
            raise _BadRecord(f"the prompt has {image_column.placeholder_count(pair.prompt)} image placeholders "
                             f"({{\"type\": \"image\"}}) for {len(sources)} images; give one image per placeholder")
    return [replace(pair, images=sources) for pair in made] if sources else made


def _image_base(path: str) -> Path:
    """The folder image paths in `path`'s records are relative to: the data file's (or the data folder)."""
    source = Path(path)
    return source if source.is_dir() else source.parent


def _tools(record: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The `tools` column: function definitions for the chat template (a list of JSON objects, or its JSON text)."""
    value = record.get("tools")
    if isinstance(value, str) and value.strip():
        try:
            value = json.loads(value)
        except ValueError:
            raise _BadRecord("field 'tools' is not valid JSON") from None
    if value in (None, "", []):
        return None
    if not isinstance(value, list) or not all(isinstance(tool, dict) for tool in value):
        raise _BadRecord(f"field 'tools' must be a list of function definitions (JSON objects), got {value!r:.80}")
    return value


def _prompt_or_messages(record: dict[str, Any]) -> Text:
    prompt = record.get("prompt")
    return _messages(record, "prompt") if isinstance(prompt, list) else _text(record, "prompt", allow_empty=True)


def _completion(record: dict[str, Any]) -> Text:
    value = record.get("completion")
    return _messages(record, "completion") if isinstance(value, list) else _text(record, "completion")


def _number(record: dict[str, Any], name: str, value: Any) -> float:
    if isinstance(value, str):  # CSV cells are text
        try:
            return float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _BadRecord(f"field '{name}' must be a number, got {value!r}")
    return float(value)


def _list_of(record: dict[str, Any], name: str, length: int) -> list[Any]:
    value = record[name]
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            pass
    if not isinstance(value, list) or len(value) != length:
        raise _BadRecord(f"field '{name}' must be a list with one entry per response ({length}), got {value!r:.80}")
    return value


def _gold(record: dict[str, Any], kind: type) -> Text | None:
    """The gold response of a `reference` or `gold` column (None without one), as a string or a message list
    like the record's chosen (`kind`); a conversational record's gold may also be a string (one assistant turn)."""
    name = next((n for n in GOLD_COLUMNS if record.get(n) not in (None, "", [])), None)
    if name is None:
        return None
    if kind is list and isinstance(record[name], list):
        return _messages(record, name)
    if kind is list and isinstance(record[name], str) and record[name].strip():
        return [{"role": "assistant", "content": record[name]}]
    return _text(record, name)


def _extras(record: dict[str, Any]) -> dict[str, float]:
    return {name: _number(record, name, record[name]) for name in EXTRA_FIELDS
            if record.get(name) not in (None, "")}


def _common_prefix(a: Any, b: Any) -> Any:
    """Longest common prefix of two strings (the prefix) or two lists (its length)."""
    n = min(len(a), len(b))
    k = next((i for i in range(n) if a[i] != b[i]), n)
    return a[:k] if isinstance(a, str) else k


def _parse_columns(columns: str | None) -> dict[str, str]:
    """`chosen=good,prompt=question` -> {"good": "chosen", "question": "prompt"} (source name -> ours)."""
    rename: dict[str, str] = {}
    for item in (columns or "").split(","):
        if not item.strip():
            continue
        ours, sep, theirs = item.partition("=")
        if not sep or not ours.strip() or not theirs.strip():
            raise DPOError(f"--columns: expected ours=theirs pairs like chosen=good, got {item!r}")
        rename[theirs.strip()] = ours.strip()
    return rename


# ---- sources ------------------------------------------------------------------------------------------------


def rank_pairs(scores: Sequence[float], mode: str) -> tuple[list[tuple[int, int]], int]:
    """(chosen, rejected) indices among one prompt's samples, paired as ranked data is
    (best first, equal scores in sample order): best-worst, adjacent ranks or all; and how many of those
    candidate pairs were dropped because their scores tie."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    if mode == "best-worst":
        candidates = [(order[0], order[-1])]
    elif mode == "adjacent":
        candidates = list(zip(order, order[1:]))
    else:
        candidates = [(a, b) for k, a in enumerate(order) for b in order[k + 1:]]
    kept = [(a, b) for a, b in candidates if scores[a] > scores[b]]
    return kept, len(candidates) - len(kept)
