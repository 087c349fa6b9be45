#!/usr/bin/env python
"""Image-text retrieval evaluation (ITC + ITM re-rank): blip-jax's procedure vs LAVIS's in PyTorch, same weights.

One run builds a random transformers `BlipForImageTextRetrieval` at BLIP base size (ViT-B/16 at
384 px, a 12-layer BERT-base text encoder with cross-attention, ITC embeddings of 256, 224 M
parameters; every weight perturbed by N(0, 0.02)) with a BERT-style tokenizer over a small
vocabulary written by this script, saves it, converts it with `blip_jax.convert` and loads it with
`blip_jax.load(batch_size=--batch-size)`. The data are synthetic: --images random images (smooth
per-image colour fields plus pixel noise, already normalised) and --texts-per-image random captions
per image (7-14 words of the vocabulary, i.e. 9-16 tokens with [CLS]/[SEP]; image i owns its
captions). Both sides then run the whole retrieval evaluation, float32:

  images    JAX: `model._image_embeds` + `model.features_of` per 256-image shard (eval's
                 embed_images). PyTorch: vision_model -> last_hidden_state (kept for ITM),
                 normalize(vision_proj(CLS)), batches of --batch-size.
  texts     JAX: `model.text_features` per 256-text shard. PyTorch: the tokenizer over all texts
                 once, text_encoder -> normalize(text_proj(CLS)), batches of --batch-size.
  sim_topk  JAX: `model.similarity`, `topk_candidates` of sim and sim.T. PyTorch: img @ txt.T,
                 topk(k) of every row of sim and of sim.T.
  itm_i2t   For each image its top-k texts by sim. JAX: `model.match_logits` in shards of
                 `itm_shard_pairs // k` queries, then `rerank` (ITM logit + sim at the top-k,
                 -100 elsewhere); the pairs of one image share slots that hold its tokens once
                 (their cross-attention keys/values computed once per slot). PyTorch (LAVIS):
                 text_encoder(ids, encoder_hidden_states=the image's ViT tokens) ->
                 itm_head(CLS)[:, 1] (= `use_itm_head=True` logits[:, 1]) in batches of
                 --batch-size pairs, every pair with its own copy of the image; score + topk_sim
                 scattered into a -100 matrix.
  itm_t2i   The same for each text's top-k images; JAX runs these pairs by image as the eval job
                 (`pairs_by_image`), a block's share of the images per PyTorch block of texts.

Each phase is cut into blocks that the two sides run in turn (JAX block, PyTorch block, next block):
images in batches, texts in 256-text shards, ITM in blocks of about --interleave-pairs pairs (whole
batches; for JAX a smaller shard of the eval job's, the same batches), so that a change of machine
load during the run hits both sides alike. JAX is warmed up by one untimed run of the whole procedure.

ITM forward passes: n_img * k + n_txt * k (k capped at the candidates), e.g. the paper's COCO 5k
test (5000 images, 25010 captions, k = 256) has 7.68 M; the measured counts are reported. Both sides
rank their score matrices with `blip_jax.eval.retrieval_metrics.recall_at_k` (a copy of the
reference's `itm_eval`); the check: recall metrics equal and score matrices within 1e-3 (the
max abs differences of the similarity and score matrices are recorded).

Texts start with [CLS] on both sides, as transformers' `BlipForImageTextRetrieval` takes them (LAVIS
puts [ENC] there for ITM: the same cost). PyTorch pads the text set to its longest text (16 tokens,
the width blip-jax's per-batch padding to a multiple of 8 gives these captions);
`--torch-padding max_length` pads to 35 as LAVIS does.

Timing: first an untimed warm-up (JAX: the whole image phase once and every other compiled
function at every batch shape the run uses, so compilation is excluded - a compile listener checks
that the timed runs compile nothing - and its time is reported; PyTorch: one batch of each
piece), then --iters full evaluations. Per phase the median over --iters is
reported; total = sum of the phase medians; ratio = PyTorch time / JAX time (> 1: JAX faster).

    python benchmarks/bench_retrieval.py                     # base: 32 images x 160 texts, k 6; ~8 min on 2 cores
    python benchmarks/bench_retrieval.py --small             # tiny model, smoke run, < 1 min
    python benchmarks/bench_retrieval.py --images 64 --k 16  # larger (ITM time grows with (n_img + n_txt) * k)
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import write_report, jaxlib_version  # benchmarks/ is on the path when a script runs

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
PHASES = ("images", "texts", "sim_topk", "itm_i2t", "itm_t2i")
SHARD = 256  # blip_jax.eval.defaults: shard_size (images / texts per shard)
ITM_SHARD_PAIRS = 8192  # blip_jax.eval.defaults: itm_shard_pairs
LAVIS_MAX_LEN = 35  # LAVIS / BLIP tokenizer max_length in compute_sim_matrix
MIN_WORDS, MAX_WORDS = 7, 14  # 9-16 tokens with [CLS] and [SEP]: one text width (16) on both sides
PAPER = dict(images=5000, texts=25010, k=256)  # COCO 5k test, BLIP's k_test

# BLIP base (model_base_retrieval_coco): ViT-B/16 at 384 px, BERT-base with cross-attention to the
# 768-wide ViT tokens, ITC projections to 256. Vocabulary size of bert-base-uncased + [DEC], [ENC];
# the tokenizer only uses its first few hundred ids.
BASE = dict(
    vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                image_size=384, patch_size=16),
    text=dict(vocab_size=30524, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=512, encoder_hidden_size=768),
    image_text_hidden_size=256,
    images=32, texts_per_image=5, k=6, batch_size=32,
)
SMALL = dict(
    vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                image_size=64, patch_size=16),
    text=dict(vocab_size=None, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=64, encoder_hidden_size=64),
    image_text_hidden_size=32,
    images=12, texts_per_image=5, k=4, batch_size=8,
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=None, help="images (base default 32, small 12)")
    p.add_argument("--texts-per-image", type=int, default=None, help="captions per image (default 5)")
    p.add_argument("--k", type=int, default=None, help="ITM candidates per query, both ways (base default 6, small 4)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="rows per forward pass on both sides (base default 32 = blip-jax eval's, small 8)")
    p.add_argument("--image-size", type=int, default=None, help="ViT input size (base default 384, small 64)")
    p.add_argument("--iters", type=int, default=1, help="timed evaluations per side (median per phase; default 1)")
    p.add_argument("--torch-padding", choices=["longest", "max_length"], default="longest",
                   help="PyTorch tokenisation of the text set: 'longest' (default; padded to the longest text, "
                        "16 tokens here, the width blip-jax uses) or 'max_length' (35 tokens, as LAVIS)")
    p.add_argument("--interleave-pairs", type=int, default=96,
                   help="ITM pairs per block the two sides take turns on (rounded to whole batches; default 96)")
    p.add_argument("--scan-layers", action="store_true", help="convert to the scanned layer layout (default unrolled)")
    p.add_argument("--device-tag", default=None, help="name used in the results file (default: cpu or the GPU)")
    p.add_argument("--small", action="store_true", help="a tiny config for a quick smoke run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--perturb", type=float, default=0.02,
                   help="std of the Gaussian noise added to every random weight (default 0.02)")
    p.add_argument("--out", default=None,
                   help="results JSON path (default benchmarks/results/retrieval_<device>[_small].json)")
    args = p.parse_args(argv)
    sizes = SMALL if args.small else BASE
    for name in ("images", "texts_per_image", "k", "batch_size"):
        if getattr(args, name) is None:
            setattr(args, name, sizes[name])
    if args.image_size is None:
        args.image_size = sizes["vision"]["image_size"]
    if min(args.images, args.texts_per_image, args.k, args.batch_size, args.iters) < 1:
        p.error("--images, --texts-per-image, --k, --batch-size and --iters must be >= 1")
    if args.image_size % sizes["vision"]["patch_size"]:
        p.error(f"--image-size must be a multiple of the patch size {sizes['vision']['patch_size']}")
    return args


def device_name(jax) -> str:
    dev = jax.devices()[0]
    if dev.platform == "cpu":
        return "cpu"
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", dev.device_kind).strip("-").lower() or dev.platform


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def caption_words() -> list[str]:
    """Plain words of `blip_jax.testing.VOCAB` (no specials, punctuation or word pieces)."""
    from blip_jax.testing import VOCAB

    return [w for w in VOCAB if w.isalpha() and not w.startswith("[")]


def build_models(sizes: dict, image_size: int, work: Path, seed: int, perturb: float, scan: bool):
    """A random transformers BLIP retrieval model + tokenizer, saved and converted -> (hf_dir, jax_dir)."""
    import torch
    import transformers

    from blip_jax.convert import convert
    from blip_jax.testing import VOCAB

    hf_dir, jax_dir = work / "hf", work / "jax"
    hf_dir.mkdir(parents=True)
    # the tokenizer of the Salesforce BLIP checkpoints (bert-base-uncased + bos [DEC] + extra [ENC])
    # over a small vocabulary, as blip_jax.testing.write_tiny_checkpoint writes it
    vocab_file = hf_dir / "vocab.txt"
    vocab_file.write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    tokenizer = transformers.BertTokenizer(str(vocab_file), bos_token="[DEC]", additional_special_tokens=["[ENC]"],
                                           model_max_length=sizes["text"]["max_position_embeddings"])
    tokenizer.save_pretrained(hf_dir)
    dec_id, sep_id = tokenizer.convert_tokens_to_ids(["[DEC]", "[SEP]"])
    transformers.BlipImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(hf_dir)
    text = dict(sizes["text"], bos_token_id=dec_id, sep_token_id=sep_id, eos_token_id=sep_id,
                pad_token_id=tokenizer.pad_token_id)
    if text["vocab_size"] is None:
        text["vocab_size"] = len(tokenizer)
    config = transformers.BlipConfig(vision_config=dict(sizes["vision"], image_size=image_size), text_config=text,
                                     image_text_hidden_size=sizes["image_text_hidden_size"])
    torch.manual_seed(seed)
    model = transformers.BlipForImageTextRetrieval(config).eval()
    # HF initialises the vision weights to ~1e-10 and LayerNorms to 1/0: add N(0, perturb**2) to
    # every parameter so that images and texts matter.
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(perturb * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    model.save_pretrained(hf_dir)
    convert(hf_dir, jax_dir, scan_layers=scan, progress=False)
    return hf_dir, jax_dir


def synthetic_data(n_img: int, per_image: int, size: int, rng: np.random.Generator):
    """(pixels [n, 3, size, size] float32, records with captions). Each image: a random 6x6 colour
    field (nearest-upsampled) plus N(0, 0.5) pixel noise, so images differ in more than noise."""
    cells = rng.standard_normal((n_img, 3, 6, 6)).astype(np.float32)
    rep = -(-size // 6)
    coarse = np.repeat(np.repeat(cells, rep, axis=2), rep, axis=3)[:, :, :size, :size]
    pixels = (coarse + 0.5 * rng.standard_normal((n_img, 3, size, size))).astype(np.float32)
    words = caption_words()
    records = []
    for i in range(n_img):
        captions = []
        for j in range(per_image):
            n = MAX_WORDS if i == j == 0 else int(rng.integers(MIN_WORDS, MAX_WORDS + 1))
            captions.append(" ".join(rng.choice(words, n)))
        records.append({"image": None, "image_id": str(i), "captions": captions})
    return pixels, records


class CompileWatch:
    """Counts XLA backend compilations (and their seconds) through jax.monitoring."""

    def __init__(self, jax):
        from jax._src.dispatch import BACKEND_COMPILE_EVENT

        self.event, self.count, self.seconds = BACKEND_COMPILE_EVENT, 0, 0.0
        jax.monitoring.register_event_duration_secs_listener(self)

    def __call__(self, event, duration, **kwargs):
        if event == self.event:
            self.count += 1
            self.seconds += duration

    def snapshot(self):
        return self.count, self.seconds


def chunk_rows(model, n: int, shard: int) -> list[int]:
    """Padded rows of every batch blip-jax runs over n items cut into shards (`BlipModel._chunks`)."""
    rows = []
    for a in range(0, n, shard):
        rows += [r for _, _, r in model._chunks(min(shard, n - a), progress=False)]
    return rows


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(os.cpu_count())
    import jax
    import torch.nn.functional as F
    import transformers

    import blip_jax
    from blip_jax.eval.retrieval import pairs_by_image, rerank, texts_of
    from blip_jax.eval.retrieval_metrics import FILL_VALUE, recall_at_k, topk_candidates

    sizes = SMALL if args.small else BASE
    device = args.device_tag or device_name(jax)
    out_path = Path(args.out) if args.out else RESULTS / f"retrieval_{device}{'_small' if args.small else ''}.json"
    rng = np.random.default_rng(args.seed)
    bs = args.batch_size
    watch = CompileWatch(jax)

    load_start = os.getloadavg()
    if load_start[0] > 1.0:
        print(f"warning: load average {load_start[0]:.2f} at start: other processes compete for the "
              f"{os.cpu_count()} CPUs and will skew the timings", flush=True)

    # ------------------------------------------------------------------ models and data
    t0 = time.perf_counter()
    tmp = tempfile.TemporaryDirectory(prefix="bench_retrieval_")
    hf_dir, jax_dir = build_models(sizes, args.image_size, Path(tmp.name), args.seed, args.perturb, args.scan_layers)
    hf = transformers.BlipForImageTextRetrieval.from_pretrained(hf_dir, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    model = blip_jax.load(jax_dir, batch_size=bs)
    setup_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in hf.parameters())

    pixels_nchw, records = synthetic_data(args.images, args.texts_per_image, args.image_size, rng)
    pixels_nhwc = np.ascontiguousarray(pixels_nchw.transpose(0, 2, 3, 1))
    pixels_t = torch.from_numpy(pixels_nchw)
    texts, txt2img, img2txt = texts_of(records, max_words=50)  # the eval job's caption cleaning
    n_img, n_txt = len(records), len(texts)
    k_txt, k_img = min(args.k, n_txt), min(args.k, n_img)
    queries = max(1, ITM_SHARD_PAIRS // max(k_txt, k_img))
    widths = {len(tok(t)["input_ids"]) for t in texts}
    if max(widths) > 16 or min(widths) <= 8:
        raise RuntimeError(f"captions tokenise to {sorted(widths)} tokens; expected 9-16 (one-word tokens)")
    print(f"setup (build, save, convert, load): {setup_s:.1f} s; {n_params / 1e6:.1f} M parameters; "
          f"{n_img} images at {args.image_size} px, {n_txt} texts ({min(widths)}-{max(widths)} tokens), k {args.k}, "
          f"batch {bs}; jax {jax.__version__} on {jax.devices()[0]}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), transformers {transformers.__version__}, {os.cpu_count()} CPUs",
          flush=True)

    # ------------------------------------------------------------------ the two procedures
    # Each phase is cut into blocks that both sides run in turn (JAX block, PyTorch block, next
    # block), so that a change of machine load during the run hits both alike. A side's phase is
    # (begin, step(state, a, b) per block, finish); its time is the sum of the three.
    def pair_block(k: int) -> int:
        """Queries per ITM block: about --interleave-pairs pairs, whole batches, <= an eval shard."""
        unit = math.lcm(k, bs)
        return max(1, min(queries, unit * max(1, round(args.interleave_pairs / unit)) // k))

    block_q = {"i2t": pair_block(k_txt), "t2i": pair_block(k_img)}

    def blocks(n: int, size: int):
        return [(a, min(n, a + size)) for a in range(0, n, size)]

    phase_blocks = dict(images=blocks(n_img, bs), texts=blocks(n_txt, SHARD), sim_topk=[(0, 1)],
                        itm_i2t=blocks(n_img, block_q["i2t"]), itm_t2i=blocks(n_txt, block_q["t2i"]))

    # blip-jax: the steps of blip_jax.eval.retrieval.evaluate (its shards cut to the blocks: the
    # batches, and so the work, are the same)
    def jax_images_step(st, a, b):
        e = model._image_embeds(pixels_nhwc[a:b])
        st.setdefault("embeds_parts", []).append(np.asarray(e))
        st.setdefault("feats_parts", []).append(model.features_of(e))

    def jax_images_finish(st):
        st["embeds"], st["img_feats"] = np.concatenate(st.pop("embeds_parts")), np.concatenate(st.pop("feats_parts"))

    def jax_texts_step(st, a, b):
        st.setdefault("txt_parts", []).append(model.text_features(texts[a:b]))

    def jax_texts_finish(st):
        st["txt_feats"] = np.concatenate(st.pop("txt_parts"))

    def jax_sim_topk(st, a, b):
        sim = model.similarity(st["img_feats"], st["txt_feats"]).astype(np.float32)
        st["sim"] = sim
        st["topk_txt"], st["topk_img"] = topk_candidates(sim, k_txt)[0], topk_candidates(sim.T, k_img)[0]
        st["t2i_pairs"] = pairs_by_image(st["topk_img"], n_img)

    def jax_i2t_step(st, a, b):
        index = np.repeat(np.arange(a, b), k_txt)
        st.setdefault("i2t_parts", []).append(
            model.match_logits(st["embeds"], index, [texts[j] for j in st["topk_txt"][a:b].ravel()])
            .reshape(b - a, k_txt))

    def jax_i2t_finish(st):
        st["itm_i2t"] = np.concatenate(st.pop("i2t_parts"))
        st["score_i2t"] = rerank(st["sim"], st["itm_i2t"], st["topk_txt"])

    def jax_t2i_step(st, a, b):  # the eval job runs these pairs by image: block [a, b) of texts
        pair_image, order, bounds = st["t2i_pairs"]  # -> the same share of the images
        pairs = order[bounds[a * n_img // n_txt]:bounds[b * n_img // n_txt]]
        logits = model.match_logits(st["embeds"], pair_image[pairs], [texts[p // k_img] for p in pairs])
        st.setdefault("t2i_parts", []).append((pairs, logits))

    def jax_t2i_finish(st):
        itm = np.empty(n_txt * k_img, np.float32)
        for pairs, logits in st.pop("t2i_parts"):
            itm[pairs] = logits
        st["itm_t2i"] = itm.reshape(n_txt, k_img)
        st["score_t2i"] = rerank(st["sim"].T.copy(), st["itm_t2i"], st["topk_img"])

    # PyTorch: LAVIS compute_sim_matrix
    pad_kw = dict(padding="max_length") if args.torch_padding == "max_length" else dict(padding="longest")

    @torch.no_grad()
    def torch_images_step(st, a, b):
        for c in range(a, b, bs):
            e = hf.vision_model(pixel_values=pixels_t[c:min(b, c + bs)]).last_hidden_state
            st.setdefault("embeds_parts", []).append(e)
            st.setdefault("feats_parts", []).append(F.normalize(hf.vision_proj(e[:, 0, :]), dim=-1))

    def torch_images_finish(st):
        st["embeds"], st["img_feats"] = torch.cat(st.pop("embeds_parts")), torch.cat(st.pop("feats_parts"))

    def torch_texts_begin(st):
        enc = tok(texts, truncation=True, max_length=LAVIS_MAX_LEN, return_tensors="pt", **pad_kw)
        st["ids"], st["mask"] = enc["input_ids"], enc["attention_mask"]

    @torch.no_grad()
    def torch_texts_step(st, a, b):
        for c in range(a, b, bs):
            d = min(b, c + bs)
            h = hf.text_encoder(input_ids=st["ids"][c:d], attention_mask=st["mask"][c:d]).last_hidden_state
            st.setdefault("txt_parts", []).append(F.normalize(hf.text_proj(h[:, 0, :]), dim=-1))

    def torch_texts_finish(st):
        st["txt_feats"] = torch.cat(st.pop("txt_parts"))

    @torch.no_grad()
    def torch_sim_topk(st, a, b):
        sim = st["img_feats"] @ st["txt_feats"].t()
        st["sim"] = sim
        st["topk_sim_txt"], st["topk_txt"] = sim.topk(k=k_txt, dim=1)
        st["topk_sim_img"], st["topk_img"] = sim.t().topk(k=k_img, dim=1)

    @torch.no_grad()
    def torch_itm(embeds, ids, mask, image_rows, text_rows):
        """ITM match logits (`use_itm_head=True` logits[:, 1]) of the pairs, batches of bs pairs."""
        scores = []
        for a in range(0, len(image_rows), bs):
            enc = embeds[image_rows[a:a + bs]]
            h = hf.text_encoder(input_ids=ids[text_rows[a:a + bs]], attention_mask=mask[text_rows[a:a + bs]],
                                encoder_hidden_states=enc,
                                encoder_attention_mask=torch.ones(enc.shape[:-1], dtype=torch.long)).last_hidden_state
            scores.append(hf.itm_head(h[:, 0, :])[:, 1])
        return torch.cat(scores)

    def torch_i2t_step(st, a, b):
        st.setdefault("i2t_parts", []).append(torch_itm(
            st["embeds"], st["ids"], st["mask"], torch.arange(a, b).repeat_interleave(k_txt),
            st["topk_txt"][a:b].reshape(-1)).reshape(b - a, k_txt))

    def torch_i2t_finish(st):
        st["itm_i2t"] = torch.cat(st.pop("i2t_parts"))
        st["score_i2t"] = torch.full((n_img, n_txt), FILL_VALUE).scatter_(1, st["topk_txt"],
                                                                          st["itm_i2t"] + st["topk_sim_txt"])

    def torch_t2i_step(st, a, b):
        st.setdefault("t2i_parts", []).append(torch_itm(
            st["embeds"], st["ids"], st["mask"], st["topk_img"][a:b].reshape(-1),
            torch.arange(a, b).repeat_interleave(k_img)).reshape(b - a, k_img))

    def torch_t2i_finish(st):
        st["itm_t2i"] = torch.cat(st.pop("t2i_parts"))
        st["score_t2i"] = torch.full((n_txt, n_img), FILL_VALUE).scatter_(1, st["topk_img"],
                                                                          st["itm_t2i"] + st["topk_sim_img"])

    procedures = {  # side -> phase -> (begin, step, finish)
        "jax": dict(images=(None, jax_images_step, jax_images_finish), texts=(None, jax_texts_step, jax_texts_finish),
                    sim_topk=(None, jax_sim_topk, None), itm_i2t=(None, jax_i2t_step, jax_i2t_finish),
                    itm_t2i=(None, jax_t2i_step, jax_t2i_finish)),
        "torch": dict(images=(None, torch_images_step, torch_images_finish),
                      texts=(torch_texts_begin, torch_texts_step, torch_texts_finish),
                      sim_topk=(None, torch_sim_topk, None), itm_i2t=(None, torch_i2t_step, torch_i2t_finish),
                      itm_t2i=(None, torch_t2i_step, torch_t2i_finish)),
    }

    def run_phase(ph: str, states: dict, sides=("jax", "torch")) -> dict:
        """One phase, its blocks alternating between the sides -> {side: seconds}."""
        spent = {side: 0.0 for side in sides}

        def timed(side, fn, *a):
            if fn is not None:
                t0 = time.perf_counter()
                fn(states[side], *a)
                spent[side] += time.perf_counter() - t0

        for side in sides:
            timed(side, procedures[side][ph][0])
        for a, b in phase_blocks[ph]:
            for side in sides:
                timed(side, procedures[side][ph][1], a, b)
        for side in sides:
            timed(side, procedures[side][ph][2])
        return spent

    # ------------------------------------------------------------------ warm-up (untimed)
    # JAX: the whole procedure once, so every batch shape the timed run meets is compiled (ITM
    # batches take their shapes from how the pairs fall into image slots)
    t0 = time.perf_counter()
    c0 = watch.snapshot()
    longest = max(texts, key=lambda t: len(t.split()))
    image_rows = sorted(set(chunk_rows(model, n_img, bs)))
    text_rows = sorted(set(chunk_rows(model, n_txt, SHARD)))
    warm = {"jax": {}}
    for ph in PHASES:
        run_phase(ph, warm, sides=("jax",))
    jax_warmup_s = time.perf_counter() - t0
    c1 = watch.snapshot()
    # PyTorch: one batch of each piece
    t0 = time.perf_counter()
    with torch.no_grad():
        hf.vision_model(pixel_values=pixels_t[np.arange(min(bs, n_img))])
        enc = tok([longest] * bs, return_tensors="pt", truncation=True, max_length=LAVIS_MAX_LEN, **pad_kw)
        hf.text_encoder(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        e_t = hf.vision_model(pixel_values=pixels_t[:1]).last_hidden_state
        torch_itm(e_t, enc["input_ids"], enc["attention_mask"], torch.zeros(bs, dtype=torch.long), torch.arange(bs))
    torch_warmup_s = time.perf_counter() - t0
    print(f"warm-up: JAX {jax_warmup_s:.1f} s ({c1[0] - c0[0]} compilations, {c1[1] - c0[1]:.1f} s backend "
          f"compile; row counts images {image_rows}, texts {text_rows}), "
          f"PyTorch {torch_warmup_s:.1f} s; blocks per phase {({ph: len(b) for ph, b in phase_blocks.items()})}",
          flush=True)

    # ------------------------------------------------------------------ timed runs
    times = {side: {ph: [] for ph in PHASES} for side in ("jax", "torch")}
    states = {}
    compiles_before = watch.snapshot()
    for it in range(args.iters):
        states = {"jax": {}, "torch": {}}
        for ph in PHASES:
            spent = run_phase(ph, states)
            for side in spent:
                times[side][ph].append(spent[side])
            print(f"  iter {it} {ph:<9} jax {spent['jax']:8.2f} s   torch {spent['torch']:8.2f} s   "
                  f"load {os.getloadavg()[0]:.2f}", flush=True)
    compiles_after = watch.snapshot()
    timed_compiles = compiles_after[0] - compiles_before[0]
    if timed_compiles:
        print(f"warning: {timed_compiles} JAX compilations ({compiles_after[1] - compiles_before[1]:.1f} s) "
              "inside the timed runs", flush=True)

    # ------------------------------------------------------------------ agreement
    js, ts = states["jax"], {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in states["torch"].items()}
    metrics = {}
    for side, st in (("jax", js), ("torch", ts)):
        sim = np.asarray(st["sim"], np.float32)
        metrics[side] = {**recall_at_k(st["score_i2t"], st["score_t2i"], txt2img, img2txt),
                         "itc_only": recall_at_k(sim, sim.T.copy(), txt2img, img2txt)}
    same_topk = {d: int(sum(set(a) == set(b) for a, b in zip(js[f"topk_{d}"], ts[f"topk_{d}"])))
                 for d in ("txt", "img")}
    diffs = dict(
        img_feats=float(np.abs(js["img_feats"] - ts["img_feats"]).max()),
        txt_feats=float(np.abs(js["txt_feats"] - ts["txt_feats"]).max()),
        sim=float(np.abs(js["sim"] - ts["sim"]).max()),
        score_i2t=float(np.abs(js["score_i2t"] - ts["score_i2t"]).max()),
        score_t2i=float(np.abs(js["score_t2i"] - ts["score_t2i"]).max()),
    )
    max_score_diff = max(diffs["score_i2t"], diffs["score_t2i"])
    recall_equal = metrics["jax"] == metrics["torch"]
    agrees = bool(recall_equal and max_score_diff < 1e-3)
    # the PyTorch ITM path (submodules on cached ViT tokens) equals the model's own forward
    with torch.no_grad():
        n_chk = min(2, n_img)
        j_chk = [int(ts["topk_txt"][i, 0]) for i in range(n_chk)]
        fwd = hf(input_ids=torch.as_tensor(ts["ids"][j_chk]), attention_mask=torch.as_tensor(ts["mask"][j_chk]),
                 pixel_values=pixels_t[:n_chk], use_itm_head=True).itm_score[:, 1].numpy()
    forward_diff = float(np.abs(fwd - ts["itm_i2t"][np.arange(n_chk), 0]).max())

    # ------------------------------------------------------------------ report
    med = {side: {ph: statistics.median(times[side][ph]) for ph in PHASES} for side in times}
    total = {side: sum(med[side].values()) for side in med}
    ratio = total["torch"] / total["jax"]
    itm_pairs = dict(i2t=n_img * k_txt, t2i=n_txt * k_img)
    measured = dict(jax_pairs=int(js["itm_i2t"].size + js["itm_t2i"].size),
                    torch_pairs=int(ts["itm_i2t"].size + ts["itm_t2i"].size))
    n_itm = itm_pairs["i2t"] + itm_pairs["t2i"]
    print()
    print(f"{'phase':<10} {'blip-jax s':>11} {'PyTorch s':>10} {'PT / JAX':>9}")
    for ph in PHASES:
        print(f"{ph:<10} {med['jax'][ph]:>11.2f} {med['torch'][ph]:>10.2f} {med['torch'][ph] / med['jax'][ph]:>8.2f}x")
    print(f"{'total':<10} {total['jax']:>11.2f} {total['torch']:>10.2f} {ratio:>8.2f}x")
    print(f"ITM pairs: {n_img} x {k_txt} + {n_txt} x {k_img} = {n_itm} (measured: JAX {measured['jax_pairs']}, "
          f"PyTorch {measured['torch_pairs']})")
    print(f"agreement: recall equal {recall_equal} (JAX r_mean {metrics['jax']['r_mean']:.4f}, PyTorch "
          f"{metrics['torch']['r_mean']:.4f}); max |score diff| {max_score_diff:.2e}, |sim diff| {diffs['sim']:.2e}; "
          f"same top-k sets {same_topk['txt']}/{n_img} images, {same_topk['img']}/{n_txt} texts; PyTorch ITM path vs "
          f"model forward {forward_diff:.1e}; JAX compilations in the timed runs: {timed_compiles}")

    # clearly an extrapolation: measured seconds per image / text / ITM pair scaled to the paper setting
    per_unit = {side: dict(image_s=med[side]["images"] / n_img, text_s=med[side]["texts"] / n_txt,
                           itm_pair_s=(med[side]["itm_i2t"] + med[side]["itm_t2i"]) / n_itm) for side in med}
    paper_itm = PAPER["images"] * PAPER["k"] + PAPER["texts"] * PAPER["k"]
    extrapolation = dict(
        note="EXTRAPOLATION, not measured: this run's per-image, per-text and per-ITM-pair seconds (median) times "
             "the COCO 5k test's counts; similarity/top-k time not included",
        setting=dict(PAPER, itm_passes=paper_itm),
        hours={side: (u["image_s"] * PAPER["images"] + u["text_s"] * PAPER["texts"]
                      + u["itm_pair_s"] * paper_itm) / 3600 for side, u in per_unit.items()},
        per_unit=per_unit,
    )
    load_end = os.getloadavg()
    tmp.cleanup()
    report = dict(
        benchmark="retrieval",
        device=device,
        jax_backend=jax.default_backend(),
        jax_device=str(jax.devices()[0]),
        torch_device="cpu",
        size="small" if args.small else "base",
        hf_config=dict(vision=dict(sizes["vision"], image_size=args.image_size), text=sizes["text"],
                       image_text_hidden_size=sizes["image_text_hidden_size"]),
        parameters=n_params,
        images=n_img, texts=n_txt, texts_per_image=args.texts_per_image, image_size=args.image_size,
        k=args.k, k_txt=k_txt, k_img=k_img, batch_size=bs, iters=args.iters,
        text_tokens=dict(min=min(widths), max=max(widths), jax_width=int(model._tokenize(texts)[0].shape[1]),
                         torch_width=int(ts["ids"].shape[1]), torch_padding=args.torch_padding),
        jax_itm_queries_per_shard=queries,
        interleave_blocks=dict(pairs_target=args.interleave_pairs, itm_queries=block_q,
                               count={ph: len(b) for ph, b in phase_blocks.items()}),
        scan_layers=args.scan_layers, seed=args.seed, perturb=args.perturb,
        phases_s={side: med[side] for side in med},
        phase_ratios={ph: med["torch"][ph] / med["jax"][ph] for ph in PHASES},
        times_s=times,
        total_s=total,
        jax_s=total["jax"], torch_s=total["torch"],
        ratio=ratio,
        itm_passes=n_itm,
        itm_passes_formula=f"n_img * k + n_txt * k = {n_img} * {k_txt} + {n_txt} * {k_img}",
        itm_passes_measured=measured,
        agreement=dict(agrees=agrees, recall_equal=recall_equal, max_score_abs_diff=max_score_diff,
                       max_abs_diff=diffs, same_topk_sets=dict(i2t=same_topk["txt"], t2i=same_topk["img"]),
                       torch_itm_vs_model_forward_abs_diff=forward_diff),
        metrics=metrics,
        warmup=dict(jax_s=jax_warmup_s, jax_compilations=c1[0] - c0[0], jax_backend_compile_s=c1[1] - c0[1],
                    torch_s=torch_warmup_s, row_counts=dict(images=image_rows, texts=text_rows)),
        jax_compilations_in_timed_runs=timed_compiles,
        extrapolation_paper_setting=extrapolation,
        versions=dict(jax=jax.__version__, jaxlib=jaxlib_version(), torch=torch.__version__,
                      transformers=transformers.__version__, python=platform.python_version(), numpy=np.__version__),
        cpu_model=cpu_model(),
        cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        env={k: os.environ[k] for k in ("XLA_FLAGS", "GLIBC_TUNABLES", "LD_PRELOAD", "OMP_NUM_THREADS",
                                        "JAX_ENABLE_X64", "JAX_DEFAULT_MATMUL_PRECISION") if k in os.environ},
        loadavg_at_start=list(load_start),
        loadavg_at_end=list(load_end),
        platform=platform.platform(),
        setup_s=setup_s,
        timestamp=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
    return write_report(out_path, report)


if __name__ == "__main__":
    main(sys.argv[1:])
