"""Mapping transformers tensors onto blip-jax parameter trees: one mechanism for every model.

A model describes its weights by (1) its abstract parameter tree and (2) a rename table from its
unrolled Flax paths to transformers keys; `map_weights` then reshapes each tensor to the Flax
layout, checks it, and reports every missing key, unexpected key and shape mismatch at once.
"""

from __future__ import annotations

import math
import re
from typing import Callable, Mapping

import numpy as np
from flax import traverse_util
from tqdm import tqdm

# Flax leaf name -> PyTorch parameter name
LEAVES = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


class ConversionError(ValueError):
    """The source tensors do not fit the model its config describes."""


def rename(path: str, rules: list[tuple[str, str]]) -> tuple[str, str]:
    """'a/b/kernel' -> (transformers key, kind) by applying `rules` (regex, replacement) to the
    module path; kind is linear | conv | plain and says how `to_flax` reshapes the tensor."""
    module = path
    for pattern, repl in rules:
        module = re.sub(pattern, repl, module)
    if "/" not in module:  # a bare parameter (cls, pos, head_bias)
        return module, "plain"
    head, leaf = module.rsplit("/", 1)
    head = head.replace("/", ".")
    kind = "plain"
    if leaf == "kernel":
        kind = "conv" if head.endswith("patch_embedding") else "linear"
    return f"{head}.{LEAVES[leaf]}", kind


def to_flax(tensor: np.ndarray, kind: str, shape: tuple[int, ...]) -> np.ndarray | None:
    """Reshape a PyTorch tensor to the Flax parameter `shape`, or None when it cannot fit."""
    if kind == "conv":  # [out, in, kh, kw] -> [kh, kw, in, out]
        out = tensor.transpose(2, 3, 1, 0)
        return out if out.shape == shape else None
    if kind == "linear":  # [out, in] -> [in..., out...], split anywhere the sizes allow
        if tensor.ndim != 2:
            return None
        fits = any(math.prod(shape[:k]) == tensor.shape[1] and math.prod(shape[k:]) == tensor.shape[0]
                   for k in range(1, len(shape)))
        return tensor.T.reshape(shape) if fits else None
    if tensor.ndim == len(shape):
        return tensor if tensor.shape == shape else None
    return tensor.reshape(shape) if tensor.size == math.prod(shape) and tensor.ndim < len(shape) + 2 else None


def _numpy(tensor) -> np.ndarray:
    if hasattr(tensor, "detach"):  # a torch tensor from an in-memory state dict
        tensor = tensor.detach().cpu()
        return (tensor.float() if str(tensor.dtype) == "torch.bfloat16" else tensor).numpy()
    return np.asarray(tensor)


def map_weights(tensors: Mapping, expected: Mapping, hf_key: Callable[[str], tuple[str, str]], *,
                what: str, scope: str = "", ignore: re.Pattern | None = None, dtype=None,
                progress: bool = False) -> tuple[dict, list[str]]:
    """Flat {'/'-path: array} for every `expected` {'/'-path: ShapeDtypeStruct}, read from `tensors`
    (any mapping with `keys`, `in` and `[]`, read one tensor at a time). Source keys under `scope`
    that no parameter uses are unexpected unless `ignore` matches them. Returns (flat params,
    ignored keys); raises one ConversionError naming every problem."""
    missing, mismatched, consumed, flat = [], [], set(), {}
    for path, spec in tqdm(expected.items(), desc="convert", unit="tensor", disable=not progress):
        key, kind = hf_key(path)
        if key not in tensors:
            missing.append(key)
            continue
        tensor = _numpy(tensors[key])
        consumed.add(key)
        value = to_flax(tensor, kind, tuple(spec.shape))
        if value is None:
            mismatched.append(f"{key}: checkpoint {tuple(tensor.shape)}, model expects {tuple(spec.shape)} ({path})")
            continue
        flat[path] = np.asarray(value, dtype=dtype or spec.dtype)
    leftover = [k for k in tensors.keys() if k.startswith(scope) and k not in consumed]
    ignored = [k for k in leftover if ignore is not None and ignore.search(k)]
    unexpected = [k for k in leftover if k not in ignored]
    if missing or unexpected or mismatched:
        lines = [f"{what}:"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                             ("shape mismatches", mismatched)):
            if items:
                lines.append(f"  {title} ({len(items)}):")
                lines += [f"    {item}" for item in items]
        raise ConversionError("\n".join(lines))
    return flat, sorted(ignored)


def expected_params(shapes) -> dict:
    """The flat {'/'-path: ShapeDtypeStruct} view `map_weights` takes."""
    return traverse_util.flatten_dict(shapes, sep="/")
