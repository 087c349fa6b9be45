#!/usr/bin/env python
"""BLIP captioning: blip-jax vs transformers PyTorch (eager), on the same random weights.

One run builds a random transformers `BlipForConditionalGeneration` (base size by default: ViT-B/16
at 224 px + BERT-base text decoder), saves it, converts it with `blip_jax.convert`, loads it with
`blip_jax.load`, and times on the same inputs:

  greedy   caption generation, num_beams=1   (images/s)
  beam3    caption generation, num_beams=3   (images/s)
  train    one LM fine-tuning step: loss forward + backward, gradients of every parameter

Generation forces `min_new_tokens = max_new_tokens` so both sides emit exactly the same number of
tokens (random weights rarely emit eos). The generated ids of both sides are compared (greedy and
beam) and the two losses printed. JAX times exclude compilation (one warm-up call at least); the
compile time (first call minus the steady-state median) is reported separately. Ratios are
pytorch_time / jax_time: > 1 means JAX is faster.

    python benchmarks/bench_blip_caption.py                      # base size, ~5-10 min on 2 cores
    python benchmarks/bench_blip_caption.py --small --iters 1 --warmup 1   # smoke run, < 1 min
"""

from __future__ import annotations

import argparse
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

RESULTS = Path(__file__).resolve().parent / "results"
TASKS = ("greedy", "beam3", "train")

# Base size: ViT-B/16 at 224 px, BERT-base decoder (Salesforce/blip-image-captioning-base at 224).
BASE = dict(
    vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                image_size=224, patch_size=16),
    text=dict(vocab_size=30524, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=512, bos_token_id=30522, sep_token_id=102,
              eos_token_id=102, pad_token_id=0),
)
# A few-MB model for a quick smoke run (the test-suite's).
SMALL = dict(
    vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                image_size=64, patch_size=16),
    text=dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=64, bos_token_id=998, sep_token_id=102,
              eos_token_id=102, pad_token_id=0),
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8, help="images per generation batch / train step (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=20, help="tokens generated per caption (default 20)")
    p.add_argument("--caption-len", type=int, default=20, help="caption tokens in the train step (default 20)")
    p.add_argument("--iters", type=int, default=3, help="timed iterations per task and side (median; default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up iterations (>= 1; default 1)")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {','.join(TASKS)}")
    p.add_argument("--device-tag", default=None, help="name used in the results file (default: cpu or the GPU)")
    p.add_argument("--small", action="store_true", help="a tiny config for a quick smoke run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-layout", choices=["scan", "unrolled"], default="scan",
                   help="layer layout of the JAX train step (default scan, as training configs use)")
    p.add_argument("--out", default=None, help="results JSON path (default benchmarks/results/blip_caption_<device>.json)")
    args = p.parse_args(argv)
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    bad = sorted(set(args.tasks) - set(TASKS))
    if bad:
        p.error(f"unknown task(s) {bad}; choose from {TASKS}")
    if args.warmup < 1:
        p.error("--warmup must be >= 1 (the first JAX call compiles)")
    if args.iters < 1 or args.batch < 1 or args.max_new_tokens < 1 or args.caption_len < 2:
        p.error("--iters, --batch, --max-new-tokens must be >= 1 and --caption-len >= 2")
    return args


def timed(fn, warmup: int, iters: int):
    """(result of the first call, first-call seconds, [seconds of each timed call])."""
    t0 = time.perf_counter()
    first = fn()
    first_s = time.perf_counter() - t0
    for _ in range(warmup - 1):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return first, first_s, times


def device_name(jax) -> str:
    dev = jax.devices()[0]
    if dev.platform == "cpu":
        return "cpu"
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", dev.device_kind).strip("-").lower() or dev.platform


def build_models(sizes: dict, workdir: Path, seed: int):
    """A random transformers BLIP caption model, saved and converted; -> (torch model, jax model)."""
    import torch
    import transformers

    import blip_jax
    from blip_jax.convert import convert

    config = transformers.BlipConfig(vision_config=dict(sizes["vision"]), text_config=dict(sizes["text"]))
    torch.manual_seed(seed)
    model = transformers.BlipForConditionalGeneration(config).eval()
    # HF initialises the vision weights to ~1e-10 and LayerNorms to 1/0: add N(0, 0.02) to every
    # parameter so that images matter and the captions differ between images.
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    hf_dir, jax_dir = workdir / "hf", workdir / "jax"
    model.save_pretrained(hf_dir)
    convert(hf_dir, jax_dir, progress=False)
    return model, blip_jax.load(jax_dir)


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(os.cpu_count())
    import jax
    import jax.numpy as jnp
    import transformers

    from blip_jax import generation, losses
    from blip_jax.models.layout import stack_layers
    from blip_jax.api import encode_image, generate_text
    from blip_jax.models.blip import Blip

    sizes = SMALL if args.small else BASE
    device = args.device_tag or device_name(jax)
    out_path = Path(args.out) if args.out else RESULTS / f"blip_caption_{device}{'_small' if args.small else ''}.json"
    rng = np.random.default_rng(args.seed)
    b, n_new = args.batch, args.max_new_tokens
    size = sizes["vision"]["image_size"]
    tcfg = sizes["text"]

    load_start = os.getloadavg()[0]
    if load_start > 1.0:
        print(f"warning: load average {load_start:.2f} at start: other processes compete for the "
              f"{os.cpu_count()} CPUs and will skew the timings", flush=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_blip_") as tmp:
        hf, jm = build_models(sizes, Path(tmp), args.seed)
    setup_s = time.perf_counter() - t0
    cfg, params = jm.config, jm.params
    n_params = sum(p.numel() for p in hf.parameters())
    print(f"setup (build, save, convert, load): {setup_s:.1f} s; {n_params / 1e6:.1f} M parameters; "
          f"jax {jax.__version__} on {jax.devices()[0]}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"transformers {transformers.__version__}, {os.cpu_count()} CPUs", flush=True)

    pixels_nchw = rng.standard_normal((b, 3, size, size)).astype(np.float32)
    pixels_t = torch.from_numpy(pixels_nchw)
    pixels_j = jnp.asarray(pixels_nchw.transpose(0, 2, 3, 1))

    results: dict = {}
    rows = []

    def record(task, unit_items, jax_first, jax_times, torch_first, torch_times, extra):
        jax_s, torch_s = statistics.median(jax_times), statistics.median(torch_times)
        entry = dict(
            items=unit_items,
            jax_ms=1e3 * jax_s, torch_ms=1e3 * torch_s,
            jax_ms_per_item=1e3 * jax_s / unit_items, torch_ms_per_item=1e3 * torch_s / unit_items,
            jax_items_per_s=unit_items / jax_s, torch_items_per_s=unit_items / torch_s,
            ratio=torch_s / jax_s,
            jax_first_call_s=jax_first, jax_compile_s=max(jax_first - jax_s, 0.0), torch_first_call_s=torch_first,
            jax_times_ms=[1e3 * t for t in jax_times], torch_times_ms=[1e3 * t for t in torch_times],
            **extra,
        )
        results[task] = entry
        rows.append(task)
        print(f"  {task}: jax {entry['jax_ms']:.1f} ms, torch {entry['torch_ms']:.1f} ms, "
              f"ratio {entry['ratio']:.2f}x, jax compile {entry['jax_compile_s']:.1f} s", flush=True)

    # ------------------------------------------------------------------ generation
    for task in [t for t in args.tasks if t != "train"]:
        beams = 3 if task == "beam3" else 1
        gcfg = generation.GenerationConfig.from_kwargs(
            num_beams=beams, max_new_tokens=n_new, min_new_tokens=n_new,
            eos_token_id=cfg.text.sep_token_id, pad_token_id=cfg.text.pad_token_id)
        prompt = np.full((b, 1), cfg.text.bos_token_id, np.int32)

        def run_jax():  # what BlipModel.caption does, minus image preprocessing and detokenisation
            embeds = encode_image(cfg, params, pixels_j)
            return generate_text(cfg, params, embeds, None, prompt, gcfg)

        def run_torch():
            with torch.inference_mode():
                return hf.generate(pixel_values=pixels_t, num_beams=beams, max_new_tokens=n_new,
                                   min_new_tokens=n_new).numpy()

        print(f"{task}: batch {b}, {n_new} new tokens", flush=True)
        jax_ids, jax_first, jax_times = timed(run_jax, args.warmup, args.iters)
        torch_ids, torch_first, torch_times = timed(run_torch, args.warmup, args.iters)
        same_shape = jax_ids.shape == torch_ids.shape
        matches = int((jax_ids == torch_ids).all(1).sum()) if same_shape else 0
        distinct = len({tuple(r) for r in jax_ids.tolist()})
        print(f"  ids: jax {jax_ids.shape}, torch {torch_ids.shape}; {matches}/{b} sequences identical; "
              f"{distinct} distinct captions", flush=True)
        record(task, b, jax_first, jax_times, torch_first, torch_times,
               dict(num_beams=beams, max_new_tokens=n_new, min_new_tokens=n_new, sequences_identical=matches,
                    sequences_total=b, all_identical=matches == b, distinct_jax_sequences=distinct,
                    jax_ids_shape=list(jax_ids.shape), torch_ids_shape=list(torch_ids.shape)))

    # ------------------------------------------------------------------ train step
    if "train" in args.tasks:
        t_len = args.caption_len
        ids = rng.integers(tcfg["sep_token_id"] + 1, tcfg["vocab_size"] - 2, (b, t_len)).astype(np.int64)
        ids[:, 0] = tcfg["bos_token_id"]
        lengths = rng.integers(t_len // 2, t_len + 1, b)
        lengths[0] = t_len  # at least one full-length caption
        mask = (np.arange(t_len)[None] < lengths[:, None]).astype(np.int64)
        ids[np.arange(b), lengths - 1] = tcfg["sep_token_id"]
        ids = ids * mask  # pad id 0
        labels = np.where(mask == 1, ids, -100)
        ids_t, mask_t, labels_t = (torch.from_numpy(x) for x in (ids, mask, labels))
        ids_j, mask_j, labels_j = (jnp.asarray(x, jnp.int32) for x in (ids, mask, labels))
        # Training runs the layer stacks as nn.scan (the training configuration): on XLA:CPU the
        # unrolled backward pass is ~30% slower (one huge temp buffer, page-faulted every step).
        train_cfg, train_params = cfg, params
        if args.train_layout == "scan":
            train_cfg = cfg.replace(scan_layers=True)
            train_params = jax.tree.map(jnp.asarray, stack_layers(jax.tree.map(np.asarray, params)))
        model = Blip(train_cfg)

        def loss_fn(p, pixels, ids, mask, labels):
            return losses.lm_loss(model.apply({"params": p}, pixels, ids, mask)["logits"], labels)

        train_step = jax.jit(jax.value_and_grad(loss_fn))

        def run_jax():
            loss, grads = train_step(train_params, pixels_j, ids_j, mask_j, labels_j)
            jax.block_until_ready(grads)
            return float(loss)

        def run_torch():
            hf.zero_grad(set_to_none=True)
            loss = hf(pixel_values=pixels_t, input_ids=ids_t, attention_mask=mask_t, labels=labels_t).loss
            loss.backward()
            return float(loss.detach())

        print(f"train: batch {b}, {t_len}-token captions (forward + backward)", flush=True)
        jax_loss, jax_first, jax_times = timed(run_jax, args.warmup, args.iters)
        torch_loss, torch_first, torch_times = timed(run_torch, args.warmup, args.iters)
        hf.zero_grad(set_to_none=True)
        print(f"  loss: jax {jax_loss:.6f}, torch {torch_loss:.6f} (|diff| {abs(jax_loss - torch_loss):.2e})", flush=True)
        record("train", b, jax_first, jax_times, torch_first, torch_times,
               dict(caption_len=t_len, layout=args.train_layout, jax_loss=jax_loss, torch_loss=torch_loss,
                    loss_abs_diff=abs(jax_loss - torch_loss)))

    # ------------------------------------------------------------------ report
    print()
    header = f"{'task':<8} {'batch':>5} {'JAX ms':>10} {'PyTorch ms':>11} {'ratio':>7} {'JAX img/s':>10} " \
             f"{'PT img/s':>9} {'compile s':>10}  check"
    print(header)
    print("-" * len(header))
    for task in rows:
        r = results[task]
        check = (f"{r['sequences_identical']}/{r['sequences_total']} ids equal" if task != "train"
                 else f"loss {r['jax_loss']:.5f} vs {r['torch_loss']:.5f}")
        print(f"{task:<8} {r['items']:>5} {r['jax_ms']:>10.1f} {r['torch_ms']:>11.1f} {r['ratio']:>6.2f}x "
              f"{r['jax_items_per_s']:>10.2f} {r['torch_items_per_s']:>9.2f} {r['jax_compile_s']:>10.1f}  {check}")
    print("ratio = PyTorch time / JAX time (> 1: JAX faster)")

    report = dict(
        benchmark="blip_caption",
        device=device,
        jax_backend=jax.default_backend(),
        jax_device=str(jax.devices()[0]),
        torch_device="cpu",
        size="small" if args.small else "base",
        hf_config=sizes,
        blip_jax_config=cfg.to_dict(),
        parameters=n_params,
        batch=b,
        max_new_tokens=n_new,
        caption_len=args.caption_len,
        iters=args.iters,
        warmup=args.warmup,
        tasks=args.tasks,
        seed=args.seed,
        versions=dict(jax=jax.__version__, jaxlib=getattr(jax.lib, "__version__", None) or jaxlib_version(),
                      torch=torch.__version__, transformers=transformers.__version__, python=platform.python_version(),
                      numpy=np.__version__),
        cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        torch_attn_implementation=getattr(hf.config, "_attn_implementation", None),
        xla_flags=os.environ.get("XLA_FLAGS", ""),
        env={k: os.environ[k] for k in ("XLA_FLAGS", "GLIBC_TUNABLES", "LD_PRELOAD", "OMP_NUM_THREADS",
                                        "JAX_ENABLE_X64", "JAX_DEFAULT_MATMUL_PRECISION") if k in os.environ},
        loadavg_at_start=load_start,
        platform=platform.platform(),
        setup_s=setup_s,
        results=results,
        ratios={t: results[t]["ratio"] for t in rows},
        compile_s={t: results[t]["jax_compile_s"] for t in rows},
        timestamp=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
    return write_report(out_path, report)


if __name__ == "__main__":
    main(sys.argv[1:])
