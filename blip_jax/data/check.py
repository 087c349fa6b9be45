"""`blip-jax data check`: one pass of a source through the full input pipeline, counting what fails.

Each record is decoded, converted to RGB, transformed (crop / flip / RandAugment / resize and
normalise, per `augment`) and has its texts cleaned, inside the same grain pipeline training uses
(threads or worker processes). The result says how many records arrived and how many were
skipped, by reason, while indexing the source and in the pipeline.
"""

from __future__ import annotations

import time

import numpy as np

from blip_jax.data import pipeline, transforms
from blip_jax.data.records import BadRecord, add_counts
from blip_jax.data.sources import build_records


class RecordCheck:
    """The data half of a training transform: image pipeline plus text cleaning (picklable)."""

    def __init__(self, image_size: int, augment: str, max_words: int = 50):
        self.image = transforms.image_transform(augment, image_size)
        self.max_words = max_words

    def __call__(self, record: dict, rng: np.random.Generator) -> dict:
        transforms.check_record(record)  # as training's transform (blip_jax.train.inputs.Task) does
        pixels = self.image(transforms.decode_image(record["image"]), rng)
        texts = 0
        if "caption" in record:
            transforms.pre_caption(record["caption"], self.max_words)
            texts += 1
        for caption in record.get("captions", ()):
            transforms.pre_caption(caption, self.max_words)
            texts += 1
        if "question" in record:
            transforms.pre_question(record["question"], self.max_words)
            texts += 1
        if not texts and "instruction" not in record:
            raise BadRecord("bad_text", "a record with no caption, question or instruction")
        return {"ok": np.int32(1), "mean": np.float32(pixels.mean())}


def check(spec: dict, *, image_size: int = 224, augment: str = "eval", limit: int = 0, batch_size: int = 32,
          worker_count: int = 0, read_threads: int = 4, progress: bool = True) -> dict:
    """Counts for one epoch of `spec`'s source (the first `limit` records when limit > 0)."""
    from tqdm import tqdm

    start = time.time()
    import grain

    records, skipped = build_records(spec, seed=0)
    described = repr(records)
    endless = isinstance(records, grain.MapDataset)  # a mixture repeats forever
    if endless and not limit:
        raise ValueError("a mixture repeats forever: give a limit (--limit N)")
    if limit and limit < len(records):
        records = (records if endless else grain.MapDataset.source(records))[:limit]
    it = pipeline.make_iterator(records, batch_size=batch_size, seed=0, transform=RecordCheck(image_size, augment),
                                process_index=0, process_count=1, shuffle=False, drop_remainder=False,
                                num_epochs=1, read_threads=read_threads, worker_count=worker_count)
    delivered = 0
    try:
        with tqdm(total=len(records), unit="rec", desc="check", disable=not progress) as bar:
            for batch in it:
                delivered += len(batch["ok"])
                bar.update(len(batch["ok"]))
            state = pipeline.iterator_state(it)
    finally:
        if worker_count:
            it.close()
    in_pipeline = pipeline.skipped_counts(state)
    seconds = time.time() - start
    total = add_counts(dict(skipped), in_pipeline)
    return {"source": described,
            "records": len(records), "delivered": delivered, "skipped": total,
            "skipped_total": sum(total.values()), "skipped_while_indexing": skipped,
            "seconds": round(seconds, 3), "records_per_sec": round(delivered / max(seconds, 1e-9), 1)}
