"""int8 weight-only storage of the frozen towers (the ViT, the LLM): each Dense kernel kept as int8
with an fp32 scale per output element, dequantised where it is used.

A kernel W [in, out...] (or a stacked [layers, in, out...]) becomes q = round(W / s) in int8, with
s = max |W| over the input axis / 127 (per output channel: the input axis is the first of the
kernel's own axes), and a `kernel_scale` leaf s beside it. `layers.Dense` finds the scale and
computes with q * s in its compute dtype, so products still accumulate in fp32. Only kernels are
quantised (embeddings, norms, biases and the ViT's patch projection stay as they are): 4x less
memory than fp32 for those weights, 2x less than bf16. Quantisation is applied to a model's
parameters when it is loaded (`blip_jax.load(path, int8=True)`), or on the device to a training
run's frozen partition (`model.int8_frozen`, each leaf in its kernel's sharding); a run's W/model
holds the dequantised kernels, the weights it trained against.
"""

from __future__ import annotations

import re

import numpy as np
from flax import traverse_util

SCALE = "kernel_scale"
# the frozen towers of BLIP-2 / InstructBLIP, and BLIP's ViT; the patch projection is a convolution
TOWERS = re.compile(r"^(vision|language_model)/")
SKIP = re.compile(r"/embed/patch/")


def quantize_kernel(kernel: np.ndarray, layer_axis: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(int8 kernel, fp32 scale): the scale per output element, over the input axis (axis 0, or 1
    under a stacked layers axis)."""
    w = np.asarray(kernel, np.float32)
    axis = 1 if layer_axis else 0
    scale = np.max(np.abs(w), axis=axis, keepdims=True) / 127.0
    scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
    q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
    return q, np.squeeze(scale, axis=axis)


def quantize(params: dict, scanned: bool = False, towers: re.Pattern = TOWERS) -> dict:
    """`params` with every Dense kernel of the frozen `towers` in int8 beside its scale."""
    flat = traverse_util.flatten_dict(params, sep="/")
    out = {}
    for path, value in flat.items():
        if path.endswith("/kernel") and towers.search(path) and not SKIP.search(path) and np.ndim(value) >= 2:
            layered = scanned and "/layers/" in path
            if np.ndim(value) >= 2 + layered:
                out[path], out[path[: -len("kernel")] + SCALE] = quantize_kernel(value, layered)
                continue
        out[path] = value
    return traverse_util.unflatten_dict(out, sep="/")


def dequantized(params: dict) -> dict:
    """The float32 kernels back from int8 ones and their scales (what the model computes with)."""
    flat = traverse_util.flatten_dict(params, sep="/")
    out = {}
    for path, value in flat.items():
        if path.endswith("/" + SCALE):
            continue
        scale = flat.get(path[: -len("kernel")] + SCALE) if path.endswith("/kernel") else None
        if scale is None:
            out[path] = value
            continue
        s = np.asarray(scale, np.float32)
        axis = 0 if s.shape == np.shape(value)[1:] else 1  # the input axis the scale was taken over
        out[path] = np.asarray(value, np.float32) * np.expand_dims(s, axis)
    return traverse_util.unflatten_dict(out, sep="/")


def nbytes(params: dict) -> int:
    return int(sum(np.asarray(v).nbytes for v in traverse_util.flatten_dict(params).values()))


def quantize_sharded(frozen: dict, scanned: bool = False, towers: re.Pattern = TOWERS) -> dict:
    """`quantize` of a device-resident, sharded tree: each int8 kernel keeps its kernel's sharding,
    its scale that sharding without the input axis; one leaf at a time, nothing gathered."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    flat = traverse_util.flatten_dict(frozen, sep="/")
    out = {}
    for path, value in flat.items():
        layered = scanned and "/layers/" in path
        if not (path.endswith("/kernel") and towers.search(path) and not SKIP.search(path)
                and value.ndim >= 2 + layered):
            out[path] = value
            continue
        axis = 1 if layered else 0
        spec = tuple(value.sharding.spec) + (None,) * (value.ndim - len(value.sharding.spec))
        scale_sharding = NamedSharding(value.sharding.mesh, PartitionSpec(*(spec[:axis] + spec[axis + 1:])))

        def one(w, axis=axis):
            w = w.astype(jnp.float32)
            scale = jnp.max(jnp.abs(w), axis=axis, keepdims=True) / 127.0
            scale = jnp.where(scale == 0, 1.0, scale)
            return jnp.clip(jnp.rint(w / scale), -127, 127).astype(jnp.int8), jnp.squeeze(scale, axis)

        out[path], out[path[: -len("kernel")] + SCALE] = jax.jit(
            one, out_shardings=(value.sharding, scale_sharding))(value)
    return traverse_util.unflatten_dict(out, sep="/")
