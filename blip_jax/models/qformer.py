"""BLIP-2's Q-Former: a post-LN BERT over learned query embeddings (and, optionally, text after them).

Matches transformers' `Blip2QFormerModel`:

* the caller passes the query embeddings (`query_tokens` broadcast over the batch) and, for the
  query+text path, the text embeddings (word + position) that follow them; `layernorm` (and dropout)
  is applied to the whole concatenated sequence, as HF applies it to `query_embeds` after concatenation;
* every layer has bidirectional self-attention over all positions; layers with
  `index % cross_attention_frequency == 0` add cross-attention to the image features (keys/values
  projected from `encoder_hidden_size`), for the query positions only;
* query positions use the `*_query` feed-forward block, text positions the plain one (which exists
  only when `use_qformer_text_input`).

Parameter layout. Unrolled (default): `encoder/layers_{i}/{self_attn,cross_attn,fc1_query,...}`.
Scanned (`scan_layers=True`): layers are not identical when `cross_attention_frequency` > 1, so the
scan runs over groups of `cross_attention_frequency` consecutive layers (the first of each group has
cross-attention): `encoder/layers/sub_{j}/...` with a leading `layers` axis of size
num_layers // cross_attention_frequency. `stack_qformer_params` converts unrolled -> scanned.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util

from blip_jax.models.weights import expected_params, map_weights, rename
from blip_jax.models import layers
from blip_jax.models.config import TextConfig
from blip_jax.models.layout import stack_layers
from blip_jax.models.med import Attention
from blip_jax.models.stack import REMAT, LayerStack


@dataclasses.dataclass(frozen=True)
class QFormerConfig:
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    encoder_hidden_size: int = 1408
    cross_attention_frequency: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    use_qformer_text_input: bool = False  # the text-position FFN (intermediate/output) exists

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"qformer: hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.cross_attention_frequency < 1:
            raise ValueError("qformer: cross_attention_frequency must be >= 1")

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> "QFormerConfig":
        """From a transformers `Blip2QFormerConfig.to_dict()` (or the `qformer_config` of a BLIP-2 config)."""
        act = hf.get("hidden_act", "gelu")
        if act != "gelu":
            raise ValueError(f"qformer: hidden_act {act!r} is not supported (only exact 'gelu')")
        return cls(
            hidden_size=hf.get("hidden_size", 768),
            intermediate_size=hf.get("intermediate_size", 3072),
            num_layers=hf.get("num_hidden_layers", 12),
            num_heads=hf.get("num_attention_heads", 12),
            encoder_hidden_size=hf.get("encoder_hidden_size", 1408),
            cross_attention_frequency=hf.get("cross_attention_frequency", 2),
            layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
            hidden_dropout=hf.get("hidden_dropout_prob", 0.0),
            attention_dropout=hf.get("attention_probs_dropout_prob", 0.0),
            use_qformer_text_input=bool(hf.get("use_qformer_text_input", False)),
        )

    def attention_config(self) -> TextConfig:
        """The fields med.Attention reads, as the TextConfig it expects."""
        return TextConfig(hidden_size=self.hidden_size, num_heads=self.num_heads,
                          intermediate_size=self.intermediate_size, num_layers=self.num_layers,
                          layer_norm_eps=self.layer_norm_eps, encoder_hidden_size=self.encoder_hidden_size,
                          hidden_dropout=self.hidden_dropout, attention_dropout=self.attention_dropout)


class QFormerLayer(nn.Module):
    config: QFormerConfig
    cross_attention: bool
    query_length: int
    deterministic: bool = True
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    def _ffn(self, x, suffix: str):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = layers.Dense(cfg.intermediate_size, ("embed", "mlp"), name=f"fc1{suffix}", **kw)(x)
        h = layers.Dense(cfg.hidden_size, ("mlp", "embed"), name=f"fc2{suffix}", **kw)(layers.gelu(h))
        h = nn.Dropout(cfg.hidden_dropout)(h, deterministic=self.deterministic)
        return layers.layer_norm(cfg.layer_norm_eps, name=f"ln{suffix}", **kw)(h + x)

    @nn.compact
    def __call__(self, x, mask, encoder_states, encoder_mask):
        cfg = self.config
        acfg = cfg.attention_config()
        kw = dict(deterministic=self.deterministic, dtype=self.dtype, param_dtype=self.param_dtype)
        q_len = self.query_length

        self_attn = Attention(acfg, cfg.hidden_size, name="self_attn", **kw)
        k, v = self_attn.keys_values(x)
        x = self_attn(x, mask, k, v)

        queries, text = x[:, :q_len], x[:, q_len:]
        if self.cross_attention and q_len:
            if encoder_states is None:
                raise ValueError("qformer: encoder_states must be given for cross-attention layers")
            cross_attn = Attention(acfg, cfg.encoder_hidden_size, name="cross_attn", **kw)
            ck, cv = cross_attn.keys_values(encoder_states)
            emask = None if encoder_mask is None else layers.padding_mask(encoder_mask)
            queries = cross_attn(queries, emask, ck, cv)
        out = self._ffn(queries, "_query")
        if text.shape[1] > 0:
            if not cfg.use_qformer_text_input:
                raise ValueError("qformer: text positions need use_qformer_text_input=True (the text FFN)")
            out = jnp.concatenate([out, self._ffn(text, "")], axis=1)
        return nn.with_logical_constraint(out, ("batch", "length", "embed"))


class QFormerGroup(nn.Module):
    """`cross_attention_frequency` consecutive layers, the first with cross-attention: the unit
    that repeats, and so the unit the scanned layout scans over. Called as LayerStack's blocks are."""

    config: QFormerConfig
    query_length: int
    deterministic: bool = True
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask, encoder_states, encoder_mask, cache):
        for j in range(self.config.cross_attention_frequency):
            x = QFormerLayer(self.config, j == 0, self.query_length, self.deterministic, self.dtype,
                             self.param_dtype, name=f"sub_{j}")(x, mask, encoder_states, encoder_mask)
        return x, None


class QFormer(nn.Module):
    """QFormer(config)(query_embeds [B,Q,D], encoder_states [B,S,E], encoder_mask=None,
    text_embeds=None, text_mask=None, deterministic=True) -> (hidden [B, Q(+T), D], aux).

    `text_embeds` [B,T,D] are the text's word + position embeddings (the caller owns the
    embedding tables); `text_mask` [B,T] its padding mask (queries are always visible).
    With no queries (Q = 0) it is the unimodal text encoder (ITC's text side). `causal_text` gives
    stage 1's multimodal-causal mask (ITG): queries attend to queries only, text to all queries and
    to its own prefix; the query outputs then equal those of a queries-only pass.
    `encoder_mask` [B,S] masks image tokens (all visible by default). aux is {} for now.
    """

    config: QFormerConfig
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32
    scan_layers: bool = False
    remat_policy: str = "none"

    @nn.compact
    def __call__(self, query_embeds, encoder_states, encoder_mask=None, text_embeds=None, text_mask=None,
                 deterministic: bool = True, causal_text: bool = False):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        batch, q_len = query_embeds.shape[:2]
        x = query_embeds
        mask = None
        if text_embeds is not None:
            x = jnp.concatenate([query_embeds, text_embeds.astype(query_embeds.dtype)], axis=1)
            if text_mask is None:
                text_mask = jnp.ones(text_embeds.shape[:2], jnp.int32)
            full = jnp.concatenate([jnp.ones((batch, q_len), jnp.int32), jnp.asarray(text_mask, jnp.int32)], axis=1)
            mask = layers.padding_mask(full)
            if causal_text:  # ITG: queries see queries only; text sees every query and its own prefix
                total = full.shape[1]
                pos = jnp.arange(total)
                sees = (pos[None, :] < q_len) | ((pos[:, None] >= q_len) & (pos[None, :] <= pos[:, None]))
                mask = mask & sees[None, None]
        x = layers.layer_norm(cfg.layer_norm_eps, name="layernorm", **kw)(x)
        x = nn.Dropout(cfg.hidden_dropout)(x, deterministic=deterministic)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))

        freq = cfg.cross_attention_frequency
        if self.scan_layers:
            if cfg.num_layers % freq:
                raise ValueError(f"qformer: scanning needs num_layers ({cfg.num_layers}) to be a multiple of "
                                 f"cross_attention_frequency ({freq}); use the unrolled layout")
            x, _ = LayerStack(
                QFormerGroup,
                dict(config=cfg, query_length=q_len, deterministic=deterministic, **kw),
                cfg.num_layers // freq,
                scan=True,
                remat_policy=self.remat_policy,
                name="encoder",
            )(x, mask, encoder_states, encoder_mask)
        else:
            x = _Unrolled(cfg, q_len, deterministic, self.dtype, self.param_dtype, self.remat_policy,
                          name="encoder")(x, mask, encoder_states, encoder_mask)
        return x, {}


class _Unrolled(nn.Module):
    """The unrolled layout: `layers_{i}`, cross-attention where i % frequency == 0."""

    config: QFormerConfig
    query_length: int
    deterministic: bool
    dtype: layers.Dtype
    param_dtype: layers.Dtype
    remat_policy: str = "none"

    @nn.compact
    def __call__(self, x, mask, encoder_states, encoder_mask):
        block = QFormerLayer
        if self.remat_policy != "none":
            block = nn.remat(block, policy=REMAT[self.remat_policy])
        cfg = self.config
        for i in range(cfg.num_layers):
            x = block(cfg, i % cfg.cross_attention_frequency == 0, self.query_length, self.deterministic,
                      self.dtype, self.param_dtype, name=f"layers_{i}")(x, mask, encoder_states, encoder_mask)
        return x


# ----------------------------------------------------------------------------------------------
# Weights

_MODULES = [
    (r"^layernorm/", "layernorm/"),
    (r"^encoder/layers_(\d+)/self_attn/(query|key|value)/", r"encoder.layer.\1.attention.attention.\2/"),
    (r"^encoder/layers_(\d+)/self_attn/out/", r"encoder.layer.\1.attention.output.dense/"),
    (r"^encoder/layers_(\d+)/self_attn/norm/", r"encoder.layer.\1.attention.output.LayerNorm/"),
    (r"^encoder/layers_(\d+)/cross_attn/(query|key|value)/", r"encoder.layer.\1.crossattention.attention.\2/"),
    (r"^encoder/layers_(\d+)/cross_attn/out/", r"encoder.layer.\1.crossattention.output.dense/"),
    (r"^encoder/layers_(\d+)/cross_attn/norm/", r"encoder.layer.\1.crossattention.output.LayerNorm/"),
    (r"^encoder/layers_(\d+)/fc1_query/", r"encoder.layer.\1.intermediate_query.dense/"),
    (r"^encoder/layers_(\d+)/fc2_query/", r"encoder.layer.\1.output_query.dense/"),
    (r"^encoder/layers_(\d+)/ln_query/", r"encoder.layer.\1.output_query.LayerNorm/"),
    (r"^encoder/layers_(\d+)/fc1/", r"encoder.layer.\1.intermediate.dense/"),
    (r"^encoder/layers_(\d+)/fc2/", r"encoder.layer.\1.output.dense/"),
    (r"^encoder/layers_(\d+)/ln/", r"encoder.layer.\1.output.LayerNorm/"),
]


def hf_key(path: str, prefix: str = "qformer.") -> tuple[str, str]:
    """Unrolled blip-jax Q-Former path 'encoder/layers_0/self_attn/query/kernel' ->
    (transformers key, kind)."""
    key, kind = rename(path, _MODULES)
    return prefix + key, kind


def param_shapes(config: QFormerConfig, query_length: int = 1, text_length: int = 0,
                 scan_layers: bool = False):
    import jax

    model = QFormer(config, scan_layers=scan_layers)
    q = jnp.zeros((1, query_length, config.hidden_size))
    e = jnp.zeros((1, 1, config.encoder_hidden_size))
    t = jnp.zeros((1, text_length, config.hidden_size)) if text_length else None
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), q, e, text_embeds=t))
    return nn.unbox(shapes["params"])


def load_qformer_params(tensors: Mapping[str, np.ndarray], config: QFormerConfig, prefix: str = "qformer.",
                        scan_layers: bool = False, dtype=np.float32):
    """HF Q-Former tensors (keys like `qformer.encoder.layer.0.attention.attention.query.weight`) ->
    Flax params (unrolled, or scanned when `scan_layers`). Keys outside `prefix` are ignored;
    missing, unexpected and misshapen tensors raise one ConversionError."""
    expected = expected_params(param_shapes(config, text_length=1 if config.use_qformer_text_input else 0))
    flat, _ = map_weights(tensors, expected, lambda path: hf_key(path, prefix), scope=prefix, dtype=dtype,
                          what="Q-Former weights do not match the config")
    params = traverse_util.unflatten_dict(flat, sep="/")
    return stack_qformer_params(params, config) if scan_layers else params


def stack_qformer_params(params, config: QFormerConfig):
    """Unrolled params (`encoder/layers_{i}`) -> scanned (`encoder/layers/sub_{j}`, leading axis =
    group index, group = cross_attention_frequency consecutive layers)."""
    freq = config.cross_attention_frequency
    if config.num_layers % freq:
        raise ValueError("qformer: num_layers must be a multiple of cross_attention_frequency to scan")
    enc = params["encoder"]
    groups = {f"layers_{g}": {f"sub_{j}": enc[f"layers_{g * freq + j}"] for j in range(freq)}
              for g in range(config.num_layers // freq)}
    return {**{k: v for k, v in params.items() if k != "encoder"}, "encoder": stack_layers(groups)}
