"""Judging sampled completions for `dpo online`: sample a policy, score the samples with reward functions and
reward models, pair them as ranked data.

`sample_and_judge` is one call for a round (`online`) or a step (`on_policy`): K completions per prompt from the
policy as it is (`generate.sample`: KV cache, each sequence seeded from (seed, prompt, sample)), every judge's
score weighted and summed, minus `missing_eos_penalty` for a completion cut at `max_new_tokens` (TRL's OnlineDPO
penalty). A judge that raises, returns the wrong count or a non-finite number stops the run with one line naming
the place (round or step) and the prompt.

Under torchrun each rank samples and judges a contiguous share of the prompts, seeded as one process seeds them
(`first_prompt`), and `on_every_rank` brings the shares (or the first rank's error) to every rank: the samples are
those of one process, and a judge failing on one rank stops all of them with its line instead of leaving the
others waiting in a collective.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import torch

from . import distributed, generate, models
from .data.formats import PAIRING, Text, rank_pairs
from .errors import DPOError, ReportedElsewhere

Judge = Callable[[list[Text], list[str]], Sequence[float]]
T = TypeVar("T")


@dataclass(frozen=True)
class Sampling:
    """How completions are drawn and scored, the same for every round or step of a run."""

    tokenizer: Any
    prompts: list[Text]                 # every prompt of the file
    prompt_ids: list[list[int]]         # their token ids, as training tokenizes prompts
    judges: list[tuple[str, Judge]]     # (name for messages, callable)
    weights: list[float]                # one per judge
    samples_per_prompt: int
    max_new_tokens: int
    temperature: float
    top_p: float
    batch_size: int                     # sequences per sampling forward pass
    missing_eos_penalty: float | None


@dataclass(frozen=True)
class Judged:
    """The samples of some prompts, `samples_per_prompt` each in prompt order, with their scores."""

    prompt_indices: list[int]           # into `Sampling.prompts`, in sampling order
    samples: list[generate.Sample]
    texts: list[str]                    # each completion as text continuing its prompt
    asked: list[Text]                   # each sample's prompt
    scores: torch.Tensor                # [samples] float64: weighted judges' sum, minus the missing-EOS penalty
    missing_eos: torch.Tensor           # [samples] bool: cut at max_new_tokens


def round_prompts(num_prompts: int, per_round: int | None, seed: int, n: int) -> list[int]:
    """Indices of round n's prompts (n from 1; an on-policy step takes its prompts as a round): every prompt in
    file order, or the n-th slice of `per_round` from a stream of passes, each pass a permutation of the prompts
    seeded by (seed, pass)."""
    if per_round is None:
        return list(range(num_prompts))
    first, last = (n - 1) * per_round, n * per_round
    out = []
    for p in range(first // num_prompts, (last - 1) // num_prompts + 1):
        order = list(range(num_prompts))
        random.Random(f"online-prompts-{seed}-{p}").shuffle(order)
        out += [i for k, i in enumerate(order, start=p * num_prompts) if first <= k < last]
    return out


def sample_and_judge(policy: torch.nn.Module, sampling: Sampling, prompt_indices: list[int], seed: int,
                     place: str, *, progress: bool = False, first_prompt: int = 0) -> Judged:
    """Sample `sampling.samples_per_prompt` completions of each prompt from `policy` (left in eval mode) with
    `seed`, and score them; `place` ("round 2", "step 7") names where, in messages. `progress`: a sampling bar,
    drawn on a terminal only (tqdm's own check), so a redirected log gets no carriage-return frames.
    `first_prompt`: where `prompt_indices` start in the list of prompts one process would sample (a rank's share;
    `generate.sample`)."""
    from tqdm.auto import tqdm

    if not prompt_indices:  # a rank left without prompts asks no judge
        return Judged([], [], [], [], torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.bool))
    context = getattr(policy.config, "max_position_embeddings", None)
    for i in prompt_indices:
        if context is not None and len(sampling.prompt_ids[i]) + sampling.max_new_tokens > context:
            raise DPOError(f"{place}, prompt {i}: {len(sampling.prompt_ids[i])} tokens + --max-new-tokens "
                           f"{sampling.max_new_tokens} exceed the model's context ({context} positions); shorten "
                           "the prompt or lower --max-new-tokens")
    tokenizer = sampling.tokenizer
    stops = generate.stop_ids(tokenizer, sampling.prompts)
    with tqdm(total=len(prompt_indices) * sampling.samples_per_prompt, desc=f"{place}: sampling", unit="sample",
              disable=None if progress else True, leave=False) as bar:
        samples = generate.sample(policy, [sampling.prompt_ids[i] for i in prompt_indices], eos_id=stops,
                                  pad_id=tokenizer.pad_token_id, num_samples=sampling.samples_per_prompt,
                                  max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
                                  top_p=sampling.top_p, seed=seed, batch_size=sampling.batch_size,
                                  progress=bar.update, first_prompt=first_prompt)
    texts = [generate.completion_text(tokenizer, s.prompt_ids, s.completion_ids) for s in samples]
    asked = [sampling.prompts[prompt_indices[s.prompt_index]] for s in samples]
    where = [f"{place}, prompt {prompt_indices[s.prompt_index]}" for s in samples]
    scores = torch.zeros(len(samples), dtype=torch.float64)                      # [samples]
    for (name, judge), weight in zip(sampling.judges, sampling.weights):
        scores += weight * judge_scores(name, judge, asked, texts, where)
    missing_eos = torch.tensor([not s.completion_ids or s.completion_ids[-1] not in stops for s in samples])
    if sampling.missing_eos_penalty:
        scores -= sampling.missing_eos_penalty * missing_eos.double()
    return Judged(list(prompt_indices), samples, texts, asked, scores, missing_eos)


def rank_share(num_items: int, dist: distributed.Dist) -> range:
    """This rank's contiguous share of `num_items` (rank 0 first; the last ranks' may be shorter or empty)."""
    size = math.ceil(num_items / dist.world_size)
    return range(min(dist.rank * size, num_items), min((dist.rank + 1) * size, num_items))


def sample_and_judge_shared(policy: torch.nn.Module, sampling: Sampling, prompt_indices: list[int], seed: int,
                            place: str, dist: distributed.Dist, *, progress: bool = False) -> Judged:
    """`sample_and_judge` of `prompt_indices` spread over the ranks (`rank_share`), every rank getting all the
    samples in order: what one process samples and scores."""
    share = rank_share(len(prompt_indices), dist)

    def own() -> Judged:
        return sample_and_judge(policy, sampling, prompt_indices[share.start:share.stop], seed, place,
                                progress=progress, first_prompt=share.start)

    return joined(on_every_rank(own, dist), sampling.samples_per_prompt)


def joined(parts: list[Judged], k: int) -> Judged:
    """The ranks' `Judged` shares as one, in order (each sample's `prompt_index` into the joined prompts)."""
    samples: list[generate.Sample] = []
    for part in parts:
        before = len(samples) // k  # the prompts of the ranks before
        samples += [replace(s, prompt_index=before + s.prompt_index) for s in part.samples]
    return Judged([i for p in parts for i in p.prompt_indices], samples, [t for p in parts for t in p.texts],
                  [a for p in parts for a in p.asked], torch.cat([p.scores for p in parts]),
                  torch.cat([p.missing_eos for p in parts]))


def on_every_rank(work: Callable[[], T], dist: distributed.Dist) -> list[T]:
    """`work()` on every rank, each rank's result on every rank (rank order). A `DPOError` on any rank is raised
    on every rank (the lowest rank's, its message as it is), so that no rank waits for one that stopped; rank 0
    reports it, the others raise it as `ReportedElsewhere`."""
    try:
        result: tuple[T | None, str | None] = work(), None
    except DPOError as err:
        result = None, str(err)
    gathered = distributed.gather_to_all(result, dist)
    failed = next((message for _, message in gathered if message is not None), None)
    if failed is not None:
        raise DPOError(failed) if dist.is_main else ReportedElsewhere(failed)
    return [value for value, _ in gathered]


def judge_scores(name: str, judge: Judge, prompts: list[Text], completions: list[str], where: list[str],
                 ) -> torch.Tensor:
    """One judge's score of every completion `[samples]`, checked: one finite number each. A judge that raises
    is asked again prompt by prompt to name the prompt it fails on."""
    try:
        values = list(judge(prompts, completions))
    except Exception as err:  # the user's code: any exception is theirs to fix, reported in one line
        failing = next((w for w in dict.fromkeys(where) if _raises(judge, prompts, completions, where, w)),
                       where[0].split(",")[0])
        raise DPOError(f"{name}: {failing}: raised {type(err).__name__}: {_first_line(err)}") from None
    if len(values) != len(completions):
        raise DPOError(f"{name}: {where[0].split(',')[0]}: returned {len(values)} values for {len(completions)} "
                       "completions (one number per completion)")
    scores = []
    for i, value in enumerate(values):
        number = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else (
            value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else None)
        if number is None or not math.isfinite(number):
            raise DPOError(f"{name}: {where[i]}: returned {value!r} for a completion; a reward must be a finite "
                           "number")
        scores.append(number)
    return torch.tensor(scores, dtype=torch.float64)


def _raises(judge: Judge, prompts: list[Text], completions: list[str], where: list[str], place: str) -> bool:
    rows = [i for i, w in enumerate(where) if w == place]
    try:
        judge([prompts[i] for i in rows], [completions[i] for i in rows])
    except Exception:  # noqa: BLE001 - locating the user's failure, not handling it
        return True
    return False


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else "(no message)"


def build_pairs(prompts: list[Text], texts: list[str], scores: list[float], k: int, mode: str,
                prompt_indices: list[int]) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """The round file's records from samples in prompt order (`k` per prompt), and what was dropped."""
    assert mode in PAIRING
    records: list[dict[str, Any]] = []
    counts = {"ties_dropped": 0, "empty_dropped": 0}
    for start in range(0, len(texts), k):
        kept, ties = rank_pairs(scores[start:start + k], mode)
        counts["ties_dropped"] += ties
        prompt = prompts[start]
        for a, b in kept:
            chosen, rejected = texts[start + a], texts[start + b]
            if not chosen.strip() or not rejected.strip():
                counts["empty_dropped"] += 1
                continue
            if not isinstance(prompt, str):  # message-list prompts: conversational records
                chosen = [{"role": "assistant", "content": chosen}]      # type: ignore[assignment]
                rejected = [{"role": "assistant", "content": rejected}]  # type: ignore[assignment]
            records.append({"prompt": prompt, "chosen": chosen, "rejected": rejected,
                            "score_chosen": scores[start + a], "score_rejected": scores[start + b],
                            "prompt_index": prompt_indices[start // k]})
    return records, counts


class RewardModel:
    """A sequence-classification reward model (`AutoModelForSequenceClassification`, one logit): the score of a
    prompt and completion is that logit, read through the model's chat template when it has one (as reward models
    are trained on conversations), else on prompt + completion as text. Batched, no grad, right-padded (the
    classifier reads the last non-pad token)."""

    def __init__(self, path: str, *, device: torch.device, dtype: str, batch_size: int, max_length: int) -> None:
        from transformers import AutoConfig, AutoModelForSequenceClassification

        where = f"--reward-model {path}"
        if not (Path(path) / "config.json").is_file():
            raise DPOError(f"{where}: no model here (no config.json); give a folder saved from "
                           "AutoModelForSequenceClassification")
        try:
            config = AutoConfig.from_pretrained(path)
        except (OSError, ValueError, KeyError) as err:
            raise DPOError(f"{where}: could not read its config ({_first_line(err)})") from None
        architectures = list(getattr(config, "architectures", None) or [])
        if not any(a.endswith("ForSequenceClassification") for a in architectures):
            raise DPOError(f"{where}: not a sequence classifier (it is {', '.join(architectures) or 'unnamed'}); "
                           "give a reward model saved from AutoModelForSequenceClassification with num_labels=1")
        if config.num_labels != 1:
            raise DPOError(f"{where}: a reward model has one output (num_labels=1), this one has {config.num_labels}")
        self.tokenizer = models.load_tokenizer(path)
        self.tokenizer.padding_side = "right"
        try:
            self.model = AutoModelForSequenceClassification.from_pretrained(path, dtype=models.DTYPES[dtype])
        except (OSError, ValueError, KeyError) as err:
            raise DPOError(f"{where}: could not load it ({_first_line(err)})") from None
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model.requires_grad_(False)
        self.model.to(device).eval()
        self.where, self.device, self.batch_size, self.max_length = where, device, batch_size, max_length
        self.chat = bool(getattr(self.tokenizer, "chat_template", None))

    def text(self, prompt: Text, completion: str) -> str:
        if self.chat:
            messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            return self.tokenizer.apply_chat_template(  # type: ignore[no-any-return]
                [*messages, {"role": "assistant", "content": completion}], tokenize=False)
        if not isinstance(prompt, str):
            raise DPOError(f"{self.where}: the prompts are message lists but the reward model's tokenizer has no "
                           "chat template")
        return prompt + completion

    @torch.no_grad()
    def __call__(self, prompts: list[Text], completions: list[str]) -> list[float]:
        texts = [self.text(p, c) for p, c in zip(prompts, completions)]
        scores: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            encoded = self.tokenizer(texts[start:start + self.batch_size], padding=True, truncation=True,
                                     max_length=self.max_length, add_special_tokens=not self.chat,
                                     return_tensors="pt").to(self.device)
            scores += self.model(**encoded).logits[:, 0].float().tolist()   # [rows]
        return scores
