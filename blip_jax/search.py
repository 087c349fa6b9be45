"""Exact top-k search over an embedding index (`blip-jax embed`), optionally re-ranked by ITM.

    index = blip_jax.search.Index("runs/coco_images")      # W/index.json, ids.jsonl, shards/
    hits = index.query(model, text="two red circles", k=10, rerank=128)

A query (a text against an image index, an image against a text index) is embedded by the model,
then scored against every row shard by shard, on device (one matmul per shard; BLIP-2's image
rows score by their best query vector), keeping a running top-k, so an index larger than memory
streams; shards are kept on the device after their first read while they fit `cache_bytes`
(default 2 GiB), so repeated queries on an index that fits skip the disk. Scores are the ITC cosine similarities retrieval uses. With `rerank=R` the R best are
re-scored as ITM match logit + similarity (LAVIS's retrieval protocol; its images re-read from
their files) and the top k of those returned. An index written by another model than the query's
is refused in one line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from blip_jax import paths
from blip_jax.embed import IDS_FILE, INDEX_FILE


class Index:
    """An embedding index directory (`blip_jax.embed`)."""

    def __init__(self, workdir, cache_bytes: int = 2 << 30):
        self.path = paths.path(workdir)
        self.cache_bytes = cache_bytes
        self._cache: dict[int, tuple] = {}  # shard number -> (device features, ok)
        manifest = self.path / INDEX_FILE
        if not manifest.is_file():
            raise FileNotFoundError(f"{workdir} is not an embedding index (no {INDEX_FILE}; make one with blip-jax embed)")
        self.manifest = json.loads(manifest.read_text(encoding="utf-8"))
        self.kind = self.manifest["kind"]
        self._ids = None
        self._checked = ""  # the model path last verified against the manifest

    def __len__(self) -> int:
        return int(self.manifest["count"])

    @property
    def ids(self) -> list[dict]:
        if self._ids is None:
            self._ids = [json.loads(line) for line in (self.path / IDS_FILE).read_text(encoding="utf-8").splitlines()]
        return self._ids

    def shards(self, device: bool = False):
        """(row offset, features [n, ...] float32, ok [n]) of each shard, one at a time; `device`:
        the features as a device array, from the cache where it holds them."""
        import jax

        offset, cached = 0, sum(f.nbytes for f, _ in self._cache.values())
        for i, shard in enumerate(self.manifest["shards"]):
            if i in self._cache:
                features, ok = self._cache[i]
            else:
                with (self.path / shard["file"]).open("rb") as f, np.load(f) as data:
                    features, ok = data["features"], data["ok"].astype(bool)
                if device:
                    features = jax.device_put(features)
                    if cached + features.nbytes <= self.cache_bytes:
                        self._cache[i] = (features, ok)
                        cached += features.nbytes
            yield offset, (features if device else np.asarray(features)), ok
            offset += shard["rows"]

    def check_model(self, model) -> None:
        from blip_jax import jobs

        built = self.manifest["model"]
        if self._checked == str(model.path):  # fingerprinting reads the model's files: once per model
            return
        if jobs.fingerprint(model.path) != built["fingerprint"]:
            raise ValueError(f"{self.path} was built by another model ({built['path']}, fingerprint "
                             f"{built['fingerprint']}); query it with that model, or embed again with this one")
        self._checked = str(model.path)

    def top_k(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(row indices [k], scores [k]) of the `k` rows scoring highest against `query` (one query's
        features: [D] against image rows [n, D] or [n, Q, D], or [Q, D] against text rows), exact;
        ties go to the lower row; unreadable rows are never returned."""
        import jax.numpy as jnp

        query = jnp.asarray(query, jnp.float32)
        best_rows, best_scores = np.zeros(0, np.int64), np.zeros(0, np.float32)
        for offset, features, ok in self.shards(device=True):
            scores = np.asarray(_scores(query, features, self.manifest["similarity"], self.kind))
            scores = np.where(ok, scores, -np.inf)
            take = min(k, len(scores))
            local = np.argpartition(-scores, take - 1)[:take] if take < len(scores) else np.arange(len(scores))
            best_rows = np.concatenate([best_rows, offset + local])
            best_scores = np.concatenate([best_scores, scores[local]])
            order = np.lexsort((best_rows, -best_scores))[:k]  # by score, then row
            best_rows, best_scores = best_rows[order], best_scores[order]
        keep = np.isfinite(best_scores)
        return best_rows[keep], best_scores[keep]

    def query(self, model, *, text: str | None = None, image=None, k: int = 10, rerank: int = 0) -> list[dict]:
        """The `k` best rows for a text (image index) or an image (text index), best first, each
        {"rank", "row", "id", "score", "similarity", ("itm"), "image" | "text"}."""
        if (text is None) == (image is None):
            raise ValueError("give a text or an image to search with")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        want = "images" if text is not None else "texts"
        if self.kind != want:
            raise ValueError(f"{self.path} indexes {self.kind}; search it with "
                             f"{'an image' if self.kind == 'texts' else 'a text'}")
        self.check_model(model)
        if text is not None:
            from blip_jax.data.transforms import pre_caption
            from blip_jax.embed import MAX_WORDS

            text = pre_caption(text, MAX_WORDS)
            q = model.embed_texts([text])[0]
        else:
            q = model.features_of(model._image_embeds(model.preprocess([_query_image(image)])))[0]
        rows, sims = self.top_k(q, max(k, rerank))
        scores, itm = sims, None
        if rerank and len(rows):
            itm = self._itm(model, rows, text=text, image=image)
            scores = itm + sims  # LAVIS: ITM logit + ITC similarity
            order = np.lexsort((rows, -scores))
            rows, sims, scores, itm = rows[order], sims[order], scores[order], itm[order]
        out = []
        for rank, j in enumerate(rows[:k]):
            row = {"rank": rank + 1, "row": int(j), **self.ids[int(j)], "score": float(scores[rank]),
                   "similarity": float(sims[rank])}
            if itm is not None:
                row["itm"] = float(itm[rank])
            out.append(row)
        return out

    def _itm(self, model, rows: np.ndarray, *, text=None, image=None) -> np.ndarray:
        """ITM match logits of the query with each candidate row."""
        from blip_jax.data.transforms import decode_image

        if text is not None:  # candidates are images: re-read from their files
            if any("image" not in self.ids[int(j)] for j in rows):
                raise ValueError(f"{self.path}: re-ranking re-reads the images from their files, and this index "
                                 "was built from WebDataset shards (no file per image); search it with rerank=0")
            embeds = model._image_embeds(model.preprocess([decode_image(self.ids[int(j)]["image"]) for j in rows]))
            return np.asarray(model.match_logits(embeds, np.arange(len(rows)), [text] * len(rows)))
        embeds = model._image_embeds(model.preprocess([_query_image(image)]))
        return np.asarray(model.match_logits(embeds, np.zeros(len(rows), np.int64),
                                             [self.ids[int(j)]["text"] for j in rows]))


def _query_image(image) -> np.ndarray:
    from blip_jax.data.records import BadRecord
    from blip_jax.data.transforms import decode_image

    try:
        return decode_image(image)
    except BadRecord as e:
        raise ValueError(f"the query image cannot be read: {e}") from None


def _scores(query, features, similarity: str, kind: str):
    """Scores of one query against a shard's rows (module docstring)."""
    import jax.numpy as jnp

    if similarity == "dot":
        return features @ query
    if kind == "images":  # rows [n, Q, D], a text query [D]: the best query vector
        return jnp.max(jnp.einsum("nqd,d->nq", features, query), axis=-1)
    return jnp.max(jnp.einsum("nd,qd->nq", features, query), axis=-1)  # text rows, an image's [Q, D]


def main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="blip-jax search", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--index", required=True, help="an index directory written by blip-jax embed")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--text", help="search an image index with this text")
    group.add_argument("--image", help="search a text index with this image file")
    p.add_argument("--ckpt", help="the model to embed the query with (default: the one that built the index)")
    p.add_argument("--k", type=int, default=10, help="results to return")
    p.add_argument("--rerank", type=int, default=0, help="re-score this many of the best by ITM (0: off)")
    p.add_argument("--output", help="also write the results to this JSON file")
    p.add_argument("--html", help="write an HTML page of the hits here")
    args = p.parse_args(argv)
    index = Index(args.index)
    if args.image is not None and not Path(args.image).is_file():
        print(f"blip-jax search: error: --image {args.image}: no such file", file=sys.stderr)
        return 2
    import blip_jax
    from blip_jax.atomic import write_json

    model = blip_jax.load(args.ckpt or index.manifest["model"]["path"])
    image = Path(args.image).read_bytes() if args.image else None
    hits = index.query(model, text=args.text, image=image, k=args.k, rerank=args.rerank)
    result = {"index": str(args.index), "query": {"text": args.text} if args.text else {"image": args.image},
              "k": args.k, "rerank": args.rerank, "hits": hits}
    if args.output:
        write_json(args.output, result)
    if args.html:
        from blip_jax.gallery import write_gallery

        items = [{"image": h["image"], "lines": [f"#{h['rank']} {h['id']}", f"score {h['score']:.4f}"]}
                 for h in hits if h.get("image")] if index.kind == "images" else \
                [{"image": args.image, "lines": [f"#{h['rank']} {h['text']} ({h['score']:.4f})" for h in hits]}]
        write_gallery(args.html, items, f"blip-jax search: {args.text or args.image}")
    print(json.dumps(result, indent=2, ensure_ascii=False))
    return 0
