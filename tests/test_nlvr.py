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


def test_export_to_lavis_gives_back_the_lavis_state_dict(converted, tmp_path):
    """`blip-jax export M OUT.pth --to lavis` of the converted model: every tensor LAVIS saved, equal."""
    import torch

    out = tmp_path / "nlvr.pth"
    done = _cli("export", str(converted), str(out), "--to", "lavis")
    assert done.returncode == 0, done.stderr[-3000:]
    ours = torch.load(out, weights_only=True)["model"]
    theirs = torch.load(FIXTURE / "model.pth", weights_only=True)["model"]
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        assert tuple(ours[key].shape) == tuple(value.shape), key
        assert torch.equal(ours[key].to(value.dtype), value), key


def test_fine_tune_from_pretrained_blip(tmp_path):
    """The blip_nlvr stage from a BLIP pre-training model: both cross-attentions of every layer start
    as the pre-trained one (LAVIS's load_from_pretrained), the merge layers fresh; the tiny run's
    loss falls, its held-out accuracy is reported, and the trained model answers through load()."""
    import blip_jax
    from flax import traverse_util

    from blip_jax import checkpoint
    from blip_jax.models.blip import param_shapes
    from blip_jax.models.transfer import transfer
    from blip_jax.testing import sample_images, write_tiny_checkpoint

    base = tmp_path / "pretrain"
    from blip_jax.convert import convert

    convert(write_tiny_checkpoint(tmp_path / "hf", "retrieval"), base, progress=False)
    base_config, base_params = checkpoint.load(base)
    import dataclasses

    nlvr_config = base_config.replace(architecture="nlvr",
                                      text=dataclasses.replace(base_config.text, twin_cross_attention=True))
    moved, _ = transfer(base_params, param_shapes(nlvr_config))
    src = traverse_util.flatten_dict(base_params, sep="/")
    layer = "text_encoder/encoder/layers_0/cross_attn"
    for name in ("query", "key", "value", "out"):
        for i in (0, 1):
            np.testing.assert_array_equal(moved[f"{layer}/{name}{i}/kernel"], src[f"{layer}/{name}/kernel"])
    assert not any("merge" in p for p in moved)

    workdir = tmp_path / "run"
    done = _cli("train", "--config=configs/blip_nlvr.py:tiny", f"--workdir={workdir}",
                f"--config.model.init_from={base}", f"--config.model.vision.image_size={base_config.vision.image_size}")
    assert done.returncode == 0, done.stderr[-3000:]
    losses = [json.loads(line)["loss"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses
    report = json.loads((workdir / "report.json").read_text())
    assert report["held_out"] == 32 and 0.0 <= report["accuracy"] <= 1.0
    print(f"nlvr tiny from pre-trained: loss {losses[0]:.3f} -> {losses[-1]:.3f}, held-out accuracy "
          f"{report['accuracy']:.3f} (true share {report['true_share']:.3f})")
    model = blip_jax.load(workdir)
    assert model.config.architecture == "nlvr" and model.config.text.merge_from_layer == 1
    trained = traverse_util.flatten_dict(model.params, sep="/")
    assert "text_encoder/encoder/layers_1/cross_attn/merge/kernel" in trained
    assert "text_encoder/encoder/layers_0/cross_attn/merge/kernel" not in trained
    assert model.nlvr(sample_images(2, size=32), sample_images(2, size=32, seed=1), "there is a red circle").shape == (2,)


@pytest.fixture(scope="module")
def nlvr_split(tmp_path_factory):
    """A tiny NLVR2 split in LAVIS's layout from synthetic image pairs, one pair with a broken image."""
    from PIL import Image

    from blip_jax.data.synthetic import SyntheticPairs

    root = tmp_path_factory.mktemp("nlvr_data")
    (root / "images").mkdir()
    pairs = SyntheticPairs(9, seed=4, image_size=48)
    entries = []
    for i in range(len(pairs)):
        r = pairs[i]
        Image.fromarray(r["image"]).save(root / "images" / f"{i}-img0.png")
        Image.fromarray(r["image1"]).save(root / "images" / f"{i}-img1.png")
        entries.append({"images": [f"{i}-img0.png", f"{i}-img1.png"], "sentence": r["text"],
                        "label": "True" if r["label"] else "False", "question_id": f"dev-{i}"})
    (root / "images" / "8-img1.png").write_bytes(b"not a png")
    entries.append({"images": ["0-img0.png", "../outside.png"], "sentence": "x", "label": "True"})
    (root / "nlvr_dev.json").write_text(json.dumps(entries))
    return root


def test_eval_job_accuracy(converted, nlvr_split, tmp_path):
    """`blip-jax eval --config=configs/eval/nlvr.py:dev`: accuracy over the readable pairs equals
    `model.nlvr` on them; the broken image is counted, the pair outside the root never opened."""
    import blip_jax
    from PIL import Image

    workdir = tmp_path / "eval"
    done = _cli("eval", "--config=configs/eval/nlvr.py:dev", f"--ckpt={converted}", f"--workdir={workdir}",
                f"--config.data.root={nlvr_split}", "--config.data.image_root=images", "--config.batch_size=4",
                "--config.shard_size=4", "--noprogress")
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((workdir / "results.json").read_text())
    metrics = results["metrics"]
    assert metrics["statements"] == 8 and metrics["unreadable_images"] == 1
    entries = json.loads((nlvr_split / "nlvr_dev.json").read_text())[:8]
    model = blip_jax.load(converted)
    left = [Image.open(nlvr_split / "images" / e["images"][0]) for e in entries]
    right = [Image.open(nlvr_split / "images" / e["images"][1]) for e in entries]
    p = model.nlvr(left, right, [e["sentence"] for e in entries])
    expected = 100.0 * np.mean([(pi > 0.5) == (e["label"] == "True") for pi, e in zip(p, entries)])
    assert metrics["accuracy"] == round(expected, 2)
    assert (workdir / "gallery.html").is_file()


def test_exported_nlvr_program_equals_the_library(converted, tmp_path):
    """`--to stablehlo`: the nlvr program, run from its artifact, gives model.nlvr_logits."""
    from jax import export

    import blip_jax
    from blip_jax.testing import sample_images

    out = tmp_path / "hlo"
    done = _cli("export", str(converted), str(out), "--to", "stablehlo", "--programs", "nlvr")
    assert done.returncode == 0, done.stderr[-3000:]
    model = blip_jax.load(converted)
    left, right = sample_images(3, size=48, seed=1), sample_images(3, size=48, seed=2)
    texts = ["a red circle", "two squares", "there is a blue triangle"]
    ids, mask = (np.asarray(a, np.int32) for a in model._tokenize(texts))
    program = export.deserialize(bytearray((out / "nlvr.jaxexport").read_bytes()))
    params = dict(np.load(out / "params.npz"))
    got = np.asarray(program.call(params, model.preprocess(left), model.preprocess(right), ids, mask))
    np.testing.assert_allclose(got, model.nlvr_logits(left, right, texts), atol=1e-5)
