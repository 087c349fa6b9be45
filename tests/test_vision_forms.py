"""The vision family by config: CLIP's form (ln_pre, quick GELU, no final norm, as BLIP-2 ViT-L uses)
checked against transformers' CLIPVisionModel; EVA's form is covered by the BLIP-2 parity tests."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import linen as nn
from flax import traverse_util

from blip_jax.models.config import VisionConfig
from blip_jax.models.vit import VisionTransformer


def test_clip_form_matches_transformers():
    hf_config = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                              num_attention_heads=4, image_size=32, patch_size=8,
                                              hidden_act="quick_gelu", layer_norm_eps=1e-5)
    torch.manual_seed(0)
    hf = transformers.CLIPVisionModel(hf_config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    sd = {k.removeprefix("vision_model."): v.numpy() for k, v in hf.state_dict().items()}
    config = VisionConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, image_size=32,
                          patch_size=8, activation="quick_gelu", pre_norm=True, final_norm=False)
    flat = {
        "embed/cls": sd["embeddings.class_embedding"].reshape(1, 1, 32),
        "embed/pos": sd["embeddings.position_embedding.weight"][None],
        "embed/patch/kernel": sd["embeddings.patch_embedding.weight"].transpose(2, 3, 1, 0),
        "embed/patch/bias": np.zeros(32, np.float32),  # CLIP's patch projection has no bias
        "ln_pre/scale": sd["pre_layrnorm.weight"], "ln_pre/bias": sd["pre_layrnorm.bias"],
    }
    for i in range(2):
        p, o = f"encoder.layers.{i}.", f"encoder/layers_{i}/"
        # CLIP keeps q, k, v apart (OpenAI's checkpoints fuse them as in_proj): fuse them here
        qkv_w = np.stack([sd[p + f"self_attn.{n}_proj.weight"] for n in "qkv"])  # [3, out, in]
        flat[o + "qkv/kernel"] = qkv_w.transpose(2, 0, 1).reshape(32, 3, 4, 8)
        flat[o + "qkv/bias"] = np.stack([sd[p + f"self_attn.{n}_proj.bias"] for n in "qkv"]).reshape(3, 4, 8)
        flat[o + "proj/kernel"] = sd[p + "self_attn.out_proj.weight"].T.reshape(4, 8, 32)
        flat[o + "proj/bias"] = sd[p + "self_attn.out_proj.bias"]
        for ours, theirs in (("ln1", "layer_norm1"), ("ln2", "layer_norm2")):
            flat[o + f"{ours}/scale"], flat[o + f"{ours}/bias"] = sd[p + theirs + ".weight"], sd[p + theirs + ".bias"]
        for fc in ("fc1", "fc2"):
            flat[o + f"{fc}/kernel"], flat[o + f"{fc}/bias"] = sd[p + f"mlp.{fc}.weight"].T, sd[p + f"mlp.{fc}.bias"]
    params = traverse_util.unflatten_dict(flat, sep="/")
    model = VisionTransformer(config)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))["params"]
    assert jax.tree.map(lambda x: x.shape, nn.unbox(shapes)) == jax.tree.map(np.shape, params)
    pixels = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)
    ours, _ = model.apply({"params": params}, jnp.asarray(pixels))
    with torch.no_grad():
        theirs = hf(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy())).last_hidden_state.numpy()
    diff = np.abs(np.asarray(ours) - theirs).max()
    print(f"CLIP form: max |hidden - transformers| = {diff:.2e}")
    assert diff < 1e-4


def test_vision_config_errors():
    with pytest.raises(ValueError, match="activation"):
        VisionConfig(activation="relu")
