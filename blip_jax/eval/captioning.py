"""Captioning (COCO Karpathy test, NoCaps val, Flickr30k) with each family's paper settings, scored
by the COCO caption metrics (`caption_metrics`).

BLIP: prompt "a picture of ", beam 3, 5-20 new tokens, the prompt removed before scoring (LAVIS);
BLIP-2: beam 5, 8-30 new tokens after "a photo of"; InstructBLIP: its instruction "A short image
description:". `cfg.prompt` and `cfg.generation` override them.
"""

from __future__ import annotations

import time


from blip_jax.eval import runner
from blip_jax.eval.caption_metrics import score_captions
from blip_jax.eval.inputs import image_name, load_pixels, load_records

BLIP_PROMPT = "a picture of "  # BLIP's captioning prompt (LAVIS caption_coco)


def _is_blip2(model) -> bool:
    from blip_jax.blip2_api import Blip2Model

    return isinstance(model, Blip2Model)


def evaluate(model, cfg, workdir, *, progress: bool = True) -> dict:
    start_time = time.time()
    records = load_records(cfg.data)
    prompt = cfg.prompt if cfg.prompt is not None else (None if _is_blip2(model) else BLIP_PROMPT)
    options = dict(cfg.generation)

    def caption(a, b):
        pixels, ok, reasons = load_pixels(model, [records[i]["image"] for i in range(a, b)])
        texts = iter(model.caption(pixels[ok], prompt=prompt, **options) if ok.any() else [])
        bad = iter(reasons)
        out = []
        for i, good in zip(range(a, b), ok):
            row = {"image_id": str(records[i].get("image_id", i)), "image": image_name(records[i])}
            if good:
                text = next(texts)
                if prompt and not _is_blip2(model) and text.lower().startswith(prompt.strip().lower()):
                    text = text[len(prompt.strip()):].strip()  # LAVIS scores the caption without its prompt
                row["caption"] = text
            else:
                row["error"] = next(bad)
            out.append(row)
        return out

    predictions = runner.run_sharded(workdir, "captions", len(records), caption, shard_size=cfg.shard_size,
                                     progress=progress)
    scored = [(p, r) for p, r in zip(predictions, records) if "caption" in p]
    metrics = score_captions({p["image_id"]: p["caption"] for p, _ in scored},
                             {p["image_id"]: list(r.get("captions") or [r["caption"]]) for p, r in scored})
    metrics["images"] = len(scored)
    metrics["unreadable_images"] = len(predictions) - len(scored)
    for p, r in scored:
        p["references"] = list(r.get("captions") or [r["caption"]])
    gallery = [{"image": p["image"], "lines": [p["caption"], *[f"ref: {t}" for t in p["references"][:2]]]}
               for p, _ in scored[: cfg.gallery] if p["image"]]
    settings = {"prompt": prompt, "generation": options, "data": dict(cfg.data),
                "family": "blip2" if _is_blip2(model) else "blip"}
    return runner.write_outputs(workdir, "caption", metrics, settings, predictions, gallery, time.time() - start_time)


