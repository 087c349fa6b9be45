"""The BLIP-2 task fine-tunes (configs/blip2_caption.py, configs/blip2_retrieval.py) from tiny
transformers checkpoints converted here, through `blip-jax train`: the ViT unfrozen (fp32 master
weights), the resolution raised (positions resized on load), the loss falling, the exported model
answering through `blip_jax.load`; and the retrieval objective's image-id positives."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flax import traverse_util

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    from blip_jax.convert import convert
    from blip_jax.testing import write_tiny_blip2_checkpoint

    root = tmp_path_factory.mktemp("recipe_bases")
    out = {}
    for kind in ("opt", "retrieval"):
        convert(write_tiny_blip2_checkpoint(root / f"hf_{kind}", kind), root / kind, progress=False)
        out[kind] = root / kind
    return out


def _train(config: str, workdir: Path, base: Path, *flags: str) -> list[float]:
    cmd = [sys.executable, "-m", "blip_jax.cli", "train", f"--config=configs/{config}", f"--workdir={workdir}",
           f"--config.model.init_from={base}", "--config.report=False", *flags]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line)["loss"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _flat(directory):
    from blip_jax import checkpoint

    config, params = checkpoint.load(directory)
    return config, traverse_util.flatten_dict(params, sep="/")


@pytest.mark.parametrize("config,base", [("blip2_caption.py:tiny", "opt"), ("blip2_retrieval.py:tiny", "retrieval")])
def test_fine_tune_at_a_higher_resolution_with_the_vit_unfrozen(bases, config, base, tmp_path):
    import blip_jax
    from blip_jax.models.transfer import POSITIONS
    from blip_jax.testing import sample_images

    workdir = tmp_path / "run"
    losses = _train(config, workdir, bases[base], "--config.total_steps=30", "--config.optim.decay_steps=30",
                    "--config.log_every=5", "--config.checkpoint_every=30")
    assert losses[-1] < losses[0], losses
    before_config, before = _flat(bases[base])
    after_config, after = _flat(workdir / "model")
    assert (before_config.vision.image_size, after_config.vision.image_size) == (32, 48)
    assert before[POSITIONS].shape[1] == 1 + 4 * 4 and after[POSITIONS].shape[1] == 1 + 6 * 6
    moved = [p for p in after if p.startswith("vision/") and p != POSITIONS
             and not np.array_equal(np.asarray(after[p]), np.asarray(before[p]))]
    assert moved  # the ViT trained
    model = blip_jax.load(workdir)
    images = sample_images(2, size=40)
    if "caption" in model.tasks:
        assert len(model.caption(images, max_new_tokens=3)) == 2
    else:
        assert model.itm(images, ["a red circle", "two blue squares"]).shape == (2,)


def test_image_id_positives():
    """With every image distinct, the image-id objective is stage 1's exactly; with two captions of
    one image in the batch, each is the other's positive in ITC (the loss changes)."""
    import jax
    import jax.numpy as jnp

    from blip_jax.config_files import load_config
    from blip_jax.train import inputs, sharding
    from blip_jax.train import state as state_lib
    from blip_jax.train import optim, partition
    from blip_jax.train.objectives import blip2 as objectives

    cfg = load_config(ROOT / "configs" / "blip2_retrieval.py", "tiny")
    mesh = sharding.make_mesh(cfg.mesh.to_dict())
    bert, llm = inputs.tokenizers(cfg)
    inputs.prepare_loss(cfg, mesh, bert, llm)
    st = state_lib.create(cfg, mesh, optim.make_optimizer(cfg.optim), inputs.vocab(bert, llm))
    params = partition.merge(st.train["params"], st.frozen)
    task = inputs.make_task(cfg, st.config.vision.image_size, False)
    batch = jax.tree.map(jnp.asarray, next(task.iterator(process_index=0, process_count=1)))
    rng = jax.random.PRNGKey(0)
    plain = {k: v for k, v in batch.items() if k != "image_index"}
    distinct = dict(batch, image_index=jnp.arange(cfg.batch_size, dtype=jnp.int32))
    loss_a, m_a, _ = objectives.stage1(st.model, params, plain, rng, cfg.loss, {})
    loss_b, m_b, _ = objectives.stage1(st.model, params, distinct, rng, cfg.loss, {})
    np.testing.assert_allclose(float(m_a["itc"]), float(m_b["itc"]), rtol=1e-6)
    np.testing.assert_allclose(float(loss_a), float(loss_b), rtol=1e-6)
    index = np.arange(cfg.batch_size).astype(np.int32)
    index[1] = 0
    _, m_c, _ = objectives.stage1(st.model, params, dict(batch, image_index=jnp.asarray(index)), rng, cfg.loss, {})

    # the reference, in numpy: LAVIS's targets 0.9 x positives / their count + 0.1 / B
    from blip_jax.models.blip2 import Blip2

    v = {"params": params}
    image = st.model.apply(v, batch["pixels"], method=Blip2.encode_image)
    feats_i = np.asarray(st.model.apply(v, image, method=Blip2.image_features))
    feats_t = np.asarray(st.model.apply(v, batch["text_ids"], batch["text_mask"], method=Blip2.text_features))
    temp = float(np.clip(params["temp"], 0.001, 0.5))
    sim_i2t = np.einsum("iqe,te->itq", feats_i, feats_t).max(-1) / temp
    positives = (index[:, None] == index[None, :]).astype(np.float64)
    targets = 0.9 * positives / positives.sum(1, keepdims=True) + 0.1 / cfg.batch_size

    def soft(sim):
        logp = sim - np.log(np.exp(sim - sim.max(1, keepdims=True)).sum(1, keepdims=True)) - sim.max(1, keepdims=True)
        return -(logp * targets).sum(1).mean()

    np.testing.assert_allclose(float(m_c["itc"]), (soft(sim_i2t) + soft(sim_i2t.T)) / 2, rtol=1e-5)


def test_blip2_vqa_fine_tune(tmp_path):
    """The question enters the Q-Former in training and in `model.vqa`; the loss falls."""
    import blip_jax
    from blip_jax.testing import sample_images

    workdir = tmp_path / "vqa"
    cmd = [sys.executable, "-m", "blip_jax.cli", "train", "--config=configs/blip2_vqa.py:tiny", f"--workdir={workdir}",
           "--config.report=False"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 0, done.stderr[-3000:]
    losses = [json.loads(line)["loss"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0], losses
    model = blip_jax.load(workdir)
    assert model.config.instruct and model.config.qformer_input == "question"
    assert model._qformer_reads(["how many circles?"]) == ["how many circles?"]
    answers = model.vqa(sample_images(2, size=32), ["how many circles?", "what color is the square?"],
                        max_new_tokens=3)
    assert len(answers) == 2
