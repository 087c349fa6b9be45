"""Captions and VQA answers token for token against transformers' generate."""

import numpy as np
import pytest
import torch

import blip_jax
from blip_jax.testing import sample_images

# Options are always given in full: blip-jax's task defaults (beam 3, min 5 tokens) are BLIP's, not
# transformers' (greedy, no minimum).
CAPTION_SETTINGS = [
    dict(num_beams=1, max_new_tokens=12, min_new_tokens=0),
    dict(num_beams=3, max_new_tokens=12, min_new_tokens=0),
    dict(num_beams=3, max_new_tokens=12, min_new_tokens=4, length_penalty=0.6, repetition_penalty=1.5),
    dict(num_beams=4, max_new_tokens=10, min_new_tokens=0, early_stopping=True, num_return_sequences=2),
]


def _hf_processor(directory):
    from transformers import BlipProcessor

    return BlipProcessor.from_pretrained(str(directory))


def _ids(model, texts):
    return [model.tokenizer.encode(t, add_special_tokens=False) for t in texts]


@pytest.mark.parametrize("options", CAPTION_SETTINGS)
@pytest.mark.parametrize("prompt", [None, "a picture of"])
def test_captions_match_transformers(hf_checkpoint, converted, hf_model, options, prompt):
    processor = _hf_processor(hf_checkpoint("caption"))
    images = sample_images(3)
    inputs = processor(images=images, text=[prompt] * 3 if prompt else None, return_tensors="pt")
    with torch.no_grad():
        ref = hf_model("caption").generate(**inputs, **options)
    ref_text = [t.strip() for t in processor.batch_decode(ref, skip_special_tokens=True)]
    model = blip_jax.load(converted("caption"))
    ours = model.caption(images, prompt=prompt, **options)
    assert ours == ref_text
    # Token level: the JAX sequences, cut where transformers stopped, are transformers' ids.
    assert _ids(model, ours) == _ids(model, ref_text)
    assert any(t for t in ours)  # not vacuous: something was generated


@pytest.mark.parametrize("options", CAPTION_SETTINGS[:3])
def test_vqa_answers_match_transformers(hf_checkpoint, converted, hf_model, options):
    from blip_jax.testing import TINY_QUESTIONS

    processor = _hf_processor(hf_checkpoint("vqa"))
    images = sample_images(3)
    questions = TINY_QUESTIONS[:3]
    inputs = processor(images=images, text=questions, return_tensors="pt", padding=True)
    with torch.no_grad():
        ref = hf_model("vqa").generate(**inputs, **options)
    ref_text = [t.strip() for t in processor.batch_decode(ref, skip_special_tokens=True)]
    assert blip_jax.load(converted("vqa")).vqa(images, questions, **options) == ref_text


def test_scan_layout_generates_the_same(converted):
    images = sample_images(2)
    a = blip_jax.load(converted("caption", False)).caption(images, num_beams=3, max_new_tokens=8)
    b = blip_jax.load(converted("caption", True)).caption(images, num_beams=3, max_new_tokens=8)
    assert a == b


def test_sampling_is_seeded(converted):
    model = blip_jax.load(converted("caption"))
    images = sample_images(2)
    opts = dict(do_sample=True, num_beams=1, top_p=0.9, max_new_tokens=8, min_new_tokens=0)
    first = model.caption(images, seed=1, **opts)
    assert first == model.caption(images, seed=1, **opts)
    others = [model.caption(images, seed=s, **opts) for s in range(2, 6)]
    assert any(o != first for o in others)
