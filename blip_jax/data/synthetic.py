"""Deterministic synthetic image-text data: coloured shapes with captions, VQA pairs and instructions.

Training tests and demos need image-text data that is free, tiny, reproducible on any host and
actually learnable: the caption (and every answer) is a function of what is drawn. Record `i` of
`SyntheticShapes(seed=s)` is generated from `(s, i)` alone, so any process can read any record in
any order (a grain random-access source).

Each image shows 1-3 solid shapes (circle, square, triangle) in distinct quadrants of a lightly
noisy background whose colour no shape uses. Shapes are drawn without antialiasing, so every
shape pixel has exactly its palette colour. All texts are lowercase; `split_words` splits them into
words and punctuation marks, all of which are in `WORDS`.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw

COLORS = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "white": (250, 250, 250),
    "black": (10, 10, 10),
}
SHAPES = ("circle", "square", "triangle")
PLURALS = {shape: shape + "s" for shape in SHAPES}
COUNT_WORDS = ("zero", "one", "two", "three")
MAX_SHAPES = 3
NOISE = 12  # background pixels vary by at most this much per channel

CAPTION_INSTRUCTIONS = (
    "describe the image briefly.",
    "write a short caption for the image.",
    "what does the image show?",
)
VQA_INSTRUCTIONS = (
    "question: {question} short answer:",
    "{question} answer with one word.",
    "answer the question: {question}",
)
QUESTIONS = {
    "count": "how many {plural} are there?",
    "exists": "is there a {shape}?",
    "color": "what color is the {shape}?",
    "color_plural": "what color are the {plural}?",
}
_FIXED_WORDS = "a and , yes no"

_WORD_RE = re.compile(r"[a-z]+|[^\sa-z]")


def split_words(text: str) -> list[str]:
    """Words and single punctuation marks of `text`, in order (the unit `WORDS` lists)."""
    return _WORD_RE.findall(text.lower())


def _template_words(template: str) -> list[str]:
    return split_words(re.sub(r"\{\w+\}", " ", template))


WORDS = tuple(sorted(set(
    list(COLORS) + list(SHAPES) + list(PLURALS.values()) + list(COUNT_WORDS) + split_words(_FIXED_WORDS)
    + [w for t in CAPTION_INSTRUCTIONS + VQA_INSTRUCTIONS + tuple(QUESTIONS.values()) for w in _template_words(t)]
)))


class Shape(NamedTuple):
    kind: str  # one of SHAPES
    color: str  # one of COLORS


def canonical(shapes) -> list[Shape]:
    """Shapes in the canonical order (shape kind, then colour, both in module order)."""
    colors = list(COLORS)
    return sorted(shapes, key=lambda s: (SHAPES.index(s.kind), colors.index(s.color)))


def caption(shapes) -> str:
    """E.g. "a red circle and two blue squares": counted groups of identical shapes, canonical order."""
    groups: dict[Shape, int] = {}
    for shape in canonical(shapes):
        groups[shape] = groups.get(shape, 0) + 1
    phrases = [f"a {s.color} {s.kind}" if n == 1 else f"{COUNT_WORDS[n]} {s.color} {PLURALS[s.kind]}"
               for s, n in groups.items()]
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def question_answers(shapes) -> dict[str, list[tuple[str, str]]]:
    """Every (question, answer) pair about `shapes`, by family: count, exists, color."""
    families = {"count": [], "exists": [], "color": []}
    for kind in SHAPES:
        names = {"shape": kind, "plural": PLURALS[kind]}
        colors = {s.color for s in shapes if s.kind == kind}
        count = sum(s.kind == kind for s in shapes)
        families["count"].append((QUESTIONS["count"].format(**names), COUNT_WORDS[count]))
        families["exists"].append((QUESTIONS["exists"].format(**names), "yes" if count else "no"))
        if len(colors) == 1:  # asked only when the answer is a single colour
            question = QUESTIONS["color" if count == 1 else "color_plural"].format(**names)
            families["color"].append((question, colors.pop()))
    return families


def _scene(rng: np.random.Generator) -> tuple[list[Shape], str]:
    """1-MAX_SHAPES random shapes and a background colour that none of them uses."""
    n = int(rng.integers(1, MAX_SHAPES + 1))
    colors = list(COLORS)
    shapes = [Shape(SHAPES[rng.integers(len(SHAPES))], colors[rng.integers(len(colors))]) for _ in range(n)]
    free = [c for c in colors if c not in {s.color for s in shapes}]
    return shapes, free[rng.integers(len(free))]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: Shape, box: tuple[int, int, int, int]):
    x0, y0, x1, y1 = box
    fill = COLORS[shape.color]
    if shape.kind == "circle":
        draw.ellipse(box, fill=fill)
    elif shape.kind == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)


def render(shapes, background: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [size, size, 3]: each shape in its own quadrant, random size (50-90% of it) and offset,
    with a margin of at least one background pixel around it."""
    noise = rng.integers(-NOISE, NOISE + 1, size=(size, size, 3))
    pixels = np.clip(np.asarray(COLORS[background]) + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    cell = size // 2
    for shape, quadrant in zip(shapes, rng.permutation(4)):
        side = int(rng.integers(cell // 2, min(int(cell * 0.9), cell - 2) + 1))
        x = (quadrant % 2) * cell + int(rng.integers(1, cell - side))
        y = (quadrant // 2) * cell + int(rng.integers(1, cell - side))
        _draw_shape(draw, shape, (x, y, x + side - 1, y + side - 1))
    return np.asarray(image)


def _instruction(rng: np.random.Generator, text: str, question: str, answer: str) -> tuple[str, str]:
    """An instruction-style (prompt, target) pair: a captioning or a VQA task, template at random."""
    if rng.integers(2) == 0:
        return CAPTION_INSTRUCTIONS[rng.integers(len(CAPTION_INSTRUCTIONS))], text
    template = VQA_INSTRUCTIONS[rng.integers(len(VQA_INSTRUCTIONS))]
    return template.format(question=question), answer


class SyntheticShapes:
    """Grain random-access source of `num_records` synthetic records (see module docstring).

    record = {"image": uint8 [H, W, 3], "caption", "question", "answer", "instruction", "output": str,
    "index": int}; with `wrong_fraction` > 0 that share of captions (drawn per record) describe another
    scene, like noisy web alt-texts, and `caption_is_wrong` says which.
    """

    def __init__(self, num_records: int = 10_000, *, seed: int = 0, image_size: int = 64, wrong_fraction: float = 0.0):
        if image_size < 16:
            raise ValueError(f"image_size must be >= 16 for shapes to stay recognisable, got {image_size}")
        if not 0.0 <= wrong_fraction <= 1.0:
            raise ValueError(f"wrong_fraction must be in [0, 1], got {wrong_fraction}")
        self.num_records = num_records
        self.seed = seed
        self.image_size = image_size
        self.wrong_fraction = wrong_fraction  # web-like noise: this share of captions describe another image

    def __len__(self) -> int:
        return self.num_records

    def __repr__(self) -> str:
        noise = f", wrong_fraction={self.wrong_fraction}" if self.wrong_fraction else ""
        return f"SyntheticShapes(num_records={self.num_records}, seed={self.seed}, image_size={self.image_size}{noise})"

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not 0 <= index < self.num_records:
            raise IndexError(f"record {index} out of range [0, {self.num_records})")
        rng = np.random.default_rng([self.seed, index])
        shapes, background = _scene(rng)
        image = render(shapes, background, self.image_size, rng)
        families = [pairs for pairs in question_answers(shapes).values() if pairs]
        pairs = families[rng.integers(len(families))]
        question, answer = pairs[rng.integers(len(pairs))]
        text = caption(shapes)
        instruction, output = _instruction(rng, text, question, answer)
        record = {"image": image, "caption": text, "question": question, "answer": answer,
                  "instruction": instruction, "output": output, "index": index}
        if self.wrong_fraction:  # a separate stream, so clean records stay what they were
            noise = np.random.default_rng([self.seed, index, 1])
            if noise.random() < self.wrong_fraction:
                while True:  # the caption of another scene, never one that happens to fit
                    other, _ = _scene(noise)
                    if caption(other) != text:
                        break
                record["caption"] = caption(other)
            record["caption_is_wrong"] = record["caption"] != text
        return record


PAIR_STATEMENTS = {"exists": "there is a {color} {shape}", "count": "there are {count} {plural}"}
_PAIR_COUNTS = {0: "zero", 2: "two", 3: "three"}  # totals a plural statement can name
COUNT_SHARE = 0.25  # of statements that count (harder: a total over both images) rather than find a shape


def _pair_statement(rng: np.random.Generator, left, right, true: bool) -> str:
    """A statement about both images together (NLVR2's form), `true` of them or not: a coloured
    shape in either image, or a shape's total count over the two."""
    both = list(left) + list(right)
    totals = {kind: sum(s.kind == kind for s in both) for kind in SHAPES}
    countable = [k for k in SHAPES if totals[k] in _PAIR_COUNTS]
    if rng.random() < COUNT_SHARE and (countable or not true):
        kind = countable[rng.integers(len(countable))] if true else SHAPES[rng.integers(len(SHAPES))]
        counts = [totals[kind]] if true else [n for n in _PAIR_COUNTS if n != totals[kind]]
        count = _PAIR_COUNTS[counts[rng.integers(len(counts))]]
        return PAIR_STATEMENTS["count"].format(count=count, plural=PLURALS[kind])
    present = sorted({(s.color, s.kind) for s in both})
    pool = present if true else [(c, k) for c in COLORS for k in SHAPES if (c, k) not in present]
    color, kind = pool[rng.integers(len(pool))]
    return PAIR_STATEMENTS["exists"].format(color=color, shape=kind)


class SyntheticPairs:
    """Grain random-access source of NLVR2-style records: two synthetic-shapes images and a statement
    about them, true for half the records (drawn per record).

    record = {"image", "image1": uint8 [H, W, 3], "text": str, "label": 1 (true) | 0, "index": int}
    """

    def __init__(self, num_records: int = 10_000, *, seed: int = 0, image_size: int = 64):
        if image_size < 16:
            raise ValueError(f"image_size must be >= 16 for shapes to stay recognisable, got {image_size}")
        self.num_records, self.seed, self.image_size = num_records, seed, image_size

    def __len__(self) -> int:
        return self.num_records

    def __repr__(self) -> str:
        return f"SyntheticPairs(num_records={self.num_records}, seed={self.seed}, image_size={self.image_size})"

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not 0 <= index < self.num_records:
            raise IndexError(f"record {index} out of range [0, {self.num_records})")
        rng = np.random.default_rng([self.seed, index, 2])
        (left, bg0), (right, bg1) = _scene(rng), _scene(rng)
        true = bool(rng.integers(2))
        return {"image": render(left, bg0, self.image_size, rng), "image1": render(right, bg1, self.image_size, rng),
                "text": _pair_statement(rng, left, right, true), "label": int(true), "index": index}
