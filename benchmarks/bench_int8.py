#!/usr/bin/env python
"""int8 weight-only frozen towers (`blip_jax.load(path, int8=True)`, `blip_jax.models.quant`) against
fp32, the same weights in the same run: memory, speed on this CPU, and what changes in the outputs.

Models are random transformers BLIP-2 checkpoints converted here (no hub): a "small" BLIP-2 OPT
(ViT and OPT of width --hidden, --layers layers, 224 px) for memory, speed, LLM logit error and
caption / VQA id agreement, and a stage-1 (retrieval) model of the same size for the ITC recall
change over --images synthetic-shapes images and their captions. Timings: median of --repeats
warm calls of `model.caption` (beam 1, 10 new tokens) on --batch images, compile excluded.
Writes results/int8_cpu.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import jaxlib_version, write_report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _median_seconds(fn, repeats: int) -> float:
    fn()  # compile
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "int8_cpu.json")
    args = p.parse_args()
    import jax
    import jax.numpy as jnp

    import blip_jax
    from blip_jax.blip2_api import encode_image, language_prefix
    from blip_jax.convert import convert
    from blip_jax.data.synthetic import SyntheticShapes
    from blip_jax.eval.retrieval_metrics import recall_at_k
    from blip_jax.models import quant
    from blip_jax.models.blip2 import Blip2
    from blip_jax.testing import sample_images, write_tiny_blip2_checkpoint

    report = {"benchmark": "int8", "device": str(jax.devices()[0]), "jax": jax.__version__,
              "jaxlib": jaxlib_version(), "hidden": args.hidden, "layers": args.layers}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        size = dict(hidden_size=args.hidden, num_layers=args.layers, num_heads=8, image_size=224, patch_size=16)
        for kind in ("opt", "retrieval"):
            convert(write_tiny_blip2_checkpoint(tmp / f"hf_{kind}", kind, **size), tmp / kind, progress=False)
        full, small = blip_jax.load(tmp / "opt"), blip_jax.load(tmp / "opt", int8=True)
        frozen = lambda m: {k: v for k, v in m.params.items() if k in ("vision", "language_model")}  # noqa: E731
        report["memory"] = {"all_params_bytes": {"fp32": quant.nbytes(full.params), "int8": quant.nbytes(small.params)},
                            "frozen_towers_bytes": {"fp32": quant.nbytes(frozen(full)), "int8": quant.nbytes(frozen(small))}}
        images = sample_images(args.batch, size=224, seed=1)
        pixels = jnp.asarray(full.preprocess(images))
        ids = jnp.asarray(full.tokenizer(["a photo of"] * args.batch)["input_ids"], jnp.int32)

        def logits(model):
            embeds = encode_image(model.config, model.params, pixels)
            prefix = language_prefix(model.config, model.params, embeds, None, None)
            return np.asarray(Blip2(model.config).apply({"params": model.params}, prefix, ids, jnp.ones_like(ids),
                                                        method=Blip2.language_model_logits))
        a, b = logits(full), logits(small)
        report["llm_logits"] = {"max_abs_diff": float(np.abs(a - b).max()), "max_abs_fp32": float(np.abs(a).max()),
                                "top1_agreement": float(np.mean(a.argmax(-1) == b.argmax(-1)))}
        gen = dict(num_beams=1, max_new_tokens=10)
        caps = full.caption(images, **gen), small.caption(images, **gen)
        beams = full.caption(images, num_beams=3, max_new_tokens=10), small.caption(images, num_beams=3, max_new_tokens=10)
        questions = ["what color is the circle?"] * args.batch
        answers = full.vqa(images, questions), small.vqa(images, questions)
        report["agreement"] = {"greedy_captions_equal": float(np.mean([x == y for x, y in zip(*caps)])),
                               "beam3_captions_equal": float(np.mean([x == y for x, y in zip(*beams)])),
                               "vqa_answers_equal": float(np.mean([x == y for x, y in zip(*answers)])),
                               "examples": args.batch}
        report["caption_seconds_median"] = {"fp32": _median_seconds(lambda: full.caption(images, **gen), args.repeats),
                                            "int8": _median_seconds(lambda: small.caption(images, **gen), args.repeats)}
        full_r, small_r = blip_jax.load(tmp / "retrieval"), blip_jax.load(tmp / "retrieval", int8=True)
        source = SyntheticShapes(args.images, seed=3, image_size=64)
        recs = [source[i] for i in range(args.images)]
        imgs, texts = [r["image"] for r in recs], [r["caption"] for r in recs]
        recalls = {}
        for name, m in (("fp32", full_r), ("int8", small_r)):
            sim = m.similarity(m.image_features(imgs), m.text_features(texts))
            recalls[name] = recall_at_k(sim, sim.T, np.arange(args.images), [[i] for i in range(args.images)])
        report["itc_recall"] = {name: {k: r[k] for k in ("txt_r1", "txt_r5", "img_r1", "img_r5", "r_mean")}
                                for name, r in recalls.items()}
        feats = full_r.image_features(imgs[:16]), small_r.image_features(imgs[:16])
        report["itc_image_features_max_abs_diff"] = float(np.abs(feats[0] - feats[1]).max())
    print(report)
    write_report(args.out, report)


if __name__ == "__main__":
    main()
