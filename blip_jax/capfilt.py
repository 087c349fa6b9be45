"""CapFilt, BLIP's dataset bootstrapping: caption web images, then filter web and synthetic texts.

    blip-jax capfilt --config=configs/capfilt.py:web --workdir=W \
        --config.data.path=cc3m/shards --config.captioner=blip-caption-coco --config.filter=blip-itm-coco

BLIP (section 3.3 of the paper; no reference code was published). For every web image-text pair:

1. the captioner (a BLIP caption model fine-tuned on COCO) writes `num_captions` synthetic captions by
   nucleus sampling (`top_p` 0.9) after the prompt "a picture of ", which is removed from the result
   as BLIP does;
2. the filter (a BLIP retrieval model fine-tuned on COCO) scores the web text and every synthetic
   text: ITM match probability (and ITC cosine similarity, reported);
3. `mode="itm"` (BLIP): a text is kept when its match probability >= `threshold` (0.5, i.e. the ITM
   head says "match"); `mode="itc_topk"` (the BLIP-2 variant, filter a BLIP-2 retrieval model): the
   image's candidate texts are ranked by ITC similarity and the `top_k` best are kept.

Texts are cleaned as BLIP's pre-training data is (`pre_caption`, `max_words`) before scoring, and
written cleaned. Unreadable images are skipped and counted by reason, never fatal.

Sharding and resuming (`blip_jax.eval.runner.run_sharded`): records are cut into shards of
`shard_size`, each shard into batches of `batch_size`; a finished shard's scores are written
atomically to `W/shards/capfilt/<i>.jsonl`, so a killed job recomputes only unfinished shards. The
captions of the batch that starts at record `s` are sampled with the seed `derive_seed(seed, s)`,
the batch padded to `batch_size` rows: captions depend only on (seed, shard_size, batch_size) and the
data, not on which process computed them, nor on the device count as long as it divides
`batch_size` (a model pads a batch to a multiple of its devices, which changes the random stream). The shards hold scores, not
decisions: rerunning with another `threshold`, `mode` or `top_k` re-decides without recomputing
anything. The models (path and content fingerprint) and the settings that change the scores are
recorded in `W/job.json` (`blip_jax.jobs`); a rerun with others is refused (use a new workdir).

Outputs in W (process 0):

    cleaned.jsonl     one line per kept (image, text): image (path, or "<data kind>:<index>" for
                      in-memory images), text, provenance ("web" | "synthetic"), itm_probability,
                      itc_similarity, source_index (and image_id when the source has one)
    all.jsonl         every candidate, the same fields plus candidate (0.. per image), kept, drop_reason
                      ("below_threshold" | "not_top_k" | "empty_text"), itc_rank, original_text (web
                      texts whose cleaning changed them)
    cleaned_packed/   the kept pairs with their image bytes as ArrayRecord (`blip_jax.data.packed`;
                      read with PackedSource; each record's "caption" is the kept text)
    summary.json      counts (images, unreadable by reason, web / synthetic candidates kept and dropped),
                      shards computed in this run, seconds, settings
    gallery.html      kept and dropped texts of the first `gallery` images (in-memory images get
                      thumbnails under W/gallery_images/)
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import numpy as np

STAGE = "capfilt"
PROVENANCES = ("web", "synthetic")
MODES = ("itm", "itc_topk")
MAX_EXAMPLES = 20  # unreadable images listed in summary.json
TINY = "tiny"  # captioner / filter value: build tiny random models under W/tiny_models (tests, demos)
# Settings that change the shards' contents (captions or scores); the others only change decisions.
SCORE_SETTINGS = ("data", "captioner", "filter", "num_captions", "top_p", "prompt", "max_new_tokens",
                  "min_new_tokens", "seed", "shard_size", "batch_size", "max_words", "generation")


# ------------------------------------------------------------------------------ settings
def base_config():
    """Every CapFilt config field with its default (the paper's settings); configs/capfilt.py sets
    the presets."""
    import ml_collections

    from blip_jax.train.defaults import source_defaults

    c = ml_collections.ConfigDict()
    # the web image-text pairs (blip_jax.data.sources); one record per image, its texts together
    c.data = dict(source_defaults(), kind="webdataset", expand_captions=False)
    c.captioner = ""  # blip-jax caption model directory (BLIP fine-tuned on COCO captioning); "tiny": random
    c.filter = ""  # blip-jax retrieval model directory (BLIP ITM/ITC on COCO; BLIP-2 for itc_topk); "tiny"
    c.num_captions = 1  # synthetic captions per image (the BLIP paper samples one; BLIP-2 ten)
    c.top_p = 0.9  # nucleus sampling
    c.prompt = "a picture of "  # the captioner's prompt, removed from its outputs
    c.max_new_tokens = 30
    c.min_new_tokens = 5
    c.generation = {}  # any other GenerationConfig option for the captioner (e.g. top_k, temperature)
    c.seed = 0
    c.max_words = 30  # texts are cleaned as BLIP's pre-training data (pre_caption, 30 words)
    c.mode = "itm"  # itm: keep ITM probability >= threshold (BLIP) | itc_topk: top_k by ITC (BLIP-2 variant)
    c.threshold = 0.5
    c.top_k = 2
    c.shard_size = 1024  # records per resumable shard (W/shards/capfilt)
    c.batch_size = 32  # images per captioning batch; also the filter's batch of pairs
    c.gallery = 24  # images shown in W/gallery.html
    c.pack = True  # write W/cleaned_packed (ArrayRecord)
    c.pack_records_per_shard = 10_000
    return c


# ------------------------------------------------------------------------------ pure pieces
def derive_seed(seed: int, start: int) -> int:
    """The sampling seed of the batch of records starting at index `start` (a 31-bit int)."""
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(start)]).generate_state(1)[0] & 0x7FFFFFFF)


def filter_decisions(probabilities, threshold: float) -> np.ndarray:
    """BLIP's filter: keep each text whose ITM match probability is >= `threshold` ([n] bool)."""
    return np.asarray(probabilities, np.float64) >= threshold


def topk_decisions(similarities, k: int) -> np.ndarray:
    """The BLIP-2 variant: keep the `k` texts of one image with the highest ITC similarity ([n] bool;
    all of them when there are fewer than k). Ties go to the earlier text (the web text first)."""
    similarities = np.asarray(similarities, np.float64)
    keep = np.zeros(similarities.shape, bool)
    keep[np.argsort(-similarities, kind="stable")[:max(0, int(k))]] = True
    return keep


def strip_prompt(text: str, prompt: str) -> str:
    """`text` without a leading `prompt` (compared case-insensitively, surrounding spaces ignored)."""
    head = (prompt or "").strip()
    if head and text.lower().startswith(head.lower()):
        return text[len(head):].strip()
    return text.strip()


def clean_text(text, max_words: int) -> str | None:
    """BLIP's caption cleaning (`pre_caption`); None for a text that is empty or not a string."""
    from blip_jax.data.records import BadRecord
    from blip_jax.data.transforms import pre_caption

    try:
        return pre_caption(text, max_words)
    except BadRecord:
        return None


def image_reference(record: dict, index: int, kind: str) -> str:
    """A record's image: its path, or "<data kind>:<index>" for in-memory images (bytes, arrays)."""
    image = record.get("image")
    return image if isinstance(image, str) else f"{kind}:{index}"


def web_texts(record: dict) -> list:
    texts = record.get("captions")
    if texts is None:
        texts = [record.get("caption")] if "caption" in record else []
    return list(texts) if isinstance(texts, (list, tuple)) else [texts]


def decide(candidates: list[dict], mode: str, threshold: float, top_k: int) -> list[dict]:
    """Each candidate row with `kept` and `drop_reason` (and `itc_rank` among its image's texts),
    candidates grouped by source_index."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
    groups: dict[int, list[dict]] = {}
    for row in candidates:
        groups.setdefault(row["source_index"], []).append(row)
    out = []
    for rows in groups.values():
        valid = np.array([bool(r["text"]) for r in rows])
        sims = np.array([r["itc_similarity"] for r in rows], np.float64)
        order = np.argsort(-np.where(valid, sims, -np.inf), kind="stable")
        rank = np.empty(len(rows), np.int64)
        rank[order] = np.arange(len(rows))
        if mode == "itm":
            keep = filter_decisions([r["itm_probability"] for r in rows], threshold)
            reason = "below_threshold"
        else:
            keep = topk_decisions(np.where(valid, sims, -np.inf), min(int(top_k), int(valid.sum())))
            reason = "not_top_k"
        for r, k, v, rk in zip(rows, keep, valid, rank):
            kept = bool(k and v)
            out.append({**r, "kept": kept, "drop_reason": None if kept else (reason if v else "empty_text"),
                        "itc_rank": int(rk)})
    return out


def count_summary(rows: list[dict], decided: list[dict], num_records: int) -> dict:
    """The counts of summary.json from the shard rows and the decided candidates."""
    unreadable: dict[str, int] = {}
    examples = []
    bad_texts = 0
    for r in rows:
        if r["kind"] == "unreadable_image":
            unreadable[r["error"]] = unreadable.get(r["error"], 0) + 1
            if len(examples) < MAX_EXAMPLES:
                examples.append({k: r[k] for k in ("source_index", "image", "error", "detail")})
        elif r["kind"] == "bad_web_text":
            bad_texts += 1
    counts = {"images": num_records, "readable_images": num_records - sum(unreadable.values()),
              "unreadable_images": {"total": sum(unreadable.values()), "by_reason": unreadable,
                                    "examples": examples},
              "unusable_web_texts": bad_texts}
    for provenance in PROVENANCES:
        mine = [r for r in decided if r["provenance"] == provenance]
        kept = sum(r["kept"] for r in mine)
        counts[provenance] = {"candidates": len(mine), "kept": kept, "dropped": len(mine) - kept}
    counts["candidates"] = len(decided)
    counts["kept"] = sum(r["kept"] for r in decided)
    counts["dropped"] = counts["candidates"] - counts["kept"]
    counts["images_with_kept_text"] = len({r["source_index"] for r in decided if r["kept"]})
    return counts


# ------------------------------------------------------------------------------ the job
def _settings(cfg) -> dict:
    return json.loads(cfg.to_json()) if hasattr(cfg, "to_json") else dict(cfg)


def _tiny_models(workdir: Path) -> dict:
    """Tiny random caption and retrieval models under W/tiny_models (built once; needs torch and
    transformers). The weights are random: the job runs, its texts are random words."""
    from blip_jax.convert import convert
    from blip_jax.testing import write_tiny_checkpoint

    out = {}
    for architecture in ("caption", "retrieval"):
        dst = workdir / "tiny_models" / architecture
        if not (dst / "config.json").exists():
            hf = write_tiny_checkpoint(workdir / "tiny_models" / f"transformers_{architecture}", architecture)
            convert(hf, dst, progress=False, overwrite=True)
        out[architecture] = str(dst)
    return out


def _model_dirs(cfg, workdir: Path) -> tuple[str, str]:
    captioner, filter_dir = cfg.captioner, cfg.filter
    if TINY in (captioner, filter_dir):
        tiny = _tiny_models(workdir)
        captioner = tiny["caption"] if captioner == TINY else captioner
        filter_dir = tiny["retrieval"] if filter_dir == TINY else filter_dir
    for name, value in (("captioner", captioner), ("filter", filter_dir)):
        if not value:
            raise ValueError(f"config.{name} is required: a blip-jax model directory (`blip-jax convert`)")
    return str(captioner), str(filter_dir)


def load_models(cfg, workdir: str | Path):
    """(captioner, filter): loaded and placed on this process's devices."""
    import jax
    from jax.sharding import Mesh

    import blip_jax

    captioner_dir, filter_dir = _model_dirs(cfg, Path(workdir))
    mesh = Mesh(np.array(jax.local_devices()), ("data",))
    captioner = blip_jax.load(captioner_dir, batch_size=cfg.batch_size).use_mesh(mesh)
    filter_model = blip_jax.load(filter_dir, batch_size=cfg.batch_size).use_mesh(mesh)
    if "caption" not in captioner.tasks:
        raise ValueError(f"config.captioner {captioner_dir} is a {captioner.architecture} model; "
                         "CapFilt needs a caption model")
    if not {"itm", "itc"} <= set(filter_model.tasks):
        raise ValueError(f"config.filter {filter_dir} is a {filter_model.architecture} model; CapFilt needs a "
                         "retrieval model (BLIP, or BLIP-2 for the itc_topk variant)")
    return captioner, filter_model


def _claim(workdir: Path, cfg, captioner, filter_model) -> None:
    """Refuse to mix shards computed by other models or score settings (blip_jax.jobs)."""
    import jax

    from blip_jax import jobs

    settings = _settings(cfg)
    identity = {"job": "capfilt",
                "models": {"captioner": jobs.model_identity(captioner.path),
                           "filter": jobs.model_identity(filter_model.path)},
                "settings": {k: settings.get(k) for k in SCORE_SETTINGS if k not in ("captioner", "filter")}}
    folder = workdir / "shards" / STAGE
    jobs.claim(workdir, identity, has_outputs=folder.is_dir() and any(folder.glob("[0-9]*.jsonl")),
               write=jax.process_index() == 0)


def _caption_options(cfg) -> dict:
    return dict(do_sample=True, num_beams=1, top_p=float(cfg.top_p), max_new_tokens=int(cfg.max_new_tokens),
                min_new_tokens=int(cfg.min_new_tokens), num_return_sequences=int(cfg.num_captions),
                **dict(cfg.generation))


def score_batch(captioner, filter_model, records: list[dict], start: int, cfg, kind: str) -> list[dict]:
    """Shard rows of the records `start, start + 1, ...`: unreadable images, unusable web texts and
    every candidate text (web, then synthetic) with its ITM probability and ITC similarity."""
    import jax

    from blip_jax.data.records import BadRecord
    from blip_jax.data.transforms import decode_image

    rows, arrays, owners = [], [], []
    n = int(cfg.num_captions)
    for offset, record in enumerate(records):
        index = start + offset
        ref = {"source_index": index, "image": image_reference(record, index, kind)}
        if record.get("image_id") is not None:
            ref["image_id"] = str(record["image_id"])
        try:
            if record.get("image") is None:
                raise BadRecord("incomplete_sample", "no image")
            arrays.append(decode_image(record["image"]))
        except BadRecord as e:
            detail = re.sub(r" at 0x[0-9a-fA-F]+", "", e.detail)  # object addresses: reruns give equal rows
            rows.append({"kind": "unreadable_image", **ref, "error": e.reason, "detail": detail})
            continue
        web = []
        for text in web_texts(record):
            cleaned = clean_text(text, int(cfg.max_words))
            if cleaned is None:
                rows.append({"kind": "bad_web_text", **ref, "error": "bad_text", "text": str(text)})
            else:
                web.append((cleaned, text))
        owners.append((ref, web))
    if not arrays:
        return rows
    # Sample the captions on a batch padded to batch_size rows: the random stream of each row then
    # depends only on the seed of this batch and the row's position.
    captions = []
    if n:
        padded = arrays + [arrays[0]] * max(0, int(cfg.batch_size) - len(arrays))
        captions = captioner.caption(padded, prompt=cfg.prompt or None, seed=derive_seed(cfg.seed, start),
                                     **_caption_options(cfg))[: len(arrays) * n]
    candidates, image_index = [], []
    for i, (ref, web) in enumerate(owners):
        for j, (cleaned, original) in enumerate(web):
            row = {"kind": "candidate", **ref, "provenance": "web", "candidate": j, "text": cleaned}
            if cleaned != original:
                row["original_text"] = original
            candidates.append(row)
        for j in range(n):
            synthetic = strip_prompt(captions[i * n + j], cfg.prompt)
            candidates.append({"kind": "candidate", **ref, "provenance": "synthetic", "candidate": len(web) + j,
                               "text": clean_text(synthetic, int(cfg.max_words)) or ""})
        image_index += [i] * (len(web) + n)
    if not candidates:
        return rows
    texts = [c["text"] for c in candidates]
    image_index = np.asarray(image_index)
    embeds = filter_model.image_embeddings(arrays)
    logits = filter_model._itm_rows(embeds, image_index, texts)  # [pairs, 2]: no-match, match
    probabilities = np.asarray(jax.nn.softmax(logits, -1)[:, 1], np.float64)
    similarity = filter_model.similarity(filter_model.features_of(embeds), filter_model.text_features(texts))
    similarity = np.asarray(similarity, np.float64)[image_index, np.arange(len(texts))]
    for row, p, s in zip(candidates, probabilities, similarity):
        row["itm_probability"], row["itc_similarity"] = float(p), float(s)
    return sorted(rows + candidates, key=lambda r: r["source_index"])


class KeptSource:
    """Random-access source of the kept pairs, each with its image read again from the data source
    (what `blip_jax.data.packed.pack` writes)."""

    FIELDS = ("provenance", "itm_probability", "itc_similarity", "source_index", "image_id")

    def __init__(self, source, kept: list[dict]):
        self.source = source
        self.kept = kept

    def __len__(self) -> int:
        return len(self.kept)

    def __getitem__(self, index: int) -> dict:
        row = self.kept[int(index)]
        record = {"image": self.source[row["source_index"]]["image"], "caption": row["text"], "task": "caption"}
        record.update({k: row[k] for k in self.FIELDS if k in row})
        return record

    def __repr__(self) -> str:
        return f"CapFilt kept pairs ({len(self.kept)}) of {self.source!r}"


def _gallery(workdir: Path, source, decided: list[dict], count: int) -> None:
    from PIL import Image

    from blip_jax.data.transforms import decode_image
    from blip_jax.gallery import write_gallery

    groups: dict[int, list[dict]] = {}
    for row in decided:
        groups.setdefault(row["source_index"], []).append(row)
    # about half the cards show images with a kept text, the rest images with dropped texts
    with_kept = [i for i, rows in groups.items() if any(r["kept"] for r in rows)]
    chosen = set(with_kept[: (count + 1) // 2])
    chosen |= set([i for i in groups if i not in chosen and not all(r["kept"] for r in groups[i])]
                  [: count - len(chosen)])
    chosen |= set([i for i in groups if i not in chosen][: count - len(chosen)])
    items = []
    for index in sorted(chosen):
        rows = groups[index]
        image = rows[0]["image"]
        if not isinstance(source[index]["image"], str):
            thumb = Image.fromarray(decode_image(source[index]["image"]))
            thumb.thumbnail((256, 256))
            path = workdir / "gallery_images" / f"{index:08d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            thumb.save(path)
            image = str(path)
        lines = [f"{'KEPT' if r['kept'] else 'dropped'} {r['provenance']} (itm {r['itm_probability']:.2f}, "
                 f"itc {r['itc_similarity']:.2f}): {r['text']}" for r in rows]
        items.append({"image": image, "lines": lines})
    if items:
        write_gallery(workdir / "gallery.html", items, "blip-jax capfilt: kept and dropped texts")


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    from blip_jax.atomic import write_file

    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    write_file(path, lines)


def run(cfg, workdir: str | Path, *, progress: bool = True, models=None) -> dict:
    """The whole job (module docstring); returns the summary. `models`: (captioner, filter) already
    loaded (else loaded from cfg.captioner / cfg.filter)."""
    import jax

    from blip_jax.data.sources import build_source
    from blip_jax.eval import runner

    start_time = time.time()
    workdir = Path(workdir)
    if cfg.mode not in MODES:
        raise ValueError(f"unknown mode {cfg.mode!r}; use one of {', '.join(MODES)}")
    if int(cfg.num_captions) < 0:
        raise ValueError(f"num_captions must be >= 0, got {cfg.num_captions}")
    captioner, filter_model = models if models is not None else load_models(cfg, workdir)
    data = dict(cfg.data)
    source = build_source(data)
    _claim(workdir, cfg, captioner, filter_model)
    kind = data.get("kind", "synthetic")
    n = len(source)
    folder = workdir / "shards" / STAGE
    before = {p.name for p in folder.glob("[0-9]*.jsonl")} if folder.exists() else set()
    batch = max(1, int(cfg.batch_size))

    def compute(a: int, b: int) -> list[dict]:
        rows = []
        for s in range(a, b, batch):
            records = [source[i] for i in range(s, min(b, s + batch))]
            rows += score_batch(captioner, filter_model, records, s, cfg, kind)
        return rows

    rows = runner.run_sharded(workdir, STAGE, n, compute, shard_size=int(cfg.shard_size), progress=progress)
    after = {p.name for p in folder.glob("[0-9]*.jsonl")}
    decided = decide([r for r in rows if r["kind"] == "candidate"], cfg.mode, float(cfg.threshold), int(cfg.top_k))
    summary = {**count_summary(rows, decided, n),
               "skipped_records": dict(getattr(source, "skipped", {}) or {}),
               "shards": {"total": -(-n // int(cfg.shard_size)), "computed_this_run": len(after - before)},
               "models": {name: {"path": str(m.path), "class": type(m).__name__, "architecture": m.architecture}
                          for name, m in (("captioner", captioner), ("filter", filter_model))},
               "settings": _settings(cfg)}
    if jax.process_index() != 0:
        return summary
    fields = ("image", "text", "provenance", "itm_probability", "itc_similarity", "source_index", "image_id")
    drop = {"kind"}
    _write_jsonl(workdir / "all.jsonl", [{k: v for k, v in r.items() if k not in drop} for r in decided])
    kept = [{k: r[k] for k in fields if k in r} for r in decided if r["kept"]]
    _write_jsonl(workdir / "cleaned.jsonl", kept)
    if cfg.pack:
        from blip_jax.data.packed import pack

        manifest = pack(KeptSource(source, kept), workdir / "cleaned_packed", verify=False, overwrite=True,
                        records_per_shard=int(cfg.pack_records_per_shard), progress=progress)
        summary["packed"] = {"path": str(workdir / "cleaned_packed"), "records": manifest["records"],
                             "skipped": manifest["skipped"]}
    if cfg.gallery:
        _gallery(workdir, source, decided, int(cfg.gallery))
    summary["seconds"] = round(time.time() - start_time, 2)
    summary["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    _write_json(workdir / "summary.json", summary)
    return summary


def _write_json(path: Path, summary: dict) -> None:
    from blip_jax.atomic import write_json

    write_json(path, summary, ensure_ascii=False)


# ------------------------------------------------------------------------------ command line
def _flags(argv: list[str]):
    from absl import flags

    from blip_jax import processes

    values = processes.job_flags(argv, "CapFilt config, e.g. configs/capfilt.py:web")
    flags.DEFINE_string("workdir", None, "output directory: cleaned.jsonl, all.jsonl, cleaned_packed/, "
                        "summary.json, gallery.html", flag_values=values)
    flags.DEFINE_bool("progress", True, "progress bars with rate and ETA", flag_values=values)
    return values


def main(argv: list[str]) -> int:
    """`blip-jax capfilt --config=configs/capfilt.py:<preset> --workdir=W [--config.field=value ...]`"""
    from blip_jax import processes

    argv = ["blip-jax capfilt"] + list(argv)
    values = _flags(argv)  # overrides (--config.x=v) are read from argv, not sys.argv
    usage = ("blip-jax capfilt --config=configs/capfilt.py:<tiny|coco|web|blip2> --workdir=DIR "
             "[--config.captioner=DIR --config.filter=DIR --config.data.path=...]")
    stop = processes.parse(values, argv, usage, __doc__)
    if stop is not None:
        return stop
    if values.config is None or values.workdir is None:
        print(f"usage: {usage}", file=sys.stderr)
        return 2
    import jax

    from blip_jax import validate

    validate.capfilt(values.config)
    processes.initialize(values)
    summary = run(values.config, values.workdir, progress=values.progress)
    if jax.process_index() == 0:
        print(json.dumps({k: v for k, v in summary.items() if k != "settings"}, indent=2))
    return 0
