"""Convert parameter trees between the unrolled (`layers_0`, `layers_1`, ...) and scanned
(`layers`, stacked on a leading axis) layouts of `LayerStack`.

Both functions consume their input as they go (each per-layer array is dropped once copied), so a
conversion never holds two full copies of a model.
"""

from __future__ import annotations

import re

import numpy as np

_LAYER = re.compile(r"^layers_(\d+)$")


def _is_unrolled_stack(node) -> bool:
    return isinstance(node, dict) and node and all(_LAYER.match(k) for k in node)


def stack_layers(tree: dict) -> dict:
    """{'layers_0': t0, 'layers_1': t1, ...} -> {'layers': stacked}, recursively."""
    if not isinstance(tree, dict):
        return tree
    if _is_unrolled_stack(tree):
        count = len(tree)
        layer_trees = [tree.pop(f"layers_{i}") for i in range(count)]
        return {"layers": _stack([stack_layers(t) for t in layer_trees])}
    return {k: stack_layers(v) for k, v in list(tree.items())}


class LazyStack:
    """Stacked lazy weights (`blip_jax.models.weights.LazyWeight`), read when materialised."""

    lazy = True

    def __init__(self, parts: list):
        self.parts = parts
        self.shape = (len(parts),) + tuple(parts[0].shape)
        self.dtype = parts[0].dtype
        self.size = int(np.prod(self.shape))
        self.nbytes = self.size * self.dtype.itemsize

    def __array__(self, dtype=None, copy=None):
        out = np.empty(self.shape, dtype or self.dtype)
        for i, part in enumerate(self.parts):
            out[i] = np.asarray(part)
        return out


def _stack(trees: list):
    first = trees[0]
    if isinstance(first, dict):
        return {k: _stack([t.pop(k) for t in trees]) for k in list(first)}
    if getattr(first, "lazy", False):
        return LazyStack(trees)
    out = np.empty((len(trees),) + np.shape(first), dtype=np.asarray(first).dtype)
    for i in range(len(trees)):
        out[i] = trees[i]
        trees[i] = None
    return out


def unstack_layers(tree: dict) -> dict:
    """{'layers': stacked} -> {'layers_0': ..., 'layers_1': ...}, recursively."""
    if not isinstance(tree, dict):
        return tree
    out = {}
    for k, v in list(tree.items()):
        if k == "layers" and isinstance(v, dict):
            count = _leading(v)
            for i in range(count):
                out[f"layers_{i}"] = unstack_layers(_index(v, i))
        else:
            out[k] = unstack_layers(v)
    return out


def _leading(tree) -> int:
    while isinstance(tree, dict):
        tree = next(iter(tree.values()))
    return np.shape(tree)[0]


def _index(tree, i):
    if isinstance(tree, dict):
        return {k: _index(v, i) for k, v in tree.items()}
    return np.asarray(tree[i])
