"""BLIP-2's stages: stage 1 (ITC + ITM + ITG on the Q-Former, no LLM) and the LM stages (stage 2 with
OPT / Flan-T5, InstructBLIP instruction tuning), with their examples and batch shapes.

Batches (host arrays, batch-major; `pixels` [B, H, W, 3] is the task's):
  stage1      text_ids, text_mask [B, T]: Q-Former tokens ([CLS] text [SEP])
  lm          ids, mask [B, T]: LLM tokens, right-padded; loss_mask [B, T]: 1 on target tokens
              (decoder LLMs: the text / the output after the instruction)
  lm (T5)     ids, mask: encoder text after the soft prompt; targets, target_mask: decoder targets
  instruct    qformer_ids, qformer_mask: the instruction for the Q-Former (both LM variants)

LM formats follow LAVIS: decoder LLMs read [BOS] text [EOS] with the loss on every real token but
`data.prompt`'s (on the output only for instructions and questions; [EOS] is the model's, "\\n" for
OPT); Flan-T5 stage 2 is a prefix LM whose split point is drawn per record (from token 1 to the
middle). InstructBLIP records without an instruction get one from the templates of
`cfg.data.instruction_family` (or their task's family); BLIP-2 question records read the model
family's VQA prompt.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from blip_jax.prompts import VQA_TEMPLATES
from blip_jax.data import transforms
from blip_jax.data.instructions import instruct, sample_answer
from blip_jax.data.records import BadRecord
from blip_jax.losses import IGNORE, clamped_temperature, cross_entropy
from blip_jax.models.blip2 import Blip2
from blip_jax.train import report
from blip_jax.train.objectives.blip import image_index
from blip_jax.train.objectives.stage import Stage


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
    temp = clamped_temperature(params["temp"])
    sim_i2t = jnp.einsum("iqe,te->itq", image_feats, text_feats).max(-1) / temp
    sim_t2i = jnp.einsum("te,iqe->tiq", text_feats, image_feats).max(-1) / temp
    if "image_index" in batch:  # retrieval fine-tuning: every text of the same image is a positive
        idx = batch["image_index"]
        eye = idx[:, None] == idx[None, :]
        s = cfg.itc_label_smoothing  # LAVIS: 0.9 x the positives' share + 0.1 uniform
        targets = (1 - s) * eye / eye.sum(1, keepdims=True) + s / b
        soft = lambda sim: -(jax.nn.log_softmax(sim, -1) * targets).sum(-1).mean()  # noqa: E731
        itc = (soft(sim_i2t) + soft(sim_t2i)) / 2
    else:
        labels = jnp.arange(b)
        itc = (cross_entropy(sim_i2t, labels, cfg.itc_label_smoothing)
               + cross_entropy(sim_t2i, labels, cfg.itc_label_smoothing)) / 2
        eye = jnp.eye(b, dtype=bool)

    # ITM: each text with a hard negative image, each image with a hard negative text, drawn from
    # softmax(similarity) without the positives (no gradient through the sampling)
    neg_logits = lambda sim: jnp.where(eye, -jnp.inf, jax.lax.stop_gradient(sim))  # noqa: E731
    k_img, k_txt = jax.random.split(rngs["negatives"])
    # a batch may carry its negatives (`itm_negative_image` / `itm_negative_text` [B]: comparisons
    # with a reference's draw); otherwise they are drawn here
    neg_image = batch.get("itm_negative_image")  # for text t, an image != t
    if neg_image is None:
        neg_image = jax.random.categorical(k_img, neg_logits(sim_t2i))
    neg_text = batch.get("itm_negative_text")  # for image i, a text != i
    if neg_text is None:
        neg_text = jax.random.categorical(k_txt, neg_logits(sim_i2t))
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
        # text token t is predicted at position Q - 1 + t: only those logits are computed
        logits = model.apply(v, prefix, batch["ids"], batch["mask"], logits_at=slice(prefix.shape[1] - 1, -1),
                             method=Blip2.language_model_logits)
        lm = _masked_ce(logits, batch["ids"], batch["loss_mask"], cfg.lm_label_smoothing)
    return lm, {"lm": lm}, extra


def lm_weight(batch):
    """What `language_modeling` averages over: the batch's number of target tokens."""
    return jnp.sum(batch["target_mask" if "target_mask" in batch else "loss_mask"] > 0)


def caption_example(task, record, rng) -> dict:
    """Stage 1: the caption's BERT tokens."""
    ids, mask = task.bert_caption(record)
    return {"text_ids": ids, "text_mask": mask}


def caption_shapes(cfg, encoder_decoder: bool) -> dict:
    tokens = jax.ShapeDtypeStruct((cfg.batch_size, cfg.data.max_text_len), np.int32)
    return {"text_ids": tokens, "text_mask": tokens}


def retrieval_example(task, record, rng) -> dict:
    """Stage 1's example and its image's index: the texts of one image are each other's positives."""
    return {**caption_example(task, record, rng), "image_index": np.int32(image_index(record))}


def retrieval_shapes(cfg, encoder_decoder: bool) -> dict:
    return {**caption_shapes(cfg, encoder_decoder), "image_index": jax.ShapeDtypeStruct((cfg.batch_size,), np.int32)}


def _prompt_and_target(task, record: dict, rng: np.random.Generator) -> tuple[str, str]:
    """(prompt, target) of an LM record; the prompt is empty for plain captions."""
    d = task.cfg.data
    cleaned = dict(record)
    if "caption" in record:
        cleaned["caption"] = transforms.pre_caption(record["caption"], d.max_words, d.prompt)
    if "question" in record:
        cleaned["question"] = transforms.pre_question(record["question"], d.max_words)
    if task.cfg.model.get("qformer_input") == "question":  # BLIP-2's VQA fine-tune: the paper's prompt
        if "question" not in cleaned:
            raise BadRecord("bad_text", "a VQA fine-tune record without a question")
        template = VQA_TEMPLATES["t5" if task.encoder_decoder else "opt"]
        return template.format(cleaned["question"]), sample_answer(cleaned, rng)
    if task.cfg.model.instruct:
        return instruct(cleaned, d.instruction_family, rng)
    if "caption" in cleaned:
        return "", cleaned["caption"]
    if "question" in cleaned:
        template = VQA_TEMPLATES["t5" if task.encoder_decoder else "opt"]
        return template.format(cleaned["question"]), sample_answer(cleaned, rng)
    raise BadRecord("bad_text", "a record with neither caption nor question")


def lm_example(task, record, rng) -> dict:
    """The LLM's tokens (and, for InstructBLIP, the Q-Former's instruction tokens); see the module doc.
    Prompts are cut on their tokenizer's side (LAVIS: InstructBLIP's from the left, where the question
    is least needed; BLIP-2's from the right), targets from the right (`data.max_prompt_len`,
    `data.max_target_len`)."""
    d = task.cfg.data
    prompt, target = _prompt_and_target(task, record, rng)
    tok = task.llm_tokenizer
    prompt_len, target_len = d.max_prompt_len or None, d.max_target_len or None  # 0: no limit
    out = {}
    if task.cfg.model.instruct:  # cut on the Q-Former tokenizer's own side (LAVIS: left)
        qformer_text = prompt
        if task.cfg.model.get("qformer_input") == "question":  # the question alone (BLIP-2 VQA fine-tune)
            qformer_text = transforms.pre_question(record["question"], d.max_words)
        out["qformer_ids"], out["qformer_mask"] = task.bert_tokens(qformer_text, prompt_len)
    if task.encoder_decoder:
        if not prompt:  # prefix LM: split the caption at a point drawn from [1, middle]
            words = target.split()
            cut = int(rng.integers(1, max(len(words) // 2, 1) + 1))
            prompt, target = " ".join(words[:cut]), " ".join(words[cut:])
        ids, mask = task.pad(tok.encode(prompt, max_length=prompt_len), d.max_text_len, tok.pad_token_id)
        targets, target_mask = task.pad(tok.encode(target, max_length=target_len, truncation_side="right"),
                                        d.max_text_len, tok.pad_token_id)
        return {**out, "ids": ids, "mask": mask, "targets": targets, "target_mask": target_mask}
    eos = [task.text_end_id]
    if prompt:  # [BOS] prompt | target [EOS]; loss on the target and EOS only
        head = tok.encode(prompt, max_length=prompt_len)
        # LAVIS cuts "target</s>" with its bos (then dropped) at max_target_len: the eos may go
        tail = (tok.encode(target, add_special_tokens=False) + eos)[: target_len and target_len - 1]
        seq, loss_from = head + tail, len(head)
    else:  # [BOS] caption [EOS]; every real token is a target but the data prompt's (LAVIS's prompt_length)
        seq = tok.encode(target) + eos
        loss_from = len(tok.encode(d.prompt.rstrip())) if d.prompt.strip() else 0
    ids, mask = task.pad(seq, d.max_text_len, tok.pad_token_id)
    loss_mask = mask.copy()
    loss_mask[:loss_from] = 0
    return {**out, "ids": ids, "mask": mask, "loss_mask": loss_mask}


def lm_shapes(cfg, encoder_decoder: bool) -> dict:
    tokens = jax.ShapeDtypeStruct((cfg.batch_size, cfg.data.max_text_len), np.int32)
    out = {"qformer_ids": tokens, "qformer_mask": tokens} if cfg.model.instruct else {}
    names = ("ids", "mask", "targets", "target_mask") if encoder_decoder else ("ids", "mask", "loss_mask")
    return {**out, **{n: tokens for n in names}}


STAGE1 = Stage("stage1", "blip2", stage1, caption_example, caption_shapes, report.qformer_retrieval,
               bert_text_only=True, architecture="retrieval", model_fields={"stage1_heads": True})
# the paper's retrieval fine-tune: stage 1's objectives with the positives of `image_index` (LAVIS
# Blip2Qformer given image ids)
STAGE1_RETRIEVAL = Stage("stage1_retrieval", "blip2", stage1, retrieval_example, retrieval_shapes,
                         report.qformer_retrieval, bert_text_only=True, architecture="retrieval",
                         model_fields={"stage1_heads": True})
# each microbatch's mean weighs its target tokens, so an accumulated loss is the whole batch's
LM = Stage("lm", "blip2", language_modeling, lm_example, lm_shapes, report.llm_generation,
           microbatch_weight=lm_weight)
