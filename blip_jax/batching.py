"""Batching helpers shared by the BLIP and BLIP-2 model objects: power-of-two buckets (few compiled
shapes), row padding, token-width padding, (image, text) pairing and ITM slot layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np

TEXT_PAD_MULTIPLE = 8  # pad token lengths to a multiple of this to share compiled programs
MAX_SHARED_ROWS = 16  # ITM pairs of one image sharing its cross-attention keys and values in a batch


def bucket(n: int) -> int:
    """The power of two >= n: the padded row count of a batch of n."""
    return 1 << max(0, (n - 1).bit_length())


def pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
    if x.shape[0] == rows:
        return x
    pad = np.zeros((rows - x.shape[0],) + x.shape[1:], x.dtype)
    return np.concatenate([x, pad])


def pad_width(ids: np.ndarray, mask: np.ndarray, pad_id: int, side: str = "right"):
    """Pad token arrays to a multiple of TEXT_PAD_MULTIPLE columns on `side` (fewer compiled shapes)."""
    width = -(-ids.shape[1] // TEXT_PAD_MULTIPLE) * TEXT_PAD_MULTIPLE
    spec = ((0, 0), (width - ids.shape[1], 0)) if side == "left" else ((0, 0), (0, width - ids.shape[1]))
    return (np.pad(ids, spec, constant_values=pad_id).astype(np.int32), np.pad(mask, spec).astype(np.int32))


def shared_rows(image_index: np.ndarray, batch_size: int) -> int:
    """Rows per image slot: the median number of pairs per image (so most images fill their slots),
    at most MAX_SHARED_ROWS and the batch size."""
    if not len(image_index):
        return 1
    median = int(np.median(np.unique(image_index, return_counts=True)[1]))
    return max(1, min(median, MAX_SHARED_ROWS, batch_size))


def slots(image_index: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray]:
    """Pairs laid out by image: (image of each slot [S], pair indices of each slot [S, group], -1 padding)."""
    order = np.argsort(image_index, kind="stable")
    images, starts, counts = np.unique(image_index[order], return_index=True, return_counts=True)
    per_image = -(-counts // group)
    slot_image = np.repeat(images, per_image)
    slot_pairs = np.full((len(slot_image), group), -1, np.int64)
    first_slot = np.concatenate([[0], np.cumsum(per_image)[:-1]])
    for slot0, start, count in zip(first_slot, starts, counts):
        flat = slot_pairs[slot0:slot0 + -(-count // group)].reshape(-1)  # a view: writes land in slot_pairs
        flat[:count] = order[start:start + count]
    return slot_image, slot_pairs


def as_list(x) -> list:
    if isinstance(x, (str, Path)) or not isinstance(x, (list, tuple)):
        return [x]
    return list(x)


def texts_of(value, name: str, *, at_least_one: bool = True) -> list[str]:
    """`value` (one text or a list) as a list of non-empty strings; otherwise a ValueError naming
    the argument and the entry (an empty text would be scored as if it said something)."""
    out = as_list(value)
    if not out and at_least_one:
        raise ValueError(f"{name} is empty: give at least one text")
    for i, text in enumerate(out):
        where = name if len(out) == 1 else f"{name}[{i}]"
        if not isinstance(text, str):
            raise ValueError(f"{where} is a {type(text).__name__}, not a string")
        if not text.strip():
            raise ValueError(f"{where} is an empty text: give words to score")
    return out


def pair_up(n_images: int, texts: list) -> tuple[np.ndarray, list]:
    """(image index of each pair, text of each pair): one to one, or a single image or a single
    text broadcast. Images are indexed, not copied, so each is encoded once."""
    if n_images == len(texts):
        return np.arange(n_images), texts
    if n_images == 1:
        return np.zeros(len(texts), np.int64), texts
    if len(texts) == 1:
        return np.arange(n_images), texts * n_images
    raise ValueError(f"got {n_images} images and {len(texts)} texts: give as many of each, or one of either")
