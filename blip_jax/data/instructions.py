"""Instruction templates per task family (InstructBLIP's data format), kept as data.

`instruction_templates.json` beside this file holds 10-13 templates per family, each family
saying where its templates come from (the InstructBLIP paper's appendix for captioning, VQA and
question generation; the others are written in the same style). `instruct(record, family, rng)`
turns a raw record into an (instruction, output) pair with a template drawn by `rng`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from blip_jax.data.records import BadRecord

TEMPLATES_FILE = Path(__file__).with_name("instruction_templates.json")
TEMPLATES: dict[str, list[str]] = {
    family: entry["templates"]
    for family, entry in json.loads(TEMPLATES_FILE.read_text(encoding="utf-8")).items() if not family.startswith("_")
}
FAMILIES = tuple(TEMPLATES)
# A record's `task` -> the family whose templates it uses when the config names none.
DEFAULT_FAMILY = {"caption": "caption", "vqa": "vqa_short", "multiple_choice": "multiple_choice",
                  "dialogue": "dialogue"}
_ANSWERED = ("vqa_short", "vqa_long", "ocr_vqa", "knowledge_vqa", "reasoning")


def family_of(record: dict, family: str = "") -> str:
    """The template family for `record`: its source's (`instruction_family`, a mixture tag), else
    `family` if given, else one derived from its task."""
    family = record.get("instruction_family") or family or DEFAULT_FAMILY.get(record.get("task", ""), "")
    if not family:
        family = "vqa_short" if "question" in record else "caption"
    if family not in TEMPLATES:
        raise ValueError(f"unknown instruction family {family!r}; known: {', '.join(FAMILIES)}")
    return family


def sample_answer(record: dict, rng: np.random.Generator) -> str:
    """One of the record's answers, drawn by its answer weights (LAVIS's VQA training target)."""
    answers = record.get("answers") or ([record["answer"]] if record.get("answer") else None)  # one: synthetic
    if not answers:
        raise BadRecord("bad_text", f"no answers in record {record.get('question_id', '')}")
    weights = np.asarray(record.get("answer_weights") or [1.0] * len(answers), np.float64)
    return answers[int(rng.choice(len(answers), p=weights / weights.sum()))]


def instruct(record: dict, family: str, rng: np.random.Generator) -> tuple[str, str]:
    """(instruction, output) for `record` (already cleaned texts) under a random template of `family`.
    A record that already carries "instruction" and "output" (LLaVA-Instruct) is returned as it is,
    unless its source names a template family."""
    if "instruction" in record and "output" in record and not record.get("instruction_family"):
        return record["instruction"], record["output"]
    family = family_of(record, family)
    templates = TEMPLATES[family]
    template = templates[int(rng.integers(len(templates)))]
    if family == "caption":
        return template, record["caption"]
    if family == "vqg":
        return template.format(answer=sample_answer(record, rng)), record["question"]
    if family == "multiple_choice":
        choices = record.get("choices")
        if not choices or not 0 <= int(record.get("answer_index", -1)) < len(choices):
            raise BadRecord("bad_text", "a multiple-choice record needs choices and a valid answer_index")
        options = ", ".join(choices)
        return template.format(question=record["question"], options=options), choices[int(record["answer_index"])]
    if family == "dialogue":
        return (template.format(context=record.get("context", ""), question=record["question"]).strip(),
                sample_answer(record, rng))
    assert family in _ANSWERED, family
    return template.format(question=record["question"]), sample_answer(record, rng)
