"""Checkpointable, per-process-sharded grain input pipeline over a random-access source.

    MapDataset.source(source).shuffle(seed).repeat(num_epochs)[process_index::process_count]
        .map(transform).batch(batch_size // process_count)

Shuffling and repetition act on the global record stream (every epoch is a new permutation,
identical on all processes since it depends only on `seed`); each process then takes every
`process_count`-th position of that stream (strided sharding) before decoding, so it only reads
and transforms its own records. Guarantee: at step `s`, process `p`'s local batch row `j` is global
position `s * batch_size + j * process_count + p`, so the processes' batches are disjoint slices of
the stream and, interleaved row by row, equal the batch one process with the full `batch_size`
reads at that step. (A record can appear twice in one global batch only when that batch straddles
an epoch boundary, as in any repeated stream.)

The iterator state is grain's (`{"next_index": ...}` in-process), a small JSON-serializable dict a
trainer stores in its checkpoint; restoring it into a fresh iterator built with the same arguments
resumes with exactly the batches the saved one would have produced next.
"""

from __future__ import annotations

import json
from typing import Any, Callable

import grain
import numpy as np


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


def make_dataset(source, *, batch_size: int, seed: int, transform: Callable[[dict], dict[str, np.ndarray]],
                 process_index: int | None = None, process_count: int | None = None, shuffle: bool = True,
                 drop_remainder: bool = True, num_epochs: int | None = None) -> grain.MapDataset:
    """This process's batched `grain.MapDataset` (see module docstring); `batch_size` is global.

    `num_epochs=None` repeats forever. With a finite `num_epochs`, `drop_remainder=True` first
    truncates the stream to whole global batches, so every process yields the same number of
    batches; `drop_remainder=False` keeps the final partial batch, which some processes may then
    lack (use it single-process, e.g. for evaluation).
    """
    process_index, process_count = _process_defaults(process_index, process_count)
    if batch_size % process_count:
        raise ValueError(f"batch_size {batch_size} is not divisible by process_count {process_count}")
    ds = grain.MapDataset.source(source)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs)
    if num_epochs is not None and drop_remainder:
        ds = ds[: len(ds) // batch_size * batch_size]
    ds = ds[process_index::process_count].map(transform)
    return ds.batch(batch_size // process_count, drop_remainder=drop_remainder)


def make_iterator(source, *, batch_size: int, seed: int, transform: Callable[[dict], dict[str, np.ndarray]],
                  process_index: int | None = None, process_count: int | None = None, shuffle: bool = True,
                  drop_remainder: bool = True, num_epochs: int | None = None, read_threads: int = 2,
                  worker_count: int = 0) -> grain.DatasetIterator:
    """Checkpointable iterator of this process's batches (dicts of stacked numpy arrays).

    `read_threads` threads of this process prepare up to that many batches ahead (0: synchronous).
    `worker_count > 0` moves decoding into that many grain worker processes (`mp_prefetch`, spawn
    start method: `source` and `transform` must be picklable, and the first batch waits for the
    workers to start). Each worker prepares whole batches, so the batches, their order and the
    restored position are the same as in-process; the state then holds one entry per worker, so it
    can only be restored with the same `worker_count`. Close such an iterator (`it.close()`) when
    done to stop its workers.
    """
    ds = make_dataset(source, batch_size=batch_size, seed=seed, transform=transform, process_index=process_index,
                      process_count=process_count, shuffle=shuffle, drop_remainder=drop_remainder,
                      num_epochs=num_epochs)
    read_options = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=read_threads)
    ds = ds.to_iter_dataset(read_options)
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
