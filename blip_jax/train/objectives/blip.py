"""BLIP's own objectives (salesforce/BLIP, LAVIS): pre-training and fine-tuning for retrieval and
captioning and VQA, on the `Blip` module.

Pre-training = ITC + ITM + LM, equal weights:
  ITC  unit-norm CLS projections, similarities over the global batch plus feature queues filled by
       momentum encoders (EMA of ViT, text encoder and projections, `momentum` 0.995), divided by
       the learnable temperature clamped to [0.001, 0.5]; targets (1 - alpha) * one-hot + alpha *
       softmax(momentum similarities), alpha ramped linearly from 0 over `alpha_ramp_steps`.
  ITM  [ENC] text over the image (the model config's `enc_token_id`): each image with a hard negative text and each text with a hard
       negative image, drawn from softmax(similarity) + 1e-4 with the positives removed.
  LM   [DEC] text, next-token cross-entropy with label smoothing 0.1 on every real token.
Retrieval fine-tuning is ITC + ITM where texts of the same image (`image_index`) are all positives
(also against an index queue), and ITM never draws a same-image negative. Caption fine-tuning is
the LM loss with the prompt ("a picture of ") left out of the targets. VQA fine-tuning (the "vqa"
architecture, encoder and decoder untied) encodes the question over the image and decodes
every answer of the question over the question states: per-answer sequence losses (summed over
tokens, label smoothing 0.1) weighted by the answers' weights, summed, divided by the batch size.
NLVR2 fine-tuning (the "nlvr" architecture, LAVIS BlipNLVR) is the cross-entropy of the classifier
on the [ENC] token of the statement encoded over both images.

Batches (host arrays, batch-major; `pixels` [B, H, W, 3] is the task's):
  all         text_ids, text_mask [B, T]: BERT tokens ([CLS] text [SEP]); retrieval also image_index [B]
              (texts of one image share it)
  nlvr        pixels1 [B, H, W, 3] (the right image); label [B] (1: the statement is true)
  vqa         question_ids, question_mask [B, T]: BERT tokens of the question; answer_ids, answer_mask
              [B, K, A]: each question's K answers ([CLS] answer [SEP]); answer_weights [B, K] (0 for
              padding answers)

The momentum parameters and queues are the objective's state (`extra`, checkpointed with the train
state, momentum sharded like the online parameters); `init_extra` makes it.
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np

from blip_jax.data import transforms
from blip_jax.data.records import BadRecord
from blip_jax.losses import IGNORE, clamped_temperature, cross_entropy, sequence_cross_entropy
from blip_jax.models.blip import Blip
from blip_jax.models.tying import applied_form
from blip_jax.train import report
from blip_jax.train.objectives.stage import Stage
MOMENTUM_KEYS = ("vision", "text_encoder", "vision_proj", "text_proj")  # BLIP's model_pairs


def init_extra(params, cfg, rng, batch_size: int) -> dict:
    """Momentum copies of the online encoders, unit-norm random feature queues [E, queue_size], the
    index queue (-1: matches no image), the queue pointer and an update counter."""
    size = int(cfg.queue_size)
    if size % batch_size:
        raise ValueError(f"queue_size {size} must be divisible by the global batch size {batch_size}")
    embed = params["vision_proj"]["kernel"].shape[-1]
    k_img, k_txt = jax.random.split(rng)

    def queue(key):
        q = jax.random.normal(key, (embed, size), jnp.float32)
        return q / jnp.linalg.norm(q, axis=0, keepdims=True)

    return {"momentum": jax.tree.map(jnp.array, {k: params[k] for k in MOMENTUM_KEYS}),
            "image_queue": queue(k_img), "text_queue": queue(k_txt),
            "idx_queue": jnp.full((size,), -1, jnp.int32), "ptr": jnp.zeros((), jnp.int32),
            "updates": jnp.zeros((), jnp.int32)}


def ema(momentum, params, m: float):
    """momentum * m + params * (1 - m), leaf by leaf (no gradient into `params`)."""
    return jax.tree.map(lambda a, b: a * m + jax.lax.stop_gradient(b).astype(a.dtype) * (1 - m), momentum,
                        {k: params[k] for k in momentum})


def soft_cross_entropy(logits, targets):
    """Mean over rows of -sum(targets * log_softmax(logits))."""
    return -jnp.mean(jnp.sum(jax.nn.log_softmax(logits, axis=-1) * targets, axis=-1))


def enqueue(queue, values, ptr):
    """`values` written at `ptr` (columns of a feature queue [E, Q]; entries of the index queue [Q])."""
    if queue.ndim == 1:
        return jax.lax.dynamic_update_slice(queue, values.astype(queue.dtype), (ptr,))
    return jax.lax.dynamic_update_slice(queue, values.astype(queue.dtype), (0, ptr))


def itc_loss(image_feat, text_feat, image_feat_m, text_feat_m, image_queue, text_queue, temp, alpha, positives):
    """BLIP's ITC with momentum distillation: similarities of the online features against the
    momentum features and the queues, targets blending `positives` (rows normalised) with the
    momentum model's softmax by `alpha`. positives: [B, B + Q] (1 where a text shows the image)."""
    image_all = jnp.concatenate([image_feat_m, image_queue.T])  # [B + Q, E]
    text_all = jnp.concatenate([text_feat_m, text_queue.T])
    targets = positives / positives.sum(1, keepdims=True)
    i2t_targets = jax.lax.stop_gradient(alpha * jax.nn.softmax(image_feat_m @ text_all.T / temp, -1)
                                        + (1 - alpha) * targets)
    t2i_targets = jax.lax.stop_gradient(alpha * jax.nn.softmax(text_feat_m @ image_all.T / temp, -1)
                                        + (1 - alpha) * targets)
    sim_i2t = image_feat @ text_all.T / temp
    sim_t2i = text_feat @ image_all.T / temp
    loss = (soft_cross_entropy(sim_i2t, i2t_targets) + soft_cross_entropy(sim_t2i, t2i_targets)) / 2
    return loss, sim_i2t, sim_t2i


def not_negatives(idx, mode: str, shards: int):
    """[B, B] True where column j cannot be row i's ITM negative: the same image, and with
    mode "device" another shard of the batch (each device mines its own rows, as BLIP pre-training
    does on each GPU); "global" mines over the whole batch."""
    excluded = idx[:, None] == idx[None, :]
    if mode == "device":
        shard = jnp.arange(idx.shape[0]) // (idx.shape[0] // shards)
        return excluded | (shard[:, None] != shard[None, :])
    if mode != "global":
        raise ValueError(f"loss.itm_negatives must be 'global' or 'device', got {mode!r}")
    return excluded


def hard_negatives(key, sim, excluded):
    """For each row, a column drawn with probability softmax(sim row) + 1e-4, never where `excluded`
    (BLIP's ITM negatives; `sim` [B, B] without gradient)."""
    weights = jnp.where(excluded, 0.0, jax.nn.softmax(jax.lax.stop_gradient(sim), -1) + 1e-4)
    return jax.random.categorical(key, jnp.log(weights))


def contrastive_matching(model: Blip, params, batch, rng, cfg, extra, *, with_lm: bool, by_image: bool):
    """ITC with momentum distillation and queues + ITM with hard negatives (+ LM); see the module doc."""
    full = applied_form(model.config, params)
    v = {"params": full}
    r_drop, r_neg = jax.random.split(rng)

    def apply(method, *args, **kwargs):
        return model.apply(v, *args, method=method, rngs={"dropout": r_drop}, **kwargs)

    ids, mask = batch["text_ids"], batch["text_mask"]  # [CLS] text [SEP]
    b = ids.shape[0]
    image = apply(Blip.encode_image, batch["pixels"], deterministic=False)
    image_feat = apply(Blip.image_features, image)
    text_feat = apply(Blip.text_features, ids, mask, deterministic=False)
    temp = clamped_temperature(params["temp"])

    momentum = ema(extra["momentum"], params, cfg.momentum)
    vm = {"params": {**full, **momentum}}
    image_m = model.apply(vm, batch["pixels"], method=Blip.encode_image)
    image_feat_m = jax.lax.stop_gradient(model.apply(vm, image_m, method=Blip.image_features))
    text_feat_m = jax.lax.stop_gradient(model.apply(vm, ids, mask, method=Blip.text_features))
    idx = batch["image_index"] if by_image else jnp.arange(b, dtype=jnp.int32)
    queue_size = extra["image_queue"].shape[1]
    if by_image:  # every text of the same image is a positive, in the batch and in the queue
        positives = (idx[:, None] == jnp.concatenate([idx, extra["idx_queue"]])[None, :]).astype(jnp.float32)
    else:  # pre-training: only the pair itself
        positives = jnp.eye(b, b + queue_size, dtype=jnp.float32)
    alpha = cfg.alpha * jnp.minimum(1.0, extra["updates"].astype(jnp.float32) / max(1, cfg.alpha_ramp_steps))
    itc, sim_i2t, sim_t2i = itc_loss(image_feat, text_feat, image_feat_m, text_feat_m, extra["image_queue"],
                                     extra["text_queue"], temp, alpha, positives)

    # ITM: negatives drawn from the in-batch similarities, never a positive; a batch may carry them
    # instead (`itm_negative_image` / `itm_negative_text` [B]: comparisons with a reference's draw)
    excluded = not_negatives(idx, cfg.itm_negatives, cfg.batch_shards)
    k_img, k_txt = jax.random.split(r_neg)
    neg_image = batch.get("itm_negative_image")  # for each text
    if neg_image is None:
        neg_image = hard_negatives(k_img, sim_t2i[:, :b], excluded)
    neg_text = batch.get("itm_negative_text")  # for each image
    if neg_text is None:
        neg_text = hard_negatives(k_txt, sim_i2t[:, :b], excluded)
    itm_logits = apply(Blip.itm_logits, jnp.concatenate([image, image[neg_image], image]),
                       jnp.concatenate([ids, ids, ids[neg_text]]),
                       jnp.concatenate([mask, mask, mask[neg_text]]), deterministic=False)
    itm_labels = jnp.concatenate([jnp.ones(b, jnp.int32), jnp.zeros(2 * b, jnp.int32)])
    itm = cross_entropy(itm_logits, itm_labels)
    loss, metrics = itc + itm, {"itc": itc, "itm": itm, "temperature": temp, "alpha": alpha}

    if with_lm:
        lm = _lm(apply, image, ids, mask, cfg, prompt_length=0)
        loss, metrics = loss + lm, {**metrics, "lm": lm}

    ptr = extra["ptr"]
    new_extra = {"momentum": momentum, "image_queue": enqueue(extra["image_queue"], image_feat_m.T, ptr),
                 "text_queue": enqueue(extra["text_queue"], text_feat_m.T, ptr),
                 "idx_queue": enqueue(extra["idx_queue"], idx, ptr),
                 "ptr": (ptr + b) % queue_size, "updates": extra["updates"] + 1}
    return loss, metrics, new_extra


def _lm(apply, image, ids, mask, cfg, prompt_length: int):
    """[DEC] text: next-token cross-entropy with label smoothing on the real tokens after the prompt."""
    dec_ids = ids.at[:, 0].set(cfg.bos_token_id)
    logits, _ = apply(Blip.decode, dec_ids, mask, image, deterministic=False)
    targets = jnp.where(mask[:, 1:] > 0, dec_ids[:, 1:], IGNORE)
    if prompt_length:
        targets = targets.at[:, : prompt_length - 1].set(IGNORE)  # the prompt's tokens are given, not learnt
    return cross_entropy(logits[:, :-1], targets, cfg.blip_lm_label_smoothing)


def pretrain(model, params, batch, rng, cfg, extra):
    return contrastive_matching(model, params, batch, rng, cfg, extra, with_lm=True, by_image=False)


def retrieval(model, params, batch, rng, cfg, extra):
    return contrastive_matching(model, params, batch, rng, cfg, extra, with_lm=False, by_image=True)


def caption(model, params, batch, rng, cfg, extra):
    """Caption fine-tuning: the LM loss after the prompt (`cfg.prompt_length` tokens incl. [DEC])."""
    v = {"params": applied_form(model.config, params)}

    def apply(method, *args, **kwargs):
        return model.apply(v, *args, method=method, rngs={"dropout": rng}, **kwargs)

    image = apply(Blip.encode_image, batch["pixels"], deterministic=False)
    lm = _lm(apply, image, batch["text_ids"], batch["text_mask"], cfg, cfg.prompt_length)
    return lm, {"lm": lm}, extra


def vqa(model, params, batch, rng, cfg, extra):
    """VQA fine-tuning (LAVIS BlipVQA): question_ids/mask [B, T] ([CLS] question [SEP]), answer_ids/mask
    [B, K, A] ([CLS] answer [SEP]; K answers per question, padding answers have weight 0),
    answer_weights [B, K]. LAVIS repeats each question's states once per real answer; here every
    question has K answer rows, which adds weight-0 rows and changes nothing else."""
    v = {"params": params}
    r_image, r_question, r_answer = jax.random.split(rng, 3)

    def apply(method, key, *args, **kwargs):
        return model.apply(v, *args, method=method, rngs={"dropout": key}, deterministic=False, **kwargs)

    image = apply(Blip.encode_image, r_image, batch["pixels"])
    q_mask = batch["question_mask"]
    question = apply(Blip.encode_question, r_question, image, batch["question_ids"], q_mask)
    b, k, length = batch["answer_ids"].shape
    a_ids = batch["answer_ids"].reshape(b * k, length).at[:, 0].set(cfg.bos_token_id)
    a_mask = batch["answer_mask"].reshape(b * k, length)
    logits, _ = apply(Blip.decode, r_answer, a_ids, a_mask, jnp.repeat(question, k, axis=0),
                      jnp.repeat(q_mask, k, axis=0))
    targets = jnp.where(a_mask[:, 1:] > 0, a_ids[:, 1:], IGNORE)
    per_answer = sequence_cross_entropy(logits[:, :-1], targets, cfg.blip_lm_label_smoothing).reshape(b, k)
    loss = jnp.sum(per_answer * batch["answer_weights"]) / b
    return loss, {"vqa": loss}, extra


def nlvr_cross_entropy(logits, labels):
    """Mean cross-entropy of class `logits` [B, C] against integer `labels` [B] (torch's F.cross_entropy)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=-1))


def nlvr(model, params, batch, rng, cfg, extra):
    """NLVR2 fine-tuning: the statement ([ENC] text) over both images, cross-entropy of its class."""
    v = {"params": params}
    r0, r1, r_text = jax.random.split(rng, 3)

    def apply(method, key, *args):
        return model.apply(v, *args, method=method, rngs={"dropout": key}, deterministic=False)

    left, right = apply(Blip.encode_image, r0, batch["pixels"]), apply(Blip.encode_image, r1, batch["pixels1"])
    logits = apply(Blip.nlvr_logits, r_text, left, right, batch["text_ids"], batch["text_mask"])
    loss = nlvr_cross_entropy(logits, batch["label"])
    accuracy = jnp.mean((jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32))
    return loss, {"nlvr": loss, "accuracy": accuracy}, extra


# ------------------------------------------------------------------------- examples
def caption_example(task, record, rng) -> dict:
    """The caption's BERT tokens (pre-training, captioning)."""
    ids, mask = task.bert_caption(record)
    return {"text_ids": ids, "text_mask": mask}


def image_index(record: dict) -> int:
    """A stable non-negative integer per image (retrieval fine-tuning's positives)."""
    if "index" in record and "image_id" not in record:  # synthetic records: one caption per image
        return int(record["index"])
    return zlib.crc32(str(record.get("image_id", record["image"])).encode()) & 0x7FFFFFFF


def retrieval_example(task, record, rng) -> dict:
    """The caption's BERT tokens and its image's index: texts of one image are each other's positives."""
    return {**caption_example(task, record, rng), "image_index": np.int32(image_index(record))}


def vqa_example(task, record, rng) -> dict:
    """The question's BERT tokens and up to `data.max_answers` of its answers (the heaviest first)
    with their weights (LAVIS: each distinct answer's share of the annotators; a single answer weighs
    1); padding answers weigh 0."""
    d, tok = task.cfg.data, task.qformer_tokenizer
    answers = list(record.get("answers") or ([record["answer"]] if record.get("answer") else []))
    if "question" not in record or not answers:
        raise BadRecord("bad_text", "blip_vqa trains on questions with answers; the record lacks them")
    weights = list(record.get("answer_weights") or [1.0 / len(answers)] * len(answers))
    keep = np.argsort(-np.asarray(weights, np.float64), kind="stable")[: d.max_answers]
    q_ids, q_mask = task.bert_tokens(transforms.pre_question(record["question"], d.max_words))
    rows = [task.pad(tok.encode(str(answers[i])), d.max_answer_len, tok.pad_token_id) for i in keep]
    rows += [task.pad([], d.max_answer_len, tok.pad_token_id)] * (d.max_answers - len(rows))
    a_weights = np.zeros(d.max_answers, np.float32)
    a_weights[: len(keep)] = [weights[i] for i in keep]
    return {"question_ids": q_ids, "question_mask": q_mask, "answer_ids": np.stack([r[0] for r in rows]),
            "answer_mask": np.stack([r[1] for r in rows]), "answer_weights": a_weights}


def nlvr_example(task, record, rng) -> dict:
    """The statement's BERT tokens and its label (1: true of the image pair)."""
    if "text" not in record or record.get("label") not in (0, 1):
        raise BadRecord("bad_text", "blip_nlvr trains on statements with a label (0 or 1); the record lacks them")
    ids, mask = task.bert_tokens(transforms.pre_caption(record["text"], task.cfg.data.max_words))
    return {"text_ids": ids, "text_mask": mask, "label": np.int32(record["label"])}


def nlvr_shapes(cfg, encoder_decoder: bool) -> dict:
    return {**caption_shapes(cfg, encoder_decoder), "label": jax.ShapeDtypeStruct((cfg.batch_size,), np.int32)}


def caption_shapes(cfg, encoder_decoder: bool) -> dict:
    tokens = jax.ShapeDtypeStruct((cfg.batch_size, cfg.data.max_text_len), np.int32)
    return {"text_ids": tokens, "text_mask": tokens}


def retrieval_shapes(cfg, encoder_decoder: bool) -> dict:
    return {**caption_shapes(cfg, encoder_decoder), "image_index": jax.ShapeDtypeStruct((cfg.batch_size,), np.int32)}


def vqa_shapes(cfg, encoder_decoder: bool) -> dict:
    b, k, a = cfg.batch_size, cfg.data.max_answers, cfg.data.max_answer_len
    tokens = jax.ShapeDtypeStruct((b, cfg.data.max_text_len), np.int32)
    answers = jax.ShapeDtypeStruct((b, k, a), np.int32)
    return {"question_ids": tokens, "question_mask": tokens, "answer_ids": answers, "answer_mask": answers,
            "answer_weights": jax.ShapeDtypeStruct((b, k), np.float32)}


def prompt_length(cfg, bert_tokenizer, llm_tokenizer) -> None:
    """Caption fine-tuning: [DEC] + the prompt's tokens are given, not targets."""
    cfg.loss.prompt_length = len(bert_tokenizer.encode(cfg.data.prompt)) - 1


# ------------------------------------------------------------------------- the stages
# "pretrain" has every head and the tied decoder (retrieval fine-tuning uses its encoder, heads and
# temperature); caption and VQA are untied. Learning rates and resolutions are the paper's: pre-train
# at 224, fine-tune at 384, VQA at 480 (positions resized when a checkpoint's grid differs).
_BLIP = dict(model="blip", bert_text_only=True)
PRETRAIN = Stage("blip_pretrain", loss=pretrain, example=caption_example, batch_shapes=caption_shapes,
                 report=report.blip_retrieval, architecture="pretrain", init_extra=init_extra, lr=3e-4,
                 image_size=224, **_BLIP)
RETRIEVAL = Stage("blip_retrieval", loss=retrieval, example=retrieval_example, batch_shapes=retrieval_shapes,
                  report=report.blip_retrieval, architecture="pretrain", init_extra=init_extra, lr=1e-5,
                  image_size=384, **_BLIP)
CAPTION = Stage("blip_caption", loss=caption, example=caption_example, batch_shapes=caption_shapes,
                report=report.blip_generation, architecture="caption", prepare=prompt_length, lr=1e-5,
                image_size=384, **_BLIP)
NLVR = Stage("blip_nlvr", loss=nlvr, example=nlvr_example, batch_shapes=nlvr_shapes, report=report.blip_nlvr,
             architecture="nlvr", lr=2.5e-5, image_size=384, two_images=True, **_BLIP)
VQA = Stage("blip_vqa", loss=vqa, example=vqa_example, batch_shapes=vqa_shapes, report=report.blip_generation,
            architecture="vqa", lr=2e-5, image_size=480, **_BLIP)
