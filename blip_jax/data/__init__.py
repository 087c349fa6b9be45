"""Input data: a synthetic image-text source and a sharded, checkpointable grain pipeline."""

from blip_jax.data.pipeline import iterator_state, make_dataset, make_iterator, restore_iterator
from blip_jax.data.synthetic import WORDS, SyntheticShapes, split_words

__all__ = ["WORDS", "SyntheticShapes", "iterator_state", "make_dataset", "make_iterator", "restore_iterator",
           "split_words"]
