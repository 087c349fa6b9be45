"""Visual question answering (VQAv2, OK-VQA, GQA, VizWiz, TextVQA).

`generate` mode: each family's zero-shot prompt and settings (`model.vqa`: BLIP's answer decoder
with beam 3; BLIP-2 "Question: {} Answer:" (OPT) / "Question: {} Short answer:" (Flan-T5,
InstructBLIP), beam 5, <= 10 tokens). `rank` mode (BLIP): the answer decoder scores a candidate
answer list (`cfg.answer_list`, a JSON list) and picks the most likely (`model.vqa_rank`).
Scored with the official VQA accuracy (answer normalisation, min(1, matches / 3) over annotator
subsets), or exact match after the same normalisation for GQA (`cfg.metric`).
"""

from __future__ import annotations

import json
import time

from blip_jax.eval import runner
from blip_jax.eval.inputs import image_name, load_pixels, load_records
from blip_jax.eval.vqa_metrics import exact_match_accuracy, score_vqa

METRICS = ("vqa", "exact_match")


def evaluate(model, cfg, workdir, *, progress: bool = True) -> dict:
    start_time = time.time()
    if cfg.metric not in METRICS:
        raise ValueError(f"unknown VQA metric {cfg.metric!r}; use one of {', '.join(METRICS)}")
    records = load_records(cfg.data)
    options = dict(cfg.generation)
    answer_list = None
    if cfg.mode == "rank":
        with open(cfg.answer_list, encoding="utf-8") as f:
            answer_list = json.load(f)
    elif cfg.mode != "generate":
        raise ValueError(f"unknown VQA mode {cfg.mode!r}; use generate or rank")

    def answer(a, b):
        pixels, ok, reasons = load_pixels(model, [records[i]["image"] for i in range(a, b)])
        questions = [records[i]["question"] for i in range(a, b) if ok[i - a]]
        if not questions:
            answers = iter([])
        elif answer_list is not None:
            answers = iter(model.vqa_rank(pixels[ok], questions, answer_list, k=cfg.rank_k))
        else:
            answers = iter(model.vqa(pixels[ok], questions, **options))
        bad = iter(reasons)
        out = []
        for i, good in zip(range(a, b), ok):
            r = records[i]
            row = {"question_id": str(r.get("question_id", i)), "image": image_name(r), "question": r["question"]}
            row.update({"answer": next(answers)} if good else {"error": next(bad)})
            out.append(row)
        return out

    predictions = runner.run_sharded(workdir, "answers", len(records), answer, shard_size=cfg.shard_size,
                                     progress=progress)
    answered = [(p, r) for p, r in zip(predictions, records) if "answer" in p]
    annotated = [(p, r) for p, r in answered if r.get("answers")]
    metrics = {}
    predicted = {p["question_id"]: p["answer"] for p, _ in annotated}
    if annotated and cfg.metric == "exact_match":  # GQA: one answer per question
        metrics = exact_match_accuracy(predicted, {p["question_id"]: r["answers"][0] for p, r in annotated})
    elif annotated:
        scored = score_vqa(predicted, {p["question_id"]: r.get("all_answers") or r["answers"] for p, r in annotated})
        metrics = {k: v for k, v in scored.items() if not k.startswith("per_question")}
        for p in predictions:
            if p["question_id"] in scored["per_question_unrounded"]:
                p["accuracy"] = scored["per_question_unrounded"][p["question_id"]]
    metrics.update(questions=len(answered), annotated=len(annotated),
                   unreadable_images=len(predictions) - len(answered))
    gallery = [{"image": p["image"], "lines": [f"Q: {p['question']}", f"A: {p['answer']}",
                                               f"refs: {', '.join(r.get('answers', [])[:3])}"]}
               for p, r in answered[: cfg.gallery] if p["image"]]
    settings = {"mode": cfg.mode, "metric": cfg.metric, "generation": options, "data": dict(cfg.data)}
    return runner.write_outputs(workdir, "vqa", metrics, settings, predictions, gallery, time.time() - start_time)

