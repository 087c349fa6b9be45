"""`blip-jax export SRC OUT --to transformers`: what transformers' from_pretrained loads, equal to the
blip-jax model (HF -> blip-jax -> HF gives back the original tensors bit for bit; a LAVIS model's
exported form computes what blip-jax computes)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file

import blip_jax

ROOT = Path(__file__).resolve().parents[1]
LAVIS = ROOT / "tests" / "fixtures" / "lavis"


def export(src, out) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "blip_jax.cli", "export", str(src), str(out), "--to", "transformers"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("architecture", ["caption", "retrieval", "vqa"])
def test_transformers_round_trip_is_bit_for_bit(architecture, hf_checkpoint, converted, tmp_path):
    src = hf_checkpoint(architecture)
    done = export(converted(architecture), tmp_path / "hf")
    assert done.returncode == 0, done.stderr[-2000:]
    original, exported = load_file(src / "model.safetensors"), load_file(tmp_path / "hf" / "model.safetensors")
    assert set(original) == set(exported)
    for key in original:
        assert torch.equal(original[key], exported[key]), key
    model = transformers.AutoConfig.from_pretrained(tmp_path / "hf").architectures[0]
    getattr(transformers, model).from_pretrained(tmp_path / "hf")  # loads, every tensor in place
    assert (tmp_path / "hf" / "preprocessor_config.json").is_file()


def test_a_lavis_caption_model_exports_to_what_blip_jax_computes(tmp_path):
    convert = subprocess.run([sys.executable, "-m", "blip_jax.cli", "convert", str(LAVIS / "blip_caption" / "model.pth"),
                              str(tmp_path / "jax"), "--lavis", "blip_caption/base_coco", "--tokenizer",
                              str(LAVIS / "bert_tokenizer"), "--heads", "vision=4,text=3"],
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert convert.returncode == 0, convert.stderr[-2000:]
    assert export(tmp_path / "jax", tmp_path / "hf").returncode == 0
    ours = blip_jax.load(tmp_path / "jax")
    hf = transformers.BlipForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    pixels = np.load(LAVIS / "blip_caption" / "reference.npz")["pixel_values"]
    ids = torch.tensor([[ours.config.text.bos_token_id, 8, 44, 39, 66, 61]])
    with torch.no_grad():
        theirs = hf(pixel_values=torch.from_numpy(pixels[:1]), input_ids=ids)
    embeds = ours.image_embeddings(pixels[:1].transpose(0, 2, 3, 1))
    diff = np.abs(theirs.image_embeds.numpy() - embeds).max()
    print(f"exported LAVIS caption model: image embeds max |transformers - blip-jax| = {diff:.2e}")
    assert diff < 1e-4
    captions = ours.caption(pixels.transpose(0, 2, 3, 1), num_beams=3, max_new_tokens=8, min_new_tokens=0)
    with torch.no_grad():
        out = hf.generate(pixel_values=torch.from_numpy(pixels), num_beams=3, max_new_tokens=8, min_new_tokens=0)
    processor_tokens = ours.tokenizer.batch_decode(out.numpy())
    assert [c.strip() for c in captions] == [t.strip() for t in processor_tokens]


def test_models_transformers_has_no_class_for_are_refused(tmp_path):
    done = subprocess.run([sys.executable, "-m", "blip_jax.cli", "convert", str(LAVIS / "blip_pretrain" / "model.pth"),
                           str(tmp_path / "pt"), "--lavis", "blip_pretrain/base", "--tokenizer",
                           str(LAVIS / "bert_tokenizer"), "--heads", "vision=4,text=3"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0
    refused = export(tmp_path / "pt", tmp_path / "out")
    assert refused.returncode == 2 and "no class for" in refused.stderr and not (tmp_path / "out").exists()
