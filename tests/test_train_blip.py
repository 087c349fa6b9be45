"""BLIP's objectives and their training: each loss against a direct NumPy / PyTorch computation,
the momentum update, queue wrap-around, hard negatives, the tied decoder, 8 devices == 1, and the
pre-training state (momentum encoders, queues) surviving kill-and-resume exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blip_jax.train import blip_objectives as bo

ROOT = Path(__file__).resolve().parents[1]


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.parametrize("by_image", [False, True])
def test_itc_loss_matches_numpy(by_image):
    rng = np.random.default_rng(0)
    b, q, e = 4, 8, 6
    img, txt, img_m, txt_m = (_unit(rng.normal(size=(b, e))).astype(np.float32) for _ in range(4))
    img_q, txt_q = (_unit(rng.normal(size=(q, e))).T.astype(np.float32) for _ in range(2))
    temp, alpha = 0.07, 0.3
    if by_image:
        idx = np.array([0, 1, 1, 2])
        idx_all = np.concatenate([idx, [1, 5, -1, 2, 0, -1, -1, 7]])
        positives = (idx[:, None] == idx_all[None]).astype(np.float32)
    else:
        positives = np.eye(b, b + q, dtype=np.float32)
    loss, _, _ = bo.itc_loss(*map(jnp.asarray, (img, txt, img_m, txt_m, img_q, txt_q)), temp, alpha,
                             jnp.asarray(positives))
    # BLIP's computation, step by step
    img_all, txt_all = np.concatenate([img_m, img_q.T]), np.concatenate([txt_m, txt_q.T])
    targets = positives / positives.sum(1, keepdims=True)

    def softmax(x):
        return np.exp(_np_log_softmax(x))

    i2t_t = alpha * softmax(img_m @ txt_all.T / temp) + (1 - alpha) * targets
    t2i_t = alpha * softmax(txt_m @ img_all.T / temp) + (1 - alpha) * targets
    l_i2t = -(_np_log_softmax(img @ txt_all.T / temp) * i2t_t).sum(1).mean()
    l_t2i = -(_np_log_softmax(txt @ img_all.T / temp) * t2i_t).sum(1).mean()
    np.testing.assert_allclose(float(loss), (l_i2t + l_t2i) / 2, rtol=1e-5)


def test_momentum_update_matches_numpy():
    rng = np.random.default_rng(1)
    online = {"vision": {"w": rng.normal(size=(3, 4)).astype(np.float32)}, "other": np.ones(2, np.float32)}
    momentum = {"vision": {"w": rng.normal(size=(3, 4)).astype(np.float32)}}
    out = bo.ema(momentum, online, 0.995)
    np.testing.assert_allclose(out["vision"]["w"], momentum["vision"]["w"] * 0.995 + online["vision"]["w"] * 0.005,
                               rtol=1e-6)
    assert set(out) == {"vision"}  # only the momentum twins move


def test_queue_pointer_wraps_around():
    size, b, e = 6, 2, 3
    queue, idx_queue, ptr = jnp.zeros((e, size)), jnp.full((size,), -1, jnp.int32), 0
    for step in range(4):  # the 4th batch overwrites the 1st slot
        feats = jnp.full((b, e), step + 1.0)
        queue = bo.enqueue(queue, feats.T, ptr)
        idx_queue = bo.enqueue(idx_queue, jnp.array([10 * step, 10 * step + 1]), ptr)
        ptr = (ptr + b) % size
    np.testing.assert_array_equal(np.asarray(queue)[0], [4, 4, 2, 2, 3, 3])
    np.testing.assert_array_equal(np.asarray(idx_queue), [30, 31, 10, 11, 20, 21])
    assert ptr == 2


def test_hard_negatives_never_pick_a_positive_and_follow_the_similarities():
    rng = np.random.default_rng(2)
    sim = jnp.asarray(rng.normal(size=(4, 4)) * 3, jnp.float32)
    idx = jnp.array([0, 1, 1, 2])
    same = idx[:, None] == idx[None, :]
    draws = np.asarray(jax.vmap(lambda k: bo.hard_negatives(k, sim, same))(jax.random.split(jax.random.PRNGKey(0),
                                                                                              4000)))
    assert not np.asarray(same)[np.arange(4)[None, :].repeat(4000, 0), draws].any()
    weights = np.where(np.asarray(same), 0, np.exp(_np_log_softmax(np.asarray(sim))) + 1e-4)
    expected = weights / weights.sum(1, keepdims=True)
    for row in range(4):
        freq = np.bincount(draws[:, row], minlength=4) / len(draws)
        np.testing.assert_allclose(freq, expected[row], atol=0.03)


def test_lm_label_smoothing_matches_pytorch():
    torch = pytest.importorskip("torch")
    from blip_jax.losses import IGNORE, cross_entropy

    rng = np.random.default_rng(3)
    logits = rng.normal(size=(3, 5, 11)).astype(np.float32)
    labels = rng.integers(0, 11, size=(3, 5))
    labels[0, 3:] = IGNORE
    ours = float(cross_entropy(jnp.asarray(logits), jnp.asarray(labels), 0.1))
    theirs = float(torch.nn.functional.cross_entropy(torch.tensor(logits).reshape(-1, 11),
                                                     torch.tensor(labels).reshape(-1), ignore_index=-100,
                                                     label_smoothing=0.1))
    assert ours == pytest.approx(theirs, rel=1e-6)


def test_the_decoder_is_tied_once_in_the_tree_and_gradients_add_up():
    """The stored tree holds the decoder's own self-attention and head only; the tied view uses the
    encoder's arrays; a shared parameter's gradient is the sum of its encoder and decoder uses."""
    from flax import linen as nn
    from flax import traverse_util

    from blip_jax.models.blip import Blip, init_params
    from blip_jax.models.config import BlipConfig, TextConfig, VisionConfig
    from blip_jax.models.tying import tie, untie

    config = BlipConfig(architecture="pretrain", embed_dim=8,
                        vision=VisionConfig(hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                                            image_size=16, patch_size=8),
                        text=TextConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
                                        max_position_embeddings=16, encoder_hidden_size=16, bos_token_id=38,
                                        sep_token_id=3))
    model = Blip(config)
    full = nn.unbox(init_params(model, jax.random.PRNGKey(0)))
    stored = untie(full)
    decoder_paths = traverse_util.flatten_dict(stored["text_decoder"], sep="/")
    assert decoder_paths and all("self_attn" in p or p.startswith("head_") for p in decoder_paths)
    tied = tie(stored)
    enc, dec = stored["text_encoder"], tied["text_decoder"]
    assert dec["encoder"]["layers_0"]["fc1"]["kernel"] is enc["encoder"]["layers_0"]["fc1"]["kernel"]
    assert dec["word"]["embedding"] is enc["word"]["embedding"]
    assert dec["encoder"]["layers_0"]["self_attn"]["query"]["kernel"] is not \
        enc["encoder"]["layers_0"]["self_attn"]["query"]["kernel"]

    pixels = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 3))
    ids = jnp.array([[1, 5, 6, 3], [1, 7, 3, 0]])
    mask = (ids > 0).astype(jnp.int32)

    def loss(p):
        v = {"params": p}
        image = model.apply(v, pixels, method=Blip.encode_image)
        logits, _ = model.apply(v, ids, mask, image, method=Blip.decode)
        feats = model.apply(v, ids, mask, method=Blip.text_features)
        return jnp.sum(logits ** 2) * 1e-3 + jnp.sum(feats[:, 0])

    g_tied = jax.grad(lambda p: loss(tie(p)))(stored)
    # the same loss over an untied tree (separate copies): the tied gradient is the sum of both uses
    g_full = jax.grad(loss)(tie(stored))
    fc1 = ("encoder", "layers_1", "fc1", "kernel")

    def leaf(tree):
        for k in fc1:
            tree = tree[k]
        return tree

    np.testing.assert_allclose(leaf(g_tied["text_encoder"]), leaf(g_full["text_encoder"]) + leaf(g_full["text_decoder"]),
                               rtol=1e-5, atol=1e-7)
    assert float(jnp.abs(leaf(g_full["text_decoder"])).max()) > 0  # the decoder's use really contributes


# ------------------------------------------------------------------ training runs (fresh processes)
def _train(workdir: Path, devices: int, *flags: str) -> list[dict]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    proc = subprocess.run([sys.executable, "-m", "blip_jax.cli", "train", "--config=configs/blip_pretrain.py:tiny",
                           f"--workdir={workdir}", "--config.report=False", "--config.log_every=1", *flags],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _model_params(workdir: Path) -> dict:
    from flax import traverse_util

    from blip_jax import checkpoint

    _, params = checkpoint.load(workdir / "model")
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep="/").items()}


def _strip(rows):
    return [{k: v for k, v in r.items() if k not in ("steps_per_sec", "examples_per_sec")} for r in rows]


def test_eight_devices_equal_one(tmp_path):
    one = _train(tmp_path / "one", 1, "--config.total_steps=3")
    eight = _train(tmp_path / "eight", 8, "--config.total_steps=3", "--config.mesh.data=2", "--config.mesh.fsdp=2",
                   "--config.mesh.tensor=2")
    for a, b in zip(_strip(one), _strip(eight)):
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key
    p1, p8 = (_without_key_biases(_model_params(tmp_path / d)) for d in ("one", "eight"))
    scale = max(np.abs(v).max() for v in p1.values())
    assert max(np.abs(p1[k] - p8[k]).max() for k in p1) < 5e-5 * scale  # Adam's rounding, as test_train


def _without_key_biases(params: dict) -> dict:
    """Attention key biases have a zero gradient in exact arithmetic (softmax ignores a constant per
    query), so Adam turns their rounding noise into full-size steps: left out, as in test_train
    (the ViT's fused qkv bias keeps its query and value thirds)."""
    out = {}
    for k, v in params.items():
        if k.endswith("key/bias"):
            continue
        if k.endswith("qkv/bias"):  # [3, heads, head_dim]: drop the key part
            v = np.delete(v, 1, axis=-3)
        out[k] = v
    return out


def test_pretraining_state_survives_kill_and_resume_exactly(tmp_path):
    """Momentum encoders and queues are checkpointed: 4 + 4 steps give the same metrics (ITC reads
    the queues, so a lost queue would show) and the same weights as 8 uninterrupted steps."""
    whole = _train(tmp_path / "whole", 1, "--config.total_steps=8", "--config.checkpoint_every=4")
    _train(tmp_path / "split", 1, "--config.total_steps=4", "--config.checkpoint_every=4")
    resumed = _train(tmp_path / "split", 1, "--config.total_steps=8", "--config.checkpoint_every=4")
    assert [r["step"] for r in resumed] == list(range(1, 9))
    assert _strip(resumed) == _strip(whole)
    a, b = _model_params(tmp_path / "whole"), _model_params(tmp_path / "split")
    assert all(np.array_equal(a[k], b[k]) for k in a)
