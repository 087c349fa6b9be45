"""The losses of the one trainer: each stage is a function `(model, params, batch, rng, cfg, extra) ->
(loss, metrics, extra)` over a global batch (jit sees global arrays, so "all-gathered" features and
negatives mined "across devices" are simply the whole batch; XLA inserts the collectives). `extra`
is an objective's own state (BLIP's momentum encoders and queues; empty for the others).

Batches (numpy / jax arrays, batch-major):
  all         pixels [B, H, W, 3] (normalised, NHWC)
  stage1      text_ids, text_mask [B, T]: Q-Former tokens ([CLS] text [SEP])
  lm          ids, mask [B, T]: LLM tokens, right-padded; loss_mask [B, T]: 1 on target tokens
              (decoder LLMs: the text / the output after the instruction)
  lm (T5)     ids, mask: encoder text after the soft prompt; targets, target_mask: decoder targets
  instruct    qformer_ids, qformer_mask: the instruction for the Q-Former (both LM variants)
  blip_*      text_ids, text_mask [B, T]: BERT tokens ([CLS] text [SEP]); blip_retrieval also
              image_index [B] (texts of one image share it)
  blip_vqa    question_ids, question_mask [B, T]: BERT tokens of the question; answer_ids,
              answer_mask [B, K, A]: each question's K answers ([CLS] answer [SEP]); answer_weights
              [B, K] (0 for padding answers)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from blip_jax.losses import IGNORE, cross_entropy
from blip_jax.models.blip2 import Blip2
from blip_jax.train import blip_objectives

TEMP_RANGE = (0.001, 0.5)  # LAVIS clamps the learnable ITC temperature


def _masked_ce(logits, targets, weights, label_smoothing=0.0):
    """Mean cross-entropy over the positions where `weights` is 1."""
    return cross_entropy(logits, jnp.where(weights > 0, targets, IGNORE), label_smoothing)


def stage1(model: Blip2, params, batch, rng, cfg, extra):
    """BLIP-2 stage 1: ITC + ITM (hard negatives) + ITG, equal weights (LAVIS Blip2Qformer)."""
    v = {"params": params}
    rngs = dict(zip(("dropout", "negatives"), jax.random.split(rng)))
    apply = lambda method, *a, **k: model.apply(v, *a, method=method, rngs={"dropout": rngs["dropout"]}, **k)  # noqa: E731
    image = model.apply(v, batch["pixels"], method=Blip2.encode_image)  # frozen ViT: no dropout
    ids, mask = batch["text_ids"], batch["text_mask"]
    b = ids.shape[0]

    # ITC: the best-matching query's similarity, both directions, over the global batch
    image_feats = apply(Blip2.image_features, image, deterministic=False)  # [B, Q, E]
    text_feats = apply(Blip2.text_features, ids, mask, deterministic=False)  # [B, E]
    temp = jnp.clip(params["temp"], *TEMP_RANGE)
    sim_i2t = jnp.einsum("iqe,te->itq", image_feats, text_feats).max(-1) / temp
    sim_t2i = jnp.einsum("te,iqe->tiq", text_feats, image_feats).max(-1) / temp
    labels = jnp.arange(b)
    itc = (cross_entropy(sim_i2t, labels, cfg.itc_label_smoothing)
           + cross_entropy(sim_t2i, labels, cfg.itc_label_smoothing)) / 2

    # ITM: each text with a hard negative image, each image with a hard negative text, drawn from
    # softmax(similarity) without the positive (no gradient through the sampling)
    eye = jnp.eye(b, dtype=bool)
    neg_logits = lambda sim: jnp.where(eye, -jnp.inf, jax.lax.stop_gradient(sim))  # noqa: E731
    k_img, k_txt = jax.random.split(rngs["negatives"])
    neg_image = jax.random.categorical(k_img, neg_logits(sim_t2i))  # for text t, an image != t
    neg_text = jax.random.categorical(k_txt, neg_logits(sim_i2t))  # for image i, a text != i
    itm_image = jnp.concatenate([image, image[neg_image], image])
    itm_ids = jnp.concatenate([ids, ids, ids[neg_text]])
    itm_mask = jnp.concatenate([mask, mask, mask[neg_text]])
    itm_logits = apply(Blip2.itm_logits, itm_image, itm_ids, itm_mask, deterministic=False)
    itm_labels = jnp.concatenate([jnp.ones(b, jnp.int32), jnp.zeros(2 * b, jnp.int32)])
    itm = cross_entropy(itm_logits, itm_labels)

    # ITG: [DEC] replaces [CLS]; each text token predicts the next, padding excluded
    dec_ids = ids.at[:, 0].set(cfg.bos_token_id)
    logits = apply(Blip2.itg_logits, image, dec_ids, mask, deterministic=False)
    itg = _masked_ce(logits[:, :-1], ids[:, 1:], mask[:, 1:], cfg.itg_label_smoothing)

    loss = itc + itm + itg
    return loss, {"itc": itc, "itm": itm, "itg": itg, "temperature": temp}, extra


def language_modeling(model: Blip2, params, batch, rng, cfg, extra):
    """Stage 2 and instruction tuning: the LM loss of the target tokens after the soft prompt (decoder
    LLMs: predicted one position earlier; T5: teacher-forced decoder targets)."""
    v = {"params": params}
    image = model.apply(v, batch["pixels"], method=Blip2.encode_image)
    prefix = model.apply(v, image, batch.get("qformer_ids"), batch.get("qformer_mask"), deterministic=False,
                         method=Blip2.language_prefix, rngs={"dropout": rng})
    if model.config.family.encoder_decoder:
        targets, weights = batch["targets"], batch["target_mask"]
        start = jnp.full((targets.shape[0], 1), model.config.llm.decoder_start_token_id, targets.dtype)
        decoder_ids = jnp.concatenate([start, targets[:, :-1]], 1)
        logits = model.apply(v, prefix, batch["ids"], batch["mask"], decoder_ids,  # causal: padding is harmless
                             method=Blip2.language_model_logits)
        lm = _masked_ce(logits, targets, weights, cfg.lm_label_smoothing)
    else:
        logits = model.apply(v, prefix, batch["ids"], batch["mask"], method=Blip2.language_model_logits)
        logits = logits[:, prefix.shape[1] - 1: -1]  # text token t is predicted at position Q - 1 + t
        lm = _masked_ce(logits, batch["ids"], batch["loss_mask"], cfg.lm_label_smoothing)
    return lm, {"lm": lm}, extra


def lm_weight(batch):
    """What `language_modeling` averages over: the batch's number of target tokens."""
    return jnp.sum(batch["target_mask" if "target_mask" in batch else "loss_mask"] > 0)


OBJECTIVES = {"stage1": stage1, "lm": language_modeling, "blip_pretrain": blip_objectives.pretrain,
              "blip_retrieval": blip_objectives.retrieval, "blip_caption": blip_objectives.caption,
              "blip_vqa": blip_objectives.vqa}
# objectives with their own state: its initialiser `(params, loss cfg, rng, batch_size) -> extra`
EXTRA = {"blip_pretrain": blip_objectives.init_extra, "blip_retrieval": blip_objectives.init_extra}
BLIP = ("blip_pretrain", "blip_retrieval", "blip_caption", "blip_vqa")  # objectives of the BLIP model (the rest: BLIP-2)
# each objective's weight of a microbatch in gradient accumulation (None: equal weights; stage 1's
# contrastive and matching losses see the microbatch's in-batch negatives only, whatever the weights)
WEIGHTS = {"stage1": None, "lm": lm_weight, "blip_caption": None, "blip_vqa": None}
