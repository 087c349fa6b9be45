"""`blip-jax score {caption,vqa,retrieval,choice} --predictions P --annotations A`: the evaluation
jobs' metric code on predictions made elsewhere.

    caption    P: [{"image_id", "caption"}] (COCO results format; JSON or JSON Lines)
               A: any caption layout of `blip_jax.data.annotations` (COCO captions_*.json, LAVIS,
                  Karpathy with --split); references are grouped by image id (COCO files need
                  only their annotations' ids and captions, no image file names)
    vqa        P: [{"question_id", "answer"}] (VQA results format)
               A: the official VQA annotations file ({"annotations": [{"question_id", "answers"}]})
                  or LAVIS / JSON Lines records with "question_id" and "answer" lists; --metric
                  exact_match for GQA; --variant lavis for the older vqaEval.py rule LAVIS
                  reports with (default: the current one, `blip_jax.eval.vqa_metrics`)
    retrieval  P: .npz with scores_i2t [n_images, n_texts] and scores_t2i [n_texts, n_images]
               A: an evaluation split with every image's captions (the matrices' order)
    choice     P: [{"question_id", "scores": [...]} or {"question_id", "prediction": str}]
               A: records with "question_id", "choices", "answer_index"
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

KINDS = ("caption", "vqa", "retrieval", "choice")


def read_records(path: str | Path) -> list:
    """A JSON list (or {"annotations": [...]}) or JSON Lines file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    data = json.loads(text)
    return data["annotations"] if isinstance(data, dict) and "annotations" in data else data


def _annotation_records(path: str | Path, split: str) -> list[dict]:
    from blip_jax.data.annotations import AnnotationSource

    source = AnnotationSource(path, split=split, expand_captions=False)
    return [source[i] for i in range(len(source))]


def _caption_references(path: str | Path, split: str) -> dict:
    """image id (str) -> reference captions. A COCO captions file is read by its annotations alone
    (scoring needs ids and captions, not image files); other layouts go through the annotation reader."""
    data = json.loads(Path(path).read_text(encoding="utf-8")) if Path(path).suffix == ".json" else None
    if isinstance(data, dict) and isinstance(data.get("annotations"), list) and data["annotations"] and all(
            isinstance(a, dict) and "image_id" in a and "caption" in a for a in data["annotations"]):
        refs: dict = {}
        for a in data["annotations"]:
            refs.setdefault(str(a["image_id"]), []).append(a["caption"])
        return refs
    return {str(r["image_id"]): r["captions"] for r in _annotation_records(path, split) if "captions" in r}


def score(kind: str, predictions: str | Path, annotations: str | Path, *, split: str = "test",
          metric: str = "vqa", variant: str = "official") -> dict:
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; use one of {', '.join(KINDS)}")
    if kind == "caption":
        from blip_jax.eval.caption_metrics import score_captions

        preds = {str(p["image_id"]): p["caption"] for p in read_records(predictions)}
        if not Path(annotations).is_file():
            raise FileNotFoundError(f"file not found: {annotations}")
        refs = _caption_references(annotations, split)
        missing = sorted(set(preds) - set(refs))
        if missing:
            raise ValueError(f"{len(missing)} predicted image ids have no references (first: {missing[:3]})")
        return score_captions(preds, {i: refs[i] for i in preds})
    if kind == "vqa":
        from blip_jax.eval.vqa_metrics import exact_match_accuracy, score_vqa

        preds = {str(p["question_id"]): p["answer"] for p in read_records(predictions)}
        answers = {}
        for a in read_records(annotations):
            given = a.get("answers", a.get("answer"))
            given = [g["answer"] if isinstance(g, dict) else g for g in (given if isinstance(given, list) else [given])]
            answers[str(a["question_id"])] = given
        if metric == "exact_match":
            return exact_match_accuracy(preds, {q: answers[q][0] for q in preds})
        result = score_vqa(preds, {q: answers[q] for q in preds}, variant=variant)
        return {k: v for k, v in result.items() if not k.startswith("per_question")}
    if kind == "retrieval":
        from blip_jax.eval.retrieval import texts_of
        from blip_jax.eval.retrieval_metrics import recall_at_k

        with np.load(predictions) as data:
            i2t, t2i = data["scores_i2t"], data["scores_t2i"]
        _, txt2img, img2txt = texts_of(_annotation_records(annotations, split), 10 ** 9)
        if i2t.shape != (len(img2txt), len(txt2img)) or t2i.shape != (len(txt2img), len(img2txt)):
            raise ValueError(f"score shapes {i2t.shape} / {t2i.shape} do not match the annotations' "
                             f"{len(img2txt)} images and {len(txt2img)} texts")
        return recall_at_k(i2t, t2i, txt2img, img2txt)
    from blip_jax.eval.choice_metrics import multiple_choice_accuracy

    records = {str(r["question_id"]): r for r in read_records(annotations)}
    scores, labels = [], []
    for p in read_records(predictions):
        r = records[str(p["question_id"])]
        if "scores" in p:
            scores.append(p["scores"])
        else:
            scores.append([float(c == p["prediction"]) for c in r["choices"]])
        labels.append(int(r["answer_index"]))
    return {"accuracy": multiple_choice_accuracy(scores, labels), "questions": len(labels)}
