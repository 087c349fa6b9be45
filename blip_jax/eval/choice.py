"""Multiple choice and binary classification by candidate ranking (ScienceQA-IMG, IconQA, A-OKVQA
MC, VSR, Hateful Memes): InstructBLIP / BLIP-2 score every candidate answer by its summed LM
log-likelihood after the prompt (`model.rank`) and pick the best; accuracy, or ROC AUC of
log p(yes) - log p(no) for binary tasks (`cfg.metric="auc"`, Hateful Memes as the paper reports).

Prompts come from `cfg.template` with {question}, {options} (the choices joined by ", ") and
{context} (a record's "context", e.g. ScienceQA's hint).
"""

from __future__ import annotations

import time

import numpy as np

from blip_jax.eval import runner
from blip_jax.eval.choice_metrics import multiple_choice_accuracy, roc_auc
from blip_jax.eval.inputs import image_name, load_pixels, load_records

METRICS = ("accuracy", "auc")


def prompt_of(template: str, record: dict) -> str:
    return template.format(question=record.get("question", ""), options=", ".join(record["choices"]),
                           context=record.get("context", "")).strip()


def evaluate(model, cfg, workdir, *, progress: bool = True) -> dict:
    start_time = time.time()
    if cfg.metric not in METRICS:
        raise ValueError(f"unknown choice metric {cfg.metric!r}; use one of {', '.join(METRICS)}")
    records = load_records(cfg.data)
    missing = [i for i, r in enumerate(records) if not r.get("choices")]
    if missing:
        raise ValueError(f"{len(missing)} records have no 'choices' (first: {records[missing[0]]})")

    def score(a, b):
        pixels, ok, reasons = load_pixels(model, [records[i]["image"] for i in range(a, b)])
        bad = iter(reasons)
        out = []
        for i, good in zip(range(a, b), ok):
            r = records[i]
            row = {"question_id": str(r.get("question_id", i)), "image": image_name(r)}
            if good:  # candidates differ per question: one ranking call each
                scores = model.rank(pixels[i - a: i - a + 1], [prompt_of(cfg.template, r)], r["choices"])[0]
                row.update(scores=[float(s) for s in scores], prediction=r["choices"][int(np.argmax(scores))])
            else:
                row["error"] = next(bad)
            out.append(row)
        return out

    predictions = runner.run_sharded(workdir, "choices", len(records), score, shard_size=cfg.shard_size,
                                     progress=progress)
    scored = [(p, r) for p, r in zip(predictions, records) if "scores" in p and "answer_index" in r]
    if cfg.metric == "auc":  # choices (positive, negative): score = log p(positive) - log p(negative)
        metrics = {"auc": roc_auc(np.array([int(r["answer_index"]) == 0 for _, r in scored], np.int32),
                                  np.array([p["scores"][0] - p["scores"][1] for p, _ in scored]))} if scored else {}
    else:
        metrics = {"accuracy": multiple_choice_accuracy([p["scores"] for p, _ in scored],
                                               [int(r["answer_index"]) for _, r in scored])} if scored else {}
    metrics.update(questions=len(scored), unreadable_images=sum("error" in p for p in predictions))
    gallery = [{"image": p["image"], "lines": [prompt_of(cfg.template, r), f"→ {p['prediction']}",
                                               f"answer: {r['choices'][int(r['answer_index'])]}"]}
               for p, r in scored[: cfg.gallery] if p["image"]]
    settings = {"template": cfg.template, "metric": cfg.metric, "data": dict(cfg.data)}
    return runner.write_outputs(workdir, "choice", metrics, settings, predictions, gallery, time.time() - start_time)
