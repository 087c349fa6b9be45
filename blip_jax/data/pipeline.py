"""Checkpointable, per-process-sharded grain input pipeline over a random-access source.

    MapDataset.source(source).shuffle(seed).repeat(num_epochs)        # or a mixture (mixing.py)
        .random_map(transform)[process_index::process_count]         # lazy: only our records decode
        .to_iter_dataset() -> drop and count bad records -> .batch(batch_size // process_count)

Shuffling and repetition act on the global record stream (every epoch is a new permutation,
identical on all processes since it depends only on `seed`); each process then takes every
`process_count`-th position of that stream (strided sharding, grain's ShardByJaxProcess layout)
before decoding, so it only reads and transforms its own records. Guarantee (when no record is
bad): at step `s`, process `p`'s local batch row `j` is global position
`s * batch_size + j * process_count + p`, so the processes' batches are disjoint slices of the
stream and, interleaved row by row, equal the batch one process with the full `batch_size` reads
at that step. (A record can appear twice in one global batch only when that batch straddles an
epoch boundary, as in any repeated stream.) A bad record is dropped and the process reads on.

The iterator state is grain's plus the skip counts, a small JSON-serializable dict a trainer
stores in its checkpoint; restoring it into a fresh iterator built with the same arguments resumes
with exactly the batches the saved one would have produced next.
"""

from __future__ import annotations

import json
from typing import Any, Callable, NamedTuple

import grain
import numpy as np
from absl import logging

from blip_jax.data.records import BadRecord, add_counts

SKIPPED_KEY = "blip_jax_skipped"  # where `_SkipBad` keeps its counts inside the iterator state


def _process_defaults(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    return process_index, process_count


def _mark_absl_flags_parsed():
    """grain <= 0.2.18 reads an absl flag when starting workers, which fails in programs that never
    parse flags (google/grain#1355); marking them parsed keeps every flag at its default."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


class Skipped(NamedTuple):
    """What the guarded transform returns in place of a bad record (dropped by `_SkipBad`)."""

    reason: str


class GuardedTransform:
    """`transform(record, rng)` with a `BadRecord` turned into `Skipped(reason)`, so a bad record
    costs one element, not the run. The first few of each reason are logged with their detail."""

    LOG_FIRST = 5

    def __init__(self, transform: Callable[[dict, np.random.Generator], dict]):
        self.transform = transform
        self._logged: dict[str, int] = {}

    def __call__(self, record: dict, rng: np.random.Generator):
        try:
            return self.transform(record, rng)
        except BadRecord as e:
            seen = self._logged.get(e.reason, 0)
            if seen < self.LOG_FIRST:
                self._logged[e.reason] = seen + 1
                logging.warning("skipping a record (%s)%s", e, " (further ones not logged)" if
                                seen + 1 == self.LOG_FIRST else "")
            return Skipped(e.reason)


class _SkipBadIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator):
        super().__init__(parent)
        self._skipped: dict[str, int] = {}

    def __next__(self):
        while True:
            value = next(self._parent)
            if not isinstance(value, Skipped):
                return value
            add_counts(self._skipped, {value.reason: 1})

    def get_state(self):
        return {"parent": self._parent.get_state(), SKIPPED_KEY: dict(self._skipped)}

    def set_state(self, state):
        self._parent.set_state(state["parent"])
        self._skipped = dict(state[SKIPPED_KEY])


class _SkipBad(grain.IterDataset):
    """Drops `Skipped` elements and counts them by reason in the iterator state, so the counts
    survive checkpoints and are visible from worker processes (their states come back to us)."""

    def __iter__(self):
        return _SkipBadIterator(self._parent.__iter__())


def record_dataset(source, *, seed: int, shuffle: bool = True, num_epochs: int | None = None) -> grain.MapDataset:
    """The global record stream: `source` shuffled (a new permutation per epoch) and repeated.
    A `grain.MapDataset` (e.g. a mixture from `blip_jax.data.mixing`) is taken as already built."""
    if isinstance(source, grain.MapDataset):
        return source
    ds = grain.MapDataset.source(source)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    return ds.repeat(num_epochs)


def make_dataset(source, *, batch_size: int, seed: int, transform: Callable[[dict, np.random.Generator], dict],
                 process_index: int | None = None, process_count: int | None = None, shuffle: bool = True,
                 drop_remainder: bool = True, num_epochs: int | None = None,
                 read_options: grain.ReadOptions | None = None) -> grain.IterDataset:
    """This process's batches as a `grain.IterDataset` (see module docstring); `batch_size` is global.

    `transform(record, rng)` gets a generator seeded by `seed` and the record's global stream
    position, so augmentations are reproducible and do not depend on the number of processes.
    It may raise `BadRecord`: the record is then dropped and counted (`skipped_counts`).

    `num_epochs=None` repeats forever. With a finite `num_epochs`, `drop_remainder=True` first
    truncates the stream to whole global batches, so every process reads the same number of
    records; `drop_remainder=False` keeps the final partial batch (use it single-process, e.g. for
    evaluation). Skipped records make a process's batches come from later records, never smaller.
    """
    process_index, process_count = _process_defaults(process_index, process_count)
    if batch_size % process_count:
        raise ValueError(f"batch_size {batch_size} is not divisible by process_count {process_count}")
    ds = record_dataset(source, seed=seed, shuffle=shuffle, num_epochs=num_epochs)
    if num_epochs is not None and drop_remainder:
        ds = ds[: len(ds) // batch_size * batch_size]
    ds = ds.random_map(GuardedTransform(transform), seed=seed)[process_index::process_count]
    ds = _SkipBad(ds.to_iter_dataset(read_options))
    return ds.batch(batch_size // process_count, drop_remainder=drop_remainder)


def make_iterator(source, *, batch_size: int, seed: int, transform: Callable[[dict, np.random.Generator], dict],
                  process_index: int | None = None, process_count: int | None = None, shuffle: bool = True,
                  drop_remainder: bool = True, num_epochs: int | None = None, read_threads: int = 2,
                  worker_count: int = 0) -> grain.DatasetIterator:
    """Checkpointable iterator of this process's batches (dicts of stacked numpy arrays).

    `read_threads` threads of this process prepare up to that many records ahead (0: synchronous).
    `worker_count > 0` moves decoding into that many grain worker processes (`mp_prefetch`, spawn
    start method: `source` and `transform` must be picklable, and the first batch waits for the
    workers to start). Worker `w` batches every `worker_count`-th record of this process's stream
    and the batches come round-robin, so each group of `worker_count` batches holds the same
    records as in-process, in another order; the state holds one entry per worker, so it can only
    be restored with the same `worker_count`. Close such an iterator (`it.close()`) when
    done to stop its workers.
    """
    read_options = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=read_threads)
    ds = make_dataset(source, batch_size=batch_size, seed=seed, transform=transform, process_index=process_index,
                      process_count=process_count, shuffle=shuffle, drop_remainder=drop_remainder,
                      num_epochs=num_epochs, read_options=read_options)
    if worker_count:
        _mark_absl_flags_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return iter(ds)


def iterator_state(it: grain.DatasetIterator) -> dict[str, Any]:
    """The iterator's position as a JSON-serializable dict (a deep copy, safe to store)."""
    return json.loads(json.dumps(it.get_state()))


def restore_iterator(it: grain.DatasetIterator, state: dict[str, Any]) -> grain.DatasetIterator:
    """Moves `it` (built with the same arguments as the saved one) to `state`; returns it."""
    it.set_state(state)
    return it


def skipped_counts(state: dict) -> dict[str, int]:
    """Records skipped so far by reason, from an iterator state (summed over worker processes)."""
    total: dict[str, int] = {}

    def walk(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key == SKIPPED_KEY:
                    add_counts(total, value)
                else:
                    walk(value)
        elif isinstance(node, (list, tuple)):
            for value in node:
                walk(value)

    walk(state)
    return total
