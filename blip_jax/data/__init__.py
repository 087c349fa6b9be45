"""Input data: sources (synthetic, annotation JSON + images, WebDataset, TFDS, packed ArrayRecord),
reference transforms, mixtures and instruction templates, and a sharded, checkpointable grain
pipeline that skips and counts bad records."""

from blip_jax.data.pipeline import (iterator_state, make_dataset, make_iterator, restore_iterator,
                                    skipped_counts)
from blip_jax.data.records import REASONS, BadRecord
from blip_jax.data.sources import KINDS, build_records, build_source
from blip_jax.data.synthetic import WORDS, SyntheticShapes, split_words

__all__ = ["KINDS", "REASONS", "WORDS", "BadRecord", "SyntheticShapes", "build_records", "build_source",
           "iterator_state", "make_dataset", "make_iterator", "restore_iterator", "skipped_counts", "split_words"]
