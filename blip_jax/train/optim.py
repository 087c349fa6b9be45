"""The optimizer of every stage: AdamW with a weight-decay mask, linear warmup then cosine decay to a
floor, global-norm clipping. Gradient accumulation happens in the train step (microbatches)."""

from __future__ import annotations

import re

import optax
from flax import traverse_util

# No weight decay on biases, norm scales, embeddings and the learned queries (BLIP-2's practice).
NO_DECAY = (r"/bias$", r"/scale$", r"/embedding$", r"^query_tokens$", r"(^|/)temp$", r"itg_bias$")


def schedule(cfg) -> optax.Schedule:
    """0 -> lr over `warmup_steps`, then cosine to `min_lr` at `decay_steps` (default total_steps)."""
    decay = max(int(cfg.decay_steps) - int(cfg.warmup_steps), 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if cfg.warmup_steps else cfg.lr, peak_value=cfg.lr, warmup_steps=int(cfg.warmup_steps),
        decay_steps=int(cfg.warmup_steps) + decay, end_value=cfg.min_lr)


def decay_mask(params) -> dict:
    flat = traverse_util.flatten_dict(params, sep="/")
    return traverse_util.unflatten_dict({k: not any(re.search(p, k) for p in NO_DECAY) for k in flat}, sep="/")


def make_optimizer(cfg) -> optax.GradientTransformation:
    """`cfg`: lr, min_lr, warmup_steps, decay_steps, b1, b2, eps, weight_decay, clip_norm (0: off)."""
    parts = []
    if cfg.clip_norm:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(optax.adamw(schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                             mask=decay_mask))
    return optax.chain(*parts)
