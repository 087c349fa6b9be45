"""Frozen vs trainable parameters, chosen by regular expressions on '/'-joined parameter paths.

The trainer differentiates and updates the trainable tree only; the frozen tree is an argument of
the train step that is never differentiated, has no optimizer state and is saved once.
"""

from __future__ import annotations

import re
from typing import Sequence

from flax import traverse_util


def is_trainable(path: str, patterns: Sequence[str]) -> bool:
    return any(re.search(p, path) for p in patterns)


def split(params: dict, patterns: Sequence[str]) -> tuple[dict, dict]:
    """(trainable, frozen) sub-trees of `params`; every leaf lands in exactly one of them."""
    flat = traverse_util.flatten_dict(params, sep="/")
    trainable = {k: v for k, v in flat.items() if is_trainable(k, patterns)}
    frozen = {k: v for k, v in flat.items() if k not in trainable}
    if not trainable:
        raise ValueError(f"no parameter matches the trainable patterns {list(patterns)}")
    return (traverse_util.unflatten_dict(trainable, sep="/"), traverse_util.unflatten_dict(frozen, sep="/"))


def merge(trainable: dict, frozen: dict) -> dict:
    flat = traverse_util.flatten_dict(frozen, sep="/")
    flat.update(traverse_util.flatten_dict(trainable, sep="/"))
    return traverse_util.unflatten_dict(flat, sep="/")
