"""What the frozen LLMs share for decoding: the zero KV cache, the causal-LM generation step and
the abstract parameter tree."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import linen as nn


def zero_kv_cache(batch: int, num_layers: int, num_heads: int, max_len: int, head_dim: int, dtype=jnp.float32, *,
                  scan_layers: bool = False) -> dict:
    """{"layers": per-layer {"k", "v"} [B, H, max_len, Dh] (a list), or, scanned, {"k", "v"}
    [B, L, H, max_len, Dh]}; H is the number of key/value heads."""
    shape = (batch, num_heads, max_len, head_dim)
    if scan_layers:
        shape = (batch, num_layers) + shape[1:]
        return {"layers": {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}}
    return {"layers": [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(num_layers)]}


@functools.lru_cache(maxsize=None)
def causal_decode_step(module_cls, config, scan_layers: bool = False, dtype=jnp.float32):
    """The `blip_jax.generation` step of a decoder-only LM: `step(params, cache, token_ids,
    attention_mask, cache_index) -> (logits [R, 1, V], cache)`; one stable callable per (module,
    config, layout, dtype), so jit caches hit."""
    model = module_cls(config, dtype=dtype, scan_layers=scan_layers)

    def step(params, cache, token_ids, attention_mask, cache_index):
        logits, aux = model.apply({"params": params}, token_ids, attention_mask, cache=cache,
                                  cache_index=cache_index, logits_at=slice(-1, None))
        return logits, aux["cache"]

    return step


def param_shapes(model: nn.Module, *inputs):
    """The parameter tree of `model` as ShapeDtypeStructs (no allocation); `inputs` default to one
    token id."""
    inputs = inputs or (jnp.zeros((1, 1), jnp.int32),)
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *inputs))
    return nn.unbox(variables["params"])
