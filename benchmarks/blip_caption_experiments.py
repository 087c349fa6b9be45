#!/usr/bin/env python
"""Candidate speed-ups for blip-jax on CPU, measured with bench_blip_caption.py without editing the library.

    python benchmarks/blip_caption_experiments.py --variant bhtd-attention [bench_blip_caption.py options]

Variants (monkeypatched before the benchmark runs; the benchmark itself is unchanged):
  none             the library as it is (same as bench_blip_caption.py)
  bhtd-attention   layers.attend with q/k/v transposed to [B, H, T, D] before both einsums, so that
                   XLA:CPU gets batch-major dot_generals (no per-head strided transposes inside the
                   dot); identical maths.
Results go to benchmarks/results/blip_caption_<device>_<variant>.json unless --out is given.
Environment-level settings (e.g. GLIBC_TUNABLES=glibc.malloc.hugetlb=1) are set by the caller.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def attend_bhtd(q, k, v, mask=None, dtype=None):
    import jax
    import jax.numpy as jnp

    dtype = dtype or jnp.float32
    q, k, v = (jnp.swapaxes(t, 1, 2) for t in (q, k, v))  # [B, H, T|S, D]
    scores = jnp.einsum("bhtd,bhsd->bhts", q, k, preferred_element_type=jnp.float32) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    return jnp.swapaxes(jnp.einsum("bhts,bhsd->bhtd", probs, v.astype(dtype)), 1, 2)


VARIANTS = ("none", "bhtd-attention")


def main():
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--variant", choices=VARIANTS, default="none")
    args, rest = p.parse_known_args()
    if args.variant == "bhtd-attention":
        from blip_jax.models import layers

        layers.attend = attend_bhtd
    if "--out" not in rest:
        import bench_blip_caption as bench

        tag = next((rest[i + 1] for i, a in enumerate(rest[:-1]) if a == "--device-tag"), "cpu")
        small = "_small" if "--small" in rest else ""
        rest += ["--out", str(bench.RESULTS / f"blip_caption_{tag}{small}_{args.variant}.json")]
    import bench_blip_caption

    bench_blip_caption.main(rest)


if __name__ == "__main__":
    main()
