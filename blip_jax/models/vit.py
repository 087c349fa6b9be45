"""The vision transformer of the BLIP family: patch embedding, CLS, learned positions, pre-LN blocks.

BLIP's ViT, BLIP-2's EVA ViT-g and CLIP ViT-L differ only by `VisionConfig`: width, depth, eps,
the activation (CLIP: quick GELU), CLIP's `ln_pre` and whether the tower ends in a norm (BLIP's
`ln_post`; BLIP-2 follows its towers with a separate, trainable `ln_vision`). EVA's q/v-only biases
are a fused qkv bias whose k third is zero.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import linen as nn

from blip_jax.models import layers
from blip_jax.models.config import VisionConfig
from blip_jax.models.stack import LayerStack


class VisionEmbeddings(nn.Module):
    config: VisionConfig
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values):
        cfg = self.config
        patch = nn.Conv(
            cfg.hidden_size,
            kernel_size=(cfg.patch_size, cfg.patch_size),
            strides=(cfg.patch_size, cfg.patch_size),
            padding="VALID",
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=layers.logical(layers.default_kernel_init, (None, None, None, "embed")),
            bias_init=layers.logical(nn.initializers.zeros, ("embed",)),
            name="patch",
        )(pixel_values.astype(self.dtype))
        batch, gh, gw, width = patch.shape
        cls = self.param("cls", layers.logical(layers.default_kernel_init, (None, None, "embed")),
                         (1, 1, width), self.param_dtype)
        pos = self.param("pos", layers.logical(layers.default_kernel_init, (None, None, "embed")),
                         (1, cfg.grid**2 + 1, width), self.param_dtype)
        if (gh, gw) != (cfg.grid, cfg.grid):  # another resolution: bicubic-resize the position grid
            grid = layers.resize_grid(pos[0, 1:].reshape(cfg.grid, cfg.grid, width), (gh, gw))
            pos = jnp.concatenate([pos[:, :1].astype(jnp.float32), grid.reshape(1, gh * gw, width)], axis=1)
        tokens = jnp.concatenate(
            [jnp.broadcast_to(cls.astype(self.dtype), (batch, 1, width)), patch.reshape(batch, gh * gw, width)], axis=1
        )
        return tokens + pos.astype(self.dtype)


class VisionBlock(nn.Module):
    """Pre-LN block: x + attn(ln1(x)); x + mlp(ln2(x)), each branch with stochastic depth."""

    config: VisionConfig
    deterministic: bool = True
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, cache=None):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        heads, head_dim = cfg.num_heads, cfg.hidden_size // cfg.num_heads

        h = layers.layer_norm(cfg.layer_norm_eps, name="ln1", **kw)(x)
        qkv = layers.Dense((3, heads, head_dim), ("embed", "qkv", "heads", "kv"), name="qkv", **kw)(h)
        q, k, v = qkv[:, :, 0], layers.heads_first(qkv[:, :, 1]), layers.heads_first(qkv[:, :, 2])
        h = layers.attend(q, k, v, dtype=self.dtype)
        h = nn.Dropout(cfg.attention_dropout)(h, deterministic=self.deterministic)
        h = layers.Dense(cfg.hidden_size, ("heads", "kv", "embed"), in_dims=2, name="proj", **kw)(h)
        x = x + layers.drop_path(h, cfg.drop_path_rate, self.deterministic, self)

        h = layers.layer_norm(cfg.layer_norm_eps, name="ln2", **kw)(x)
        h = layers.Dense(cfg.intermediate_size, ("embed", "mlp"), name="fc1", **kw)(h)
        h = layers.Dense(cfg.hidden_size, ("mlp", "embed"), name="fc2", **kw)(layers.ACTIVATIONS[cfg.activation](h))
        x = x + layers.drop_path(h, cfg.drop_path_rate, self.deterministic, self)
        return nn.with_logical_constraint(x, ("batch", "length", "embed")), None


class VisionTransformer(nn.Module):
    """pixel_values [B, H, W, 3] (NHWC) -> (tokens [B, 1 + patches, D], aux); the tokens are after the
    final norm when the config has one, aux["pre_norm"] before it."""

    config: VisionConfig
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32
    scan_layers: bool = False
    remat_policy: str = "none"

    @nn.compact
    def __call__(self, pixel_values, deterministic: bool = True):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = VisionEmbeddings(cfg, name="embed", **kw)(pixel_values)
        if cfg.pre_norm:
            x = layers.layer_norm(cfg.layer_norm_eps, name="ln_pre", **kw)(x)
        x, _ = LayerStack(
            VisionBlock,
            dict(config=cfg, deterministic=deterministic, **kw),
            cfg.num_layers,
            scan=self.scan_layers,
            remat_policy=self.remat_policy,
            name="encoder",
        )(x)
        pre_norm = x
        if cfg.final_norm:
            x = layers.layer_norm(cfg.layer_norm_eps, name="ln_post", **kw)(x)
        return x, {"pre_norm": pre_norm}
