"""`blip-jax demo`: the whole path on a tiny random model, end to end, in about a minute.

Builds tiny random transformers BLIP checkpoints (captioning and retrieval) with their tokenizer
and image processor, converts them with `blip-jax convert`, then captions a few images and scores
image-text matches. The weights are random, so the captions are random words: the demo shows the
machinery working (and how to drive it), not a trained model's quality.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

TEXTS = ["a dog sitting on the grass", "a red car on the street", "a woman holding an umbrella"]


def _log(message: str) -> None:
    print(f"[demo] {message}", file=sys.stderr, flush=True)


def run_demo(workdir: str | Path) -> dict:
    import blip_jax
    from blip_jax.atomic import write_json
    from blip_jax.convert import convert
    from blip_jax.convert.verify import compare
    from blip_jax.gallery import write_gallery
    from blip_jax.testing import sample_images, write_tiny_checkpoint

    workdir = Path(workdir)
    start = time.time()
    models, verify = {}, {}
    for architecture in ("caption", "retrieval"):
        hf_dir = workdir / f"transformers_{architecture}"
        _log(f"building a tiny random transformers BLIP ({architecture}) in {hf_dir}")
        write_tiny_checkpoint(hf_dir, architecture)
        dst = workdir / f"blip_jax_{architecture}"
        _log(f"converting it: blip-jax convert {hf_dir} {dst}")
        convert(hf_dir, dst, overwrite=True)
        verify[architecture] = compare(hf_dir, dst)
        _log(f"largest |transformers - blip-jax| per output: {verify[architecture]}")
        models[architecture] = blip_jax.load(dst)

    image_dir = workdir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(sample_images(4)):
        paths.append(image_dir / f"image_{i}.png")
        image.save(paths[-1])

    _log("captioning (beam search, 3 beams)")
    captions = models["caption"].caption(paths, max_new_tokens=12)
    _log("scoring image-text matches (ITM) and similarities (ITC)")
    itc = models["retrieval"].itc(paths, TEXTS)
    results = []
    for i, path in enumerate(paths):
        itm = models["retrieval"].itm(path, TEXTS)
        results.append({"image": str(path), "caption": captions[i],
                        "itm_probability": dict(zip(TEXTS, map(float, itm))),
                        "itc_similarity": dict(zip(TEXTS, map(float, itc[i])))})

    summary = {"results": results, "verify_max_abs_diff": verify, "seconds": round(time.time() - start, 1),
               "models": {k: str(m.path) for k, m in models.items()}}
    write_json(workdir / "results.json", summary)
    gallery = write_gallery(
        workdir / "gallery.html",
        [{"image": r["image"], "lines": [f"caption: {r['caption']}"] +
          [f"ITM {p:.2f}: {t}" for t, p in r["itm_probability"].items()]} for r in results],
        title="blip-jax demo (tiny random weights)")
    summary["gallery"] = str(gallery)
    _log(f"done in {summary['seconds']} s: {workdir / 'results.json'} and {gallery}")
    return summary
