"""Batched sampling from a causal LM: left-padded prompts, a KV cache, temperature and nucleus (top-p) sampling.

    dpo generate --model runs/sft/model --prompts prompts.jsonl --out samples.jsonl --num-samples 2 --seed 0

A prompt is text, or a list of chat messages rendered with the model's chat template and its generation prompt
(exactly as training renders prompts); a chat reply stops at the template's end of turn as well as at EOS.

Reproducible: each sampled sequence draws its noise from its own generator, seeded from (seed, prompt index,
sample index), so a rerun with the same seed gives the same samples whatever else runs in the process, and a
different --batch-size gives the same samples too (up to float rounding of batched matmuls). A token is drawn
with the Gumbel-max trick: argmax(logits / T + Gumbel noise) is a sample from softmax(logits / T)
(Maddison, Tarlow & Minka 2014, "A* Sampling", Sec. 2), which needs exactly one uniform per vocabulary entry per
step and row, independent of what the other rows do.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import distributed, models
from .errors import DPOError
from .data import tokenization
from .data.formats import Text
from .data.sources import read_records


@dataclass(frozen=True)
class Sample:
    """One sampled completion. `completion_ids` ends with a stop token (EOS, or the end of turn of a chat
    prompt) unless it was cut at `max_new_tokens`."""

    prompt_index: int
    sample_index: int
    prompt_ids: list[int]
    completion_ids: list[int]


def sample(model: torch.nn.Module, prompt_ids: Sequence[list[int]], *, eos_id: int | Sequence[int] | None, pad_id: int,
           num_samples: int = 1, max_new_tokens: int = 64, temperature: float = 1.0, top_p: float = 1.0,
           seed: int = 0, batch_size: int = 32) -> list[Sample]:
    """`num_samples` completions of every prompt, in order (prompt 0's samples first), `batch_size` rows at a time.

    `temperature` 0 is greedy decoding. `eos_id`: the token, or tokens, that end a completion. The model is put
    in eval mode and left there.
    """
    if any(not ids for ids in prompt_ids):
        raise DPOError("generate: a prompt tokenized to nothing (give the tokenizer a BOS token, or a non-empty prompt)")
    model.eval()
    jobs = [(i, k) for i in range(len(prompt_ids)) for k in range(num_samples)]
    samples = []
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start:start + batch_size]
        completions = _sample_rows(
            model, [prompt_ids[i] for i, _ in chunk], [_row_seed(seed, i, k) for i, k in chunk],
            eos_id=eos_id, pad_id=pad_id, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
        samples += [Sample(i, k, list(prompt_ids[i]), c) for (i, k), c in zip(chunk, completions)]
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
                 pad_id: int, max_new_tokens: int, temperature: float, top_p: float) -> list[list[int]]:
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
    for _ in range(max_new_tokens):
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                    past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        next_ids = choose_tokens(out.logits[:, -1].float(), temperature, top_p, generators)   # [rows]
        next_ids = next_ids.masked_fill(finished, pad_id)
        new_tokens.append(next_ids)
        finished |= torch.isin(next_ids, stop_tensor)
        if finished.all():
            break
        input_ids = next_ids[:, None]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        position_ids = position_ids[:, -1:] + 1
    tokens = torch.stack(new_tokens, dim=1).tolist() if new_tokens else [[] for _ in prompts]
    return [_cut_after_stop(row, stops) for row in tokens]


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


def sample_texts(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[Text], **options: Any,
                 ) -> list[tuple[Sample, str]]:
    """`sample` on text or message-list prompts; each sample with its completion text. `options` as `sample`'s
    keywords."""
    ids = encode_prompts(tokenizer, prompts)
    samples = sample(model, ids, eos_id=stop_ids(tokenizer, prompts), pad_id=tokenizer.pad_token_id, **options)
    return [(s, completion_text(tokenizer, s.prompt_ids, s.completion_ids)) for s in samples]


def read_prompts(path: str, field: str = "prompt") -> list[Text]:
    """The `field` of every record of a JSONL/JSON/Parquet file: a string, or a list of chat messages."""
    prompts: list[Text] = []
    for where, record in read_records(path):
        value = record.get(field)
        is_messages = isinstance(value, list) and value and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in value)
        if not isinstance(value, str) and not is_messages:
            raise DPOError(f"{where}: field '{field}' must be a string or a non-empty list of "
                           f"{{\"role\": str, \"content\": str}} messages, got {json.dumps(value)[:80]}")
        prompts.append(value)
    if not prompts:
        raise DPOError(f"{path}: no prompts found")
    return prompts


def write_samples(path: str | Path, prompts: Sequence[Text], texts: Sequence[tuple[Sample, str]]) -> Path:
    """One JSON line per sample: prompt, completion, prompt_index, sample_index, completion_tokens."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for s, text in texts:
            handle.write(json.dumps({"prompt": prompts[s.prompt_index], "completion": text,
                                     "prompt_index": s.prompt_index, "sample_index": s.sample_index,
                                     "completion_tokens": len(s.completion_ids)}) + "\n")
    return path


def generate_file(*, model: str, prompts: str, out: str, field: str = "prompt", device: str = "auto",
                  dtype: str = "float32", batch_size: int = 32, **sampling: Any) -> Path:
    """`dpo generate`: sample completions of every prompt in a file from a saved model, write them as JSONL."""
    texts_in = read_prompts(prompts, field)
    tokenizer = models.load_tokenizer(model)
    policy = models.load_model(model, dtype=dtype).to(distributed.resolve_device(device))
    texts = sample_texts(policy, tokenizer, texts_in, batch_size=batch_size, **sampling)
    path = write_samples(out, texts_in, texts)
    print(f"wrote {len(texts)} samples of {len(texts_in)} prompts to {path}", flush=True)
    return path
