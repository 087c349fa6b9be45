"""OPT (Meta's Open Pre-trained Transformer), the frozen LLM of BLIP-2, matching transformers'
`OPTForCausalLM` (logits within float32 noise, generation token for token).

Architecture: learned positions (table of max_position_embeddings + 2 rows, looked up at
`position + 2`, positions derived from the attention mask as HF does: cumsum(mask) * mask - 1, so
padding sits at -1), optional `project_in`/`project_out` when `word_embed_proj_dim` differs from
`hidden_size` (opt-350m), pre-LN blocks (`do_layer_norm_before`, post-LN for opt-350m), ReLU MLP,
LayerNorm eps 1e-5, final LayerNorm, `lm_head` tied to `embed_tokens` (or separate when untied).

Decoding uses an explicit head-major cache, per layer {"k", "v"} [B, H, max_len, D] (scanned:
[B, L, H, max_len, D]), written at `cache_index` with dynamic_update_slice, wrapped as
{"layers": ...}. `decode_step(config)` is a `blip_jax.generation` step function.

Parameter tree (unrolled layout; the scanned one stacks `decoder/layers_i` into `decoder/layers`):
    embed_tokens/embedding [V, P]         model.decoder.embed_tokens.weight
    embed_positions/embedding [N+2, D]    model.decoder.embed_positions.weight
    project_in/kernel [P, D]              model.decoder.project_in.weight       (P != D only)
    decoder/layers_i/self_attn/{q,k,v}_proj/{kernel [D, H, Dh], bias [H, Dh]}
    decoder/layers_i/self_attn/out_proj/{kernel [H, Dh, D], bias [D]}
    decoder/layers_i/{self_attn_layer_norm, final_layer_norm}/{scale, bias}
    decoder/layers_i/fc1, fc2/{kernel, bias}
    final_layer_norm/{scale, bias}        model.decoder.final_layer_norm
    project_out/kernel [D, P]             model.decoder.project_out.weight      (P != D only)
    lm_head/kernel [P, V]                 lm_head.weight                         (untied only)
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

POSITION_OFFSET = 2

@dataclasses.dataclass(frozen=True)
class OptConfig:
    vocab_size: int = 50272
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    ffn_dim: int = 3072
    max_position_embeddings: int = 2048
    word_embed_proj_dim: int | None = None  # None: hidden_size
    do_layer_norm_before: bool = True
    remove_final_layer_norm: bool = False
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    tie_word_embeddings: bool = True
    activation: str = "relu"
    layer_norm_eps: float = 1e-5
    dropout: float = 0.1
    attention_dropout: float = 0.0
    pad_token_id: int = 1
    bos_token_id: int = 2
    eos_token_id: int = 2

    @property
    def embed_dim(self) -> int:
        """Width of the word embeddings (and of `inputs_embeds`)."""
        return self.word_embed_proj_dim or self.hidden_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def has_final_layer_norm(self) -> bool:
        return self.do_layer_norm_before and not self.remove_final_layer_norm

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> "OptConfig":
        """From an OPT `config.json` dict (or the `text_config` of a BLIP-2 one)."""
        get = functools.partial(hf_get, hf)
        d = cls()
        eos = get("eos_token_id", d.eos_token_id)
        return cls(
            vocab_size=get("vocab_size", d.vocab_size),
            hidden_size=get("hidden_size", d.hidden_size),
            num_layers=get("num_hidden_layers", d.num_layers),
            num_heads=get("num_attention_heads", d.num_heads),
            ffn_dim=get("ffn_dim", d.ffn_dim),
            max_position_embeddings=get("max_position_embeddings", d.max_position_embeddings),
            word_embed_proj_dim=hf.get("word_embed_proj_dim"),
            do_layer_norm_before=get("do_layer_norm_before", d.do_layer_norm_before),
            remove_final_layer_norm=get("_remove_final_layer_norm", d.remove_final_layer_norm),
            enable_bias=get("enable_bias", d.enable_bias),
            layer_norm_elementwise_affine=get("layer_norm_elementwise_affine", d.layer_norm_elementwise_affine),
            tie_word_embeddings=get("tie_word_embeddings", d.tie_word_embeddings),
            activation=get("activation_function", d.activation),
            dropout=float(get("dropout", d.dropout)),
            attention_dropout=float(get("attention_dropout", d.attention_dropout)),
            pad_token_id=get("pad_token_id", d.pad_token_id),
            bos_token_id=get("bos_token_id", d.bos_token_id),
            eos_token_id=eos[0] if isinstance(eos, (list, tuple)) else eos,
        )

    def to_hf(self) -> dict:
        """The transformers `OPTConfig` dict `from_hf` reads back to this config."""
        return {"model_type": "opt", "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
                "num_hidden_layers": self.num_layers, "num_attention_heads": self.num_heads, "ffn_dim": self.ffn_dim,
                "max_position_embeddings": self.max_position_embeddings,
                "word_embed_proj_dim": self.embed_dim, "do_layer_norm_before": self.do_layer_norm_before,
                "_remove_final_layer_norm": self.remove_final_layer_norm, "enable_bias": self.enable_bias,
                "layer_norm_elementwise_affine": self.layer_norm_elementwise_affine,
                "tie_word_embeddings": self.tie_word_embeddings, "activation_function": self.activation,
                "dropout": self.dropout, "attention_dropout": self.attention_dropout,
                "pad_token_id": self.pad_token_id, "bos_token_id": self.bos_token_id,
                "eos_token_id": self.eos_token_id}


def _layer_norm(cfg: OptConfig, dtype, param_dtype, name: str) -> nn.LayerNorm:
    return layers.layer_norm(cfg.layer_norm_eps, dtype, param_dtype, name, affine=cfg.layer_norm_elementwise_affine)


class OptAttention(nn.Module):
    config: OptConfig
    deterministic: bool = True
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask, cache_index, cache):
        cfg = self.config
        kw = dict(use_bias=cfg.enable_bias, dtype=self.dtype, param_dtype=self.param_dtype)
        shape = (cfg.num_heads, cfg.head_dim)
        q = layers.Dense(shape, ("embed", "heads", "kv"), name="q_proj", **kw)(x)
        k = layers.heads_first(layers.Dense(shape, ("embed", "heads", "kv"), name="k_proj", **kw)(x))
        v = layers.heads_first(layers.Dense(shape, ("embed", "heads", "kv"), name="v_proj", **kw)(x))
        new_cache = None
        if cache is not None:
            new_cache = layers.write_cache(cache, k, v, cache_index)
            k, v = new_cache["k"], new_cache["v"]
        h = layers.attend(q, k, v, mask, dtype=self.dtype)
        h = nn.Dropout(cfg.attention_dropout)(h, deterministic=self.deterministic)  # HF drops probs
        h = layers.Dense(cfg.hidden_size, ("heads", "kv", "embed"), in_dims=2, name="out_proj", **kw)(h)
        return h, new_cache


class OptLayer(nn.Module):
    config: OptConfig
    deterministic: bool = True
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask, cache_index, cache):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        pre = cfg.do_layer_norm_before
        attn_norm = _layer_norm(cfg, name="self_attn_layer_norm", **kw)
        mlp_norm = _layer_norm(cfg, name="final_layer_norm", **kw)

        h = attn_norm(x) if pre else x
        h, new_cache = OptAttention(cfg, self.deterministic, name="self_attn", **kw)(h, mask, cache_index, cache)
        x = x + nn.Dropout(cfg.dropout)(h, deterministic=self.deterministic)
        if not pre:
            x = attn_norm(x)

        h = mlp_norm(x) if pre else x
        h = layers.Dense(cfg.ffn_dim, ("embed", "mlp"), use_bias=cfg.enable_bias, name="fc1", **kw)(h)
        h = layers.ACTIVATIONS[cfg.activation](h)
        h = layers.Dense(cfg.hidden_size, ("mlp", "embed"), use_bias=cfg.enable_bias, name="fc2", **kw)(h)
        x = x + nn.Dropout(cfg.dropout)(h, deterministic=self.deterministic)
        if not pre:
            x = mlp_norm(x)
        return nn.with_logical_constraint(x, ("batch", "length", "embed")), new_cache


def hf_positions(attention_mask):
    """HF OPT's positions: cumsum(mask) * mask - 1 (padding at -1, i.e. table row 1)."""
    mask = attention_mask.astype(jnp.int32)
    return jnp.cumsum(mask, axis=1) * mask - 1


class OPT(nn.Module):
    """OPTForCausalLM. `__call__(input_ids, attention_mask, *, inputs_embeds, positions, cache,
    cache_index, deterministic, logits_at) -> (logits float32 [B, T, V], aux)`.

    Inputs: `input_ids` [B, T] and/or `inputs_embeds` [B, T', embed_dim] (the width of the word
    embeddings, before `project_in`); with both, the embeddings come first (BLIP-2's soft prompt
    followed by the text). `attention_mask` [B, T_total] (0/1, left padding), or [B, max_len] over
    every cache position when decoding with a cache (the inputs then sit at `cache_index`).
    `positions` default to HF's, derived from the mask. `logits_at` (a slice of positions)
    computes only those logits: the last one for generation, the text positions for the LM loss. aux["cache"] holds the updated cache.
    """

    config: OptConfig
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32
    scan_layers: bool = False
    remat_policy: str = "none"

    @nn.compact
    def __call__(self, input_ids=None, attention_mask=None, *, inputs_embeds=None, positions=None, cache=None,
                 cache_index=None, deterministic: bool = True, logits_at: slice | None = None):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        embed_tokens = layers.embed(cfg.vocab_size, cfg.embed_dim, ("vocab", "embed"), name="embed_tokens", **kw)
        pieces = []
        if inputs_embeds is not None:
            pieces.append(inputs_embeds.astype(self.dtype))
        if input_ids is not None:
            pieces.append(embed_tokens(input_ids))
        if not pieces:
            raise ValueError("pass input_ids and/or inputs_embeds")
        x = pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces, axis=1)
        batch, length = x.shape[:2]
        if attention_mask is None:
            if cache is not None:
                raise ValueError("decoding with a cache needs an attention_mask over every cache position")
            attention_mask = jnp.ones((batch, length), jnp.int32)

        start = 0 if cache is None else cache_index
        query_positions = start + jnp.arange(length)
        if positions is None:
            positions = jax.lax.dynamic_slice_in_dim(hf_positions(attention_mask), start, length, axis=1)

        if cfg.embed_dim != cfg.hidden_size:
            x = layers.Dense(cfg.hidden_size, (None, "embed"), use_bias=False, name="project_in", **kw)(x)
        embed_positions = layers.embed(cfg.max_position_embeddings + POSITION_OFFSET, cfg.hidden_size,
                                       (None, "embed"), name="embed_positions", **kw)
        x = x + embed_positions(positions + POSITION_OFFSET)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))

        mask = layers.causal_mask(attention_mask, query_positions)
        x, layer_cache = LayerStack(
            OptLayer,
            dict(config=cfg, deterministic=deterministic, **kw),
            cfg.num_layers,
            scan=self.scan_layers,
            remat_policy=self.remat_policy,
            name="decoder",
        )(x, mask, cache_index, cache=None if cache is None else cache["layers"])

        if logits_at is not None:
            x = x[:, logits_at]
        if cfg.has_final_layer_norm:
            x = _layer_norm(cfg, name="final_layer_norm", **kw)(x)
        if cfg.embed_dim != cfg.hidden_size:
            x = layers.Dense(cfg.embed_dim, ("embed", None), use_bias=False, name="project_out", **kw)(x)
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


def init_cache(config: OptConfig, batch: int, max_len: int, dtype=jnp.float32, *, scan_layers: bool = False):
    """Zero decoding cache for `max_len` positions (`decoding.zero_kv_cache`)."""
    return decoding.zero_kv_cache(batch, config.num_layers, config.num_heads, max_len, config.head_dim, dtype,
                                  scan_layers=scan_layers)


def decode_step(config: OptConfig, *, scan_layers: bool = False, dtype=jnp.float32):
    """The `blip_jax.generation` step of OPT (`decoding.causal_decode_step`)."""
    return decoding.causal_decode_step(OPT, config, scan_layers, dtype)


def param_shapes(config: OptConfig, scan_layers: bool = False):
    """The parameter tree of `OPT(config)` as ShapeDtypeStructs (no allocation)."""
    return decoding.param_shapes(OPT(config, scan_layers=scan_layers))


_MODULES = [
    (r"^decoder/layers_(\d+)/", r"model.decoder.layers.\1/"),
    (r"^(embed_tokens|embed_positions|final_layer_norm|project_in|project_out)/", r"model.decoder.\1/"),
]


def hf_key(path: str, prefix: str = "") -> tuple[str, str]:
    """(transformers key, kind) of an unrolled Flax parameter path 'decoder/layers_0/fc1/kernel'."""
    key, kind = rename(path, _MODULES)
    return prefix + key, kind


def load_opt_params(state_dict: Mapping[str, Any], config: OptConfig, *, scan_layers: bool = False,
                    prefix: str = "", dtype=np.float32) -> dict:
    """Flax params of `OPT(config)` from an `OPTForCausalLM` state dict (numpy arrays or CPU torch
    tensors). `prefix` is prepended to every key (e.g. "language_model." in a BLIP-2 checkpoint) and
    scopes the unexpected-key check. Missing, unexpected or misshapen tensors raise one
    ConversionError; the tied `lm_head.weight` copy is ignored."""
    tied = re.compile(rf"^{re.escape(prefix)}lm_head\.weight$") if config.tie_word_embeddings else None
    flat, _ = map_weights(state_dict, expected_params(param_shapes(config)), lambda path: hf_key(path, prefix),
                          what="OPT weights do not match the config", scope=prefix, ignore=tied, dtype=dtype)
    params = traverse_util.unflatten_dict(flat, sep="/")
    return stack_layers(params) if scan_layers else params
