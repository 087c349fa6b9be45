#!/usr/bin/env python
"""Exact top-k search over an embedding index (`blip_jax.search.Index`): latency at 100k and 1M rows,
and the results against brute force (numpy: one matmul over all rows held in memory, a full stable
sort), in the same run.

The index is written by `blip_jax.testing.write_synthetic_index` (random unit vectors, BLIP's ITC
width 256, float32, 10k rows a shard: what `blip-jax embed` writes), so its size costs no model
time. `Index.top_k` reads each shard from disk (the page cache warm after the first query) and
scores it on the device (a JAX matmul), keeping a running top-k; brute force has every row in
memory already. Also timed: the same index with no device cache (`cache_bytes=0`), as an index too
large for memory runs, every shard read from disk for every query. Queries: --queries random unit vectors, timed after one warm-up query (which
compiles each shard shape once). Writes results/search_cpu.json.

    python benchmarks/bench_search.py                 # 100k and 1M rows
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import jaxlib_version, write_report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def run(rows: int, dim: int, queries: int, k: int, model_path: Path, tmp: Path) -> dict:
    from blip_jax.search import Index
    from blip_jax.testing import write_synthetic_index

    rng = np.random.default_rng(rows)
    features = rng.standard_normal((rows, dim), dtype=np.float32)
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    start = time.perf_counter()
    index = Index(write_synthetic_index(tmp / f"index_{rows}", features, model_path=model_path, shard_size=10_000))
    write_seconds = time.perf_counter() - start
    qs = rng.standard_normal((queries + 1, dim), dtype=np.float32)
    qs /= np.linalg.norm(qs, axis=1, keepdims=True)
    streaming = Index(index.path, cache_bytes=0)  # an index that does not fit: every query reads every shard
    index.top_k(qs[0], k)  # warm-up: compiles, fills the page cache and the device cache
    streaming.top_k(qs[0], k)
    ours, uncached, theirs, equal = [], [], [], True
    for q in qs[1:]:
        t = time.perf_counter()
        got, _ = index.top_k(q, k)
        ours.append(time.perf_counter() - t)
        t = time.perf_counter()
        equal &= bool(np.array_equal(streaming.top_k(q, k)[0], got))
        uncached.append(time.perf_counter() - t)
        t = time.perf_counter()
        scores = features @ q
        want = np.lexsort((np.arange(rows), -scores))[:k]
        theirs.append(time.perf_counter() - t)
        equal &= bool(np.array_equal(got, want))
    return {"rows": rows, "dim": dim, "k": k, "queries": queries, "index_bytes": rows * dim * 4,
            "write_seconds": round(write_seconds, 2), "index_ms_median": round(1e3 * float(np.median(ours)), 2),
            "streaming_ms_median": round(1e3 * float(np.median(uncached)), 2),
            "brute_force_ms_median": round(1e3 * float(np.median(theirs)), 2),
            "ratio_index_over_brute_force": round(float(np.median(ours) / np.median(theirs)), 3),
            "results_equal_brute_force": equal}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="100000,1000000")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--queries", type=int, default=20)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "search_cpu.json")
    args = p.parse_args()
    import jax

    from blip_jax.testing import write_tiny_checkpoint
    from blip_jax.convert import convert

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = tmp / "model"  # an index names the model that built it: any converted model will do
        convert(write_tiny_checkpoint(tmp / "hf", "retrieval"), model, progress=False)
        results = [run(int(n), args.dim, args.queries, args.k, model, tmp) for n in args.rows.split(",")]
    for r in results:
        print(json.dumps(r))
    write_report(args.out, {"benchmark": "search", "device": str(jax.devices()[0]), "jax": jax.__version__,
                            "jaxlib": jaxlib_version(), "results": results})


if __name__ == "__main__":
    main()
