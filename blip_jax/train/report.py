"""What a run learned, shown at its end on held-out synthetic records (a seed the run never reads):
stage 1 and BLIP pre-training / retrieval report ITC retrieval accuracy (R@1 both ways); LM stages,
BLIP captioning and VQA print greedy outputs beside the references (VQA: exact-match accuracy);
NLVR2 its classifier's accuracy. Written to W/report.json and returned."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from blip_jax import generation
from blip_jax.data.synthetic import SyntheticPairs, SyntheticShapes
from blip_jax.models.blip import Blip
from blip_jax.models.blip2 import Blip2
from blip_jax.models.tying import applied_form
from blip_jax.train import partition

HELD_OUT_SEED = 10_007  # the training source's seed is cfg.data.seed; this one is never trained on
SHOWN = 4  # examples of generated text in a report


def held_out_records(cfg, n: int) -> list[dict]:
    from blip_jax.train.objectives import stage_of

    pairs = stage_of(cfg).two_images  # NLVR2: image pairs and statements
    source = (SyntheticPairs if pairs else SyntheticShapes)(n, seed=cfg.data.seed + HELD_OUT_SEED,
                                                            image_size=cfg.data.image_size)
    return [source[i] for i in range(n)]


def _retrieval_r1(sim: np.ndarray, records: list[dict]) -> dict:
    """ITC R@1 both ways of a [n_images, n_texts] similarity; several records can share a caption, so
    a retrieved text (image) with the same caption counts as right."""
    captions = np.array([r["caption"] for r in records])
    return {"held_out": len(records), "itc_image_to_text_r1": float(np.mean(captions[sim.argmax(1)] == captions)),
            "itc_text_to_image_r1": float(np.mean(captions[sim.argmax(0)] == captions)),
            "chance": float(np.mean([np.mean(captions == c) for c in captions]))}


def blip_retrieval(cfg, st, task, params, records, batch) -> dict:
    """BLIP pre-training / retrieval: ITC R@1 of the CLS projections."""
    v = {"params": applied_form(st.config, params)}
    model = Blip(st.config)
    image = model.apply(v, jnp.asarray(batch["pixels"]), method=Blip.encode_image)
    image_feats = np.asarray(model.apply(v, image, method=Blip.image_features))
    text_feats = np.asarray(model.apply(v, jnp.asarray(batch["text_ids"]), jnp.asarray(batch["text_mask"]),
                                        method=Blip.text_features))
    return _retrieval_r1(image_feats @ text_feats.T, records)


def blip_generation(cfg, st, task, params, records, batch, shown: int = SHOWN) -> dict:
    """BLIP caption / VQA models: greedy captions after the prompt, or greedy answers (exact match)."""
    from blip_jax.api import BlipModel

    model = BlipModel(st.config, params, task.qformer_tokenizer)
    images = [r["image"] for r in records]
    if st.config.architecture == "vqa":
        questions = [r["question"] for r in records]
        answers = model.vqa(images, questions, num_beams=1, max_new_tokens=cfg.data.max_answer_len)
        examples = [{"question": q, "generated": a, "reference": r["answer"]}
                    for q, a, r in zip(questions, answers, records)]
        return {"held_out": len(records), "exact_match": float(np.mean([e["generated"] == e["reference"]
                                                                         for e in examples])),
                "examples": examples[:shown]}
    prompt = cfg.data.prompt.strip()
    captions = model.caption(images[:shown], prompt=prompt or None, num_beams=1, min_new_tokens=0,
                             max_new_tokens=cfg.data.max_text_len)
    return {"held_out": shown, "examples": [{"generated": c, "reference": r["caption"]}
                                            for c, r in zip(captions, records)]}


def blip_nlvr(cfg, st, task, params, records, batch) -> dict:
    """NLVR2: accuracy of the true / false classifier on held-out statements about image pairs."""
    v = {"params": params}
    model = Blip(st.config)
    left = model.apply(v, jnp.asarray(batch["pixels"]), method=Blip.encode_image)
    right = model.apply(v, jnp.asarray(batch["pixels1"]), method=Blip.encode_image)
    logits = model.apply(v, left, right, jnp.asarray(batch["text_ids"]), jnp.asarray(batch["text_mask"]),
                         method=Blip.nlvr_logits)
    labels = np.asarray(batch["label"])
    return {"held_out": len(records), "accuracy": float(np.mean(np.asarray(logits).argmax(-1) == labels)),
            "true_share": float(labels.mean())}


def qformer_retrieval(cfg, st, task, params, records, batch) -> dict:
    """BLIP-2 stage 1: ITC R@1 of the best-matching query."""
    model = Blip2(st.config)
    v = {"params": params}
    image = model.apply(v, jnp.asarray(batch["pixels"]), method=Blip2.encode_image)
    sim = np.einsum("iqe,te->itq", np.asarray(model.apply(v, image, method=Blip2.image_features)),
                    np.asarray(model.apply(v, jnp.asarray(batch["text_ids"]), jnp.asarray(batch["text_mask"]),
                                           method=Blip2.text_features))).max(-1)
    return _retrieval_r1(sim, records)


def llm_generation(cfg, st, task, params, records, batch, shown: int = SHOWN) -> dict:
    """BLIP-2 LM stages: greedy text after the soft prompt (and the instruction) beside the reference."""
    from blip_jax.blip2_api import generate_tokens

    model = Blip2(st.config)
    v = {"params": params}
    image = model.apply(v, jnp.asarray(batch["pixels"]), method=Blip2.encode_image)
    q_ids = jnp.asarray(batch["qformer_ids"]) if "qformer_ids" in batch else None
    q_mask = jnp.asarray(batch["qformer_mask"]) if "qformer_mask" in batch else None
    prefix = model.apply(v, image, q_ids, q_mask, method=Blip2.language_prefix)
    tok = task.llm_tokenizer
    instruct = cfg.model.instruct
    prompts = [r["instruction"] if instruct else "" for r in records[:shown]]
    side = "right" if task.encoder_decoder else "left"
    enc = tok(prompts, padding="longest", padding_side=side)
    gen = generation.GenerationConfig.from_kwargs(max_new_tokens=cfg.data.max_text_len, num_beams=1,
                                                  eos_token_id=task.text_end_id, pad_token_id=tok.pad_token_id)
    tokens = generate_tokens(st.config, params, prefix[:shown], enc["input_ids"], enc["attention_mask"], gen)
    outputs = [t.strip() for t in tok.batch_decode(tokens)]
    refs = [r["output"] if instruct else r["caption"] for r in records[:shown]]
    return {"held_out": shown, "examples": [{"prompt": p, "generated": o, "reference": ref}
                                            for p, o, ref in zip(prompts, outputs, refs)],
            "exact_match": float(np.mean([o == ref for o, ref in zip(outputs, refs)]))}


def report(cfg, st, task, n: int = 32) -> dict:
    """The stage's report on `n` held-out synthetic records."""
    params = jax.device_get(partition.merge(st.train["params"], st.frozen))
    records = held_out_records(cfg, n)
    return task.stage.report(cfg, st, task, params, records, task.eval_batch(records))
