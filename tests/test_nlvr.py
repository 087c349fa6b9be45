"""BLIP's NLVR2 model (architecture "nlvr": the image-grounded encoder's cross-attention split over
two images, merge layers from layer 6, LAVIS `BlipNLVR`): a LAVIS `.pth` written by LAVIS itself
(tests/fixtures/lavis/make_blip_nlvr.py) converted with `blip-jax convert --lavis blip_nlvr/nlvr`
computes LAVIS's logits and loss; `model.nlvr` answers through `blip_jax.load`; a bad checkpoint
is one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "lavis" / "blip_nlvr"
TOKENIZER = ROOT / "tests" / "fixtures" / "lavis" / "bert_tokenizer"


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "blip_jax.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=900, env={**os.environ, "JAX_PLATFORMS": "cpu"})


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    dst = tmp_path_factory.mktemp("nlvr") / "model"
    done = _cli("convert", str(FIXTURE / "model.pth"), str(dst), "--lavis", "blip_nlvr/nlvr", "--tokenizer",
                str(TOKENIZER), "--heads", "vision=4,text=4")
    assert done.returncode == 0, done.stderr[-3000:]
    return dst


def test_logits_and_loss_equal_lavis(converted):
    import blip_jax
    from blip_jax.api import encode_image
    from blip_jax.models.blip import Blip
    from blip_jax.train.objectives.blip import nlvr_cross_entropy

    ref = json.loads((FIXTURE / "reference.json").read_text())
    arrays = np.load(FIXTURE / "reference.npz")
    model = blip_jax.load(converted)
    cfg = model.config
    assert (cfg.architecture, cfg.text.twin_cross_attention, cfg.text.merge_from_layer, cfg.text.num_layers) == (
        "nlvr", True, 6, 8)
    enc = model.tokenizer(ref["texts"], padding="longest")  # [CLS] text [SEP]; the model puts [ENC] first
    ids, mask = np.asarray(enc["input_ids"]), np.asarray(enc["attention_mask"])
    np.testing.assert_array_equal(np.asarray(ids)[:, 1:], arrays["input_ids"][:, 1:])
    np.testing.assert_array_equal(np.asarray(mask), arrays["attention_mask"])
    px0, px1 = (jnp.asarray(arrays[k].transpose(0, 2, 3, 1)) for k in ("pixel_values0", "pixel_values1"))
    e0, e1 = encode_image(cfg, model.params, px0), encode_image(cfg, model.params, px1)
    np.testing.assert_allclose(np.stack([e0, e1]), arrays["image_embeds"], atol=1e-4)
    logits = np.asarray(Blip(cfg).apply({"params": model.params}, e0, e1, jnp.asarray(ids), jnp.asarray(mask),
                                        method=Blip.nlvr_logits))
    diff = np.abs(logits - arrays["logits"]).max()
    print(f"nlvr logits max abs diff from LAVIS: {diff:.2e}")
    assert diff < 1e-4
    loss = float(nlvr_cross_entropy(jnp.asarray(logits), jnp.asarray(ref["labels"])))
    assert abs(loss - float(arrays["loss"][0])) / float(arrays["loss"][0]) < 1e-5


def test_model_nlvr_through_load(converted):
    """`model.nlvr(left, right, statements)`: one probability per pair, a statement broadcast,
    mismatched inputs one line; other architectures refuse the task by name."""
    import blip_jax
    from blip_jax.testing import sample_images

    model = blip_jax.load(converted)
    left, right = sample_images(3, size=48, seed=1), sample_images(3, size=48, seed=2)
    p = model.nlvr(left, right, ["a red circle", "two squares", "a triangle"])
    assert p.shape == (3,) and np.all((p > 0) & (p < 1))
    assert model.nlvr_logits(left, right, "a red circle").shape == (3, 2)
    swapped = model.nlvr(right, left, ["a red circle", "two squares", "a triangle"])
    assert not np.allclose(p, swapped)  # the two images have their own attention
    with pytest.raises(ValueError, match="3 left images but 2 right images"):
        model.nlvr(left, right[:2], "a red circle")
    assert "nlvr" in model.tasks


def test_bad_checkpoint_is_one_line(tmp_path):
    """A BLIP checkpoint of another class given as blip_nlvr."""
    done = _cli("convert", str(ROOT / "tests/fixtures/lavis/blip_retrieval/model.pth"), str(tmp_path / "x"),
                "--lavis", "blip_nlvr/nlvr", "--tokenizer", str(TOKENIZER), "--heads", "vision=4,text=3")
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "not a LAVIS BlipNLVR checkpoint" in done.stderr
