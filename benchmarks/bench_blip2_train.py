#!/usr/bin/env python
"""BLIP-2 stage-2 (OPT) training step: blip-jax's trainer vs transformers PyTorch (eager), same weights.

One run builds a random transformers `Blip2ForConditionalGeneration` (default size: ViT-B/16 at
224 px, a 12-layer Q-Former with 32 queries and cross-attention every 2nd layer, an OPT-125M-size
language model; every weight perturbed by N(0, 0.02); Q-Former and OPT dropout 0), saves it,
converts it with `blip_jax.convert` (unrolled and/or scanned layer layout) and times one optimizer
step on the same batch (8 images, 16 text tokens: bos + 15 random tokens, no padding, every text
token a target), with the same frozen parts (ViT and OPT) and the same trainable ones
(`ln_vision` = HF `vision_model.post_layernorm`, the queries, the Q-Former, `language_projection`):

  PyTorch   vision_model and language_model frozen (requires_grad False, eval mode), the rest in
            train mode; AdamW(lr 1e-4, betas (0.9, 0.98), eps 1e-8, weight decay 0.05; no decay on
            biases, norm scales and the queries, as blip-jax's optimizer) over the trainable
            parameters. One step = model(pixel_values, input_ids=[<image>] * 32 + text,
            labels=[-100] * 32 + text).loss -> backward() -> optimizer.step() -> zero_grad().
  JAX       `configs/blip2_stage2_opt.py:tiny` with model.init_from = the converted model,
            lr 1e-4 constant (no warmup), weight decay 0.05, b2 0.98, no clipping, no label
            smoothing, a 1-device mesh; `blip_jax.train.state.create` and
            `blip_jax.train.trainer.make_train_step` (the `lm` objective: text token t predicted
            at position Q - 1 + t, i.e. HF's shifted labels with the query part ignored).

The losses of every step are compared (step 0: the same weights, so the same loss up to float
rounding; later steps also check that both optimizers made the same update). Timings are the
median of --iters steps after --warmup steps, the timed steps of the sides alternating (JAX
layouts, then PyTorch, and again) so that a change of machine load hits all alike. JAX times
exclude compilation (the first call; reported separately as first call minus median). Ratios are
pytorch_time / jax_time: > 1 means JAX is faster. The headline is the faster JAX layout.

`--breakdown` also times the pieces on both sides: the frozen ViT forward, the loss forward alone,
forward + backward without the optimizer, the Q-Former + projection forward + backward (given
the image features), the OPT forward + backward to its input embeddings (given the prefix) and
the AdamW update alone (given gradients).

    python benchmarks/bench_blip2_train.py --breakdown --iters 5          # default size, ~6 min on 2 cores
    python benchmarks/bench_blip2_train.py --small --iters 1 --warmup 1    # smoke run, < 1 min
"""

from __future__ import annotations

import argparse
import importlib.util
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

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
LAYOUTS = ("unrolled", "scan")

# Default size: ViT-B/16 at 224 px, BLIP-2's Q-Former (12 layers, cross-attention every 2nd, 32
# queries) and OPT-125M, as benchmarks/bench_blip2_opt.py; `<image>` is id 50265, the first unused
# row of OPT's 50272-row table, as in the Salesforce/blip2-opt-* checkpoints. Dropout 0 everywhere
# (the Q-Former's default is 0.1), so both sides compute the same deterministic loss.
BASE = dict(
    vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                image_size=224, patch_size=16, attention_dropout=0.0),
    qformer=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 cross_attention_frequency=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
    text=dict(model_type="opt", vocab_size=50272, hidden_size=768, word_embed_proj_dim=768, num_hidden_layers=12,
              num_attention_heads=12, ffn_dim=3072, max_position_embeddings=2048, dropout=0.0,
              attention_dropout=0.0, pad_token_id=1, bos_token_id=2, eos_token_id=2),
    num_query_tokens=32,
    image_token_index=50265,
)
# A few-MB model for a quick smoke run (the test-suite's).
SMALL = dict(
    vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                image_size=64, patch_size=16, attention_dropout=0.0),
    qformer=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 cross_attention_frequency=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
    text=dict(model_type="opt", vocab_size=1000, hidden_size=64, word_embed_proj_dim=64, num_hidden_layers=2,
              num_attention_heads=4, ffn_dim=128, max_position_embeddings=128, dropout=0.0,
              attention_dropout=0.0, pad_token_id=1, bos_token_id=2, eos_token_id=2),
    num_query_tokens=8,
    image_token_index=999,
)
# transformers parameters that train (everything else frozen): blip_jax.train.defaults.TRAINABLE
TORCH_TRAINABLE = (r"^query_tokens$", r"^vision_model\.post_layernorm\.", r"^qformer\.", r"^language_projection\.")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8, help="images per train step (default 8)")
    p.add_argument("--text-len", type=int, default=16, help="text tokens per image: bos + random (default 16)")
    p.add_argument("--iters", type=int, default=3, help="timed steps per side (median; default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before them (>= 1; default 1)")
    p.add_argument("--layouts", default=",".join(LAYOUTS),
                   help="comma-separated JAX layer layouts to time: unrolled, scan (default both)")
    p.add_argument("--device-tag", default=None, help="name used in the results file (default: cpu or the GPU)")
    p.add_argument("--small", action="store_true", help="a tiny config for a quick smoke run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--perturb", type=float, default=0.02,
                   help="std of the Gaussian noise added to every random weight (default 0.02)")
    p.add_argument("--torch-attn", choices=["sdpa", "eager"], default="sdpa",
                   help="transformers attention implementation (default sdpa, the faster on CPU; the "
                        "Q-Former has no such kernel and stays eager)")
    p.add_argument("--breakdown", action="store_true", help="also time the pieces of the step on both sides")
    p.add_argument("--out", default=None,
                   help="results JSON path (default benchmarks/results/blip2_train_<device>.json)")
    args = p.parse_args(argv)
    args.layouts = [t.strip() for t in args.layouts.split(",") if t.strip()]
    bad = sorted(set(args.layouts) - set(LAYOUTS))
    if bad or not args.layouts:
        p.error(f"unknown layout(s) {bad}; choose from {LAYOUTS}")
    if args.warmup < 1:
        p.error("--warmup must be >= 1 (the first JAX call compiles)")
    if args.iters < 1 or args.batch < 1 or args.text_len < 2:
        p.error("--iters and --batch must be >= 1 and --text-len >= 2")
    return args


def timed_round_robin(fns: dict, warmup: int, iters: int):
    """Each function is called once (its first call timed alone: compilation for JAX) and warmup - 1
    more times, then `iters` rounds call every function once, timed, in turn, so that a change of
    machine load during the run affects all alike.
    -> {name: (first-call seconds, [seconds of each timed call], [result of every call])}."""
    out = {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        results = [fn()]
        first_s = time.perf_counter() - t0
        for _ in range(warmup - 1):
            results.append(fn())
        out[name] = (first_s, [], results)
    for _ in range(iters):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            r = fn()
            out[name][1].append(time.perf_counter() - t0)
            out[name][2].append(r)
    return out


def device_name(jax) -> str:
    dev = jax.devices()[0]
    if dev.platform == "cpu":
        return "cpu"
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", dev.device_kind).strip("-").lower() or dev.platform


def build_hf(sizes: dict, hf_dir: Path, seed: int, perturb: float):
    """A random transformers BLIP-2 OPT model with every weight perturbed, saved to `hf_dir`."""
    import torch
    import transformers

    config = transformers.Blip2Config(vision_config=dict(sizes["vision"]), qformer_config=dict(sizes["qformer"]),
                                      text_config=dict(sizes["text"]), num_query_tokens=sizes["num_query_tokens"],
                                      image_token_index=sizes["image_token_index"])
    torch.manual_seed(seed)
    model = transformers.Blip2ForConditionalGeneration(config).eval()
    # HF initialises the vision weights to ~1e-10, LayerNorms to 1/0 and the queries to 0: add
    # N(0, perturb**2) to every parameter so that images matter and every gradient is non-trivial.
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(perturb * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    model.save_pretrained(hf_dir)


def load_stage2_config():
    """configs/blip2_stage2_opt.py, imported by path (configs/ is not a package)."""
    spec = importlib.util.spec_from_file_location("_blip2_stage2_opt_config", ROOT / "configs" / "blip2_stage2_opt.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def jax_train_config(init_from: Path, scan: bool, batch: int):
    """The stage-2 OPT `tiny` train config pointed at the converted model, with the optimizer of the
    PyTorch side (constant lr 1e-4, AdamW b2 0.98, weight decay 0.05, no clipping) and 1 device."""
    c = load_stage2_config().get_config("tiny")
    c.model.init_from = str(init_from)
    c.model.scan_layers = scan
    c.batch_size = batch
    c.grad_accum_steps = 1
    c.optim.update(dict(lr=1e-4, min_lr=1e-4, warmup_steps=0, b1=0.9, b2=0.98, eps=1e-8, weight_decay=0.05,
                        clip_norm=0.0))
    c.loss.lm_label_smoothing = 0.0
    c.mesh = dict(data=1, fsdp=1, tensor=1)
    return c


def _relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(os.cpu_count())
    import jax
    import jax.numpy as jnp
    import optax
    import transformers

    from blip_jax.convert import convert
    from blip_jax.losses import cross_entropy
    from blip_jax.models.blip2 import Blip2
    from blip_jax.train import objectives, optim, partition, sharding, trainer
    from blip_jax.train import state as state_lib

    sizes = SMALL if args.small else BASE
    device = args.device_tag or device_name(jax)
    out_path = Path(args.out) if args.out else RESULTS / f"blip2_train_{device}{'_small' if args.small else ''}.json"
    rng = np.random.default_rng(args.seed)
    b, t_len = args.batch, args.text_len
    size = sizes["vision"]["image_size"]
    tcfg = sizes["text"]
    n_query = sizes["num_query_tokens"]
    image_token = sizes["image_token_index"]

    load_start = os.getloadavg()
    if load_start[0] > 1.0:
        print(f"warning: load average {load_start[0]:.2f} at start: other processes compete for the "
              f"{os.cpu_count()} CPUs and will skew the timings", flush=True)

    # ------------------------------------------------------------------ models
    t0 = time.perf_counter()
    tmp = tempfile.TemporaryDirectory(prefix="bench_blip2_train_")
    work = Path(tmp.name)
    hf_dir = work / "hf"
    build_hf(sizes, hf_dir, args.seed, args.perturb)
    jax_dirs = {}
    for layout in args.layouts:
        jax_dirs[layout] = work / f"jax_{layout}"
        convert(hf_dir, jax_dirs[layout], scan_layers=layout == "scan", progress=False)
    hf = transformers.Blip2ForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32,
                                                                    attn_implementation=args.torch_attn)
    setup_s = time.perf_counter() - t0

    # PyTorch: freeze the ViT and the LLM, train the rest (dropout 0 everywhere)
    hf.train()
    hf.vision_model.eval()
    hf.language_model.eval()
    decay, no_decay, torch_trainable = [], [], []
    for name, p in hf.named_parameters():
        trains = any(re.search(pat, name) for pat in TORCH_TRAINABLE)
        p.requires_grad_(trains)
        if trains:
            torch_trainable.append(name)
            (no_decay if p.ndim < 2 or name == "query_tokens" else decay).append(p)
    dropouts = {n: m.p for n, m in hf.named_modules() if isinstance(m, torch.nn.Dropout) and m.p}
    if dropouts:
        raise RuntimeError(f"non-zero dropout in the PyTorch model: {dropouts}")
    torch_opt = torch.optim.AdamW([dict(params=decay, weight_decay=0.05), dict(params=no_decay, weight_decay=0.0)],
                                  lr=1e-4, betas=(0.9, 0.98), eps=1e-8)
    n_params = sum(p.numel() for p in hf.parameters())
    n_torch_trainable = sum(p.numel() for p in hf.parameters() if p.requires_grad)

    # JAX: the trainer's state and step, one per layout
    jax_sides = {}
    for layout in args.layouts:
        cfg = jax_train_config(jax_dirs[layout], layout == "scan", b)
        mesh = sharding.make_mesh(cfg.mesh.to_dict(), jax.devices()[:1])
        optimizer = optim.make_optimizer(cfg.optim)
        st = state_lib.create(cfg, mesh, optimizer)
        q = st.config.qformer
        if q.hidden_dropout or q.attention_dropout or st.config.scan_layers != (layout == "scan"):
            raise RuntimeError(f"unexpected JAX model config: {st.config}")
        step = trainer.make_train_step(st.model, optimizer, cfg, mesh, trainer.shardings_of(st.train),
                                       trainer.shardings_of(st.frozen))
        jax_sides[layout] = dict(cfg=cfg, mesh=mesh, st=st, step=step, optimizer=optimizer)
    any_side = next(iter(jax_sides.values()))
    model_cfg = any_side["st"].config
    n_jax_trainable = int(sum(np.size(x) for x in jax.tree.leaves(any_side["st"].train["params"])))
    if n_jax_trainable != n_torch_trainable:
        raise RuntimeError(f"trainable parameters differ: JAX {n_jax_trainable}, PyTorch {n_torch_trainable}")
    print(f"setup (build, save, convert x{len(args.layouts)}, load): {setup_s:.1f} s; {n_params / 1e6:.1f} M "
          f"parameters, {n_torch_trainable / 1e6:.1f} M trainable (both sides); jax {jax.__version__} on "
          f"{jax.devices()[0]}, torch {torch.__version__} ({torch.get_num_threads()} threads, attention "
          f"{args.torch_attn}), transformers {transformers.__version__}, {os.cpu_count()} CPUs", flush=True)

    # ------------------------------------------------------------------ batch
    pixels_nchw = rng.standard_normal((b, 3, size, size)).astype(np.float32)
    special = {tcfg["pad_token_id"], tcfg["bos_token_id"], tcfg["eos_token_id"], image_token}
    pool = np.array([t for t in range(4, tcfg["vocab_size"]) if t not in special])
    text = rng.choice(pool, (b, t_len)).astype(np.int64)
    text[:, 0] = tcfg["bos_token_id"]
    hf_ids = np.concatenate([np.full((b, n_query), image_token, np.int64), text], 1)
    hf_labels = np.concatenate([np.full((b, n_query), -100, np.int64), text], 1)
    pixels_t, ids_t, labels_t = (torch.from_numpy(x) for x in (pixels_nchw, hf_ids, hf_labels))
    mask_t = torch.ones_like(ids_t)
    batch_np = dict(pixels=pixels_nchw.transpose(0, 2, 3, 1).copy(), ids=text.astype(np.int32),
                    mask=np.ones((b, t_len), np.int32), loss_mask=np.ones((b, t_len), np.int32))
    for side in jax_sides.values():
        side["batch"] = jax.device_put(batch_np, sharding.batch_sharding(side["mesh"]))

    # ------------------------------------------------------------------ steps
    def jax_step_fn(side):
        def run():
            side["st"].train, metrics = side["step"](side["st"].train, side["st"].frozen, side["batch"])
            jax.block_until_ready(side["st"].train)
            return float(metrics["loss"])
        return run

    def torch_step():
        loss = hf(pixel_values=pixels_t, input_ids=ids_t, attention_mask=mask_t, labels=labels_t).loss
        loss.backward()
        torch_opt.step()
        torch_opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    fns = {f"jax_{layout}": jax_step_fn(side) for layout, side in jax_sides.items()}
    fns["torch"] = torch_step
    print(f"train step: batch {b}, {n_query} queries + {t_len} text tokens; JAX layouts {args.layouts}; "
          f"{args.warmup} warm-up + {args.iters} timed steps each", flush=True)
    timings = timed_round_robin(fns, args.warmup, args.iters)

    torch_first, torch_times, torch_losses = timings["torch"]
    torch_s = statistics.median(torch_times)
    results = {}
    for layout in args.layouts:
        first, times, losses = timings[f"jax_{layout}"]
        jax_s = statistics.median(times)
        rel = [_relative(a, c) for a, c in zip(losses, torch_losses)]
        results[layout] = dict(
            jax_ms=1e3 * jax_s, torch_ms=1e3 * torch_s, ratio=torch_s / jax_s,
            # the fastest step of each side: less sensitive to other processes than the median
            jax_min_ms=1e3 * min(times), torch_min_ms=1e3 * min(torch_times), ratio_of_min=min(torch_times) / min(times),
            jax_steps_per_s=1 / jax_s, torch_steps_per_s=1 / torch_s,
            jax_images_per_s=b / jax_s, torch_images_per_s=b / torch_s,
            jax_first_call_s=first, jax_compile_s=max(first - jax_s, 0.0), torch_first_call_s=torch_first,
            jax_times_ms=[1e3 * t for t in times], torch_times_ms=[1e3 * t for t in torch_times],
            jax_losses=losses, torch_losses=torch_losses,
            first_loss_jax=losses[0], first_loss_torch=torch_losses[0], first_loss_rel_diff=rel[0],
            first_loss_agrees=rel[0] < 1e-4, max_loss_rel_diff_all_steps=max(rel),
        )
        r = results[layout]
        print(f"  jax {layout:<8} {r['jax_ms']:9.1f} ms/step (compile {r['jax_compile_s']:.1f} s)   torch "
              f"{r['torch_ms']:9.1f} ms/step   ratio {r['ratio']:.2f}x (of the fastest steps {r['ratio_of_min']:.2f}x)   "
              f"step-0 loss jax {losses[0]:.6f} torch "
              f"{torch_losses[0]:.6f} (rel diff {rel[0]:.1e}; all {len(rel)} steps <= {max(rel):.1e})", flush=True)
    best = min(args.layouts, key=lambda layout: results[layout]["jax_ms"])

    # ------------------------------------------------------------------ breakdown
    breakdown: dict = {}
    if args.breakdown:
        print("breakdown (median ms per call)", flush=True)
        side = jax_sides[best]
        st, jb = side["st"], side["batch"]
        model, cfg = st.model, side["cfg"]
        objective = objectives.stage_of(cfg).loss
        key = jax.random.PRNGKey(0)

        def loss_of(trainable, frozen, batch):
            return objective(model, partition.merge(trainable, frozen), batch, key, cfg.loss, {})[0]

        j_vision = jax.jit(lambda tr, fr, px: model.apply({"params": partition.merge(tr, fr)}, px,
                                                          method=Blip2.encode_image))
        j_forward = jax.jit(loss_of)
        j_grads = jax.jit(jax.value_and_grad(loss_of))

        def qformer_loss(trainable, frozen, image, cot):
            prefix = model.apply({"params": partition.merge(trainable, frozen)}, image, method=Blip2.language_prefix)
            return jnp.sum(prefix * cot)

        def llm_loss(prefix, trainable, frozen, ids):
            logits = model.apply({"params": partition.merge(trainable, frozen)}, prefix, ids, jnp.ones_like(ids),
                                 method=Blip2.language_model_logits)
            return cross_entropy(logits[:, prefix.shape[1] - 1: -1], ids)

        j_qformer = jax.jit(jax.grad(qformer_loss))
        j_llm = jax.jit(jax.value_and_grad(llm_loss))
        tr, fr = st.train["params"], st.frozen
        image_j = j_vision(tr, fr, jb["pixels"])
        prefix_j = jax.jit(lambda tr, fr, im: model.apply({"params": partition.merge(tr, fr)}, im,
                                                           method=Blip2.language_prefix))(tr, fr, image_j)
        cot_np = np.random.default_rng(1).standard_normal(prefix_j.shape).astype(np.float32)
        cot_j = jnp.asarray(cot_np)

        with torch.no_grad():
            image_t = hf.vision_model(pixels_t).last_hidden_state
            query_t = hf.query_tokens.expand(b, -1, -1)
            prefix_t = hf.language_projection(hf.qformer(
                query_embeds=query_t, encoder_hidden_states=image_t,
                encoder_attention_mask=torch.ones(image_t.shape[:-1], dtype=torch.long)).last_hidden_state)
            text_embeds_t = hf.get_input_embeddings()(torch.from_numpy(text))
        cot_t = torch.from_numpy(cot_np)
        image_mask_t = torch.ones(image_t.shape[:-1], dtype=torch.long)

        def t_vision():
            with torch.no_grad():
                return hf.vision_model(pixels_t).last_hidden_state

        def t_forward():
            with torch.no_grad():
                return float(hf(pixel_values=pixels_t, input_ids=ids_t, attention_mask=mask_t, labels=labels_t).loss)

        def t_grads():
            loss = hf(pixel_values=pixels_t, input_ids=ids_t, attention_mask=mask_t, labels=labels_t).loss
            loss.backward()
            hf.zero_grad(set_to_none=True)
            return float(loss.detach())

        def t_qformer():  # Q-Former + projection forward + backward from the (frozen) image features
            q = hf.query_tokens.expand(b, -1, -1)
            out = hf.language_projection(hf.qformer(query_embeds=q, encoder_hidden_states=image_t,
                                                    encoder_attention_mask=image_mask_t).last_hidden_state)
            (out * cot_t).sum().backward()
            hf.zero_grad(set_to_none=True)

        def t_llm():  # OPT forward + backward to the prefix (no weight gradients)
            prefix = prefix_t.detach().requires_grad_(True)
            embeds = torch.cat([prefix, text_embeds_t], 1)
            loss = hf.language_model(inputs_embeds=embeds, attention_mask=mask_t, labels=labels_t).loss
            loss.backward()
            return float(loss.detach())

        # the optimizer update alone, on fixed gradients (AdamW over the trainable parameters)
        grads_j = j_grads(tr, fr, jb)[1]
        optimizer = side["optimizer"]

        def update(params, opt_state, grads):
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        j_update = jax.jit(update, donate_argnums=(0, 1))  # in place, as in the train step
        held = {"params": jax.tree.map(jnp.copy, tr), "opt": jax.tree.map(jnp.copy, st.train["opt_state"])}

        def j_optimizer():
            held["params"], held["opt"] = j_update(held["params"], held["opt"], grads_j)
            jax.block_until_ready(held["params"])

        def t_optimizer():  # on the gradients of one backward, made just before timing it
            torch_opt.step()

        pieces = {
            "vision_forward": (lambda: jax.block_until_ready(j_vision(tr, fr, jb["pixels"])), t_vision),
            "loss_forward": (lambda: float(j_forward(tr, fr, jb)), t_forward),
            "forward_backward": (lambda: jax.block_until_ready(j_grads(tr, fr, jb)), t_grads),
            "qformer_forward_backward": (lambda: jax.block_until_ready(j_qformer(tr, fr, image_j, cot_j)), t_qformer),
            "llm_forward_backward_to_prefix": (lambda: jax.block_until_ready(j_llm(prefix_j, tr, fr, jb["ids"])), t_llm),
            "optimizer_update": (j_optimizer, t_optimizer),
        }
        for name, (fj, ft) in pieces.items():
            if name == "optimizer_update":  # gradients for torch's AdamW (the weights change; timing only)
                hf(pixel_values=pixels_t, input_ids=ids_t, attention_mask=mask_t, labels=labels_t).loss.backward()
            tm = timed_round_robin({"jax": fj, "torch": ft}, args.warmup, args.iters)
            jm, tm_ = 1e3 * statistics.median(tm["jax"][1]), 1e3 * statistics.median(tm["torch"][1])
            breakdown[name] = dict(jax_ms=jm, torch_ms=tm_, ratio=tm_ / jm)
        torch_opt.zero_grad(set_to_none=True)
        for name, r in breakdown.items():
            print(f"  {name:<32} jax {r['jax_ms']:9.1f}  torch {r['torch_ms']:9.1f}  ratio {r['ratio']:.2f}x", flush=True)

    # ------------------------------------------------------------------ report
    head = results[best]
    print()
    print(f"{'JAX layout':<11} {'JAX ms':>9} {'PyTorch ms':>11} {'ratio':>7} {'JAX steps/s':>12} {'PT steps/s':>11} "
          f"{'compile s':>10}  step-0 loss (JAX vs PyTorch)")
    for layout in args.layouts:
        r = results[layout]
        print(f"{layout:<11} {r['jax_ms']:>9.1f} {r['torch_ms']:>11.1f} {r['ratio']:>6.2f}x {r['jax_steps_per_s']:>12.3f} "
              f"{r['torch_steps_per_s']:>11.3f} {r['jax_compile_s']:>10.1f}  {r['first_loss_jax']:.6f} vs "
              f"{r['first_loss_torch']:.6f} (rel {r['first_loss_rel_diff']:.1e})")
    print(f"headline: {best} layout, {head['ratio']:.2f}x (ratio = PyTorch time / JAX time; > 1: JAX faster)")
    load_end = os.getloadavg()
    tmp.cleanup()

    report = dict(
        benchmark="blip2_train",
        device=device,
        jax_backend=jax.default_backend(),
        jax_device=str(jax.devices()[0]),
        torch_device="cpu",
        size="small" if args.small else "base",
        hf_config=sizes,
        blip_jax_config=model_cfg.replace(scan_layers=best == "scan").to_dict(),
        jax_train_config={k: v for k, v in any_side["cfg"].to_dict().items() if k in (
            "objective", "trainable", "optim", "loss", "mesh", "grad_accum_steps")},
        parameters=n_params,
        trainable_parameters=n_torch_trainable,
        torch_trainable=torch_trainable,
        batch=b,
        text_len=t_len,
        num_query_tokens=n_query,
        iters=args.iters,
        warmup=args.warmup,
        layouts=args.layouts,
        seed=args.seed,
        perturb=args.perturb,
        headline_layout=best,
        ratio=head["ratio"],
        ratio_of_min=head["ratio_of_min"],
        jax_ms=head["jax_ms"],
        torch_ms=head["torch_ms"],
        first_loss_jax=head["first_loss_jax"],
        first_loss_torch=head["first_loss_torch"],
        first_loss_rel_diff=head["first_loss_rel_diff"],
        loss_agrees=all(r["first_loss_agrees"] for r in results.values()),
        results=results,
        ratios={layout: results[layout]["ratio"] for layout in args.layouts},
        compile_s={layout: results[layout]["jax_compile_s"] for layout in args.layouts},
        breakdown_ms=breakdown,
        versions=dict(jax=jax.__version__, jaxlib=jaxlib_version(), torch=torch.__version__,
                      transformers=transformers.__version__, python=platform.python_version(), numpy=np.__version__),
        cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        torch_attn_implementation=args.torch_attn,
        xla_flags=os.environ.get("XLA_FLAGS", ""),
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
