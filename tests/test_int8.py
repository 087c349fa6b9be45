"""int8 weight-only frozen towers (`blip_jax.load(path, int8=True)`, `blip_jax.models.quant`): each
ViT / LLM kernel int8 with a per-output-channel scale, the rest untouched; the model computes
exactly what fp32 weights equal to the dequantised ones compute; scanned and unrolled layouts agree.
The quality change against fp32 is measured in benchmarks/bench_int8.py."""

from __future__ import annotations

import numpy as np
import pytest
from flax import traverse_util


@pytest.fixture(scope="module")
def blip2(tmp_path_factory):
    from blip_jax.convert import convert
    from blip_jax.testing import write_tiny_blip2_checkpoint

    root = tmp_path_factory.mktemp("int8")
    hf = write_tiny_blip2_checkpoint(root / "hf", "opt")
    convert(hf, root / "plain", progress=False)
    convert(hf, root / "scanned", scan_layers=True, progress=False)
    return root


def test_quantize_kernel_bounds():
    from blip_jax.models.quant import quantize_kernel

    w = np.random.default_rng(0).standard_normal((64, 3, 8)).astype(np.float32)
    q, s = quantize_kernel(w)
    assert q.dtype == np.int8 and s.shape == (3, 8) and np.abs(q).max() <= 127
    assert np.all(np.abs(q * s[None] - w) <= s[None] / 2 + 1e-7)


def test_only_the_frozen_towers_kernels_are_int8(blip2):
    import blip_jax

    full, small = blip_jax.load(blip2 / "plain"), blip_jax.load(blip2 / "plain", int8=True)
    a, b = traverse_util.flatten_dict(full.params, sep="/"), traverse_util.flatten_dict(small.params, sep="/")
    int8 = sorted(p for p, v in b.items() if np.asarray(v).dtype == np.int8)
    assert int8 and all(p.startswith(("vision/", "language_model/")) and p.endswith("/kernel") for p in int8)
    assert not any(p.startswith("qformer/") for p in int8) and "vision/embed/patch/kernel" not in int8
    assert {p for p in b if p.endswith("kernel_scale")} == {p[: -len("kernel")] + "kernel_scale" for p in int8}
    assert all(np.array_equal(np.asarray(a[p]), np.asarray(b[p])) for p in a if p not in int8)
    assert not any(p.endswith("kernel_scale") for p in a)  # the fp32 path is untouched


def test_int8_computes_what_its_dequantised_weights_do(blip2, tmp_path):
    """An int8 model's outputs equal a model holding the dequantised kernels in fp32: the scale is
    applied in the matmul, nothing else changes; scanned and unrolled int8 models agree."""
    import blip_jax
    from blip_jax.models import quant
    from blip_jax.testing import sample_images

    small = blip_jax.load(blip2 / "plain", int8=True)
    reference = blip_jax.load(blip2 / "plain")
    reference.params = quant.dequantized(small.params)
    images = sample_images(3, size=40)
    np.testing.assert_allclose(small.image_embeddings(images), reference.image_embeddings(images), atol=1e-5)
    assert small.caption(images, num_beams=1, max_new_tokens=6) == reference.caption(images, num_beams=1, max_new_tokens=6)
    assert small.caption(images, num_beams=3, max_new_tokens=6) == reference.caption(images, num_beams=3, max_new_tokens=6)
    scanned = blip_jax.load(blip2 / "scanned", int8=True)
    np.testing.assert_allclose(scanned.image_embeddings(images), small.image_embeddings(images), atol=1e-5)
    assert scanned.caption(images, num_beams=1, max_new_tokens=6) == small.caption(images, num_beams=1, max_new_tokens=6)
