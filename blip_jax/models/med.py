"""BLIP's MED text transformer: a post-LN BERT whose one parameter set serves three functions.

* unimodal encoder (`encoder_states=None`, bidirectional): the text side of ITC;
* image-grounded encoder (`encoder_states` given, bidirectional): cross-attends to image tokens, ITM;
* image-grounded decoder (`causal=True`): causal self-attention plus cross-attention, LM.

Decoding uses an explicit cache (a pytree with the batch leading): each layer keeps its self-attention
keys/values for every position and the cross-attention keys/values of the encoder states, computed
once by `init_cache` instead of at every step.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import linen as nn

from blip_jax.models import layers
from blip_jax.models.config import TextConfig
from blip_jax.models.stack import LayerStack


class Attention(nn.Module):
    """BERT attention with its output block: LN(x + out(attend(q(x), k(src), v(src))))."""

    config: TextConfig
    kv_width: int
    deterministic: bool = True
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    def setup(self):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        shape = (cfg.num_heads, cfg.hidden_size // cfg.num_heads)
        self.query = layers.Dense(shape, ("embed", "heads", "kv"), **kw)
        self.key = layers.Dense(shape, ("embed", "heads", "kv"), **kw)
        self.value = layers.Dense(shape, ("embed", "heads", "kv"), **kw)
        self.out = layers.Dense(cfg.hidden_size, ("heads", "kv", "embed"), in_dims=2, **kw)
        self.norm = layers.layer_norm(cfg.layer_norm_eps, **kw)
        self.attn_dropout = nn.Dropout(cfg.attention_dropout)
        self.out_dropout = nn.Dropout(cfg.hidden_dropout)

    def keys_values(self, source):
        """Head-major keys and values [B, H, S, D] of `source` [B, S, width]."""
        return layers.heads_first(self.key(source)), layers.heads_first(self.value(source))

    def __call__(self, x, mask, keys, values):
        h = layers.attend(self.query(x), keys, values, mask, dtype=self.dtype)
        h = self.attn_dropout(h, deterministic=self.deterministic)  # HF drops the probs; same in law
        h = self.out_dropout(self.out(h), deterministic=self.deterministic)
        return self.norm(h + x)


class TwinCrossAttention(nn.Module):
    """BLIP NLVR2's cross-attention over two images: one attention (query/key/value/out) per image,
    their outputs averaged (or, with `merge`, concatenated and projected back), one residual norm."""

    config: TextConfig
    merge: bool
    deterministic: bool = True
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, encoder_states, encoder_masks):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        shape = (cfg.num_heads, cfg.hidden_size // cfg.num_heads)
        outs = []
        for i, (states, mask) in enumerate(zip(encoder_states, encoder_masks)):
            q = layers.Dense(shape, ("embed", "heads", "kv"), name=f"query{i}", **kw)(x)
            k = layers.Dense(shape, ("embed", "heads", "kv"), name=f"key{i}", **kw)(states)
            v = layers.Dense(shape, ("embed", "heads", "kv"), name=f"value{i}", **kw)(states)
            h = layers.attend(q, layers.heads_first(k), layers.heads_first(v), layers.padding_mask(mask),
                              dtype=self.dtype)
            h = nn.Dropout(cfg.attention_dropout)(h, deterministic=self.deterministic)
            outs.append(layers.Dense(cfg.hidden_size, ("heads", "kv", "embed"), in_dims=2, name=f"out{i}", **kw)(h))
        if self.merge:
            h = layers.Dense(cfg.hidden_size, ("mlp", "embed"), name="merge", **kw)(jnp.concatenate(outs, axis=-1))
        else:
            h = (outs[0] + outs[1]) / 2
        h = nn.Dropout(cfg.hidden_dropout)(h, deterministic=self.deterministic)
        return layers.layer_norm(cfg.layer_norm_eps, name="norm", **kw)(h + x)


class TextLayer(nn.Module):
    config: TextConfig
    deterministic: bool = True
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32
    index: int = 0  # the layer's number (NLVR2's merge layers start at config.merge_from_layer)

    @nn.compact
    def __call__(self, x, mask, encoder_states, encoder_mask, cache_index, cache):
        cfg = self.config
        kw = dict(deterministic=self.deterministic, dtype=self.dtype, param_dtype=self.param_dtype)
        new_cache = None

        self_attn = Attention(cfg, cfg.hidden_size, name="self_attn", **kw)
        k, v = self_attn.keys_values(x)
        if cache is not None:
            new_cache = layers.write_cache(cache, k, v, cache_index)
            k, v = new_cache["k"], new_cache["v"]
        x = self_attn(x, mask, k, v)

        if cfg.twin_cross_attention and encoder_states is not None:  # NLVR2: (image 0, image 1)
            x = TwinCrossAttention(cfg, self.index >= cfg.merge_from_layer, name="cross_attn", **kw)(
                x, encoder_states, encoder_mask)
        elif cfg.cross_attention and (encoder_states is not None or cache is not None):
            cross_attn = Attention(cfg, cfg.encoder_hidden_size, name="cross_attn", **kw)
            if encoder_states is not None:
                ck, cv = cross_attn.keys_values(encoder_states)
            else:
                ck, cv = cache["cross_k"], cache["cross_v"]
            if cache is not None:
                new_cache.update(cross_k=ck.astype(cache["cross_k"].dtype), cross_v=cv.astype(cache["cross_v"].dtype))
            x = cross_attn(x, layers.padding_mask(encoder_mask), ck, cv)

        h = layers.Dense(cfg.intermediate_size, ("embed", "mlp"), name="fc1", dtype=self.dtype,
                         param_dtype=self.param_dtype)(x)
        h = layers.Dense(cfg.hidden_size, ("mlp", "embed"), name="fc2", dtype=self.dtype,
                         param_dtype=self.param_dtype)(layers.gelu(h))
        h = nn.Dropout(cfg.hidden_dropout)(h, deterministic=self.deterministic)
        x = layers.layer_norm(cfg.layer_norm_eps, name="ln", dtype=self.dtype, param_dtype=self.param_dtype)(h + x)
        return nn.with_logical_constraint(x, ("batch", "length", "embed")), new_cache


class TextTransformer(nn.Module):
    """input_ids [B, T] -> (hidden [B, T, D], aux), or (logits [B, T, V], aux with the `hidden`
    states) when `lm_head` is set; aux holds the updated `cache` when decoding with one."""

    config: TextConfig
    lm_head: bool = False
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32
    scan_layers: bool = False
    remat_policy: str = "none"

    @nn.compact
    def __call__(
        self,
        input_ids,
        attention_mask,
        *,
        encoder_states=None,
        encoder_mask=None,
        causal: bool = False,
        positions=None,
        cache=None,
        cache_index=None,
        deterministic: bool = True,
    ):
        """`attention_mask` is [B, T], or [B, max_len] over every cache position when decoding with a
        cache (then `cache_index` is where `input_ids` start). `encoder_mask` defaults to all ones."""
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        length = input_ids.shape[1]
        start = 0 if cache is None else cache_index
        query_positions = start + jnp.arange(length)
        if positions is None:
            positions = jnp.broadcast_to(query_positions, input_ids.shape)

        word = layers.embed(cfg.vocab_size, cfg.hidden_size, ("vocab", "embed"), name="word", **kw)
        position = layers.embed(cfg.max_position_embeddings, cfg.hidden_size, (None, "embed"), name="position", **kw)
        x = layers.layer_norm(cfg.layer_norm_eps, name="embed_norm", **kw)(word(input_ids) + position(positions))
        x = nn.Dropout(cfg.hidden_dropout)(x, deterministic=deterministic)

        mask = layers.causal_mask(attention_mask, query_positions) if causal else layers.padding_mask(attention_mask)
        if cache is not None:
            encoder_mask = cache["encoder_mask"]
        elif isinstance(encoder_states, tuple):  # NLVR2's two images
            encoder_mask = encoder_mask or tuple(jnp.ones(s.shape[:2], jnp.int32) for s in encoder_states)
        elif encoder_states is not None and encoder_mask is None:
            encoder_mask = jnp.ones(encoder_states.shape[:2], jnp.int32)
        if cfg.twin_cross_attention and self.scan_layers and cfg.num_layers > cfg.merge_from_layer:
            raise ValueError("nlvr: the text encoder's layers differ (merge layers from "
                             f"{cfg.merge_from_layer} on): it cannot be scanned (scan_layers=False)")

        x, layer_cache = LayerStack(
            TextLayer,
            dict(config=cfg, deterministic=deterministic, dtype=self.dtype, param_dtype=self.param_dtype),
            cfg.num_layers,
            scan=self.scan_layers,
            remat_policy=self.remat_policy,
            name="encoder",
        )(x, mask, encoder_states, encoder_mask, cache_index, cache=None if cache is None else cache["layers"])

        aux = {}
        if cache is not None:
            aux["cache"] = {"layers": layer_cache, "encoder_mask": encoder_mask}
        if self.lm_head:  # BERT's prediction head; the output matrix is the word embedding when tied
            h = layers.Dense(cfg.hidden_size, ("embed", "mlp"), name="head_dense", **kw)(x)
            h = layers.layer_norm(cfg.layer_norm_eps, name="head_norm", **kw)(layers.gelu(h))
            if cfg.tie_word_embeddings:
                logits = word.attend(h)
            else:
                logits = layers.Dense(cfg.vocab_size, ("embed", "vocab"), use_bias=False, name="head_out", **kw)(h)
            bias = self.param("head_bias", layers.logical(nn.initializers.zeros, ("vocab",)), (cfg.vocab_size,),
                              self.param_dtype)
            # (out, aux): a model with a head returns its logits, the hidden states are intermediates
            return (logits + bias.astype(logits.dtype)).astype(jnp.float32), {**aux, "hidden": x}
        return x, aux

    def init_cache(self, encoder_states, encoder_mask, batch: int, max_len: int, dtype=jnp.float32):
        """A decoding cache for `max_len` positions whose cross-attention keys/values hold the
        projected `encoder_states`: running the stack on zero tokens fills them once."""
        cfg = self.config
        heads, head_dim = cfg.num_heads, cfg.hidden_size // cfg.num_heads
        enc_len = encoder_states.shape[1]
        if encoder_mask is None:
            encoder_mask = jnp.ones((batch, enc_len), jnp.int32)

        def empty(length):  # head-major [B, (L,) H, S, D]
            if self.scan_layers:
                return jnp.zeros((batch, cfg.num_layers, heads, length, head_dim), dtype)
            return [jnp.zeros((batch, heads, length, head_dim), dtype) for _ in range(cfg.num_layers)]

        def layer_caches(k, v, ck, cv):
            if self.scan_layers:
                return {"k": k, "v": v, "cross_k": ck, "cross_v": cv}
            return [{"k": a, "v": b, "cross_k": c, "cross_v": d} for a, b, c, d in zip(k, v, ck, cv)]

        cache = {
            "layers": layer_caches(empty(max_len), empty(max_len), empty(enc_len), empty(enc_len)),
            "encoder_mask": encoder_mask.astype(jnp.int32),
        }
        no_tokens = jnp.zeros((batch, 0), jnp.int32)
        _, aux = self(no_tokens, jnp.zeros((batch, max_len), jnp.int32), encoder_states=encoder_states,
                      causal=True, cache=cache, cache_index=jnp.int32(0))
        return aux["cache"]


CROSS_KEYS = ("cross_k", "cross_v")


def split_cache(cache):
    """(per-row part, shared part) of a decoding cache.

    Self-attention keys/values follow each row (a beam) and are reordered with it; the
    cross-attention keys/values and the encoder mask are the same for every beam of an example, so
    generation keeps them once per example (as `params`, untouched) and `attend` shares them.
    """
    def part(layer, cross):
        return {k: v for k, v in layer.items() if (k in CROSS_KEYS) == cross}

    stack = cache["layers"]
    if isinstance(stack, list):
        rows, shared = [part(l, False) for l in stack], [part(l, True) for l in stack]
    else:
        rows, shared = part(stack, False), part(stack, True)
    return {"layers": rows}, {"layers": shared, "encoder_mask": cache["encoder_mask"]}


def merge_cache(rows, shared):
    stack = rows["layers"]
    if isinstance(stack, list):
        merged = [{**a, **b} for a, b in zip(stack, shared["layers"])]
    else:
        merged = {**stack, **shared["layers"]}
    return {"layers": merged, "encoder_mask": shared["encoder_mask"]}
