"""The controlled-generation task: short "reviews" whose reward is the share of positive words.

A stand-in for the DPO paper's IMDb sentiment task (Rafailov et al. 2023, Sec. 6.1), small enough for a CPU:
a review is a few sentences like `the plot was really good and fun .`; each review has a hidden sentiment
p ~ U(0, 1), and every adjective in it is positive with probability p. The prompt is the first sentence, the
completion the rest, so an SFT model learns to continue in the prompt's mood (mean reward well below the
maximum). The reward, `positive_share`, is the share of the completion's words that are positive: it plays the
part of the paper's sentiment classifier, and preferences are drawn from it with Bradley-Terry probabilities.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from pathlib import Path

POSITIVE = ("good", "great", "happy", "lovely", "wonderful", "excellent", "bright", "kind", "fun", "nice")
NEGATIVE = ("bad", "awful", "sad", "boring", "terrible", "poor", "dark", "cruel", "dull", "ugly")
DETERMINERS = ("the", "this", "a")
NOUNS = ("movie", "film", "plot", "actor", "story", "scene", "music", "ending", "cast", "script")
VERBS = ("was", "is", "felt", "seemed")
ADVERBS = ("very", "really", "quite", "so")
SPECIALS = ("<pad>", "<unk>", "<s>", "</s>")
WORDS = (*DETERMINERS, *NOUNS, *VERBS, *ADVERBS, "and", ".", *POSITIVE, *NEGATIVE)
BT_SCALE = 10.0  # P(y1 > y2) = sigmoid(BT_SCALE * (r(y1) - r(y2))): a 0.1 reward gap is a 73% preference


def sentence(rng: random.Random, p: float) -> str:
    """`the plot was really good and fun .`: one or two adjectives, each positive with probability p."""
    words = [rng.choice(DETERMINERS), rng.choice(NOUNS), rng.choice(VERBS)]
    if rng.random() < 0.5:
        words.append(rng.choice(ADVERBS))
    adjectives = [rng.choice(POSITIVE if rng.random() < p else NEGATIVE) for _ in range(rng.choice((1, 1, 2)))]
    return " ".join(words + [" and ".join(adjectives), "."])


def review(rng: random.Random) -> dict[str, str]:
    """One SFT record: the first sentence is the prompt, two or three more the completion (with a leading space,
    so prompt + completion is the whole text)."""
    p = rng.random()
    prompt = sentence(rng, p)
    completion = " ".join(sentence(rng, p) for _ in range(rng.choice((2, 3))))
    return {"prompt": prompt, "completion": " " + completion}


def positive_share(prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
    """The reward: share of the completion's words that are positive (0 for an empty completion)."""
    rewards = []
    for completion in completions:
        words = completion.split()
        rewards.append(sum(w in POSITIVE for w in words) / len(words) if words else 0.0)
    return rewards


def write_jsonl(path: Path, records: Sequence[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def label_pairs(samples: Sequence[dict], seed: int) -> list[dict]:
    """Preference pairs from two samples per prompt, labelled by a draw from the Bradley-Terry model of the
    reward (Bradley & Terry 1952; the DPO paper's Eq. 1). Identical or empty completions (EOS first) are skipped:
    the former carry no preference, the latter are not valid records of a preference file."""
    rng = random.Random(seed)
    by_prompt: dict[int, list[dict]] = {}
    for s in samples:
        by_prompt.setdefault(s["prompt_index"], []).append(s)
    pairs = []
    for group in by_prompt.values():
        first, second = group[0], group[1]
        if first["completion"] == second["completion"] or not (first["completion"].strip() and second["completion"].strip()):
            continue
        r1, r2 = positive_share([], [first["completion"], second["completion"]])
        first_wins = rng.random() < 1.0 / (1.0 + math.exp(-BT_SCALE * (r1 - r2)))
        chosen, rejected = (first, second) if first_wins else (second, first)
        pairs.append({"prompt": first["prompt"], "chosen": chosen["completion"], "rejected": rejected["completion"]})
    return pairs


def build_tokenizer(path: Path):
    """A word-level tokenizer over the task's words (BOS added to every text), saved with `save_pretrained`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate((*SPECIALS, *WORDS))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                       special_tokens=[("<s>", vocab["<s>"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    fast.save_pretrained(path)
    return fast


def build_model(path: Path, tokenizer, *, hidden: int, layers: int, seed: int):
    """A random-init Llama sized for the task, saved with its tokenizer: the starting point of SFT."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=128, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())
