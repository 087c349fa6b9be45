"""The optimizer of every stage: AdamW with a weight-decay mask, linear warmup then cosine decay to a
floor (or BLIP pre-training's step decay per epoch), global-norm clipping. Gradient accumulation happens in the train step (microbatches)."""

from __future__ import annotations

import re

import jax.numpy as jnp
import optax
from flax import traverse_util

# No weight decay on biases, norm scales, embeddings and the learned queries (BLIP-2's practice).
NO_DECAY = (r"/bias$", r"/scale$", r"/embedding$", r"^query_tokens$", r"(^|/)temp$", r"itg_bias$")


SCHEDULES = ("cosine", "step")


def schedule(cfg) -> optax.Schedule:
    """"cosine": 0 -> lr over `warmup_steps`, then cosine to `min_lr` at `decay_steps`.
    "step" (BLIP pre-training): `warmup_lr` -> lr linearly over `warmup_steps`, then
    max(min_lr, lr * decay_rate ** epoch), an epoch being `steps_per_epoch` steps."""
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"optim.schedule must be one of {SCHEDULES}, got {cfg.schedule!r}")
    if cfg.schedule == "step":
        if cfg.steps_per_epoch <= 0:
            raise ValueError("optim.schedule='step' needs optim.steps_per_epoch > 0")

        def step_decay(step):
            warm = cfg.warmup_lr + (cfg.lr - cfg.warmup_lr) * step / max(1, int(cfg.warmup_steps))
            decayed = jnp.maximum(cfg.min_lr, cfg.lr * cfg.decay_rate ** (step // int(cfg.steps_per_epoch)))
            return jnp.where(step < cfg.warmup_steps, warm, decayed)

        return step_decay
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
