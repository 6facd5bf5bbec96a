"""Several data sources mixed into one training set: `--data a.jsonl:0.7,b.parquet:0.3`.

Each source is `PATH[:WEIGHT]`, and the weight is the share of that source's pairs taken: 0.5 a random half,
1 (the default) all of them, 2 every pair twice, 2.5 twice and then a random half, as the dataset mixers of the
alignment-handbook and open-instruct recipes read their weights. Which pairs are taken and the order of the
mixture depend on the seed alone, so a run is repeatable; the pairs taken from each source are counted in the
notes. A single source without a weight is read as it always was: nothing is sampled or reordered.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..errors import DPOError
from . import formats
from .formats import PreferencePair


@dataclass(frozen=True)
class Source:
    """One `--data` source: a file, folder or hub name, and the share of its pairs taken."""

    path: str
    weight: float = 1.0


def parse(spec: str) -> list[Source]:
    """The sources of a `--data` value: comma-separated `PATH[:WEIGHT]`. A value naming an existing file or
    folder is that one source, whatever characters its name holds."""
    if Path(spec).exists():
        return [Source(spec)]
    sources = []
    for part in spec.split(","):
        path, colon, weight = part.strip().rpartition(":")
        try:
            value = float(weight) if colon and path else None
        except ValueError:
            value = None
        if value is None:
            path, value = part.strip(), 1.0
        if not path:
            raise DPOError(f"--data {spec!r}: an empty source; give PATH[:WEIGHT] items separated by commas")
        if not value > 0 or value == float("inf"):
            raise DPOError(f"--data {spec!r}: the weight of {path} must be a positive number (the share of its "
                           f"pairs taken), got {weight}")
        sources.append(Source(path, value))
    return sources


def is_mixture(sources: list[Source]) -> bool:
    """Whether the sources are sampled and mixed (several, or one with a weight other than 1)."""
    return len(sources) > 1 or sources[0].weight != 1.0


def load(sources: list[Source], *, split: str, seed: int, max_pairs: int | None, **options: Any,
         ) -> tuple[list[PreferencePair], list[formats.DataReport], list[str]]:
    """The mixture's pairs (`mix`), each source's `DataReport`, and lines saying how many pairs came from each.
    `options` are `formats.load_pairs`'s; `max_pairs` caps the mixture, not a source."""
    loaded = [formats.load_pairs(source.path, split=split, seed=seed, **options) for source in sources]
    mixed, counts = mix([(pairs, source.weight) for source, (pairs, _) in zip(sources, loaded)], seed)
    notes = [f"mixture of {len(sources)} sources (--seed {seed}): {len(mixed)} pairs"]
    notes += [f"  {source.path}: {count} of {len(pairs)} pairs (weight {source.weight:g})"
              for source, (pairs, _), count in zip(sources, loaded, counts)]
    if max_pairs is not None and len(mixed) > max_pairs:
        mixed = mixed[:max_pairs]
        notes.append(f"  stopped at --max-pairs {max_pairs}")
    return mixed, [report for _, report in loaded], notes


def mix(parts: list[tuple[list[PreferencePair], float]], seed: int) -> tuple[list[PreferencePair], list[int]]:
    """Each part's pairs taken `weight` times (whole copies, then a random share of the rest), all shuffled
    together, drawn by `seed`; and how many pairs came from each part. Pairs that share a prompt (a `group`:
    ranked data) are taken, left and moved together, and renumbered, so no two parts (or two copies of one
    part) share a group."""
    rng = random.Random(seed)
    units: list[list[PreferencePair]] = []
    counts = []
    for pairs, weight in parts:
        whole, share = divmod(weight, 1.0)
        own = _units(pairs)
        taken = own * int(whole) + [own[k] for k in sorted(rng.sample(range(len(own)), round(share * len(own))))]
        units += taken
        counts.append(sum(map(len, taken)))
    rng.shuffle(units)
    out: list[PreferencePair] = []
    for group, unit in enumerate(units):
        out += unit if unit[0].group is None else [replace(pair, group=group) for pair in unit]
    return out, counts


def _units(pairs: list[PreferencePair]) -> list[list[PreferencePair]]:
    """The pairs, those of one group together, in order of first appearance."""
    units: dict[object, list[PreferencePair]] = {}
    for i, pair in enumerate(pairs):
        units.setdefault(i if pair.group is None else ("group", pair.group), []).append(pair)
    return list(units.values())
