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


def _fits(source_shape: tuple[int, ...], kind: str, shape: tuple[int, ...]) -> bool:
    """Whether a PyTorch tensor of `source_shape` can become the Flax parameter `shape`."""
    if kind == "conv":  # [out, in, kh, kw] -> [kh, kw, in, out]
        return len(source_shape) == 4 and tuple(source_shape[i] for i in (2, 3, 1, 0)) == shape
    if kind == "linear":  # [out, in] -> [in..., out...], split anywhere the sizes allow
        return len(source_shape) == 2 and any(
            math.prod(shape[:k]) == source_shape[1] and math.prod(shape[k:]) == source_shape[0]
            for k in range(1, len(shape)))
    if len(source_shape) == len(shape):
        return tuple(source_shape) == shape
    return math.prod(source_shape) == math.prod(shape) and len(source_shape) < len(shape) + 2


def to_flax(tensor: np.ndarray, kind: str, shape: tuple[int, ...]) -> np.ndarray | None:
    """Reshape a PyTorch tensor to the Flax parameter `shape`, or None when it cannot fit."""
    if not _fits(tensor.shape, kind, shape):
        return None
    if kind == "conv":
        return tensor.transpose(2, 3, 1, 0)
    if kind == "linear":
        return tensor.T.reshape(shape)
    return tensor.reshape(shape)


def to_torch(array: np.ndarray, kind: str, shape: tuple[int, ...]) -> np.ndarray:
    """The inverse of `to_flax`: a Flax parameter as the PyTorch tensor of `shape`."""
    if kind == "conv":
        return np.ascontiguousarray(array.transpose(3, 2, 0, 1))
    if kind == "linear":
        return np.ascontiguousarray(array.reshape(shape[1], shape[0]).T) if len(shape) == 2 else array.reshape(shape)
    return np.ascontiguousarray(array).reshape(shape)  # (ascontiguousarray makes a scalar 1-d)


class LazyWeight:
    """A converted parameter not read yet: `np.asarray(w)` reads, reshapes and casts it. Checkpoint
    writers materialise one at a time, so a conversion holds a few tensors, not the model."""

    lazy = True

    def __init__(self, tensors: Mapping, key: str, kind: str, shape: tuple[int, ...], dtype):
        self.tensors, self.key, self.kind, self.shape, self.dtype = tensors, key, kind, shape, np.dtype(dtype)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def __array__(self, dtype=None, copy=None):
        source = self.tensors[self.key]
        # a copy of its own, so a source that maps a file can hand the pages back now
        value = np.array(to_flax(_numpy(source), self.kind, self.shape), dtype or self.dtype)
        if hasattr(self.tensors, "release"):
            self.tensors.release(source)
        return value


def _numpy(tensor) -> np.ndarray:
    if hasattr(tensor, "detach"):  # a torch tensor from an in-memory state dict
        tensor = tensor.detach().cpu()
        return (tensor.float() if str(tensor.dtype) == "torch.bfloat16" else tensor).numpy()
    return np.asarray(tensor)


def _source_shape(tensors: Mapping, key: str) -> tuple[int, ...]:
    if hasattr(tensors, "shape"):  # a CheckpointReader: from the file header, nothing read
        return tuple(tensors.shape(key))
    return tuple(np.shape(_numpy(tensors[key])))


def map_weights(tensors: Mapping, expected: Mapping, hf_key: Callable[[str], tuple[str, str]], *,
                what: str, scope: str = "", ignore: re.Pattern | None = None, dtype=None,
                progress: bool = False) -> tuple[dict, list[str]]:
    """Flat {'/'-path: array} for every `expected` {'/'-path: ShapeDtypeStruct}, from `tensors` (any
    mapping with `keys`, `in` and `[]`). Every key and shape is checked first; source keys under
    `scope` that no parameter uses are unexpected unless `ignore` matches them. Returns (flat params,
    ignored keys); raises one ConversionError naming every problem. From a reader that reports shapes
    (`CheckpointReader`), the arrays are `LazyWeight`s, read only when used or written."""
    missing, mismatched, consumed, flat = [], [], set(), {}
    lazy = hasattr(tensors, "shape")
    for path, spec in tqdm(expected.items(), desc="convert", unit="tensor", disable=not progress):
        key, kind = hf_key(path)
        if key not in tensors:
            missing.append(key)
            continue
        consumed.add(key)
        shape, source = tuple(spec.shape), _source_shape(tensors, key)
        if not _fits(source, kind, shape):
            mismatched.append(f"{key}: checkpoint {source}, model expects {shape} ({path})")
            continue
        weight = LazyWeight(tensors, key, kind, shape, dtype or spec.dtype)
        flat[path] = weight if lazy else np.asarray(weight)
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
