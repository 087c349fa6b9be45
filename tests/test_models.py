"""Model properties that hold whatever the weights: sharding metadata, layouts, remat, dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util

from blip_jax import checkpoint, losses
from blip_jax.models.blip import Blip, init_params
from blip_jax.models.layout import stack_layers


@pytest.mark.parametrize("architecture", ["caption", "retrieval", "vqa"])
@pytest.mark.parametrize("scan_layers", [False, True])
def test_every_parameter_has_logical_axes(converted, architecture, scan_layers):
    config = checkpoint.read_config(converted(architecture)).replace(scan_layers=scan_layers)
    boxed = jax.eval_shape(lambda: init_params(Blip(config), jax.random.PRNGKey(0)))
    specs = traverse_util.flatten_dict(nn.get_partition_spec(boxed), sep="/")
    shapes = traverse_util.flatten_dict(nn.unbox(boxed), sep="/")
    assert specs.keys() == shapes.keys()
    for path, spec in specs.items():
        assert isinstance(spec, jax.sharding.PartitionSpec), path
        assert len(spec) == len(shapes[path].shape), (path, spec)
        if scan_layers and "/layers/" in path:
            assert spec[0] == "layers", (path, spec)
    named = {a for s in specs.values() for a in s if a}
    assert {"embed", "heads", "kv", "mlp"} <= named


def _caption_loss(config, params, batch):
    out = Blip(config).apply({"params": params}, *batch)
    return losses.lm_loss(out["logits"], batch[1])


def _batch(config, rng):
    size = config.vision.image_size
    pixels = jnp.asarray(rng.standard_normal((2, size, size, 3)), jnp.float32)
    ids = jnp.asarray(rng.integers(5, config.text.vocab_size, (2, 6)), jnp.int32)
    return pixels, ids, jnp.ones_like(ids)


def test_scan_and_remat_give_the_same_gradients(converted, rng):
    config, params = checkpoint.load(converted("caption"))
    batch = _batch(config, rng)
    loss, grads = jax.value_and_grad(lambda p: _caption_loss(config, p, batch))(params)
    stacked_params = stack_layers(jax.tree.map(np.asarray, params))
    want = traverse_util.flatten_dict(stack_layers(jax.tree.map(np.asarray, grads)), sep="/")
    for policy in ("none", "full", "dots"):
        cfg = config.replace(scan_layers=True, remat_policy=policy)
        loss2, grads2 = jax.value_and_grad(lambda p: _caption_loss(cfg, p, batch))(stacked_params)
        np.testing.assert_allclose(float(loss2), float(loss), rtol=1e-6)
        got = traverse_util.flatten_dict(grads2, sep="/")
        assert got.keys() == want.keys()
        for k in want:
            np.testing.assert_allclose(np.asarray(got[k]), want[k], atol=1e-6, err_msg=f"{policy} {k}")


def test_bfloat16_compute_is_close_to_float32(converted, rng):
    config, params = checkpoint.load(converted("retrieval"))
    batch = _batch(config, rng)
    ref = Blip(config).apply({"params": params}, *batch)
    low = Blip(config.replace(dtype="bfloat16")).apply({"params": params}, *batch)
    assert low["image_embeds"].dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(low["itm_logits"]), np.asarray(ref["itm_logits"]), atol=0.1)
    assert float(jnp.max(jnp.abs(low["itm_logits"] - ref["itm_logits"]))) > 0  # really ran in bf16


def test_bad_config_values_are_rejected():
    from blip_jax.models.config import BlipConfig, TextConfig, VisionConfig

    with pytest.raises(ValueError, match="unknown BLIP architecture"):
        BlipConfig(architecture="albef")
    with pytest.raises(ValueError, match="split over two images"):
        BlipConfig(architecture="nlvr")  # its text encoder must have twin cross-attention
    with pytest.raises(ValueError, match="not divisible"):
        TextConfig(hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        VisionConfig(image_size=30, patch_size=16)
    with pytest.raises(ValueError, match="dtype"):
        BlipConfig(dtype="fp8")
    with pytest.raises(ValueError, match="remat_policy"):
        BlipConfig(remat_policy="sometimes")


def test_demo_runs_end_to_end(tmp_path):
    from blip_jax.demo import run_demo

    summary = run_demo(tmp_path)
    assert len(summary["results"]) == 4
    assert all(max(d.values()) < 1e-4 for d in summary["verify_max_abs_diff"].values())
    assert (tmp_path / "results.json").exists() and (tmp_path / "gallery.html").exists()
