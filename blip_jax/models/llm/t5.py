"""T5 (original and v1.1 / Flan-T5), the frozen encoder-decoder LLM of BLIP-2 and InstructBLIP FlanT5,
matching transformers' `T5ForConditionalGeneration` (logits within float32 noise, generation token
for token).

Architecture: pre-RMSNorm blocks (T5LayerNorm, no mean, no bias), attention without score scaling
nor biases, relative position buckets (bidirectional in the encoder, causal in the decoder) whose
table belongs to the first block of each stack and serves every block, no position bias in the
cross-attention, ReLU MLP (`wi`, `wo`) for original T5 or gated MLP (`wi_0`, `wi_1`, `wo`; tanh GELU
for "gated-gelu" unless the config's `dense_act_fn` names another) for v1.1/Flan, final RMSNorm per
stack. Original T5 ties the head to `shared` and scales the decoder output by d_model**-0.5 first;
v1.1/Flan have an untied `lm_head`, unscaled.

Decoding keeps two caches (see `blip_jax.generation`): per row (beam) the self-attention keys and
values {"layers": per layer {"k", "v"} [R, H, max_len, Dkv]} from `init_cache`, and per example the
cross-attention keys/values of the encoder states and the encoder mask from `cross_cache`, passed
once in `params=(weights, shared)`; `attend` lets the beams of an example share that copy.

Parameter tree (unrolled layout; the scanned one stacks `block/layers_i` into `block/layers`):
    shared/embedding [V, D]                                 shared.weight
    {encoder,decoder}/relative_attention_bias/embedding [N, H]
                                   {encoder,decoder}.block.0.layer.0.SelfAttention.relative_attention_bias.weight
    encoder/block/layers_i/self_attn/{q,k,v}/kernel [D, H, Dkv]   encoder.block.i.layer.0.SelfAttention.{q,k,v}.weight
    encoder/block/layers_i/self_attn/o/kernel [H, Dkv, D]         encoder.block.i.layer.0.SelfAttention.o.weight
    encoder/block/layers_i/self_attn_norm/scale                   encoder.block.i.layer.0.layer_norm.weight
    encoder/block/layers_i/mlp/{wi | wi_0, wi_1, wo}/kernel       encoder.block.i.layer.1.DenseReluDense.*.weight
    encoder/block/layers_i/mlp_norm/scale                         encoder.block.i.layer.1.layer_norm.weight
    decoder/block/layers_i/{self_attn, self_attn_norm}            decoder.block.i.layer.0.*
    decoder/block/layers_i/{cross_attn, cross_attn_norm}          decoder.block.i.layer.1.{EncDecAttention, layer_norm}
    decoder/block/layers_i/{mlp, mlp_norm}                        decoder.block.i.layer.2.{DenseReluDense, layer_norm}
    {encoder,decoder}/final_layer_norm/scale                      {encoder,decoder}.final_layer_norm.weight
    lm_head/kernel [D, V]                                         lm_head.weight    (untied only)
"""

from __future__ import annotations

import dataclasses
import functools
import math
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
from blip_jax.models.med import merge_cache, split_cache
from blip_jax.models.stack import LayerStack

# transformers' names for an activation blip-jax spells otherwise ("gelu_python" is exact GELU too)
HF_ACTIVATION_ALIASES = {"gelu_python": "gelu"}


@dataclasses.dataclass(frozen=True)
class T5Config:
    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_decoder_layers: int = 6
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    activation: str = "relu"  # of the MLP: relu (T5), gelu_new (v1.1, Flan), gelu (BLIP-2's Flan-T5)
    gated: bool = False  # wi_0, wi_1 (v1.1, Flan) instead of wi
    tie_word_embeddings: bool = True  # head = `shared`, decoder output scaled by d_model**-0.5
    layer_norm_eps: float = 1e-6
    dropout: float = 0.1
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0

    def __post_init__(self):
        if self.activation not in layers.ACTIVATIONS:
            raise ValueError(f"T5 activation {self.activation!r} is not one of {sorted(layers.ACTIVATIONS)}")

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> "T5Config":
        """From a T5 `config.json` dict (or the `text_config` of a BLIP-2 / InstructBLIP one)."""
        get = functools.partial(hf_get, hf)
        d = cls()
        num_layers = get("num_layers", d.num_layers)
        # transformers 5 always ties the parameter and records the original flag as
        # `scale_decoder_outputs`; config.json files carry `tie_word_embeddings` (False for v1.1).
        tie = hf.get("scale_decoder_outputs")
        if tie is None:
            tie = get("tie_word_embeddings", d.tie_word_embeddings)
        # feed_forward_proj is "relu" or "gated-gelu"; transformers maps the latter to the tanh GELU
        # unless the config names the activation (BLIP-2's Flan-T5 configs say dense_act_fn "gelu").
        proj = get("feed_forward_proj", "relu")
        activation = get("dense_act_fn", "gelu_new" if proj == "gated-gelu" else proj.split("-")[-1])
        activation = HF_ACTIVATION_ALIASES.get(activation, activation)
        eos = get("eos_token_id", d.eos_token_id)
        pad = get("pad_token_id", d.pad_token_id)
        return cls(
            vocab_size=get("vocab_size", d.vocab_size),
            d_model=get("d_model", d.d_model),
            d_kv=get("d_kv", d.d_kv),
            d_ff=get("d_ff", d.d_ff),
            num_layers=num_layers,
            num_decoder_layers=get("num_decoder_layers", num_layers),
            num_heads=get("num_heads", d.num_heads),
            relative_attention_num_buckets=get("relative_attention_num_buckets", d.relative_attention_num_buckets),
            relative_attention_max_distance=get("relative_attention_max_distance", d.relative_attention_max_distance),
            activation=activation,
            gated=bool(get("is_gated_act", proj.split("-")[0] == "gated")),
            tie_word_embeddings=bool(tie),
            layer_norm_eps=float(get("layer_norm_epsilon", d.layer_norm_eps)),
            dropout=float(get("dropout_rate", d.dropout)),
            pad_token_id=pad,
            eos_token_id=eos[0] if isinstance(eos, (list, tuple)) else eos,
            decoder_start_token_id=get("decoder_start_token_id", pad),
        )

    def to_hf(self) -> dict:
        """The transformers `T5Config` dict `from_hf` reads back to this config. transformers derives
        the activation from `feed_forward_proj` and reads "gated-gelu" as tanh GELU, so exact GELU
        (LAVIS's Flan-T5) is written as its "gelu_python"."""
        act = "gelu_python" if self.gated and self.activation == "gelu" else self.activation
        proj = "gated-gelu" if self.gated and act == "gelu_new" else ("gated-" if self.gated else "") + act
        return {"model_type": "t5", "vocab_size": self.vocab_size, "d_model": self.d_model, "d_kv": self.d_kv,
                "d_ff": self.d_ff, "num_layers": self.num_layers, "num_decoder_layers": self.num_decoder_layers,
                "num_heads": self.num_heads, "relative_attention_num_buckets": self.relative_attention_num_buckets,
                "relative_attention_max_distance": self.relative_attention_max_distance,
                "feed_forward_proj": proj, "tie_word_embeddings": self.tie_word_embeddings,
                "layer_norm_epsilon": self.layer_norm_eps, "dropout_rate": self.dropout,
                "pad_token_id": self.pad_token_id, "eos_token_id": self.eos_token_id,
                "decoder_start_token_id": self.decoder_start_token_id}


@functools.lru_cache(maxsize=None)
def _distance_buckets(num_buckets: int, max_distance: int) -> np.ndarray:
    """Bucket of each distance 0..max_distance (farther ones share the last): exact below
    num_buckets // 2, logarithmic above. Tabulated in numpy with transformers' float32 arithmetic so
    that distances on a bucket boundary land where they do there."""
    exact = num_buckets // 2
    distance = np.arange(max_distance + 1)
    ratio = np.log(np.maximum(distance, exact).astype(np.float32) / np.float32(exact))
    ratio = ratio / np.float32(math.log(max_distance / exact)) * np.float32(num_buckets - exact)
    log_bucket = np.minimum(exact + ratio.astype(np.int64), num_buckets - 1)
    return np.where(distance < exact, distance, log_bucket).astype(np.int32)


def relative_position_bucket(relative_position, *, bidirectional: bool, num_buckets: int, max_distance: int):
    """T5's bucket of each (key position - query position). Bidirectional: half the buckets for
    keys after the query; causal: keys after the query share bucket 0 (they are masked anyway)."""
    if bidirectional:
        num_buckets //= 2
        offset = jnp.where(relative_position > 0, num_buckets, 0)
        distance = jnp.abs(relative_position)
    else:
        offset = 0
        distance = jnp.maximum(-relative_position, 0)
    table = jnp.asarray(_distance_buckets(num_buckets, max_distance))
    return offset + table[jnp.minimum(distance, max_distance)]


class T5Attention(nn.Module):
    """T5 attention: o(softmax(q(x) k^T + position bias) v), no 1/sqrt(d) scaling, no biases."""

    config: T5Config
    deterministic: bool = True
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    def setup(self):
        cfg = self.config
        kw = dict(use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)
        shape = (cfg.num_heads, cfg.d_kv)
        self.q = layers.Dense(shape, ("embed", "heads", "kv"), **kw)
        self.k = layers.Dense(shape, ("embed", "heads", "kv"), **kw)
        self.v = layers.Dense(shape, ("embed", "heads", "kv"), **kw)
        self.o = layers.Dense(cfg.d_model, ("heads", "kv", "embed"), in_dims=2, **kw)
        self.dropout = nn.Dropout(cfg.dropout)

    def keys_values(self, source):
        """Head-major keys and values [B, H, S, Dkv] of `source` [B, S, D]."""
        return layers.heads_first(self.k(source)), layers.heads_first(self.v(source))

    def __call__(self, x, keys, values, mask, bias=None):
        h = layers.attend(self.q(x), keys, values, mask, dtype=self.dtype, bias=bias, scale=1.0)
        h = self.dropout(h, deterministic=self.deterministic)  # HF drops the probs; same in law
        return self.o(h)


class T5MLP(nn.Module):
    config: T5Config
    deterministic: bool = True
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        kw = dict(use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)
        act = layers.ACTIVATIONS[cfg.activation]
        if cfg.gated:
            h = act(layers.Dense(cfg.d_ff, ("embed", "mlp"), name="wi_0", **kw)(x))
            h = h * layers.Dense(cfg.d_ff, ("embed", "mlp"), name="wi_1", **kw)(x)
        else:
            h = act(layers.Dense(cfg.d_ff, ("embed", "mlp"), name="wi", **kw)(x))
        h = nn.Dropout(cfg.dropout)(h, deterministic=self.deterministic)
        return layers.Dense(cfg.d_model, ("mlp", "embed"), name="wo", **kw)(h)


class T5Block(nn.Module):
    """One encoder block (self-attention, MLP) or decoder block (+ cross-attention between them).

    The decoder's cross-attention keys/values come from `encoder_states` when given, else from the
    cache ("cross_k", "cross_v"); with a cache, the new cache holds them too."""

    config: T5Config
    decoder: bool = False
    deterministic: bool = True
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask, bias, encoder_states, encoder_mask, cache_index, cache):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attn_kw = dict(deterministic=self.deterministic, **kw)

        def norm(name):
            return layers.rms_norm(cfg.layer_norm_eps, name=name, **kw)

        def residual(h):
            return nn.Dropout(cfg.dropout)(h, deterministic=self.deterministic)

        self_attn = T5Attention(cfg, name="self_attn", **attn_kw)
        h = norm("self_attn_norm")(x)
        k, v = self_attn.keys_values(h)
        new_cache = None
        if cache is not None:
            new_cache = layers.write_cache(cache, k, v, cache_index)
            k, v = new_cache["k"], new_cache["v"]
        x = x + residual(self_attn(h, k, v, mask, bias))

        if self.decoder:
            cross_attn = T5Attention(cfg, name="cross_attn", **attn_kw)
            if encoder_states is not None:
                ck, cv = cross_attn.keys_values(encoder_states)
            else:
                ck, cv = cache["cross_k"], cache["cross_v"]
            if cache is not None:
                new_cache.update(cross_k=ck.astype(cache["k"].dtype), cross_v=cv.astype(cache["v"].dtype))
            x = x + residual(cross_attn(norm("cross_attn_norm")(x), ck, cv, encoder_mask))

        x = x + residual(T5MLP(cfg, name="mlp", **attn_kw)(norm("mlp_norm")(x)))
        return nn.with_logical_constraint(x, ("batch", "length", "embed")), new_cache


class T5Stack(nn.Module):
    """The encoder or the decoder: position bias, blocks, final norm. `mask` is the boolean
    [B, 1, T | 1, S] attention mask, `query_positions` [T] the absolute positions of the inputs."""

    config: T5Config
    decoder: bool = False
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32
    scan_layers: bool = False
    remat_policy: str = "none"

    @nn.compact
    def __call__(self, x, mask, query_positions, encoder_states=None, encoder_mask=None, *, cache=None,
                 cache_index=None, deterministic: bool = True):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        table = layers.embed(cfg.relative_attention_num_buckets, cfg.num_heads, (None, "heads"),
                             name="relative_attention_bias", **kw)
        relative = jnp.arange(mask.shape[-1])[None, :] - query_positions[:, None]  # [T, S]
        buckets = relative_position_bucket(relative, bidirectional=not self.decoder,
                                           num_buckets=cfg.relative_attention_num_buckets,
                                           max_distance=cfg.relative_attention_max_distance)
        bias = jnp.moveaxis(table(buckets), -1, 0)[None]  # [1, H, T, S], shared by every block

        x = nn.Dropout(cfg.dropout)(x, deterministic=deterministic)
        x, new_cache = LayerStack(
            T5Block,
            dict(config=cfg, decoder=self.decoder, deterministic=deterministic, **kw),
            cfg.num_decoder_layers if self.decoder else cfg.num_layers,
            scan=self.scan_layers,
            remat_policy=self.remat_policy,
            name="block",
        )(x, mask, bias, encoder_states, encoder_mask, cache_index, cache=cache)
        x = layers.rms_norm(cfg.layer_norm_eps, name="final_layer_norm", **kw)(x)
        return nn.Dropout(cfg.dropout)(x, deterministic=deterministic), new_cache


class T5(nn.Module):
    """T5ForConditionalGeneration. `__call__(input_ids, attention_mask, decoder_input_ids,
    decoder_attention_mask=None, *, inputs_embeds=None, deterministic) -> logits float32 [B, T_dec, V]`
    (teacher forcing); `encode` and `decode` are its two halves, `decode` also with a cache.

    Encoder inputs: `input_ids` [B, T] and/or `inputs_embeds` [B, T', D]; with both, the embeddings
    come first (BLIP-2's soft prompt followed by the text). `attention_mask` [B, T' + T], any 0/1
    pattern (BLIP-2 pads in the middle); relative positions ignore it, as in transformers.
    """

    config: T5Config
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32
    scan_layers: bool = False
    remat_policy: str = "none"

    def setup(self):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        stack = dict(scan_layers=self.scan_layers, remat_policy=self.remat_policy, **kw)
        self.shared = layers.embed(cfg.vocab_size, cfg.d_model, ("vocab", "embed"), name=None, **kw)
        self.encoder = T5Stack(cfg, decoder=False, **stack)
        self.decoder = T5Stack(cfg, decoder=True, **stack)
        if not cfg.tie_word_embeddings:
            self.lm_head = layers.Dense(cfg.vocab_size, ("embed", "vocab"), use_bias=False, **kw)

    def __call__(self, input_ids=None, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None, *,
                 inputs_embeds=None, deterministic: bool = True, logits_at: slice | None = None):
        states = self.encode(input_ids, attention_mask, inputs_embeds=inputs_embeds, deterministic=deterministic)
        logits, aux = self.decode(decoder_input_ids, decoder_attention_mask, states, attention_mask,
                                  deterministic=deterministic, logits_at=logits_at)
        return logits, {**aux, "encoder_states": states}  # (out, aux), as the other LLMs

    def encode(self, input_ids=None, attention_mask=None, *, inputs_embeds=None, deterministic: bool = True):
        """Encoder states [B, T' + T, D]."""
        pieces = []
        if inputs_embeds is not None:
            pieces.append(inputs_embeds.astype(self.dtype))
        if input_ids is not None:
            pieces.append(self.shared(input_ids))
        if not pieces:
            raise ValueError("pass input_ids and/or inputs_embeds")
        x = pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces, axis=1)
        if attention_mask is None:
            attention_mask = jnp.ones(x.shape[:2], jnp.int32)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        x, _ = self.encoder(x, layers.padding_mask(attention_mask), jnp.arange(x.shape[1]),
                            deterministic=deterministic)
        return x

    def decode(self, decoder_input_ids, decoder_attention_mask=None, encoder_states=None, encoder_mask=None, *,
               cache=None, cache_index=None, deterministic: bool = True, logits_at: slice | None = None):
        """(logits float32 [B, T, V] (at the positions `logits_at` only, when given), aux).

        Without a cache: `decoder_attention_mask` [B, T] (default all ones) and `encoder_states`.
        With one, the inputs sit at `cache_index`, `decoder_attention_mask` covers every cache
        position [B, max_len], and the cross-attention keys/values and encoder mask come from the
        cache (a merged one, see `decode_step`) unless `encoder_states` is given; aux["cache"] holds
        the updated cache with them."""
        cfg = self.config
        if encoder_states is None and cache is None:
            raise ValueError("decode needs encoder_states, or a cache holding the cross-attention keys/values")
        x = nn.with_logical_constraint(self.shared(decoder_input_ids), ("batch", "length", "embed"))
        length = x.shape[1]
        if decoder_attention_mask is None:
            if cache is not None:
                raise ValueError("decoding with a cache needs a decoder_attention_mask over every cache position")
            decoder_attention_mask = jnp.ones(x.shape[:2], jnp.int32)
        if cache is not None and "encoder_mask" in cache:
            encoder_mask = cache["encoder_mask"]
        elif encoder_mask is None:
            encoder_mask = jnp.ones(encoder_states.shape[:2], jnp.int32)

        query_positions = (0 if cache is None else cache_index) + jnp.arange(length)
        x, layer_cache = self.decoder(
            x, layers.causal_mask(decoder_attention_mask, query_positions), query_positions, encoder_states,
            layers.padding_mask(encoder_mask), cache=None if cache is None else cache["layers"],
            cache_index=cache_index, deterministic=deterministic)
        if logits_at is not None:
            x = x[:, logits_at]
        if cfg.tie_word_embeddings:
            logits = self.shared.attend(x * cfg.d_model**-0.5)
        else:
            logits = self.lm_head(x)

        aux = {}
        if cache is not None:
            aux["cache"] = {"layers": layer_cache, "encoder_mask": encoder_mask}
        return logits.astype(jnp.float32), aux

    def cross_kv(self, encoder_states, encoder_mask=None):
        """The shared decoding cache: {"layers": per layer {"cross_k", "cross_v"} [B, H, S, Dkv]
        (scanned: [B, L, H, S, Dkv]), "encoder_mask" [B, S]}, filled by decoding zero tokens."""
        batch = encoder_states.shape[0]
        empty = init_cache(self.config, batch, 0, self.dtype, scan_layers=self.scan_layers)
        no_tokens = jnp.zeros((batch, 0), jnp.int32)
        _, aux = self.decode(no_tokens, no_tokens, encoder_states, encoder_mask, cache=empty,
                             cache_index=jnp.int32(0))
        return split_cache(aux["cache"])[1]


def init_cache(config: T5Config, batch: int, max_len: int, dtype=jnp.float32, *, scan_layers: bool = False):
    """Zero per-row decoder cache for `max_len` positions (`decoding.zero_kv_cache`)."""
    return decoding.zero_kv_cache(batch, config.num_decoder_layers, config.num_heads, max_len, config.d_kv, dtype,
                                  scan_layers=scan_layers)


@functools.partial(jax.jit, static_argnums=0, static_argnames=("scan_layers", "dtype"))
def cross_cache(config: T5Config, params, encoder_states, encoder_mask, *, scan_layers: bool = False,
                dtype=jnp.float32):
    """The per-example shared part of decoding (`T5.cross_kv`): every decoder layer's
    cross-attention keys/values of `encoder_states` [B, S, D], computed once, and `encoder_mask`."""
    model = T5(config, dtype=dtype, scan_layers=scan_layers)
    return model.apply({"params": params}, encoder_states, encoder_mask, method=T5.cross_kv)


@functools.lru_cache(maxsize=None)
def decode_step(config: T5Config, *, scan_layers: bool = False, dtype=jnp.float32):
    """The `blip_jax.generation` step of the T5 decoder: `step((weights, shared), cache, token_ids,
    attention_mask, cache_index) -> (logits [R, 1, V], cache)` with `shared` from `cross_cache` and
    `cache` from `init_cache`; the prompt is [B, 1] of `decoder_start_token_id`. One stable callable
    per (config, layout, dtype)."""
    model = T5(config, dtype=dtype, scan_layers=scan_layers)

    def step(params, cache, token_ids, attention_mask, cache_index):
        weights, shared = params
        logits, aux = model.apply({"params": weights}, token_ids, attention_mask, cache=merge_cache(cache, shared),
                                  cache_index=cache_index, logits_at=slice(-1, None), method=T5.decode)
        return logits, split_cache(aux["cache"])[0]

    return step


def param_shapes(config: T5Config, scan_layers: bool = False):
    """The parameter tree of `T5(config)` as ShapeDtypeStructs (no allocation)."""
    ids = jnp.zeros((1, 1), jnp.int32)
    return decoding.param_shapes(T5(config, scan_layers=scan_layers), ids, ids, ids)


_MODULES = [
    (r"^(encoder|decoder)/relative_attention_bias/", r"\1/block/layers_0/self_attn/relative_attention_bias/"),
    (r"^encoder/block/layers_(\d+)/mlp", r"encoder/block/\1/layer/1/mlp"),
    (r"^decoder/block/layers_(\d+)/mlp", r"decoder/block/\1/layer/2/mlp"),
    (r"/block/layers_(\d+)/self_attn", r"/block/\1/layer/0/self_attn"),
    (r"/block/layers_(\d+)/cross_attn", r"/block/\1/layer/1/cross_attn"),
    (r"/(self_attn|cross_attn|mlp)_norm/", "/layer_norm/"),
    (r"/self_attn/", "/SelfAttention/"),
    (r"/cross_attn/", "/EncDecAttention/"),
    (r"/mlp/", "/DenseReluDense/"),
]


def hf_key(path: str, prefix: str = "") -> tuple[str, str]:
    """(transformers key, kind) of an unrolled Flax parameter path 'encoder/block/layers_0/mlp/wo/kernel'."""
    key, kind = rename(path, _MODULES)
    return prefix + key, kind


def load_t5_params(state_dict: Mapping[str, Any], config: T5Config, *, scan_layers: bool = False,
                   prefix: str = "", dtype=np.float32) -> dict:
    """Flax params of `T5(config)` from a `T5ForConditionalGeneration` state dict (numpy arrays or
    CPU torch tensors). `prefix` is prepended to every key (e.g. "language_model." in a BLIP-2
    checkpoint) and scopes the unexpected-key check. Missing, unexpected or misshapen tensors raise
    one ConversionError; the stacks' copies of `shared.weight`, the tied `lm_head.weight` and the
    unused decoder cross-attention bias of old checkpoints (which transformers skips too) are ignored.
    An untied (v1.1) head absent from the checkpoint is `shared.weight`: transformers 5 ties the two
    whatever the config and saves v1.1 models without `lm_head.weight`."""
    ignored = [r"(encoder|decoder)\.embed_tokens\.weight",
               r"decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight"]
    if config.tie_word_embeddings:
        ignored.append(r"lm_head\.weight")
    ignore = re.compile(rf"^{re.escape(prefix)}({'|'.join(ignored)})$")

    def key(path):
        if path == "lm_head/kernel" and prefix + "lm_head.weight" not in state_dict:
            return prefix + "shared.weight", "linear"
        return hf_key(path, prefix)

    flat, _ = map_weights(state_dict, expected_params(param_shapes(config)), key,
                          what="T5 weights do not match the config", scope=prefix, ignore=ignore, dtype=dtype)
    params = traverse_util.unflatten_dict(flat, sep="/")
    return stack_layers(params) if scan_layers else params
