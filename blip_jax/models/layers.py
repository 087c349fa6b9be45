"""Building blocks shared by every model: dense layers, norms, embeddings and attention.

Every parameter is created with logical axis names (maxtext style) so that one rules table maps
them onto the mesh; parameters are stored in `param_dtype` and cast to the compute `dtype` at use.

Logical axis names used across the library:
  embed    the model width                 mlp      the feed-forward width
  heads    attention heads                 kv       the width of one head
  vocab    the vocabulary                  qkv      the fused (q, k, v) axis
  layers   the stacked axis of scanned layers
Activations use: batch, length, embed (constrained with `nn.with_logical_constraint`).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

Dtype = Any
Axes = tuple[str | None, ...]

default_kernel_init = nn.initializers.normal(stddev=0.02)


def logical(init, axes: Axes):
    return nn.with_logical_partitioning(init, axes)


class Dense(nn.Module):
    """A dense layer contracting the last `in_dims` input axes into `features` (an int or tuple).

    Shaping q/k/v kernels as [embed, heads, kv] keeps the head axis visible to the sharding rules.
    """

    features: int | tuple[int, ...]
    kernel_axes: Axes
    in_dims: int = 1
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Any = default_kernel_init

    @nn.compact
    def __call__(self, x):
        features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
        in_shape = x.shape[x.ndim - self.in_dims :]
        kernel = self.param(
            "kernel", logical(self.kernel_init, self.kernel_axes), in_shape + features, self.param_dtype
        )
        contract = tuple(range(x.ndim - self.in_dims, x.ndim))
        if self.has_variable("params", "kernel_scale"):  # int8 storage (blip_jax.models.quant)
            scale = self.get_variable("params", "kernel_scale").astype(self.dtype)
            kernel = kernel.astype(self.dtype) * scale.reshape((1,) * (kernel.ndim - scale.ndim) + scale.shape)
        # products accumulate (and the bias adds) in fp32 whatever the compute dtype: bf16 sums drift
        y = jax.lax.dot_general(
            x.astype(self.dtype),
            kernel.astype(self.dtype),
            ((contract, tuple(range(self.in_dims))), ((), ())),
            preferred_element_type=jnp.float32,
        )
        if self.use_bias:
            bias_axes = self.kernel_axes[self.in_dims :]
            bias = self.param("bias", logical(nn.initializers.zeros, bias_axes), features, self.param_dtype)
            y = y + bias.astype(jnp.float32)
        if self.has_variable("params", "lora_a"):  # a LoRA adapter beside the kernel (blip_jax.models.lora)
            a, b = self.get_variable("params", "lora_a"), self.get_variable("params", "lora_b")
            x_in = x
            if self.has_variable("params", "lora_dropout") and self.has_rng("dropout"):  # training only
                rate = self.get_variable("params", "lora_dropout")
                keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - rate, x.shape)
                x_in = jnp.where(keep, x / (1.0 - rate).astype(x.dtype), jnp.zeros_like(x))
            xa = jax.lax.dot_general(x_in.astype(self.dtype), a.astype(self.dtype),
                                     ((contract, tuple(range(self.in_dims))), ((), ())),
                                     preferred_element_type=jnp.float32)
            y = y + self.get_variable("params", "lora_scale") * jnp.tensordot(xa, b.astype(jnp.float32), axes=1)
        return y.astype(self.dtype)


def layer_norm(eps: float, dtype: Dtype, param_dtype: Dtype, name: str | None = None,
               affine: bool = True) -> nn.LayerNorm:
    """LayerNorm with statistics in fp32 and the two-pass variance PyTorch uses."""
    return nn.LayerNorm(
        epsilon=eps,
        dtype=dtype,
        param_dtype=param_dtype,
        use_fast_variance=False,
        use_scale=affine,
        use_bias=affine,
        scale_init=logical(nn.initializers.ones, ("embed",)),
        bias_init=logical(nn.initializers.zeros, ("embed",)),
        name=name,
    )


class RMSNorm(nn.Module):
    """RMSNorm (T5's LayerNorm, LLaMA's RMSNorm) in transformers' order of roundings: normalise in
    fp32, cast to the compute dtype, then multiply by the scale (no mean, no bias)."""

    eps: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", logical(nn.initializers.ones, ("embed",)), (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * normed.astype(self.dtype)


def rms_norm(eps: float, dtype: Dtype, param_dtype: Dtype, name: str | None = None) -> RMSNorm:
    return RMSNorm(eps, dtype, param_dtype, name=name)


class Embed(nn.Embed):
    """nn.Embed whose `attend` (tied output logits) accumulates in fp32 and returns fp32 logits."""

    def attend(self, query):
        table = self.embedding.astype(self.dtype)
        return jnp.einsum("...d,vd->...v", query.astype(self.dtype), table, preferred_element_type=jnp.float32)


def embed(num: int, features: int, axes: Axes, dtype: Dtype, param_dtype: Dtype, name: str) -> Embed:
    return Embed(
        num_embeddings=num,
        features=features,
        dtype=dtype,
        param_dtype=param_dtype,
        embedding_init=logical(default_kernel_init, axes),
        name=name,
    )


def gelu(x):
    """Exact (erf) GELU, as BERT and the BLIP ViT use; the tanh approximation drifts by ~1e-3."""
    return jax.nn.gelu(x, approximate=False)


# transformers' activation names -> functions
ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": gelu,
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),  # tanh approximation (T5 v1.1 "gated-gelu")
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # CLIP
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


def heads_first(x):
    """[B, S, H, D] -> [B, H, S, D], the layout keys and values are kept in (and cached in)."""
    return jnp.swapaxes(x, 1, 2)


def attend(q, k, v, mask=None, dtype: Dtype = jnp.float32, *, bias=None, scale: float | None = None):
    """Scaled dot-product attention. q [B, T, H, D]; k, v [Bk, H, S, D] head-major; mask and the
    additive `bias` (T5's relative positions) broadcastable to [B or Bk, H, T, S]; `scale`
    multiplies the scores (default 1/sqrt(D); T5 uses 1). Returns [B, T, H, D].

    Head-major operands give XLA batch-major dot products (about 4x faster attention on CPU than
    einsums with the head axis in the middle). When Bk divides B, each group of B // Bk
    consecutive query rows shares one key/value row: the beams of one example attend to a single
    copy of its image keys instead of one copy per beam.
    Softmax runs in fp32 whatever the compute dtype; masked logits get the fp32 minimum, which is
    what PyTorch's additive masks amount to (a fully masked row becomes uniform, not NaN).
    """
    batch, length, heads, head_dim = q.shape
    group = batch // k.shape[0]
    q = heads_first(q.reshape(k.shape[0], group * length, heads, head_dim))
    scores = jnp.einsum("bhtd,bhsd->bhts", q, k.astype(q.dtype), preferred_element_type=jnp.float32)
    scores = scores / math.sqrt(head_dim) if scale is None else scores * scale
    if bias is not None:
        scores = scores + _group_queries(bias, batch, k.shape[0], length).astype(jnp.float32)
    if mask is not None:
        scores = jnp.where(_group_queries(mask, batch, k.shape[0], length), scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    out = jnp.einsum("bhts,bhsd->bhtd", probs, v.astype(dtype), preferred_element_type=jnp.float32).astype(dtype)
    return heads_first(out).reshape(batch, length, heads, head_dim)


def _group_queries(x, batch: int, key_batch: int, length: int):
    """A mask or bias [B | Bk | 1, 1 | H, T | 1, S] laid out like the grouped queries: per-row ones
    [B, h, T, S] -> [Bk, h, G*T, S], shared ones tiled over the group (G = B // Bk)."""
    group = batch // key_batch
    if group == 1:
        return x
    x = jnp.broadcast_to(x, (x.shape[0], x.shape[1], length, x.shape[3]))
    if x.shape[0] == batch:
        rows = x.reshape(key_batch, group, x.shape[1], length, x.shape[3])
        return jnp.swapaxes(rows, 1, 2).reshape(key_batch, x.shape[1], group * length, -1)
    return jnp.tile(x, (1, 1, group, 1))


def write_cache(cache, keys, values, cache_index):
    """Write this step's head-major keys/values [B, H, S, D] into a decoding cache at `cache_index`;
    returns the cache, whose keys/values cover every position (attend masks the unwritten ones)."""
    def write(old, new):
        return jax.lax.dynamic_update_slice_in_dim(old, new.astype(old.dtype), cache_index, axis=2)

    return {"k": write(cache["k"], keys), "v": write(cache["v"], values)}


def padding_mask(mask):
    """[B, S] 0/1 key mask -> boolean [B, 1, 1, S]."""
    return mask[:, None, None, :].astype(bool)


def causal_mask(key_mask, query_positions):
    """Causal + padding mask: query at absolute position p sees keys at positions <= p.

    key_mask [B, S] over every key position; query_positions [T] absolute positions of the queries.
    """
    key_positions = jnp.arange(key_mask.shape[1])
    causal = key_positions[None, :] <= query_positions[:, None]  # [T, S]
    return causal[None, None] & padding_mask(key_mask)


def drop_path(x, rate: float, deterministic: bool, module: nn.Module):
    """Stochastic depth: drop a whole residual branch per example (rescaled as timm does)."""
    if deterministic or rate == 0.0:
        return x
    keep = 1.0 - rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = jax.random.bernoulli(module.make_rng("dropout"), keep, shape)
    return jnp.where(mask, x / keep, 0).astype(x.dtype)


def cubic_resize_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] matrix of PyTorch's bicubic interpolation (a=-0.75, align_corners=False).

    jax.image.resize uses a=-0.5 and antialiases when shrinking, so it does not reproduce
    PyTorch's `interpolate(mode="bicubic")` that the checkpoints' position tables were fitted with.
    """
    a = -0.75

    def weight(t):
        t = abs(t)
        if t <= 1:
            return (a + 2) * t**3 - (a + 3) * t**2 + 1
        if t < 2:
            return a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a
        return 0.0

    matrix = np.zeros((out_size, in_size), np.float64)
    scale = in_size / out_size
    for i in range(out_size):
        src = (i + 0.5) * scale - 0.5
        base = math.floor(src)
        frac = src - base
        for offset in range(-1, 3):
            j = min(max(base + offset, 0), in_size - 1)  # border replication
            matrix[i, j] += weight(offset - frac)
    return matrix


def resize_grid(table, new_hw: Sequence[int]):
    """Bicubic resize of a [h, w, D] table to new_hw, separably, in fp32."""
    h, w, _ = table.shape
    rows = jnp.asarray(cubic_resize_matrix(h, new_hw[0]), jnp.float32)
    cols = jnp.asarray(cubic_resize_matrix(w, new_hw[1]), jnp.float32)
    table = table.astype(jnp.float32)
    return jnp.einsum("ih,jw,hwd->ijd", rows, cols, table, precision=jax.lax.Precision.HIGHEST)
