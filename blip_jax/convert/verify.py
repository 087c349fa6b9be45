"""`blip-jax convert --verify`: run the transformers model beside the converted one.

Both get the same random inputs; the largest absolute difference of each output is reported.
Needs the convert extra (torch, transformers). The tests use this same function.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from blip_jax import checkpoint
from blip_jax.convert.hf_config import read_hf_config
from blip_jax.models.blip import Blip


def load_transformers_model(src: str | Path):
    import transformers

    name = read_hf_config(src)["architectures"][0]
    return getattr(transformers, name).from_pretrained(str(src), dtype="float32").eval()


def random_inputs(config, batch: int = 2, length: int = 7, seed: int = 0):
    """Pixels [B,H,W,3], token ids starting with [CLS]-like id 1 and a padded second row."""
    rng = np.random.default_rng(seed)
    size = config.vision.image_size
    pixels = rng.standard_normal((batch, size, size, 3)).astype(np.float32)
    ids = rng.integers(5, config.text.vocab_size, (batch, length)).astype(np.int64)
    mask = np.ones((batch, length), np.int64)
    if batch > 1:
        mask[1, length - 2 :] = 0
        ids[1, length - 2 :] = config.text.pad_token_id
    return pixels, ids, mask


def compare(src: str | Path, dst: str | Path, batch: int = 2, seed: int = 0) -> dict[str, float]:
    """{output name: max |transformers - blip-jax|} for every output of the architecture.

    Runs at full fp32 matmul precision: on GPUs JAX's default multiplies fp32 with TF32-class
    precision (measured on an H200: differences of 1.8e-3 to 4e-2 by default, 2e-5 at most at
    "highest"), which would hide a conversion error behind rounding."""
    with jax.default_matmul_precision("highest"):
        return _compare(src, dst, batch, seed)


def _compare(src, dst, batch: int, seed: int) -> dict[str, float]:
    import torch

    config, params = checkpoint.load(dst)
    hf = load_transformers_model(src)
    if not hasattr(config, "text"):
        return _compare_blip2(config, params, hf, batch, seed)
    model = Blip(config)
    pixels, ids, mask = random_inputs(config, batch, seed=seed)
    t_pixels = torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy())
    t_ids, t_mask = torch.from_numpy(ids), torch.from_numpy(mask)
    j_ids, j_mask = jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)
    v = {"params": params}

    def diff(a, b):
        return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b.detach().numpy(), np.float64))))

    out = {}
    with torch.no_grad():
        image = hf.vision_model(pixel_values=t_pixels).last_hidden_state
        j_image = model.apply(v, jnp.asarray(pixels), method=Blip.encode_image)
        out["vision.last_hidden_state"] = diff(j_image, image)
        image_mask = torch.ones(image.shape[:2], dtype=torch.long)
        if config.architecture == "caption":
            logits = hf(pixel_values=t_pixels, input_ids=t_ids, attention_mask=t_mask).logits
            j_logits, _ = model.apply(v, j_ids, j_mask, j_image, method=Blip.decode)
            out["text_decoder.logits"] = diff(j_logits, logits)
        elif config.architecture == "retrieval":
            itm = hf(input_ids=t_ids, pixel_values=t_pixels, attention_mask=t_mask, use_itm_head=True)
            out["itm_logits"] = diff(model.apply(v, j_image, j_ids, j_mask, method=Blip.itm_logits), itm.itm_score)
            itc = hf(input_ids=t_ids, pixel_values=t_pixels, attention_mask=t_mask, use_itm_head=False)
            j_itc = (model.apply(v, j_image, method=Blip.image_features)
                     @ model.apply(v, j_ids, j_mask, method=Blip.text_features).T)
            out["itc_similarity"] = diff(j_itc, itc.itm_score)
            text = hf.text_encoder(input_ids=t_ids, attention_mask=t_mask).last_hidden_state
            j_text = model.apply(v, j_ids, j_mask, method=lambda m, i, a: m.text_encoder(i, a)[0])
            out["text_encoder.unimodal"] = diff(_masked(j_text, mask), _masked_t(text, mask))
        else:
            question = hf.text_encoder(input_ids=t_ids, attention_mask=t_mask, encoder_hidden_states=image,
                                       encoder_attention_mask=image_mask).last_hidden_state
            j_question = model.apply(v, j_image, j_ids, j_mask, method=Blip.encode_question)
            out["text_encoder.question_states"] = diff(_masked(j_question, mask), _masked_t(question, mask))
            answer = t_ids[:, :5].clone()
            answer[:, 0] = config.text.bos_token_id if config.text.bos_token_id < config.text.vocab_size else 1
            # The answer decoder cross-attends to every question state, padding included: that is
            # what BLIP's and transformers' generate do (transformers 5 ignores this mask anyway).
            logits = hf.text_decoder(input_ids=answer, encoder_hidden_states=question,
                                     encoder_attention_mask=torch.ones_like(t_mask)).logits
            j_logits, _ = model.apply(v, jnp.asarray(answer.numpy(), jnp.int32), jnp.ones((batch, 5), jnp.int32),
                                      j_question, jnp.ones_like(j_mask), method=Blip.decode)
            out["text_decoder.logits"] = diff(j_logits, logits)
    return out


def _masked(x, mask):
    return np.asarray(x) * mask[..., None]


def _masked_t(x, mask):
    import torch

    return x * torch.from_numpy(mask)[..., None]


def _compare_blip2(config, params, hf, batch: int, seed: int) -> dict[str, float]:
    """BLIP-2 / InstructBLIP: vision features and LLM logits (generation models), or ITM logits and
    ITC similarities (retrieval), on random pixels and unpadded random token ids."""
    import torch

    from blip_jax.models.blip2 import Blip2

    rng = np.random.default_rng(seed)
    size = config.vision.image_size
    pixels = rng.standard_normal((batch, size, size, 3)).astype(np.float32)
    t_pixels = torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy())
    model, v = Blip2(config), {"params": params}
    vocab = config.llm.vocab_size if config.architecture == "generation" else config.qformer_vocab_size
    ids = rng.integers(5, min(vocab, config.image_token_id or vocab), (batch, 6)).astype(np.int64)
    ones = np.ones_like(ids)
    out = {}
    with torch.no_grad():
        image = hf.vision_model(pixel_values=t_pixels).last_hidden_state
        j_image = model.apply(v, jnp.asarray(pixels), method=Blip2.encode_image)
        out["vision.last_hidden_state"] = float(np.abs(np.asarray(j_image) - image.numpy()).max())
        if config.architecture == "retrieval":
            t = dict(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(ones))
            itm = hf(pixel_values=t_pixels, use_image_text_matching_head=True, **t).logits_per_image.numpy()
            j_itm = model.apply(v, j_image, jnp.asarray(ids), jnp.asarray(ones), method=Blip2.itm_logits)
            out["itm_logits"] = float(np.abs(np.asarray(j_itm) - itm).max())
            itc = hf(pixel_values=t_pixels, use_image_text_matching_head=False, **t).logits_per_image.numpy()
            j_itc = np.einsum("iqd,td->iqt", np.asarray(model.apply(v, j_image, method=Blip2.image_features)),
                              np.asarray(model.apply(v, jnp.asarray(ids), jnp.asarray(ones),
                                                     method=Blip2.text_features))).max(1)
            out["itc_similarity"] = float(np.abs(j_itc - itc).max())
            return out
        q = config.num_query_tokens
        full = np.concatenate([np.full((batch, q), config.image_token_id), ids], 1)
        kwargs = dict(pixel_values=t_pixels, input_ids=torch.from_numpy(full),
                      attention_mask=torch.from_numpy(np.ones_like(full)))
        instruction = None
        if config.instruct:
            instruction = rng.integers(5, config.qformer_vocab_size, (batch, 4)).astype(np.int64)
            kwargs.update(qformer_input_ids=torch.from_numpy(instruction),
                          qformer_attention_mask=torch.from_numpy(np.ones_like(instruction)))
        decoder_ids = None
        if config.family.encoder_decoder:
            decoder_ids = ids[:, :3]
            kwargs["decoder_input_ids"] = torch.from_numpy(decoder_ids)
        logits = hf(**kwargs).logits.numpy()
        prefix = model.apply(v, j_image, None if instruction is None else jnp.asarray(instruction),
                             None if instruction is None else jnp.ones(instruction.shape, jnp.int32),
                             method=Blip2.language_prefix)
        j_logits = model.apply(v, prefix, jnp.asarray(ids), jnp.asarray(ones),
                               None if decoder_ids is None else jnp.asarray(decoder_ids),
                               method=Blip2.language_model_logits)
        out["language_model.logits"] = float(np.abs(np.asarray(j_logits) - logits).max())
    return out
