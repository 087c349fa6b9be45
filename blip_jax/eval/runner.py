"""What every evaluation job shares: resumable sharded work across processes, and its outputs.

Work over `n` items is cut into shards of `shard_size`; process `p` of `P` computes the shards
`i` with `i % P == p` (within a process, batches are split over its devices by the model's mesh).
Each finished shard is written atomically to `W/shards/<stage>/<i>.npz` (arrays) or `.jsonl`
(records), so a killed job skips what it finished when rerun. After a barrier every process reads
all shards back, in order.

A workdir holds one job's outputs (`blip_jax.jobs`: W/job.json names the model and settings; a
rerun with others is refused). Outputs: `W/results.json` (metrics, settings and models),
`W/predictions.jsonl`, `W/gallery.html`, TensorBoard scalars in `W/tensorboard`.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import jax
import numpy as np

from blip_jax import paths
from blip_jax.atomic import write_file, write_json
from blip_jax.jobs import JOB_FILE


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def run_sharded(workdir: str | Path, stage: str, n: int, compute: Callable[[int, int], object], *,
                shard_size: int, progress: bool = True):
    """`compute(start, stop)` over [0, n) in resumable shards (module docstring). `compute` returns a
    dict of arrays (concatenated along axis 0 over shards) or a list of JSON records (joined)."""
    from tqdm import tqdm

    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    folder = paths.path(workdir) / "shards" / stage
    starts = list(range(0, n, shard_size))
    mine = [i for i in range(len(starts)) if i % jax.process_count() == jax.process_index()]
    done = {p.stem for p in folder.glob("*.*") if not p.name.startswith(".")} if folder.exists() else set()
    todo = [i for i in mine if f"{i:05d}" not in done]
    items = sum(min(shard_size, n - starts[i]) for i in todo)
    with tqdm(total=items, unit="item", desc=f"eval {stage}", disable=not progress or not todo) as bar:
        for i in todo:
            start, stop = starts[i], min(n, starts[i] + shard_size)
            result = compute(start, stop)
            if isinstance(result, dict):
                write_file(folder / f"{i:05d}.npz", lambda f: np.savez(f, **result))
            else:
                lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in result)
                write_file(folder / f"{i:05d}.jsonl", lines)
            bar.update(stop - start)
    _barrier(f"blip_jax_eval_{stage}")
    return _read_shards(folder, len(starts))


def _read_shards(folder: Path, count: int):
    parts = []
    for i in range(count):
        npz, jsonl = folder / f"{i:05d}.npz", folder / f"{i:05d}.jsonl"
        if npz.exists():
            with npz.open("rb") as f, np.load(f) as data:
                parts.append({k: data[k] for k in data.files})
        elif jsonl.exists():
            parts.append([json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines()])
        else:
            raise FileNotFoundError(f"shard {i} of {folder} is missing after every process finished")
    if parts and isinstance(parts[0], dict):
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return [r for p in parts for r in p]


def has_outputs(workdir: str | Path) -> bool:
    """Whether `workdir` holds an evaluation's shards or results (blip_jax.jobs guards them)."""
    workdir = paths.path(workdir)
    shards = workdir / "shards"
    return (workdir / "results.json").exists() or (shards.is_dir() and any(shards.glob("*/[0-9]*.*")))


def write_outputs(workdir: str | Path, task: str, metrics: dict, settings: dict, predictions: list[dict],
                  gallery: list[dict] | None = None, seconds: float | None = None) -> dict:
    """results.json, predictions.jsonl, gallery.html and TensorBoard scalars (process 0 only)."""
    job = paths.path(workdir) / JOB_FILE  # the models that produced these results (blip_jax.jobs)
    models = json.loads(job.read_text(encoding="utf-8")).get("models") if job.is_file() else None
    results = {"task": task, "metrics": metrics, "settings": settings, "models": models,
               "num_predictions": len(predictions),
               "seconds": None if seconds is None else round(seconds, 2),
               "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if jax.process_index() != 0:
        return results
    workdir = paths.path(workdir)
    write_json(workdir / "results.json", results)
    lines = "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions)
    write_file(workdir / "predictions.jsonl", lines)
    if gallery:
        from blip_jax.gallery import write_gallery

        write_gallery(workdir / "gallery.html", gallery, f"blip-jax eval: {task}")
    from tensorboardX import SummaryWriter

    local = tempfile.mkdtemp(prefix="blip_jax_tb.") if paths.is_remote(workdir) else str(workdir / "tensorboard")
    with SummaryWriter(local) as tb:
        for name, value in _scalars(metrics):
            tb.add_scalar(f"eval/{task}/{name}", value, 0)
    if paths.is_remote(workdir):  # a bucket has no append: the events are written here, then uploaded
        paths.upload_tree(local, workdir / "tensorboard")
        shutil.rmtree(local, ignore_errors=True)
    return results


def _scalars(metrics: dict, prefix: str = ""):
    for key, value in metrics.items():
        if isinstance(value, dict):
            yield from _scalars(value, f"{prefix}{key}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield f"{prefix}{key}", float(value)
