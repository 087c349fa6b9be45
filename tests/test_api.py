"""The Python API: ITM/ITC against transformers, input forms, batching and clear errors."""

import numpy as np
import pytest
import torch

import blip_jax
from blip_jax.api import UnsupportedTaskError
from blip_jax.testing import TINY_TEXTS, sample_images


@pytest.fixture(scope="module")
def retrieval(converted):
    return blip_jax.load(converted("retrieval"))


def _hf_inputs(hf_checkpoint, images, texts):
    from transformers import BlipProcessor

    processor = BlipProcessor.from_pretrained(str(hf_checkpoint("retrieval")))
    return processor(images=images, text=texts, return_tensors="pt", padding=True)


def test_itm_and_itc_match_transformers(hf_checkpoint, hf_model, retrieval):
    images, texts = sample_images(3), TINY_TEXTS[:3]
    inputs = _hf_inputs(hf_checkpoint, images, texts)
    with torch.no_grad():
        itm = torch.softmax(hf_model("retrieval")(**inputs, use_itm_head=True).itm_score, dim=-1)[:, 1].numpy()
        itc = hf_model("retrieval")(**inputs, use_itm_head=False).itm_score.numpy()
    np.testing.assert_allclose(retrieval.itm(images, texts), itm, atol=1e-5)
    ours = retrieval.itc(images, texts)
    assert ours.shape == (3, 3)
    np.testing.assert_allclose(ours, itc, atol=1e-5)


def test_image_input_forms_agree(retrieval, tmp_path):
    images = sample_images(2)
    paths = []
    for i, im in enumerate(images):
        paths.append(tmp_path / f"{i}.png")
        im.save(paths[-1])
    arrays = [np.asarray(im) for im in images]
    pixels = retrieval.preprocess(images)
    assert pixels.shape == (2, 32, 32, 3) and pixels.dtype == np.float32
    expected = retrieval.itm(images, TINY_TEXTS[:2])
    for form in (arrays, paths, [str(p) for p in paths], pixels):
        np.testing.assert_allclose(retrieval.itm(form, TINY_TEXTS[:2]), expected, atol=1e-6)


def test_chunking_and_broadcast(converted, retrieval):
    images, texts = sample_images(5), TINY_TEXTS[:5]
    small = blip_jax.load(converted("retrieval"), batch_size=2)
    np.testing.assert_allclose(small.itm(images, texts), retrieval.itm(images, texts), atol=1e-6)
    np.testing.assert_allclose(small.itc(images, texts), retrieval.itc(images, texts), atol=1e-6)
    one_image = retrieval.itm(images[0], texts)
    np.testing.assert_allclose(one_image, retrieval.itm([images[0]] * 5, texts), atol=1e-6)
    with pytest.raises(ValueError, match="3 images and 2 texts"):
        retrieval.itm(images[:3], texts[:2])


def test_unsupported_tasks_name_what_the_model_serves(converted, retrieval):
    with pytest.raises(UnsupportedTaskError, match="retrieval model, which serves: itm, itc"):
        retrieval.caption(sample_images(1))
    with pytest.raises(UnsupportedTaskError, match="vqa"):
        retrieval.vqa(sample_images(1), "what is it")
    captioner = blip_jax.load(converted("caption"))
    with pytest.raises(UnsupportedTaskError, match="serves: caption"):
        captioner.itm(sample_images(1), "a dog")


def test_bad_generation_options_are_rejected(converted):
    captioner = blip_jax.load(converted("caption"))
    with pytest.raises(ValueError, match="num_beams"):
        captioner.caption(sample_images(1), num_beams=0)
    with pytest.raises(ValueError, match="Unknown generation option"):
        captioner.caption(sample_images(1), beams=3)
    with pytest.raises(ValueError, match="exceeds the decoder's 64 positions"):
        captioner.caption(sample_images(1), max_new_tokens=80)


def test_loading_errors(tmp_path, hf_checkpoint):
    with pytest.raises(FileNotFoundError, match="not a blip-jax model directory"):
        blip_jax.load(tmp_path)
    with pytest.raises(ValueError, match="convert it first"):
        blip_jax.load(hf_checkpoint("caption"))


def test_itm_pairs_sharing_an_image_match_transformers(hf_checkpoint, hf_model, converted):
    """Retrieval re-ranking and CapFilt score many texts per image: those pairs run in slots that
    hold the image once (its cross-attention keys/values computed once). Shuffled pairs of 3 images
    (7, 5 and 1 texts), on a batch of 8 rows (slots of 5, the median), against transformers pair by pair."""
    from blip_jax.batching import shared_rows as _shared_rows, slots as _slots

    images = sample_images(3)
    rng = np.random.default_rng(0)
    image_index = rng.permutation(np.repeat([0, 1, 2], [7, 5, 1]))
    texts = [TINY_TEXTS[int(i)] for i in rng.integers(0, len(TINY_TEXTS), len(image_index))]
    assert _shared_rows(image_index, 8) == 5
    slot_image, slot_pairs = _slots(image_index, 5)
    assert slot_image.tolist() == [0, 0, 1, 2] and sorted(slot_pairs[slot_pairs >= 0]) == list(range(13))
    model = blip_jax.load(converted("retrieval"), batch_size=8)
    ours = model.match_logits(model.image_embeddings(images), image_index, texts)
    inputs = _hf_inputs(hf_checkpoint, [images[i] for i in image_index], texts)
    with torch.no_grad():
        theirs = hf_model("retrieval")(**inputs, use_itm_head=True).itm_score[:, 1].numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_caption_sampling_without_num_beams_samples(converted):
    """The README's sampling call: sampling without a beam count samples, the task's 3 beams do not apply."""
    captioner = blip_jax.load(converted("caption"))
    images = sample_images(2)
    sampled = captioner.caption(images, do_sample=True, top_p=0.9, seed=0, max_new_tokens=6)
    assert sampled == captioner.caption(images, do_sample=True, top_p=0.9, seed=0, max_new_tokens=6)
    assert sampled == captioner.caption(images, do_sample=True, top_p=0.9, seed=0, max_new_tokens=6, num_beams=1)
    with pytest.raises(ValueError, match="beam sampling"):
        captioner.caption(images, do_sample=True, num_beams=3)


@pytest.mark.parametrize("blip2", [False, True])
def test_missing_preprocessor_config_is_sized_to_the_vision_tower(converted, tmp_path, blip2):
    import shutil

    from blip_jax.testing import write_tiny_blip2_checkpoint

    if blip2:
        from blip_jax.convert import convert

        convert(write_tiny_blip2_checkpoint(tmp_path / "hf", "retrieval", image_size=48), tmp_path / "src",
                progress=False)
        src = tmp_path / "src"
    else:
        src = converted("retrieval")
    dst = shutil.copytree(src, tmp_path / "bare")
    for name in ("preprocessor_config.json", "processor_config.json"):
        (dst / name).unlink(missing_ok=True)
    model, reference = blip_jax.load(dst), blip_jax.load(src)
    size = model.config.vision.image_size
    assert size != 384 and model.image_processor.size == {"height": size, "width": size}
    assert model.image_processor.image_mean == reference.image_processor.image_mean
    images = sample_images(2)
    np.testing.assert_allclose(model.preprocess(images), reference.preprocess(images))
    with pytest.raises(ValueError, match=rf"shape \(2, 40, 40, 3\).*expected \[B, {size}, {size}, 3\]"):
        model.itm(np.zeros((2, 40, 40, 3), np.float32), "a dog")
