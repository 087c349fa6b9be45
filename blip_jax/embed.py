"""`blip-jax embed --ckpt M --images SRC | --texts SRC --workdir W`: unit-norm ITC features of a large
image (or text) set, computed once, for `blip-jax search` (`blip_jax.search.Index`).

Images come from a folder (every image file below it, its id the relative path), an annotation file
(`blip_jax.data.annotations`: each image once, its id the record's image_id or path) or WebDataset
shards (id "<shard>/<key>"); texts from a .txt file (one per line), a JSON list of strings, or an
annotation file's captions. Features are BLIP's projected CLS [D] or BLIP-2's query vectors
[Q, D] for images, the projected text CLS [D] for texts (what retrieval scores with).

Work is cut into shards like the eval jobs' (`blip_jax.eval.runner`): spread over processes,
batches over devices, each finished shard written atomically to `W/shards/<kind>/NNNNN.npz`
(features, ok), so a killed job resumes where it stopped and its shards equal an uninterrupted
run's. `W/index.json` (the manifest `Index` reads) names the model (path and fingerprint), the
shards, their row counts, the feature shape and how scores combine; `W/ids.jsonl` holds one line
per row (id, and the image path or the text). Unreadable images are skipped and counted: their rows
stay, flagged not ok, and search never returns them. W holds one model's embeddings of one input
(`blip_jax.jobs`): another model or input is refused.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from blip_jax import jobs, paths
from blip_jax.atomic import write_file, write_json

INDEX_FILE = "index.json"
IDS_FILE = "ids.jsonl"
KINDS = ("images", "texts")
MAX_WORDS = 50  # texts (indexed and queried) are cleaned and cut as retrieval evaluation does


def image_items(source: str, image_root: str = "") -> tuple[list[dict], dict]:
    """(items {"id", "image"}, skipped counts) of an image folder, annotation file (its images under
    `image_root`, default its folder) or WebDataset shards."""
    from blip_jax.data.paths import Root
    from blip_jax.eval.classification import IMAGE_SUFFIXES

    path = Path(source)
    if path.is_dir() and not any(p.suffix == ".tar" for p in path.iterdir()):
        root = Root(path)
        items, outside = [], 0
        for p in sorted(q for q in path.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES):
            real = root.resolve(p.relative_to(path).as_posix())
            if real is None:  # a link out of the folder: never opened
                outside += 1
                continue
            items.append({"id": p.relative_to(path).as_posix(), "image": real})
        return items, ({"outside_root": outside} if outside else {})
    if path.suffix in (".json", ".jsonl"):
        from blip_jax.data.annotations import AnnotationSource

        src = AnnotationSource(path, image_root=image_root, expand_captions=False)
        seen, items = set(), []
        for i in range(len(src)):
            r = src[i]
            if r["image"] in seen:
                continue
            seen.add(r["image"])
            items.append({"id": str(r.get("image_id", r["image"])), "image": r["image"]})
        return items, dict(src.skipped)
    from blip_jax.data.webdataset import WebDatasetSource

    src = WebDatasetSource(source)
    return [{"id": r["image_id"], "image": r["image"]} for r in (src[i] for i in range(len(src)))], dict(src.skipped)


def text_items(source: str) -> list[dict]:
    """Items {"id", "text"} of a .txt file (a line each), a JSON list of strings, or an annotation file."""
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"--texts {source}: no such file")
    if path.suffix == ".txt":
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        return [{"id": str(i), "text": t} for i, t in enumerate(lines) if t]
    data = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(data, list) and all(isinstance(t, str) for t in data):
        return [{"id": str(i), "text": t} for i, t in enumerate(data)]
    from blip_jax.data.annotations import AnnotationSource

    src = AnnotationSource(path, expand_captions=False)
    items = []
    for i in range(len(src)):
        r = src[i]
        for j, caption in enumerate(r.get("captions") or [r.get("caption", "")]):
            items.append({"id": f"{r.get('image_id', i)}/{j}", "text": caption, "image_id": str(r.get("image_id", i))})
    return items


def similarity_kind(model) -> str:
    """How an image row and a text row score: a dot product (BLIP), or its max over the query
    vectors (BLIP-2)."""
    return "max_over_queries" if model.family == "BLIP-2" else "dot"


def embed(model, kind: str, source: str, workdir, *, image_root: str = "", shard_size: int = 1024,
          progress: bool = True) -> dict:
    """Embed `source` (`kind` images or texts) into `workdir`; returns the manifest (module docstring)."""
    import jax

    from blip_jax.data.transforms import pre_caption
    from blip_jax.eval import runner
    from blip_jax.eval.inputs import load_pixels

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    start = time.time()
    workdir = paths.path(workdir)
    if kind == "images":
        items, skipped = image_items(source, image_root)
    else:
        items, skipped = text_items(source), {}
    if not items:
        raise ValueError(f"--{kind} {source}: nothing to embed")
    identity = {"job": "embed", "models": {"model": jobs.model_identity(model.path)},
                "settings": {"kind": kind, "source": str(Path(source).resolve()), "items": len(items),
                             "image_root": str(image_root)}}
    folder = workdir / "shards" / kind
    jobs.claim(workdir, identity, has_outputs=folder.is_dir() and any(folder.glob("*.npz")),
               write=jax.process_index() == 0)

    def compute(a, b):
        if kind == "texts":  # cleaned as retrieval evaluation cleans them
            texts = [pre_caption(it["text"], MAX_WORDS) for it in items[a:b]]
            return {"features": model.embed_texts(texts).astype(np.float32),
                    "ok": np.ones(b - a, bool)}
        pixels, ok, reasons = load_pixels(model, [it["image"] for it in items[a:b]])
        features = model.features_of(model._image_embeds(pixels)).astype(np.float32)
        features[~ok] = 0.0
        return {"features": features, "ok": ok, "reasons": np.array(reasons + [""] * (b - a - len(reasons)))}

    done = runner.run_sharded(workdir, kind, len(items), compute, shard_size=shard_size, progress=progress)
    unreadable = int((~done["ok"]).sum())
    if unreadable:
        for reason in done.get("reasons", []):
            if reason:
                skipped[str(reason)] = skipped.get(str(reason), 0) + 1
    count = len(items)
    shards = [{"file": f"shards/{kind}/{i:05d}.npz", "rows": min(shard_size, count - s)}
              for i, s in enumerate(range(0, count, shard_size))]
    manifest = {"kind": kind, "model": identity["models"]["model"], "family": model.family,
                "architecture": model.architecture, "similarity": similarity_kind(model), "count": count,
                "feature_shape": list(done["features"].shape[1:]), "shards": shards, "source": str(source),
                "skipped": skipped, "unreadable": unreadable, "seconds": round(time.time() - start, 2)}
    if jax.process_index() == 0:
        lines = "".join(json.dumps({k: (str(v) if k == "image" else v) for k, v in it.items()
                                    if isinstance(v, (str, int, os.PathLike))}, ensure_ascii=False) + "\n"
                        for it in items)
        write_file(workdir / IDS_FILE, lines)
        write_json(workdir / INDEX_FILE, manifest)
    return manifest


def main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="blip-jax embed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="a blip-jax model directory (BLIP retrieval / pretrain, BLIP-2 stage 1)")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--images", help="an image folder, an annotation file (.json / .jsonl) or WebDataset shards")
    group.add_argument("--texts", help="a .txt file (one text per line), a JSON list of strings, or an annotation file")
    p.add_argument("--image-root", default="", help="--images FILE.json: the folder its image paths are under "
                   "(default: the file's folder)")
    p.add_argument("--workdir", required=True, help="the index directory to write (index.json, ids.jsonl, shards/)")
    p.add_argument("--batch-size", type=int, default=32, help="rows per device batch")
    p.add_argument("--shard-size", type=int, default=1024, help="rows per resumable shard")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    args = p.parse_args(argv)
    source = args.images or args.texts
    if not args.texts and not Path(source).exists() and "*" not in source:
        print(f"blip-jax embed: error: --images {source}: no such file or directory", file=sys.stderr)
        return 2
    import jax
    from jax.sharding import Mesh

    import blip_jax

    model = blip_jax.load(args.ckpt, batch_size=args.batch_size)
    model._require("itc")
    model.use_mesh(Mesh(np.array(jax.local_devices()), ("data",)))
    manifest = embed(model, "images" if args.images else "texts", source, args.workdir, image_root=args.image_root,
                     shard_size=args.shard_size, progress=args.progress)
    print(json.dumps({k: v for k, v in manifest.items() if k != "shards"}, indent=2))
    return 0
