"""Image-text retrieval (COCO 5k, Flickr30k 1k) as the papers evaluate it.

1. Unit-norm ITC features of every image and every caption (captions cleaned by `pre_caption`),
   the full similarity matrix (BLIP-2: the best query per pair).
2. For each image its top-k captions by similarity, for each caption its top-k images; each of
   those pairs is scored by the ITM head (the "match" logit; BLIP-2: averaged over the queries)
   and gets score = ITM logit + similarity; pairs outside the top-k score -100 (LAVIS's procedure).
   Ties at the k-th place go to the lower index.
3. R@1/5/10 both ways and their means, with and without the re-ranking.

k: 256 (COCO) / 128 (Flickr30k) for BLIP, 128 for BLIP-2 (`k=-1` picks these), capped at the
number of candidates. Every stage is sharded and resumable (`runner.run_sharded`).
"""

from __future__ import annotations

import time

import numpy as np

from blip_jax.data.transforms import pre_caption
from blip_jax.eval import runner
from blip_jax.eval.inputs import image_name, load_pixels, load_records
from blip_jax.eval.retrieval_metrics import recall_at_k, scatter_topk_scores, topk_candidates

PAPER_K = {"blip": {"coco": 256, "flickr30k": 128}, "blip2": {"coco": 128, "flickr30k": 128}}


def paper_k(model, dataset: str) -> int:
    from blip_jax.blip2_api import Blip2Model

    return PAPER_K["blip2" if isinstance(model, Blip2Model) else "blip"].get(dataset, 128)


def texts_of(records: list[dict], max_words: int):
    """(cleaned texts, txt2img [n_txt], img2txt [[text ids] per image])."""
    texts, txt2img, img2txt = [], [], []
    for i, record in enumerate(records):
        captions = record.get("captions") or [record["caption"]]
        img2txt.append(list(range(len(texts), len(texts) + len(captions))))
        texts += [pre_caption(c, max_words) for c in captions]
        txt2img += [i] * len(captions)
    return texts, np.asarray(txt2img), img2txt


def rerank(sim: np.ndarray, itm: np.ndarray, topk: np.ndarray) -> np.ndarray:
    """[n_q, n_c] scores: -100 everywhere, ITM logit + similarity at each query's top-k (LAVIS)."""
    return scatter_topk_scores(sim.shape[1], topk, itm + np.take_along_axis(sim, topk, axis=1))


def pairs_by_image(topk_img: np.ndarray, n_images: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Text -> image ITM pairs (pair p = text p // k, image topk_img.ravel()[p]) grouped by image:
    (image of each pair, pairs ordered by image, bounds: image i's pairs are order[bounds[i]:bounds[i+1]]).
    Run by image, an image's cross-attention keys/values are computed once for all its pairs."""
    pair_image = topk_img.ravel()
    order = np.argsort(pair_image, kind="stable")
    return pair_image, order, np.searchsorted(pair_image[order], np.arange(n_images + 1))


def evaluate(model, cfg, workdir, *, progress: bool = True) -> dict:
    start_time = time.time()
    records = load_records(cfg.data)
    texts, txt2img, img2txt = texts_of(records, cfg.max_words)
    shard = cfg.shard_size

    def embed_images(a, b):
        pixels, ok, _ = load_pixels(model, [records[i]["image"] for i in range(a, b)])
        embeds = model._image_embeds(pixels)
        return {"embeds": np.asarray(embeds), "features": model.features_of(embeds), "ok": ok}

    images = runner.run_sharded(workdir, "image_embeddings", len(records), embed_images, shard_size=shard,
                                progress=progress)
    text_feats = runner.run_sharded(workdir, "text_features", len(texts),
                                    lambda a, b: {"features": model.text_features(texts[a:b])},
                                    shard_size=shard, progress=progress)["features"]
    sim = model.similarity(images["features"], text_feats).astype(np.float32)
    k = cfg.k if cfg.k > 0 else paper_k(model, cfg.dataset)
    k_txt, k_img = min(k, len(texts)), min(k, len(records))
    topk_txt = topk_candidates(sim, k_txt)[0]
    topk_img = topk_candidates(sim.T, k_img)[0]
    queries = max(1, cfg.itm_shard_pairs // max(k_txt, k_img))

    def itm_i2t(a, b):
        index = np.repeat(np.arange(a, b), k_txt)
        logits = model.match_logits(images["embeds"], index, [texts[j] for j in topk_txt[a:b].ravel()])
        return {"itm": logits.reshape(b - a, k_txt)}

    pair_image, by_image, bounds = pairs_by_image(topk_img, len(records))

    def itm_t2i(a, b):
        pairs = by_image[bounds[a]:bounds[b]]
        logits = model.match_logits(images["embeds"], pair_image[pairs], [texts[p // k_img] for p in pairs])
        return {"pair": pairs, "itm": logits}

    i2t = runner.run_sharded(workdir, "itm_i2t", len(records), itm_i2t, shard_size=queries, progress=progress)
    images_per_shard = max(1, cfg.itm_shard_pairs * len(records) // max(1, len(pair_image)))
    t2i = runner.run_sharded(workdir, "itm_t2i_by_image", len(records), itm_t2i, shard_size=images_per_shard,
                             progress=progress)
    t2i_itm = np.empty(len(pair_image), np.float32)
    t2i_itm[t2i["pair"]] = t2i["itm"]
    score_i2t = rerank(sim, i2t["itm"], topk_txt)
    score_t2i = rerank(sim.T.copy(), t2i_itm.reshape(len(texts), k_img), topk_img)

    ok = images["ok"].astype(bool)  # unreadable images and their captions are left out, and reported
    keep_txt = ok[txt2img]
    new_img = np.cumsum(ok) - 1
    new_txt = np.cumsum(keep_txt) - 1
    img2txt_kept = [[int(new_txt[t]) for t in ts] for i, ts in enumerate(img2txt) if ok[i]]
    txt2img_kept = new_img[txt2img[keep_txt]]

    def subset(m_i2t, m_t2i):
        return recall_at_k(m_i2t[ok][:, keep_txt], m_t2i[keep_txt][:, ok], txt2img_kept, img2txt_kept)

    metrics = {**subset(score_i2t, score_t2i), "itc_only": subset(sim, sim.T), "k": k,
               "images": int(ok.sum()), "texts": int(keep_txt.sum()), "unreadable_images": int((~ok).sum()),
               "itm_pairs": int(len(records) * k_txt + len(texts) * k_img)}
    predictions, gallery = [], []
    for i, record in enumerate(records):
        best = np.argsort(-score_i2t[i], kind="stable")[:5]
        predictions.append({"image_id": record.get("image_id", str(i)), "image": image_name(record), "readable": bool(ok[i]),
                            "top5_texts": [texts[j] for j in best], "correct_at_1": bool(best[0] in img2txt[i])})
        if len(gallery) < cfg.gallery and ok[i] and isinstance(record["image"], str):
            gallery.append({"image": record["image"], "lines": [("✓ " if j in img2txt[i] else "✗ ") + texts[j]
                                                                for j in best[:3]]})
    settings = {"k": k, "dataset": cfg.dataset, "max_words": cfg.max_words, "data": dict(cfg.data)}
    return runner.write_outputs(workdir, "retrieval", metrics, settings, predictions, gallery,
                                time.time() - start_time)
