"""Loss functions against transformers' own loss computation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from blip_jax import checkpoint, losses
from blip_jax.models.blip import Blip
from blip_jax.testing import sample_images


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_matches_torch(rng, smoothing):
    logits = rng.standard_normal((3, 5, 11)).astype(np.float32) * 3
    labels = rng.integers(0, 11, (3, 5))
    labels[0, 3:] = losses.IGNORE
    ref = torch.nn.functional.cross_entropy(torch.from_numpy(logits).reshape(-1, 11), torch.from_numpy(labels).reshape(-1),
                                            ignore_index=-100, label_smoothing=smoothing)
    np.testing.assert_allclose(float(losses.cross_entropy(logits, labels, smoothing)), float(ref), rtol=1e-6)


def test_caption_lm_loss_and_gradients_match_transformers(hf_checkpoint, converted, hf_model):
    """The fine-tuning loss of BlipForConditionalGeneration, and its gradient on two parameters."""
    from transformers import BlipProcessor

    hf = hf_model("caption")
    processor = BlipProcessor.from_pretrained(str(hf_checkpoint("caption")))
    inputs = processor(images=sample_images(2), text=["a dog on the grass", "a man"], return_tensors="pt",
                       padding=True)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    hf.zero_grad()
    ref = hf(**inputs, labels=labels)
    ref.loss.backward()

    config, params = checkpoint.load(converted("caption"))
    pixels = jnp.asarray(inputs["pixel_values"].numpy().transpose(0, 2, 3, 1))
    ids = jnp.asarray(inputs["input_ids"].numpy(), jnp.int32)
    mask = jnp.asarray(inputs["attention_mask"].numpy(), jnp.int32)

    def loss_fn(p):
        out = Blip(config).apply({"params": p}, pixels, ids, mask)
        return losses.lm_loss(out["logits"], jnp.asarray(labels.numpy(), jnp.int32))

    loss, grads = jax.value_and_grad(loss_fn)(params)
    np.testing.assert_allclose(float(loss), float(ref.loss.detach()), atol=1e-5)
    g_fc1 = grads["text_decoder"]["encoder"]["layers_0"]["fc1"]["kernel"]
    ref_fc1 = hf.text_decoder.bert.encoder.layer[0].intermediate.dense.weight.grad.numpy().T
    np.testing.assert_allclose(np.asarray(g_fc1), ref_fc1, atol=1e-5)
    g_patch = grads["vision"]["embed"]["patch"]["kernel"]
    ref_patch = hf.vision_model.embeddings.patch_embedding.weight.grad.numpy().transpose(2, 3, 1, 0)
    np.testing.assert_allclose(np.asarray(g_patch), ref_patch, atol=1e-5)
