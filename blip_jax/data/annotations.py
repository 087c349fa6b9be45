"""Annotation files plus an image folder, in the layouts vision-language datasets ship in.

    AnnotationSource("coco_karpathy_train.json", image_root="coco/images")   # layout detected

Layouts (`layout="auto"` picks from the file's shape):

    lavis      a JSON list of per-record dicts, as LAVIS stores COCO / Flickr30k (Karpathy splits),
               NoCaps, VQAv2, OK-VQA, A-OKVQA, GQA and Visual Genome annotations: "image" plus
               "caption" (a string, or a list for evaluation splits) or "question" + "answer";
               also LLaVA-Instruct-150K's entries ("image" + "conversations" of human / gpt
               turns): each human turn and the gpt reply to it is one instruction / output record;
               and NLVR2's ("images": [left, right], "sentence", "label": "True" | "False"),
               records with "image", "image1", "text" and label 1 (true) or 0
    jsonl      the same records one per line (a malformed line is skipped and counted)
    karpathy   Karpathy's dataset_coco.json / dataset_flickr30k.json ({"images": [{"filepath",
               "filename", "sentences", "split"}]}); `split="train"` includes "restval", as the
               papers' 113k-image COCO train split does
    coco       COCO's own captions_*.json ({"images", "annotations"}), also NoCaps' release
    vqa        VQAv2 / OK-VQA questions file (+ `annotations=` answers file), images by
               `image_pattern` (default "COCO_{split}2014_{image_id:012d}.jpg")
    gqa        GQA's questions file ({question_id: {"imageId", "question", "answer"}})
    vg_regions Visual Genome region_descriptions.json (each region phrase is a caption)

Every layout becomes the raw records of `records.py`. With `expand_captions=True` (training)
there is one record per caption; otherwise an image's captions stay together under "captions"
(evaluation). VQA answers carry LAVIS's weights: each distinct answer weighs its share of the
annotators' answers (entries of `"dataset": "vg"`, BLIP's Visual Genome QA, 0.2 each). Entries without an image or without any text are counted as
"malformed_json" in `skipped` and left out, those whose image path resolves outside `image_root`
as "outside_root" (`paths.py`: never opened); image files are only opened in the pipeline. Text
that is not UTF-8 is read with surrogateescape, so the pipeline counts it as bad_text (one record,
not the file).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

from blip_jax.data.paths import Root
from blip_jax.data.records import add_counts

LAYOUTS = ("lavis", "jsonl", "karpathy", "coco", "vqa", "gqa", "vg_regions")
_IMAGE_KEYS = ("image", "image_path", "file_name", "filename", "img_path")
_ID_KEYS = ("image_id", "img_id", "id")


def detect_layout(path: Path, data) -> str:
    """The layout of an already-parsed annotation file (`data` is None for JSON Lines)."""
    if data is None:
        return "jsonl"
    if isinstance(data, list):
        return "vg_regions" if data and isinstance(data[0], dict) and "regions" in data[0] else "lavis"
    if isinstance(data, dict):
        if "questions" in data:
            return "vqa"
        images = data.get("images")
        if isinstance(images, list) and images and isinstance(images[0], dict) and "sentences" in images[0]:
            return "karpathy"
        if "annotations" in data and "images" in data:
            return "coco"
        first = next(iter(data.values()), None)
        if isinstance(first, dict) and "imageId" in first:
            return "gqa"
    raise ValueError(f"cannot tell the annotation layout of {path}; pass layout= one of {', '.join(LAYOUTS)}")


VG_ANSWER_WEIGHT = 0.2  # BLIP's vqa_dataset: a Visual Genome QA answer's weight in the VQA loss


def _text_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _answers(value) -> tuple[list, list[float]]:
    """Distinct answers and LAVIS's weights (each answer's share of all given answers)."""
    given = [a.get("answer") if isinstance(a, dict) else a for a in _text_list(value)]
    counts = Counter(a for a in given if isinstance(a, str))
    bad = [a for a in given if not isinstance(a, str)]  # kept so the transform reports bad_text
    total = len(given)
    return list(counts) + bad, [n / total for n in counts.values()] + [1 / total] * len(bad)


def _common(entry: dict, image: str, task: str) -> dict:
    out = {"image": image, "task": task}
    for key in _ID_KEYS:
        if key in entry:
            out["image_id"] = str(entry[key])
            break
    if "question_id" in entry:
        out["question_id"] = str(entry["question_id"])
    return out


def _from_entry(entry, expand: bool) -> list[dict] | None:
    """Records of one LAVIS-style entry; None when it has no image or no text."""
    if not isinstance(entry, dict):
        return None
    images = entry.get("images")
    if isinstance(images, list) and len(images) == 2 and all(isinstance(i, str) for i in images):
        return _nlvr(entry, images)
    image = next((entry[k] for k in _IMAGE_KEYS if isinstance(entry.get(k), str)), None)
    if image is None:
        return None
    if "conversations" in entry:
        return _conversation(entry, image) or None
    if "question" in entry:
        record = _common(entry, image, "vqa")
        record["question"] = entry["question"]
        if "choices" in entry:  # multiple choice (A-OKVQA, ScienceQA-style)
            record["choices"] = entry["choices"]
            index = entry.get("answer_index", entry.get("correct_choice_idx"))  # A-OKVQA names it so
            if index is not None:
                record["answer_index"] = index
        answers = entry.get("answer", entry.get("answers", entry.get("direct_answers")))
        if answers is not None:
            record["answers"], record["answer_weights"] = _answers(answers)
            if entry.get("dataset") == "vg":  # BLIP weighs Visual Genome QA answers 0.2 each
                record["answer_weights"] = [VG_ANSWER_WEIGHT] * len(record["answers"])
            # every annotator's answer, repeats kept: what VQA accuracy counts agreement over
            record["all_answers"] = [a.get("answer") if isinstance(a, dict) else a for a in _text_list(answers)]
        return [record]
    captions = _text_list(entry.get("caption", entry.get("captions", entry.get("text"))))
    if not captions:
        return None
    record = _common(entry, image, "caption")
    if expand:
        return [{**record, "caption": c} for c in captions]
    return [{**record, "captions": captions}]


NLVR_LABELS = {"true": 1, "false": 0}


def _nlvr(entry: dict, images: list[str]) -> list[dict] | None:
    """NLVR2: a statement about two images and whether it is true (LAVIS's nlvr annotation files)."""
    label = str(entry.get("label", "")).strip().lower()
    if label not in NLVR_LABELS or not isinstance(entry.get("sentence"), str):
        return None
    record = _common(entry, images[0], "nlvr")
    record.update(image1=images[1], text=entry["sentence"], label=NLVR_LABELS[label])
    return [record]


def _conversation(entry: dict, image: str) -> list[dict]:
    """LLaVA-Instruct: (human turn, gpt reply) pairs as instruction records, the <image> marker removed
    (InstructBLIP shows the image through the queries, not a token)."""
    turns = [t for t in entry["conversations"] if isinstance(t, dict) and isinstance(t.get("value"), str)]
    out = []
    for ask, reply in zip(turns, turns[1:]):
        if ask.get("from") == "human" and reply.get("from") == "gpt":
            instruction = ask["value"].replace("<image>", "").strip()
            out.append({**_common(entry, image, "dialogue"), "instruction": instruction, "output": reply["value"]})
    return out


def _karpathy(data: dict, split: str) -> list:
    keep = {"train", "restval"} if split == "train" else {split}
    entries = []
    for im in data["images"]:
        if im.get("split") not in keep:
            continue
        image = str(Path(im.get("filepath", "")) / im["filename"])
        ident = im.get("cocoid", im.get("imgid"))
        entries.append({"image": image, "image_id": ident, "caption": [s.get("raw") for s in im["sentences"]]})
    return entries


def _coco(data: dict) -> list:
    captions: dict = {}
    for ann in data["annotations"]:
        captions.setdefault(ann.get("image_id"), []).append(ann.get("caption"))
    return [{"image": im.get("file_name"), "image_id": im.get("id"), "caption": captions.get(im.get("id"), [])}
            for im in data["images"]]


def _vqa(data: dict, annotations: str, image_pattern: str, split: str) -> list:
    answers = {}
    if annotations:
        with open(annotations, encoding="utf-8") as f:
            answers = {a["question_id"]: a.get("answers") for a in json.load(f)["annotations"]}
    entries = []
    for q in data["questions"]:
        entry = {"image": image_pattern.format(image_id=q["image_id"], split=split), "image_id": q["image_id"],
                 "question": q.get("question"), "question_id": q["question_id"]}
        if q["question_id"] in answers:
            entry["answer"] = answers[q["question_id"]]
        entries.append(entry)
    return entries


def _gqa(data: dict) -> list:
    return [{"image": f"{q['imageId']}.jpg", "image_id": q["imageId"], "question": q.get("question"),
             "question_id": qid, "answer": q.get("answer")} for qid, q in data.items()]


def _vg_regions(data: list) -> list:
    return [{"image": f"{im['id']}.jpg", "image_id": im["id"], "caption": [r.get("phrase") for r in im["regions"]]}
            for im in data if im.get("regions")]


class AnnotationSource:
    """Grain random-access source over an annotation file and an image folder (module docstring)."""

    def __init__(self, path: str | os.PathLike, *, image_root: str | os.PathLike = "", layout: str = "auto",
                 split: str = "train", expand_captions: bool = True, annotations: str = "",
                 image_pattern: str = "COCO_{split}2014_{image_id:012d}.jpg", task: str = ""):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"annotation file not found: {self.path}")
        self.image_root = Path(image_root) if image_root else self.path.parent
        if not self.image_root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.image_root}")
        self.skipped: dict[str, int] = {}
        entries, self.layout = self._entries(layout, split, annotations, image_pattern)
        root = Root(self.image_root)
        self._records = []
        for entry in entries:
            records = _from_entry(entry, expand_captions)
            if records is None:
                add_counts(self.skipped, {"malformed_json": 1})
                continue
            image = root.resolve(records[0]["image"])
            second = root.resolve(records[0]["image1"]) if "image1" in records[0] else None  # NLVR2's right image
            if image is None or ("image1" in records[0] and second is None):  # never opened (blip_jax.data.paths)
                add_counts(self.skipped, {"outside_root": len(records)})
                continue
            for r in records:
                r["image"] = image
                if second is not None:
                    r["image1"] = second
                if task:
                    r["task"] = task
            self._records.extend(records)
        if not self._records:
            raise ValueError(f"no usable records in {self.path} (layout {self.layout}, split {split!r}); "
                             f"skipped: {self.skipped or 'none'}")

    def _entries(self, layout: str, split: str, annotations: str, image_pattern: str) -> tuple[list, str]:
        if layout not in ("auto",) + LAYOUTS:
            raise ValueError(f"unknown annotation layout {layout!r}; use auto or one of {', '.join(LAYOUTS)}")
        if layout == "jsonl" or (layout == "auto" and self.path.suffix == ".jsonl"):
            return self._jsonl(), "jsonl"
        with open(self.path, encoding="utf-8", errors="surrogateescape") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{self.path} is not valid JSON ({e}); JSON Lines files need the .jsonl "
                                 "suffix or layout='jsonl'") from e
        layout = detect_layout(self.path, data) if layout == "auto" else layout
        if layout == "karpathy":
            return _karpathy(data, split), layout
        if layout == "coco":
            return _coco(data), layout
        if layout == "vqa":
            return _vqa(data, annotations, image_pattern, split), layout
        if layout == "gqa":
            return _gqa(data), layout
        if layout == "vg_regions":
            return _vg_regions(data), layout
        if not isinstance(data, list):
            raise ValueError(f"layout 'lavis' needs a JSON list of records, {self.path} holds a {type(data).__name__}")
        return data, layout

    def _jsonl(self) -> list:
        entries = []
        with open(self.path, encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    entries.append(json.loads(line))
                except json.JSONDecodeError:
                    add_counts(self.skipped, {"malformed_json": 1})
        return entries

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict:
        return dict(self._records[int(index)])

    def __repr__(self) -> str:
        return (f"AnnotationSource({str(self.path)!r}, layout={self.layout!r}, records={len(self)}, "
                f"image_root={str(self.image_root)!r})")
