"""The built-in synthetic preference task: learnable, checkable, and tiny (vocab 32, as in the tutorial).

Token 0 is BOS, 1 is EOS, 2..31 are symbols. A prompt is BOS and 6-12 random symbols. The chosen completion
*counts up* from the prompt's last symbol (s+1, s+2, ... wrapping within the symbols); the rejected completion
has the same length but random symbols, so it breaks the rule. A policy that learned the preference ranks
chosen above rejected on held-out prompts it never saw; `follows_rule` checks any completion.
"""

from __future__ import annotations

import random

from .tokenization import TokenizedPair

BOS, EOS, FIRST_SYMBOL, VOCAB = 0, 1, 2, 32
NUM_SYMBOLS = VOCAB - FIRST_SYMBOL


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
