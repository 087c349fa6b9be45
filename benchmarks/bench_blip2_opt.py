#!/usr/bin/env python
"""BLIP-2 OPT generation: blip-jax vs transformers PyTorch, on the same random weights.

One run builds a random transformers `Blip2ForConditionalGeneration` (default size: ViT-B/16 at
224 px, a 12-layer Q-Former with 32 queries, an OPT-125M-size language model; every weight
perturbed by N(0, 0.02) so that images matter), saves it, converts it with `blip_jax.convert`,
loads it with `blip_jax.load` and times, on the same images and prompt:

  greedy   generation after the prompt, num_beams=1   (images/s)
  beam5    generation after the prompt, num_beams=5   (images/s)

JAX runs what `Blip2Model.generate` runs per batch: `encode_image` + `language_prefix` +
`generate_tokens` (prefill of the soft prompt, then `blip_jax.generation`), the prompt left-padded
to a multiple of 8 tokens as `Blip2Model._llm_tokens` does. PyTorch runs `model.generate(pixel_values,
input_ids, attention_mask, ...)` under `torch.inference_mode`, with input_ids = 32 `<image>` tokens +
the same prompt (bos + 3 tokens), what a transformers v5 processor builds. Both sides use
`min_new_tokens = max_new_tokens`, so they emit exactly the same number of tokens; the new token ids
of both sides are compared. Timings are the median of --iters calls after --warmup calls, the timed
calls of the two sides alternating (JAX, PyTorch, JAX, ...) so that a change of machine load hits
both alike. JAX times exclude compilation (one warm-up call at least); the compile time (first call
minus the steady-state median) is reported separately. Ratios are pytorch_time / jax_time: > 1
means JAX is faster.

`--breakdown` also times the pieces on both sides (vision tower, Q-Former + projection, language
model generation with max_new_tokens=N and =1; the difference gives the cost of one decode step).

    python benchmarks/bench_blip2_opt.py --breakdown                      # default size, ~3-5 min on 2 cores
    python benchmarks/bench_blip2_opt.py --small --iters 1 --warmup 1     # smoke run, < 1 min
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
TASKS = ("greedy", "beam5")
BEAMS = {"greedy": 1, "beam5": 5}
PROMPT_TOKENS = 3  # random text tokens after bos

# Default size: ViT-B/16 at 224 px, BLIP-2's Q-Former (12 layers, cross-attention every 2nd, 32
# queries) and OPT-125M. `<image>` is id 50265, the first unused row of OPT's 50272-row table, as
# in the Salesforce/blip2-opt-* checkpoints.
BASE = dict(
    vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                image_size=224, patch_size=16),
    qformer=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 cross_attention_frequency=2),
    text=dict(model_type="opt", vocab_size=50272, hidden_size=768, word_embed_proj_dim=768, num_hidden_layers=12,
              num_attention_heads=12, ffn_dim=3072, max_position_embeddings=2048, dropout=0.0,
              pad_token_id=1, bos_token_id=2, eos_token_id=2),
    num_query_tokens=32,
    image_token_index=50265,
)
# A few-MB model for a quick smoke run (the test-suite's).
SMALL = dict(
    vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                image_size=64, patch_size=16),
    qformer=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 cross_attention_frequency=2),
    text=dict(model_type="opt", vocab_size=1000, hidden_size=64, word_embed_proj_dim=64, num_hidden_layers=2,
              num_attention_heads=4, ffn_dim=128, max_position_embeddings=128, dropout=0.0,
              pad_token_id=1, bos_token_id=2, eos_token_id=2),
    num_query_tokens=8,
    image_token_index=999,
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8, help="images per generation batch (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=20, help="tokens generated per image (default 20)")
    p.add_argument("--iters", type=int, default=3, help="timed iterations per task and side (median; default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up iterations (>= 1; default 1)")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {','.join(TASKS)}")
    p.add_argument("--device-tag", default=None, help="name used in the results file (default: cpu or the GPU)")
    p.add_argument("--small", action="store_true", help="a tiny config for a quick smoke run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--perturb", type=float, default=None,
                   help="std of the Gaussian noise added to every random weight (default 0.02; 0.1 with "
                        "--small, where 0.02 leaves every image with the same output)")
    p.add_argument("--torch-attn", choices=["sdpa", "eager"], default="sdpa",
                   help="transformers attention implementation of every sub-model (default sdpa, the "
                        "faster on CPU)")
    p.add_argument("--scan-layers", action="store_true",
                   help="convert with scan_layers=True (stacked layers under nn.scan) instead of unrolled")
    p.add_argument("--breakdown", action="store_true",
                   help="also time vision / Q-Former / LLM generation separately on both sides")
    p.add_argument("--out", default=None, help="results JSON path (default benchmarks/results/blip2_opt_<device>.json)")
    args = p.parse_args(argv)
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if args.perturb is None:
        args.perturb = 0.1 if args.small else 0.02
    bad = sorted(set(args.tasks) - set(TASKS))
    if bad:
        p.error(f"unknown task(s) {bad}; choose from {TASKS}")
    if args.warmup < 1:
        p.error("--warmup must be >= 1 (the first JAX call compiles)")
    if args.iters < 1 or args.batch < 1 or args.max_new_tokens < 2:
        p.error("--iters and --batch must be >= 1 and --max-new-tokens >= 2")
    return args


def timed_pair(fn_a, fn_b, warmup: int, iters: int):
    """Time two functions: each is called once (its first call timed alone: compilation) and
    warmup - 1 more times, then `iters` timed calls alternate a, b, a, b, ... so that a change of
    machine load during the run affects both sides alike.
    -> ((result of the first call, first-call seconds, [seconds of each timed call]) of a, same of b)."""
    out = []
    for fn in (fn_a, fn_b):
        t0 = time.perf_counter()
        first = fn()
        first_s = time.perf_counter() - t0
        for _ in range(warmup - 1):
            fn()
        out.append((first, first_s, []))
    for _ in range(iters):
        for fn, (_, _, times) in zip((fn_a, fn_b), out):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return out[0], out[1]


def device_name(jax) -> str:
    dev = jax.devices()[0]
    if dev.platform == "cpu":
        return "cpu"
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", dev.device_kind).strip("-").lower() or dev.platform


def build_models(sizes: dict, workdir: Path, seed: int, attn: str, scan_layers: bool, perturb: float):
    """A random transformers BLIP-2 OPT model, saved and converted; -> (torch model, jax model)."""
    import torch
    import transformers

    import blip_jax
    from blip_jax.convert import convert

    config = transformers.Blip2Config(vision_config=dict(sizes["vision"]), qformer_config=dict(sizes["qformer"]),
                                      text_config=dict(sizes["text"]), num_query_tokens=sizes["num_query_tokens"],
                                      image_token_index=sizes["image_token_index"])
    torch.manual_seed(seed)
    model = transformers.Blip2ForConditionalGeneration(config).eval()
    # HF initialises the vision weights to ~1e-10 and LayerNorms to 1/0: add N(0, perturb**2) to
    # every parameter so that images matter and the outputs differ between images.
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(perturb * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    hf_dir, jax_dir = workdir / "hf", workdir / "jax"
    model.save_pretrained(hf_dir)
    del model
    convert(hf_dir, jax_dir, scan_layers=scan_layers, progress=False)
    # Reload as a user would, with the requested attention implementation (sub-models that have
    # no such kernel, the Q-Former, stay eager).
    hf = transformers.Blip2ForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32,
                                                                    attn_implementation=attn).eval()
    return hf, blip_jax.load(jax_dir)


def attn_implementations(hf) -> dict:
    out = {}
    for name in ("vision_model", "qformer", "language_model"):
        sub = getattr(hf, name, None)
        out[name] = getattr(getattr(sub, "config", None), "_attn_implementation", None)
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(os.cpu_count())
    import jax
    import jax.numpy as jnp
    import transformers

    from blip_jax import generation
    from blip_jax.batching import TEXT_PAD_MULTIPLE, pad_width
    from blip_jax.blip2_api import encode_image, generate_tokens, language_prefix

    sizes = SMALL if args.small else BASE
    device = args.device_tag or device_name(jax)
    out_path = Path(args.out) if args.out else RESULTS / f"blip2_opt_{device}{'_small' if args.small else ''}.json"
    rng = np.random.default_rng(args.seed)
    b, n_new = args.batch, args.max_new_tokens
    size = sizes["vision"]["image_size"]
    tcfg = sizes["text"]
    n_query = sizes["num_query_tokens"]

    load_start = os.getloadavg()[0]
    if load_start > 1.0:
        print(f"warning: load average {load_start:.2f} at start: other processes compete for the "
              f"{os.cpu_count()} CPUs and will skew the timings", flush=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_blip2_") as tmp:
        hf, jm = build_models(sizes, Path(tmp), args.seed, args.torch_attn, args.scan_layers, args.perturb)
    setup_s = time.perf_counter() - t0
    cfg, params = jm.config, jm.params
    n_params = sum(p.numel() for p in hf.parameters())
    attn = attn_implementations(hf)
    print(f"setup (build, save, convert, load): {setup_s:.1f} s; {n_params / 1e6:.1f} M parameters; "
          f"jax {jax.__version__} on {jax.devices()[0]} ({'scanned' if cfg.scan_layers else 'unrolled'} layers), "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads, attention {attn}), "
          f"transformers {transformers.__version__}, {os.cpu_count()} CPUs", flush=True)

    pixels_nchw = rng.standard_normal((b, 3, size, size)).astype(np.float32)
    pixels_t = torch.from_numpy(pixels_nchw)
    pixels_j = jnp.asarray(pixels_nchw.transpose(0, 2, 3, 1))

    # The same prompt for every row: bos + PROMPT_TOKENS ordinary tokens.
    special = {tcfg["pad_token_id"], tcfg["bos_token_id"], tcfg["eos_token_id"], sizes["image_token_index"]}
    words = [int(t) for t in rng.permutation(np.arange(4, min(tcfg["vocab_size"], 50265))) if t not in special]
    prompt = [tcfg["bos_token_id"]] + words[:PROMPT_TOKENS]
    # PyTorch: what a transformers v5 Blip2Processor builds (the <image> tokens first).
    hf_ids = np.array([[sizes["image_token_index"]] * n_query + prompt] * b, np.int64)
    hf_ids_t, hf_mask_t = torch.from_numpy(hf_ids), torch.ones(hf_ids.shape, dtype=torch.long)
    # JAX: the prompt alone, left-padded to a multiple of 8 as Blip2Model._llm_tokens does.
    ids_j, mask_j = pad_width(np.array([prompt] * b), np.ones((b, len(prompt)), np.int64), cfg.llm.pad_token_id,
                               "left")
    print(f"prompt {prompt} ({len(prompt)} tokens; JAX pads it to {ids_j.shape[1]}, a multiple of "
          f"{TEXT_PAD_MULTIPLE}; PyTorch prepends {n_query} <image> tokens)", flush=True)

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

    def gen_config(beams, new):
        return generation.GenerationConfig.from_kwargs(
            num_beams=beams, max_new_tokens=new, min_new_tokens=new,
            eos_token_id=cfg.llm.eos_token_id, pad_token_id=cfg.llm.pad_token_id)

    def torch_gen_kwargs(beams, new):
        return dict(num_beams=beams, max_new_tokens=new, min_new_tokens=new, do_sample=False)

    # ------------------------------------------------------------------ generation
    for task in args.tasks:
        beams = BEAMS[task]
        gcfg = gen_config(beams, n_new)

        def run_jax():  # what Blip2Model.generate runs per batch, minus preprocessing and detokenisation
            embeds = encode_image(cfg, params, pixels_j)
            prefix = language_prefix(cfg, params, embeds, None, None)
            return generate_tokens(cfg, params, prefix, ids_j, mask_j, gcfg)  # np.ndarray: blocks

        def run_torch():
            with torch.inference_mode():
                out = hf.generate(pixel_values=pixels_t, input_ids=hf_ids_t, attention_mask=hf_mask_t,
                                  **torch_gen_kwargs(beams, n_new))
            return out[:, hf_ids.shape[1]:].numpy()  # new tokens only

        print(f"{task}: batch {b}, {beams} beam(s), {n_new} new tokens", flush=True)
        (jax_ids, jax_first, jax_times), (torch_ids, torch_first, torch_times) = timed_pair(
            run_jax, run_torch, args.warmup, args.iters)
        same_shape = jax_ids.shape == torch_ids.shape
        matches = int((jax_ids == torch_ids).all(1).sum()) if same_shape else 0
        distinct = len({tuple(r) for r in jax_ids.tolist()})
        print(f"  ids: jax {jax_ids.shape}, torch {torch_ids.shape}; {matches}/{b} sequences identical; "
              f"{distinct} distinct outputs", flush=True)
        record(task, b, jax_first, jax_times, torch_first, torch_times,
               dict(num_beams=beams, max_new_tokens=n_new, min_new_tokens=n_new, sequences_identical=matches,
                    sequences_total=b, all_identical=matches == b, distinct_jax_sequences=distinct,
                    jax_ids_shape=list(jax_ids.shape), torch_ids_shape=list(torch_ids.shape)))

    # ------------------------------------------------------------------ breakdown
    breakdown: dict = {}
    if args.breakdown:
        print("breakdown (median ms per batch)", flush=True)

        def both(fn_jax, fn_torch):
            (_, _, tj), (_, _, tt) = timed_pair(fn_jax, fn_torch, args.warmup, args.iters)
            return dict(jax_ms=1e3 * statistics.median(tj), torch_ms=1e3 * statistics.median(tt))

        embeds_j = encode_image(cfg, params, pixels_j)
        prefix_j = language_prefix(cfg, params, embeds_j, None, None)
        with torch.inference_mode():
            embeds_t = hf.vision_model(pixels_t).last_hidden_state
            image_mask_t = torch.ones(embeds_t.shape[:-1], dtype=torch.long)
            query_t = hf.query_tokens.expand(b, -1, -1)
            prefix_t = hf.language_projection(hf.qformer(query_embeds=query_t, encoder_hidden_states=embeds_t,
                                                         encoder_attention_mask=image_mask_t).last_hidden_state)
            llm_embeds_t = hf.get_input_embeddings()(hf_ids_t)
            llm_embeds_t[:, :n_query] = prefix_t

        def torch_vision():
            with torch.inference_mode():
                return hf.vision_model(pixels_t).last_hidden_state

        def torch_qformer():
            with torch.inference_mode():
                q = hf.qformer(query_embeds=query_t, encoder_hidden_states=embeds_t,
                               encoder_attention_mask=image_mask_t).last_hidden_state
                return hf.language_projection(q)

        def torch_llm(beams, new):
            def run():
                with torch.inference_mode():
                    return hf.language_model.generate(inputs_embeds=llm_embeds_t, input_ids=hf_ids_t,
                                                      attention_mask=hf_mask_t, **torch_gen_kwargs(beams, new))
            return run

        def jax_llm(beams, new):
            gc = gen_config(beams, new)
            return lambda: generate_tokens(cfg, params, prefix_j, ids_j, mask_j, gc)

        breakdown["vision"] = both(lambda: np.asarray(encode_image(cfg, params, pixels_j)), torch_vision)
        breakdown["qformer"] = both(lambda: np.asarray(language_prefix(cfg, params, embeds_j, None, None)),
                                    torch_qformer)
        for task in args.tasks:
            beams = BEAMS[task]
            full = both(jax_llm(beams, n_new), torch_llm(beams, n_new))
            one = both(jax_llm(beams, 1), torch_llm(beams, 1))
            step = {k: (full[k] - one[k]) / (n_new - 1) for k in full}
            breakdown[f"llm_{task}"] = full
            breakdown[f"llm_{task}_prefill_plus_1_token"] = one
            breakdown[f"llm_{task}_per_token_step"] = step
        for name, r in breakdown.items():
            r["ratio"] = r["torch_ms"] / r["jax_ms"] if r["jax_ms"] > 0 else None
            ratio = f"{r['ratio']:.2f}x" if r["ratio"] is not None else "n/a"
            print(f"  {name:<34} jax {r['jax_ms']:9.1f}  torch {r['torch_ms']:9.1f}  ratio {ratio}", flush=True)

    # ------------------------------------------------------------------ report
    print()
    header = f"{'task':<8} {'batch':>5} {'JAX ms':>10} {'PyTorch ms':>11} {'ratio':>7} {'JAX img/s':>10} " \
             f"{'PT img/s':>9} {'compile s':>10}  check"
    print(header)
    print("-" * len(header))
    for task in rows:
        r = results[task]
        check = f"{r['sequences_identical']}/{r['sequences_total']} ids equal"
        print(f"{task:<8} {r['items']:>5} {r['jax_ms']:>10.1f} {r['torch_ms']:>11.1f} {r['ratio']:>6.2f}x "
              f"{r['jax_items_per_s']:>10.2f} {r['torch_items_per_s']:>9.2f} {r['jax_compile_s']:>10.1f}  {check}")
    print("ratio = PyTorch time / JAX time (> 1: JAX faster)")

    report = dict(
        benchmark="blip2_opt",
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
        prompt_ids=prompt,
        jax_prompt_width=int(ids_j.shape[1]),
        torch_input_len=int(hf_ids.shape[1]),
        iters=args.iters,
        warmup=args.warmup,
        tasks=args.tasks,
        seed=args.seed,
        scan_layers=bool(cfg.scan_layers),
        versions=dict(jax=jax.__version__, jaxlib=getattr(jax.lib, "__version__", None) or jaxlib_version(),
                      torch=torch.__version__, transformers=transformers.__version__, python=platform.python_version(),
                      numpy=np.__version__),
        cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        torch_attn_implementation=attn,
        xla_flags=os.environ.get("XLA_FLAGS", ""),
        env={k: os.environ[k] for k in ("XLA_FLAGS", "GLIBC_TUNABLES", "LD_PRELOAD", "OMP_NUM_THREADS",
                                        "JAX_ENABLE_X64", "JAX_DEFAULT_MATMUL_PRECISION") if k in os.environ},
        perturb=args.perturb,
        loadavg_at_start=load_start,
        loadavg_at_end=os.getloadavg()[0],
        platform=platform.platform(),
        setup_s=setup_s,
        results=results,
        ratios={t: results[t]["ratio"] for t in rows},
        compile_s={t: results[t]["jax_compile_s"] for t in rows},
        breakdown_ms=breakdown,
        timestamp=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
    return write_report(out_path, report)


if __name__ == "__main__":
    main(sys.argv[1:])
