"""Synthetic shapes source (determinism, texts agree with pixels, closed vocabulary) and the grain
pipeline (batch layout, epochs, per-process sharding, exact resume from a saved state)."""

import json

import numpy as np
import pytest

from blip_jax.data import WORDS, SyntheticShapes, iterator_state, make_iterator, restore_iterator, split_words
from blip_jax.data.synthetic import (CAPTION_INSTRUCTIONS, COLORS, Shape, caption, canonical,
                                     question_answers)

TEXT_KEYS = ("caption", "question", "answer", "instruction", "output")
MAX_WORDS = 16
MIN_PIXELS = 8  # the smallest shape (a triangle of side 4 at image_size 16) has more
WORD_IDS = {w: i + 1 for i, w in enumerate(WORDS)}  # 0 = padding


def tokenize(text):
    ids = [WORD_IDS[w] for w in split_words(text)][:MAX_WORDS]
    return np.array(ids + [0] * (MAX_WORDS - len(ids)), np.int32)


def transform(record, rng):
    """A typical training transform: normalised pixels, word-level caption ids, the record index."""
    return {"pixels": record["image"].astype(np.float32) / 255.0, "caption_ids": tokenize(record["caption"]),
            "index": np.int64(record["index"])}


def index_transform(record, rng):
    return {"index": np.int64(record["index"])}


def decode_shapes(image):
    """The shapes visible in `image`, read back from pixels: one per quadrant at most, its colour from
    exact palette matches (the noisy background never hits another palette colour), its kind from how
    much of its bounding box it fills (square 1, circle ~0.78, triangle ~0.5)."""
    cell = image.shape[0] // 2
    shapes = []
    for qy in range(2):
        for qx in range(2):
            quad = image[qy * cell:(qy + 1) * cell, qx * cell:(qx + 1) * cell]
            for color, rgb in COLORS.items():
                ys, xs = np.nonzero((quad == rgb).all(-1))
                if len(ys) < MIN_PIXELS:  # stray background pixels that hit the background's own colour
                    continue
                fill = len(ys) / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
                kind = "square" if fill > 0.9 else "circle" if fill > 0.65 else "triangle"
                shapes.append(Shape(kind, color))
    return canonical(shapes)


def test_records_are_deterministic():
    a, b = SyntheticShapes(100, seed=3), SyntheticShapes(100, seed=3)
    for i in (0, 7, 99):
        ra, rb = a[i], b[i]
        assert ra["index"] == i
        np.testing.assert_array_equal(ra["image"], rb["image"])
        assert all(ra[k] == rb[k] for k in TEXT_KEYS)
    assert not np.array_equal(a[0]["image"], a[1]["image"])
    assert not np.array_equal(a[0]["image"], SyntheticShapes(100, seed=4)[0]["image"])
    with pytest.raises(IndexError):
        a[100]


@pytest.mark.parametrize("image_size", [64, 32, 16])
def test_texts_agree_with_pixels(image_size):
    source = SyntheticShapes(150, seed=1, image_size=image_size)
    for i in range(len(source)):
        record = source[i]
        image = record["image"]
        assert image.dtype == np.uint8 and image.shape == (image_size, image_size, 3)
        shapes = decode_shapes(image)
        assert caption(shapes) == record["caption"], i
        pairs = [p for family in question_answers(shapes).values() for p in family]
        assert (record["question"], record["answer"]) in pairs, i
        if record["instruction"] in CAPTION_INSTRUCTIONS:
            assert record["output"] == record["caption"]
        else:
            assert record["question"] in record["instruction"] and record["output"] == record["answer"]


def test_caption_grammar():
    shapes = [Shape("square", "blue"), Shape("circle", "red"), Shape("square", "blue")]
    assert caption(shapes) == "a red circle and two blue squares"
    shapes = [Shape("triangle", "black"), Shape("circle", "white"), Shape("circle", "green")]
    assert caption(shapes) == "a green circle, a white circle and a black triangle"
    assert question_answers(shapes)["count"][0] == ("how many circles are there?", "two")
    assert ("what color is the triangle?", "black") in question_answers(shapes)["color"]


def test_vocabulary_is_closed_and_complete():
    source = SyntheticShapes(2000, seed=0, image_size=16)
    used = {w for i in range(len(source)) for k in TEXT_KEYS for w in split_words(source[i][k])}
    assert used == set(WORDS)
    assert len(WORDS) < 64


def test_batches_shapes_and_dtypes():
    it = make_iterator(SyntheticShapes(50, image_size=32), batch_size=6, seed=0, transform=transform,
                       process_index=0, process_count=1)
    batch = next(it)
    assert batch["pixels"].shape == (6, 32, 32, 3) and batch["pixels"].dtype == np.float32
    assert batch["caption_ids"].shape == (6, MAX_WORDS) and batch["caption_ids"].dtype == np.int32
    assert batch["index"].shape == (6,) and batch["index"].dtype == np.int64
    assert 0.0 <= batch["pixels"].min() and batch["pixels"].max() <= 1.0


def _indices(it, steps):
    return np.stack([next(it)["index"] for _ in range(steps)])


def test_epochs_are_reshuffled_permutations():
    it = make_iterator(SyntheticShapes(12), batch_size=4, seed=5, transform=index_transform,
                       process_index=0, process_count=1)
    epochs = _indices(it, 6).reshape(2, 12)
    assert all(sorted(e) == list(range(12)) for e in epochs)
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[0], np.arange(12))
    unshuffled = make_iterator(SyntheticShapes(12), batch_size=4, seed=5, transform=index_transform,
                               process_index=0, process_count=1, shuffle=False)
    np.testing.assert_array_equal(_indices(unshuffled, 3).ravel(), np.arange(12))


def test_processes_read_disjoint_strided_shards_of_the_global_batch():
    source, steps = SyntheticShapes(20), 7  # 7 steps of 8 cross epoch boundaries
    full = _indices(make_iterator(source, batch_size=8, seed=2, transform=index_transform,
                                  process_index=0, process_count=1), steps)
    local = [_indices(make_iterator(source, batch_size=8, seed=2, transform=index_transform,
                                    process_index=p, process_count=2), steps) for p in range(2)]
    assert local[0].shape == (steps, 4)
    for p in range(2):  # row j of process p is row j * process_count + p of the global batch
        np.testing.assert_array_equal(local[p], full[:, p::2])
    first_epoch_steps = 2  # steps 0-1 lie inside epoch 0: no record is read twice there
    assert not set(local[0][:first_epoch_steps].ravel()) & set(local[1][:first_epoch_steps].ravel())
    with pytest.raises(ValueError, match="divisible"):
        make_iterator(source, batch_size=7, seed=0, transform=index_transform, process_index=0, process_count=2)


def test_finite_epochs_give_every_process_the_same_number_of_batches():
    source = SyntheticShapes(10)
    counts = [len(list(make_iterator(source, batch_size=4, seed=0, transform=index_transform,
                                     process_index=p, process_count=2, num_epochs=1))) for p in range(2)]
    assert counts == [2, 2]
    batches = list(make_iterator(source, batch_size=4, seed=0, transform=index_transform, process_index=0,
                                 process_count=1, num_epochs=1, drop_remainder=False))
    assert [len(b["index"]) for b in batches] == [4, 4, 2]
    assert sorted(np.concatenate([b["index"] for b in batches])) == list(range(10))


def _make(worker_count=0):
    return make_iterator(SyntheticShapes(30, image_size=16), batch_size=4, seed=7, transform=transform,
                         process_index=1, process_count=2, worker_count=worker_count)


def _assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_saved_state_resumes_exactly():
    it = _make()
    for _ in range(8):  # 8 global steps of 4 records: past the first epoch of 30
        next(it)
    state = json.loads(json.dumps(iterator_state(it)))
    expected = [next(it) for _ in range(12)]
    resumed = restore_iterator(_make(), state)
    _assert_same_batches([next(resumed) for _ in range(12)], expected)


def test_worker_processes_read_the_same_records_and_resume_exactly():
    """Each of W workers batches every W-th record of this process's stream, so W batches from the
    workers hold exactly the records of W in-process batches; a saved state resumes exactly."""
    in_process = _make()
    expected = [next(in_process) for _ in range(4)]
    it = _make(worker_count=2)
    try:
        got = [next(it) for _ in range(4)]
        state = json.loads(json.dumps(iterator_state(it)))
        following = [next(it) for _ in range(4)]
    finally:
        it.close()
    for group in (slice(0, 2), slice(2, 4)):
        assert sorted(np.concatenate([b["index"] for b in got[group]])) == \
            sorted(np.concatenate([b["index"] for b in expected[group]]))
    resumed = restore_iterator(_make(worker_count=2), state)
    try:
        _assert_same_batches([next(resumed) for _ in range(4)], following)
    finally:
        resumed.close()
