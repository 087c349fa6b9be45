"""NLVR2: is each statement true of its image pair? BLIP's NLVR model (`model.nlvr_logits`) classifies
every (left, right, statement) record of a split; accuracy as the paper reports it (dev, test-P),
also per label. A record whose either image cannot be read is left out and counted.
"""

from __future__ import annotations

import time

import numpy as np

from blip_jax.eval import runner
from blip_jax.eval.inputs import image_name, load_pixels, load_records


def evaluate(model, cfg, workdir, *, progress: bool = True) -> dict:
    start_time = time.time()
    records = load_records(cfg.data)
    missing = [i for i, r in enumerate(records) if "image1" not in r or "label" not in r]
    if missing:
        raise ValueError(f"{len(missing)} records are not NLVR2 statements about two images with a label "
                         f"(first: {records[missing[0]]})")

    def classify(a, b):
        left, ok0, bad0 = load_pixels(model, [records[i]["image"] for i in range(a, b)])
        right, ok1, bad1 = load_pixels(model, [records[i]["image1"] for i in range(a, b)])
        ok = ok0 & ok1
        logits = iter(model.nlvr_logits(left[ok], right[ok], [records[i]["text"] for i in range(a, b) if ok[i - a]])
                      if ok.any() else [])
        reasons0, reasons1 = iter(bad0), iter(bad1)
        out = []
        for i, good0, good1 in zip(range(a, b), ok0, ok1):
            r = records[i]
            row = {"id": str(r.get("question_id", r.get("image_id", i))), "image": image_name(r),
                   "image1": r["image1"] if isinstance(r["image1"], str) else "", "text": r["text"]}
            errors = [next(reasons0) if not good0 else None, next(reasons1) if not good1 else None]
            if good0 and good1:
                scores = next(logits)
                row.update(logits=[float(s) for s in scores], prediction=int(np.argmax(scores)))
            else:
                row["error"] = "; ".join(e for e in errors if e)
            out.append(row)
        return out

    predictions = runner.run_sharded(workdir, "nlvr", len(records), classify, shard_size=cfg.shard_size,
                                     progress=progress)
    scored = [(p, r) for p, r in zip(predictions, records) if "prediction" in p]
    right = np.array([p["prediction"] == int(r["label"]) for p, r in scored], bool)
    labels = np.array([int(r["label"]) for _, r in scored], int)
    metrics = {"accuracy": round(100.0 * float(right.mean()), 2) if scored else None,
               "accuracy_true": round(100.0 * float(right[labels == 1].mean()), 2) if (labels == 1).any() else None,
               "accuracy_false": round(100.0 * float(right[labels == 0].mean()), 2) if (labels == 0).any() else None,
               "statements": len(scored), "unreadable_images": len(predictions) - len(scored)}
    for p, r in scored:
        p["label"] = int(r["label"])
    gallery = [{"image": p["image"], "lines": [p["text"], f"→ {'true' if p['prediction'] else 'false'}",
                                               f"label: {'true' if p['label'] else 'false'}"]}
               for p, _ in scored[: cfg.gallery] if p["image"]]
    settings = {"data": dict(cfg.data)}
    return runner.write_outputs(workdir, "nlvr", metrics, settings, predictions, gallery, time.time() - start_time)
