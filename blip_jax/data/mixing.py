"""Several sources mixed into one endless record stream with given proportions.

    mixture({"coco": coco, "vqa": vqa}, weights={"coco": 1.0, "vqa": 1.0}, balance="sqrt", seed=0)

A source's share is its `weight` times a size term: `balance="ratio"` uses the weights as they
are, `"sqrt"` multiplies them by sqrt(len(source)) (InstructBLIP's balanced sampling, where the
weight is the paper's manual adjustment), `"size"` by len(source) (proportional to size, as one
concatenated dataset would be). Each source is shuffled with its own seed and repeated, so a
small dataset restarts (with a new permutation) while a large one is still in its first epoch;
grain's `MapDataset.mix` then interleaves them deterministically, so positions, resumption and
per-process sharding work as for a single source. Every record is tagged with its source name.
"""

from __future__ import annotations

import math

import grain

BALANCES = ("ratio", "sqrt", "size")


def mixture_weights(sizes: dict[str, int], weights: dict[str, float] | None = None,
                    balance: str = "ratio") -> dict[str, float]:
    """Normalised sampling probability of each source."""
    if balance not in BALANCES:
        raise ValueError(f"unknown balance {balance!r}; use one of {', '.join(BALANCES)}")
    weights = weights or {}
    unknown = set(weights) - set(sizes)
    if unknown:
        raise ValueError(f"weights given for unknown sources {sorted(unknown)}; sources: {sorted(sizes)}")
    raw = {}
    for name, size in sizes.items():
        w = float(weights.get(name, 1.0))
        if not w >= 0 or math.isinf(w):
            raise ValueError(f"weight of source {name!r} must be a finite number >= 0, got {w}")
        if size <= 0:
            raise ValueError(f"source {name!r} is empty")
        raw[name] = w * {"ratio": 1.0, "sqrt": math.sqrt(size), "size": float(size)}[balance]
    total = sum(raw.values())
    if total <= 0:
        raise ValueError("every mixture weight is 0")
    return {name: w / total for name, w in raw.items()}


class _Tag:
    """Adds the source name (and the source's `extra` fields) to each record (a class, not a
    lambda: grain workers pickle it)."""

    def __init__(self, name: str, extra: dict | None = None):
        self.name = name
        self.extra = dict(extra or {})

    def __call__(self, record: dict) -> dict:
        return {**record, **self.extra, "source": self.name}


def mixture(sources: dict[str, object], *, weights: dict[str, float] | None = None, balance: str = "ratio",
            seed: int = 0, tags: dict[str, dict] | None = None) -> grain.MapDataset:
    """An endless, shuffled `grain.MapDataset` drawing from `sources` in proportion (module docstring).
    Sources with weight 0 are left out; `tags[name]` are fields added to each of that source's records."""
    probabilities = mixture_weights({name: len(src) for name, src in sources.items()}, weights, balance)
    parts, shares = [], []
    for i, (name, src) in enumerate(sorted(sources.items())):
        if probabilities[name] == 0:
            continue
        parts.append(grain.MapDataset.source(src).shuffle(seed=seed + 1000 * (i + 1)).repeat(None).map(_Tag(name, (tags or {}).get(name))))
        shares.append(probabilities[name])
    return grain.MapDataset.mix(parts, shares)
