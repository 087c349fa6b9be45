"""Building blocks against their PyTorch definitions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from blip_jax.models import layers
from blip_jax.models.config import VisionConfig
from blip_jax.models.vit import VisionEmbeddings


@pytest.mark.parametrize("src,dst", [((4, 4), (6, 6)), ((6, 6), (4, 4)), ((14, 14), (24, 24)), ((5, 5), (3, 7))])
def test_position_resize_matches_torch_bicubic(src, dst, rng):
    table = rng.standard_normal(src + (8,)).astype(np.float32)
    ours = np.asarray(layers.resize_grid(jnp.asarray(table), dst))
    ref = torch.nn.functional.interpolate(torch.from_numpy(table).permute(2, 0, 1)[None], size=dst, mode="bicubic",
                                          align_corners=False)[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_vision_embeddings_interpolate_to_another_resolution(rng):
    """A 32px model run at 48px uses its position table resized as transformers'
    interpolate_pos_encoding does."""
    import transformers

    cfg = VisionConfig(hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, image_size=32, patch_size=8)
    hf = transformers.models.blip.modeling_blip.BlipVisionEmbeddings(
        transformers.BlipVisionConfig(hidden_size=16, image_size=32, patch_size=8)).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(torch.randn(p.shape, generator=generator))
    params = {"patch": {"kernel": hf.patch_embedding.weight.detach().numpy().transpose(2, 3, 1, 0),
                        "bias": hf.patch_embedding.bias.detach().numpy()},
              "cls": hf.class_embedding.detach().numpy(), "pos": hf.position_embedding.detach().numpy()}
    pixels = rng.standard_normal((2, 48, 48, 3)).astype(np.float32)
    ours = VisionEmbeddings(cfg).apply({"params": params}, jnp.asarray(pixels))
    with torch.no_grad():
        ref = hf(torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy()), interpolate_pos_encoding=True).numpy()
    assert ours.shape == (2, 37, 16)
    # Entries reach |15| (a 192-term fp32 sum of unit weights), so the bound is relative as well.
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=1e-5, atol=1e-5)


def test_drop_path_drops_whole_examples_and_rescales():
    x = jnp.ones((4000, 3, 2))

    class M(layers.nn.Module):
        @layers.nn.compact
        def __call__(self, x, deterministic):
            return layers.drop_path(x, 0.25, deterministic, self)

    out = M().apply({}, x, False, rngs={"dropout": jax.random.PRNGKey(0)})
    per_example = np.asarray(out).reshape(4000, -1)
    assert set(np.unique(per_example).tolist()) <= {0.0, float(np.float32(1 / 0.75))}
    assert np.all(per_example.min(1) == per_example.max(1))  # whole examples
    assert abs((per_example[:, 0] == 0).mean() - 0.25) < 0.03
    np.testing.assert_array_equal(M().apply({}, x, True), x)


def test_layer_norm_and_gelu_match_torch(rng):
    x = rng.standard_normal((3, 5, 8)).astype(np.float32) * 3 + 1
    ln = layers.layer_norm(1e-12, jnp.float32, jnp.float32)
    params = ln.init(jax.random.PRNGKey(0), x)
    ref = torch.nn.functional.layer_norm(torch.from_numpy(x), (8,), eps=1e-12).numpy()
    np.testing.assert_allclose(np.asarray(ln.apply(params, x)), ref, atol=1e-5)
    ref = torch.nn.functional.gelu(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.asarray(layers.gelu(x)), ref, atol=1e-6)


@pytest.mark.parametrize("per_row_mask", [False, True])
def test_grouped_attention_equals_repeated_keys(rng, per_row_mask):
    """Beams share one copy of their example's keys/values: same result as one copy per beam."""
    b, group, t, s, h, d = 2, 3, 2, 5, 4, 8
    q = rng.standard_normal((b * group, t, h, d)).astype(np.float32)
    k = rng.standard_normal((b, h, s, d)).astype(np.float32)
    v = rng.standard_normal((b, h, s, d)).astype(np.float32)
    if per_row_mask:
        mask = rng.random((b * group, 1, t, s)) > 0.3
        mask[..., 0] = True
    else:
        mask = np.ones((b, 1, 1, s), bool)
        mask[1, ..., 3:] = False
    rep = lambda x: np.repeat(x, group, axis=0)
    full_mask = mask if per_row_mask else rep(mask)
    want = layers.attend(jnp.asarray(q), jnp.asarray(rep(k)), jnp.asarray(rep(v)), jnp.asarray(full_mask))
    got = layers.attend(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)
