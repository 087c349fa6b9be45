"""LLaMA (the Vicuna-7B/13B frozen LLM of InstructBLIP), matching transformers' `LlamaForCausalLM`
(logits within float32 noise, generation token for token).

Architecture: pre-RMSNorm blocks, rotary position embeddings (HF's rotate-half convention: dims i
and i + Dh/2 rotate together, frequencies rope_theta^(-2i/Dh), computed in fp32), grouped-query
attention (`num_key_value_heads` key/value heads, each shared by num_heads / num_key_value_heads
consecutive query heads), SiLU-gated MLP down(silu(gate(x)) * up(x)), final RMSNorm, untied
`lm_head` (tied when `tie_word_embeddings`). Biases only with `attention_bias` / `mlp_bias`.

Positions default to HF generate's, derived from the attention mask (cumsum(mask) - 1, 0 on
padding), so a left-padded row sees the positions it would have alone. A plain HF forward without
`position_ids` uses arange instead: pass `positions` to reproduce that.

Decoding uses an explicit head-major cache of the key/value heads only, per layer {"k", "v"}
[B, Hkv, max_len, Dh] (scanned: [B, L, Hkv, max_len, Dh]), written at `cache_index`, wrapped as
{"layers": ...}. `decode_step(config)` is a `blip_jax.generation` step function.

Logical axis `kv_heads` names the key/value head axis of k_proj / v_proj (it differs from
`heads` under grouped-query attention, so it gets its own sharding rule).

Parameter tree (unrolled layout; the scanned one stacks `decoder/layers_i` into `decoder/layers`):
    embed_tokens/embedding [V, D]                          model.embed_tokens.weight
    decoder/layers_i/input_layernorm/scale [D]             model.layers.i.input_layernorm.weight
    decoder/layers_i/self_attn/q_proj/kernel [D, H, Dh]    model.layers.i.self_attn.q_proj.weight
    decoder/layers_i/self_attn/{k,v}_proj/kernel [D, Hkv, Dh]
    decoder/layers_i/self_attn/o_proj/kernel [H, Dh, D]    (+ bias of each with attention_bias)
    decoder/layers_i/post_attention_layernorm/scale [D]
    decoder/layers_i/mlp/{gate_proj, up_proj}/kernel [D, F], mlp/down_proj/kernel [F, D]
                                                           (+ bias with mlp_bias)
    norm/scale [D]                                         model.norm.weight
    lm_head/kernel [D, V]                                  lm_head.weight  (untied only)
HF's rotary `inv_freq` buffers (in older checkpoints) carry no weights and are ignored.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util

from blip_jax.models.weights import expected_params, map_weights, rename
from blip_jax.models import layers
from blip_jax.models.config import hf_get
from blip_jax.models.layout import stack_layers
from blip_jax.models.llm import decoding
from blip_jax.models.stack import LayerStack

MODEL_TYPES = ("llama", "mistral", "qwen2")  # transformers architectures of this family


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int | None = None  # None: num_heads (no grouping)
    head_dim: int | None = None  # None: hidden_size // num_heads
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    attention_bias: bool = False
    mlp_bias: bool = False
    qkv_bias: bool = False  # biases on q / k / v only (Qwen2)
    sliding_window: int | None = None  # keys at most this many positions back (Mistral); None: all
    model_type: str = "llama"  # the transformers architecture: llama | mistral | qwen2
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    pad_token_id: int = 0
    bos_token_id: int = 1
    eos_token_id: int = 2

    def __post_init__(self):
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"LLaMA-family model_type {self.model_type!r} is not supported; use one of {MODEL_TYPES}")
        if self.hidden_act not in layers.ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; use one of {sorted(layers.ACTIVATIONS)}")

    @property
    def embed_dim(self) -> int:
        """Width of `inputs_embeds`."""
        return self.hidden_size

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> "LlamaConfig":
        """From a LLaMA `config.json` dict (or the `text_config` of an InstructBLIP one).

        RoPE settings are read from `rope_parameters` (transformers 5), else `rope_scaling` with a
        top-level `rope_theta` (older files). Only the default RoPE is implemented: any scaling
        type (linear, dynamic, yarn, longrope, llama3, ...) raises a ValueError."""
        get = functools.partial(hf_get, hf)
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"LLaMA rope type {rope_type!r} ({dict(rope)}) is not supported: only the default RoPE "
                             "(rope_theta, no scaling) is implemented; linear, dynamic, yarn, longrope, llama3 and "
                             "every other scaling type are not")
        d = cls()
        eos = get("eos_token_id", d.eos_token_id)
        model_type = hf.get("model_type") or "llama"
        if model_type == "qwen2" and hf.get("use_sliding_window"):
            raise ValueError("Qwen2 use_sliding_window=True (a window on the layers from max_window_layers on) is not "
                             "supported; the released Qwen2 models run without it")
        window = hf.get("sliding_window") if model_type == "mistral" else None
        return cls(
            model_type=model_type,
            qkv_bias=model_type == "qwen2",
            sliding_window=window,
            vocab_size=get("vocab_size", d.vocab_size),
            hidden_size=get("hidden_size", d.hidden_size),
            intermediate_size=get("intermediate_size", d.intermediate_size),
            num_layers=get("num_hidden_layers", d.num_layers),
            num_heads=get("num_attention_heads", d.num_heads),
            num_kv_heads=hf.get("num_key_value_heads"),
            head_dim=hf.get("head_dim"),
            max_position_embeddings=get("max_position_embeddings", d.max_position_embeddings),
            rope_theta=float(rope.get("rope_theta") or get("rope_theta", d.rope_theta)),
            rms_norm_eps=float(get("rms_norm_eps", d.rms_norm_eps)),
            attention_bias=get("attention_bias", d.attention_bias),
            mlp_bias=get("mlp_bias", d.mlp_bias),
            hidden_act=get("hidden_act", d.hidden_act),
            tie_word_embeddings=get("tie_word_embeddings", d.tie_word_embeddings),
            pad_token_id=get("pad_token_id", d.pad_token_id),
            bos_token_id=get("bos_token_id", d.bos_token_id),
            eos_token_id=eos[0] if isinstance(eos, (list, tuple)) else eos,
        )

    def to_hf(self) -> dict:
        """The transformers `LlamaConfig` dict `from_hf` reads back to this config."""
        extra = {"sliding_window": self.sliding_window} if self.model_type == "mistral" else {}
        if self.model_type == "qwen2":
            extra = {"use_sliding_window": False}
        return {"model_type": self.model_type, **extra, "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
                "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_layers,
                "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
                "head_dim": self.head_dim, "max_position_embeddings": self.max_position_embeddings,
                "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
                "rms_norm_eps": self.rms_norm_eps, "attention_bias": self.attention_bias, "mlp_bias": self.mlp_bias,
                "hidden_act": self.hidden_act, "tie_word_embeddings": self.tie_word_embeddings,
                "pad_token_id": self.pad_token_id, "bos_token_id": self.bos_token_id,
                "eos_token_id": self.eos_token_id}


def rope_tables(positions, head_dim: int, theta: float):
    """fp32 (cos, sin) [B, T, 1, head_dim / 2] of integer `positions` [B, T]."""
    inv_freq = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles)[:, :, None], jnp.sin(angles)[:, :, None]


def apply_rope(x, cos, sin):
    """Rotate [B, T, heads, Dh] by the tables, pairing dim i with dim i + Dh/2 (HF's convention)."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def grouped_attend(q, k, v, mask, dtype):
    """Grouped-query attention without copying keys/values: q [B, T, H, Dh]; k, v [B, Hkv, S, Dh];
    mask [B, 1, T, S]. The G = H / Hkv query heads that share a key/value head are folded into the
    query length (query head h uses key/value head h // G, as HF's repeat_kv)."""
    batch, length, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    q = q.reshape(batch, length, kv_heads, group, head_dim).swapaxes(2, 3)
    q = q.reshape(batch, length * group, kv_heads, head_dim)
    out = layers.attend(q, k, v, jnp.repeat(mask, group, axis=2), dtype=dtype)
    out = out.reshape(batch, length, group, kv_heads, head_dim).swapaxes(2, 3)
    return out.reshape(batch, length, heads, head_dim)


class LlamaAttention(nn.Module):
    config: LlamaConfig
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask, cos, sin, cache_index, cache):
        cfg = self.config
        kw = dict(use_bias=cfg.attention_bias, dtype=self.dtype, param_dtype=self.param_dtype)
        qkv = dict(kw, use_bias=cfg.attention_bias or cfg.qkv_bias)
        kv_shape = (cfg.num_kv_heads, cfg.head_dim)
        q = layers.Dense((cfg.num_heads, cfg.head_dim), ("embed", "heads", "kv"), name="q_proj", **qkv)(x)
        k = layers.Dense(kv_shape, ("embed", "kv_heads", "kv"), name="k_proj", **qkv)(x)
        v = layers.Dense(kv_shape, ("embed", "kv_heads", "kv"), name="v_proj", **qkv)(x)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k, v = layers.heads_first(k), layers.heads_first(v)
        new_cache = None
        if cache is not None:
            new_cache = layers.write_cache(cache, k, v, cache_index)
            k, v = new_cache["k"], new_cache["v"]
        h = grouped_attend(q, k, v, mask, self.dtype)
        return layers.Dense(cfg.hidden_size, ("heads", "kv", "embed"), in_dims=2, name="o_proj", **kw)(h), new_cache


class LlamaMLP(nn.Module):
    config: LlamaConfig
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        kw = dict(use_bias=cfg.mlp_bias, dtype=self.dtype, param_dtype=self.param_dtype)
        gate = layers.Dense(cfg.intermediate_size, ("embed", "mlp"), name="gate_proj", **kw)(x)
        up = layers.Dense(cfg.intermediate_size, ("embed", "mlp"), name="up_proj", **kw)(x)
        return layers.Dense(cfg.hidden_size, ("mlp", "embed"), name="down_proj", **kw)(
            layers.ACTIVATIONS[cfg.hidden_act](gate) * up)


class LlamaLayer(nn.Module):
    config: LlamaConfig
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask, cos, sin, cache_index, cache):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = layers.rms_norm(cfg.rms_norm_eps, name="input_layernorm", **kw)(x)
        h, new_cache = LlamaAttention(cfg, name="self_attn", **kw)(h, mask, cos, sin, cache_index, cache)
        x = x + h
        h = layers.rms_norm(cfg.rms_norm_eps, name="post_attention_layernorm", **kw)(x)
        x = x + LlamaMLP(cfg, name="mlp", **kw)(h)
        return nn.with_logical_constraint(x, ("batch", "length", "embed")), new_cache


def hf_positions(attention_mask):
    """HF generate's positions: cumsum(mask) - 1 on real tokens, 0 on padding."""
    mask = attention_mask.astype(jnp.int32)
    return jnp.where(mask != 0, jnp.cumsum(mask, axis=1) - 1, 0)


class Llama(nn.Module):
    """LlamaForCausalLM. `__call__(input_ids, attention_mask, *, inputs_embeds, positions, cache,
    cache_index, deterministic, logits_at) -> (logits float32 [B, T, V], aux)`.

    Inputs: `input_ids` [B, T] and/or `inputs_embeds` [B, T', hidden_size]; with both, the
    embeddings come first (InstructBLIP's soft prompt followed by the text). `attention_mask`
    [B, T_total] (0/1, left padding), or [B, max_len] over every cache position when decoding with a
    cache (the inputs then sit at `cache_index`). `positions` of the inputs ([B, T_total] or
    broadcastable) default to HF generate's, derived from the mask. LLaMA has no dropout, so
    `deterministic` changes nothing. `logits_at` (a slice of positions) computes only those
    logits: the last one for generation, the text positions for the LM loss. aux["cache"] holds the updated cache.
    """

    config: LlamaConfig
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32
    scan_layers: bool = False
    remat_policy: str = "none"

    @nn.compact
    def __call__(self, input_ids=None, attention_mask=None, *, inputs_embeds=None, positions=None, cache=None,
                 cache_index=None, deterministic: bool = True, logits_at: slice | None = None):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        embed_tokens = layers.embed(cfg.vocab_size, cfg.hidden_size, ("vocab", "embed"), name="embed_tokens", **kw)
        pieces = []
        if inputs_embeds is not None:
            pieces.append(inputs_embeds.astype(self.dtype))
        if input_ids is not None:
            pieces.append(embed_tokens(input_ids))
        if not pieces:
            raise ValueError("pass input_ids and/or inputs_embeds")
        x = pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces, axis=1)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        batch, length = x.shape[:2]
        if attention_mask is None:
            if cache is not None:
                raise ValueError("decoding with a cache needs an attention_mask over every cache position")
            attention_mask = jnp.ones((batch, length), jnp.int32)

        start = 0 if cache is None else cache_index
        if positions is None:
            positions = jax.lax.dynamic_slice_in_dim(hf_positions(attention_mask), start, length, axis=1)
        cos, sin = rope_tables(jnp.broadcast_to(positions, (batch, length)), cfg.head_dim, cfg.rope_theta)

        query_positions = start + jnp.arange(length)
        mask = layers.causal_mask(attention_mask, query_positions)
        if cfg.sliding_window is not None:  # Mistral: a query sees the last `sliding_window` slots only
            keys = jnp.arange(mask.shape[-1])
            mask = mask & (query_positions[:, None] - keys[None, :] < cfg.sliding_window)
        x, layer_cache = LayerStack(
            LlamaLayer,
            dict(config=cfg, **kw),
            cfg.num_layers,
            scan=self.scan_layers,
            remat_policy=self.remat_policy,
            name="decoder",
        )(x, mask, cos, sin, cache_index, cache=None if cache is None else cache["layers"])

        if logits_at is not None:
            x = x[:, logits_at]
        x = layers.rms_norm(cfg.rms_norm_eps, name="norm", **kw)(x)
        if cfg.tie_word_embeddings:
            logits = embed_tokens.attend(x)
        else:
            logits = layers.Dense(cfg.vocab_size, ("embed", "vocab"), use_bias=False, name="lm_head", **kw)(x)

        aux = {}
        if cache is not None:
            aux["cache"] = {"layers": layer_cache}
        return logits.astype(jnp.float32), aux

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32):
        return init_cache(self.config, batch, max_len, dtype, scan_layers=self.scan_layers)


def init_cache(config: LlamaConfig, batch: int, max_len: int, dtype=jnp.float32, *, scan_layers: bool = False):
    """Zero decoding cache for `max_len` positions (`decoding.zero_kv_cache`, the KV heads only)."""
    return decoding.zero_kv_cache(batch, config.num_layers, config.num_kv_heads, max_len, config.head_dim, dtype,
                                  scan_layers=scan_layers)


def decode_step(config: LlamaConfig, *, scan_layers: bool = False, dtype=jnp.float32):
    """The `blip_jax.generation` step of Llama (`decoding.causal_decode_step`)."""
    return decoding.causal_decode_step(Llama, config, scan_layers, dtype)


def param_shapes(config: LlamaConfig, scan_layers: bool = False):
    """The parameter tree of `Llama(config)` as ShapeDtypeStructs (no allocation)."""
    return decoding.param_shapes(Llama(config, scan_layers=scan_layers))


_MODULES = [
    (r"^decoder/layers_(\d+)/", r"model.layers.\1/"),
    (r"^(embed_tokens|norm)/", r"model.\1/"),
]


def hf_key(path: str, prefix: str = "") -> tuple[str, str]:
    """(transformers key, kind) of an unrolled Flax parameter path 'decoder/layers_0/mlp/up_proj/kernel'."""
    key, kind = rename(path, _MODULES)
    return prefix + key, kind


def load_llama_params(state_dict: Mapping[str, Any], config: LlamaConfig, *, scan_layers: bool = False,
                      prefix: str = "", dtype=np.float32) -> dict:
    """Flax params of `Llama(config)` from a `LlamaForCausalLM` state dict (numpy arrays or CPU torch
    tensors). `prefix` is prepended to every key (e.g. "language_model." in an InstructBLIP
    checkpoint) and scopes the unexpected-key check. Missing, unexpected or misshapen tensors raise
    one ConversionError; rotary `inv_freq` buffers and, when tied, `lm_head.weight` are ignored."""
    ignore = [r"rotary_emb\.inv_freq$"]
    if config.tie_word_embeddings:
        ignore.append(rf"^{re.escape(prefix)}lm_head\.weight$")
    flat, _ = map_weights(state_dict, expected_params(param_shapes(config)), lambda path: hf_key(path, prefix),
                          what="LLaMA weights do not match the config", scope=prefix,
                          ignore=re.compile("|".join(ignore)), dtype=dtype)
    params = traverse_util.unflatten_dict(flat, sep="/")
    return stack_layers(params) if scan_layers else params
