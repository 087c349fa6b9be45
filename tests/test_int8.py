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


@pytest.mark.parametrize("config", ["blip2_stage2_opt.py:tiny", "blip2_lora.py:tiny"])
def test_training_against_int8_frozen_towers(blip2, config, tmp_path):
    """`model.int8_frozen`: stage 2 (the Q-Former trains) and LoRA (the adapter trains) against int8
    ViT / LLM kernels, each quantised on the device in its kernel's sharding; the loss falls, and
    W/model holds the dequantised kernels the run trained against."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    import blip_jax
    from blip_jax import checkpoint
    from blip_jax.models import quant

    root = Path(__file__).resolve().parents[1]
    workdir = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "blip_jax.cli", "train", f"--config=configs/{config}",
                           f"--workdir={workdir}", f"--config.model.init_from={blip2 / 'plain'}",
                           "--config.model.int8_frozen=True", "--config.report=False"],
                          cwd=root, capture_output=True, text=True, timeout=900, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 0, done.stderr[-3000:]
    losses = [json.loads(line)["loss"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0], losses
    _, base = checkpoint.load(blip2 / "plain")
    _, trained = checkpoint.load(workdir / "model")
    want = traverse_util.flatten_dict(quant.dequantized(quant.quantize(base)), sep="/")
    got, base = traverse_util.flatten_dict(trained, sep="/"), traverse_util.flatten_dict(base, sep="/")
    path = "language_model/decoder/layers_0/fc1/kernel"
    assert np.asarray(got[path]).dtype != np.int8
    np.testing.assert_allclose(np.asarray(got[path], np.float32), want[path], atol=1e-6)
    assert np.abs(np.asarray(got[path], np.float32) - np.asarray(base[path], np.float32)).max() > 0  # int8-rounded
    assert not any(p.endswith(quant.SCALE) for p in got)
    assert len(blip_jax.load(workdir).caption([np.zeros((32, 32, 3), np.uint8)], max_new_tokens=3)) == 1
