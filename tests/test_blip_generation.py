"""Captions and VQA answers token for token against transformers' generate."""

import numpy as np
import pytest
import torch

import jax.numpy as jnp

import blip_jax
from blip_jax.api import encode_image, generate_text
from blip_jax.generation import GenerationConfig
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


def _until_eos(sequences, eos, pad):
    """Rows cut after their first eos and padded: transformers fills finished beams with eos when
    pad is 0, and crops to the longest row; both are filler, not generated tokens."""
    rows = []
    for row in np.asarray(sequences).tolist():
        end = row.index(eos) + 1 if eos in row else len(row)
        rows.append(row[:end] + [pad] * (len(row) - end))
    width = max(len(r) for r in rows)
    return [r + [pad] * (width - len(r)) for r in rows]


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
    assert any(t for t in ours)  # not vacuous: something was generated
    # Token level, prompt included: the ids generate_text (what caption runs) produces.
    text = model.config.text
    prompt_ids = inputs["input_ids"].numpy()[:, :-1].copy() if prompt else np.zeros((3, 1), np.int64)
    prompt_ids[:, 0] = text.bos_token_id
    config = GenerationConfig.from_kwargs(**options, eos_token_id=text.sep_token_id, pad_token_id=text.pad_token_id)
    image_embeds = encode_image(model.config, model.params, jnp.asarray(model.preprocess(images)))
    ids = generate_text(model.config, model.params, image_embeds, None, prompt_ids.astype(np.int32), config)
    width = ids.shape[1]
    assert ref.shape[1] <= width
    ref_ids = np.pad(ref.numpy(), ((0, 0), (0, width - ref.shape[1])), constant_values=text.pad_token_id)
    assert _until_eos(ids, text.sep_token_id, text.pad_token_id) == _until_eos(ref_ids, text.sep_token_id,
                                                                                  text.pad_token_id)


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


def test_vqa_rank_mode_matches_the_reference_procedure(hf_checkpoint, converted, hf_model):
    """BLIP's rank-mode VQA (LAVIS `_rank_answers`) run with transformers' modules: first-token
    probabilities pick the top k answers, each scored by the decoder's summed loss with LAVIS's
    label smoothing 0.1. Questions go one at a time: transformers' BLIP decoder ignores
    `encoder_attention_mask`, LAVIS (and blip-jax) mask padded question tokens; unpadded, both agree."""
    from blip_jax.testing import TINY_QUESTIONS

    model = blip_jax.load(converted("vqa"), batch_size=4)
    hf = hf_model("vqa")
    processor = _hf_processor(hf_checkpoint("vqa"))
    images = sample_images(3)
    questions = TINY_QUESTIONS[:3]
    answer_list = ["yes", "no", "a dog", "two cats", "red", "the big blue car", "one"]
    k = 4
    answers = processor.tokenizer(answer_list, padding="longest", return_tensors="pt")
    answer_ids = answers["input_ids"].clone()
    answer_ids[:, 0] = hf.config.text_config.bos_token_id  # [CLS] answer [SEP] -> [DEC] answer [SEP]
    labels = answer_ids.masked_fill(answer_ids == processor.tokenizer.pad_token_id, -100)
    hf.text_decoder.label_smoothing = 0.1  # LAVIS's decoder loss (transformers' default is 0)
    topks, expected_scores = [], []
    try:
        with torch.no_grad():
            for image, question in zip(images, questions):
                inputs = processor(images=[image], text=[question], return_tensors="pt")
                image_embeds = hf.vision_model(pixel_values=inputs["pixel_values"])[0]
                states = hf.text_encoder(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                         encoder_hidden_states=image_embeds)[0]
                start = answer_ids[:1, :1]
                logits = hf.text_decoder(input_ids=start, encoder_hidden_states=states).logits
                topk = torch.softmax(logits[:, 0], -1)[0, answer_ids[:, 1]].topk(k).indices
                out = hf.text_decoder(input_ids=answer_ids[topk], attention_mask=answers["attention_mask"][topk],
                                      encoder_hidden_states=states.repeat(k, 1, 1), labels=labels[topk],
                                      reduction="none")
                topks.append(topk.numpy())
                expected_scores.append((-out.loss).numpy())
    finally:
        hf.text_decoder.label_smoothing = hf.config.text_config.label_smoothing
    candidates, scores = model.vqa_rank_scores(images, questions, answer_list, k=k)
    np.testing.assert_array_equal(candidates, np.stack(topks))
    print("rank scores max diff:", np.abs(scores - np.stack(expected_scores)).max())
    np.testing.assert_allclose(scores, np.stack(expected_scores), atol=1e-4)
    expected = [answer_list[int(t[s.argmax()])] for t, s in zip(topks, expected_scores)]
    assert model.vqa_rank(images, questions, answer_list, k=k) == expected
