"""Evaluation inputs: annotation records of a split, and their images as model pixels.

Images are decoded as training does (`data.transforms.decode_image`: no EXIF rotation, any mode to
RGB) and preprocessed by the checkpoint's own `ImageProcessor` (bicubic resize, its mean/std: the
reference's evaluation transform). An image that cannot be read is not fatal: its row is zeros,
flagged in `ok`, and the job leaves that example out and reports it.
"""

from __future__ import annotations

import numpy as np

from blip_jax.data.records import BadRecord
from blip_jax.data.sources import build_source
from blip_jax.data.transforms import decode_image


def load_records(data) -> list[dict]:
    """Every record of the configured split, in order (captions kept together per image)."""
    source = build_source({**dict(data), "expand_captions": False})
    return [source[i] for i in range(len(source))]


def load_pixels(model, images: list) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(pixels [n, H, W, 3], ok [n] bool, reasons of the failures)."""
    arrays, ok, reasons = [], [], []
    for image in images:
        try:
            arrays.append(decode_image(image))
            ok.append(True)
        except BadRecord as e:
            arrays.append(None)
            ok.append(False)
            reasons.append(e.reason)
    good = [a for a in arrays if a is not None]
    size = model.image_processor.size
    pixels = np.zeros((len(images), size["height"], size["width"], 3), np.float32)
    if good:
        pixels[np.asarray(ok)] = model.preprocess(good)
    return pixels, np.asarray(ok), reasons


def image_name(record: dict) -> str:
    """The record's image path, for predictions and galleries ("" for in-memory images)."""
    return record["image"] if isinstance(record["image"], str) else ""
