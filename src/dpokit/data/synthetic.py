"""The built-in synthetic preference task: learnable, checkable, and tiny (vocab 32, as in the tutorial).

Token 0 is BOS, 1 is EOS, 2..31 are symbols. A prompt is BOS and 6-12 random symbols. The chosen completion
*counts up* from the prompt's last symbol (s+1, s+2, ... wrapping within the symbols); the rejected completion
has the same length but random symbols, so it breaks the rule. A policy that learned the preference ranks
chosen above rejected on held-out prompts it never saw; `follows_rule` checks any completion.

As text (`build_tokenizer`), BOS is `<s>`, EOS `</s>` and each symbol is written as its own id: the prompt
`<s> 29 30` is `[0, 29, 30]` and its chosen completion `31 2 3 </s>`, so a sample reads as the ids it is.
"""

from __future__ import annotations

import random
from typing import Any

from .tokenization import TokenizedPair

BOS, EOS, FIRST_SYMBOL, VOCAB = 0, 1, 2, 32
NUM_SYMBOLS = VOCAB - FIRST_SYMBOL
BOS_TEXT, EOS_TEXT = "<s>", "</s>"


def build_tokenizer() -> Any:
    """The task's vocabulary as a `tokenizers.Tokenizer`: word-level, split on whitespace, BOS added once.

    Ids are exactly the task's (`<s>` 0, `</s>` 1, symbol `"k"` is k for k in 2..31), so a model trained on
    `make_pairs` samples text through it. Decoding joins tokens with spaces. There is no unknown token (the
    vocabulary is the model's 32 rows): a word outside it fails to encode rather than becoming another token.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {BOS_TEXT: BOS, EOS_TEXT: EOS, **{str(k): k for k in range(FIRST_SYMBOL, VOCAB)}}
    tokenizer = Tokenizer(models.WordLevel(vocab))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens([BOS_TEXT, EOS_TEXT])
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TEXT} $A", pair=f"{BOS_TEXT} $A $B", special_tokens=[(BOS_TEXT, BOS)])
    return tokenizer


def next_symbol(token: int) -> int:
    return FIRST_SYMBOL + (token - FIRST_SYMBOL + 1) % NUM_SYMBOLS


def follows_rule(prompt_ids: list[int], completion_ids: list[int]) -> bool:
    """True when the completion counts up from the prompt's last symbol (EOS at the end is allowed)."""
    body = completion_ids[:-1] if completion_ids and completion_ids[-1] == EOS else completion_ids
    previous = prompt_ids[-1]
    for token in body:
        if token != next_symbol(previous):
            return False
        previous = token
    return bool(body)


def make_pairs(num_pairs: int, seed: int) -> list[TokenizedPair]:
    """`num_pairs` synthetic pairs, the same for the same seed."""
    rng = random.Random(seed)
    pairs = []
    while len(pairs) < num_pairs:
        prompt = [BOS] + [rng.randrange(FIRST_SYMBOL, VOCAB) for _ in range(rng.randint(6, 12))]
        length = rng.randint(4, 8)
        chosen, token = [], prompt[-1]
        for _ in range(length):
            token = next_symbol(token)
            chosen.append(token)
        rejected = [rng.randrange(FIRST_SYMBOL, VOCAB) for _ in range(length)]
        if follows_rule(prompt, rejected):  # vanishingly rare; keep the task clean
            continue
        pairs.append(TokenizedPair(prompt, chosen + [EOS], rejected + [EOS]))
    return pairs
