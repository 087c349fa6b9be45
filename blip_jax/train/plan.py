"""`blip-jax train --dry_run`: compile the train step for the config's mesh ahead of time, without
allocating a parameter, and report per-device memory (XLA's memory_analysis) and FLOPs.

Run it with as many (fake) devices as the target mesh, e.g. a 64-chip pod on a laptop:
    XLA_FLAGS=--xla_force_host_platform_device_count=64 blip-jax train --dry_run \\
        --config=configs/blip2_stage2_t5.py:vitg_flant5xxl --config.mesh.fsdp=64
CPU memory figures stand in for the accelerator's: the same buffers, laid out by another backend.
"""

from __future__ import annotations

import math

import jax
from flax import linen as nn
from flax import traverse_util

from blip_jax.models.blip2 import Blip2, _init_inputs
from blip_jax.train import inputs, optim, partition, sharding
from blip_jax.train import state as state_lib
from blip_jax.train.trainer import make_train_step


def _abstract(shapes, shardings):
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def plan(cfg) -> dict:
    mesh = sharding.make_mesh(cfg.mesh.to_dict())
    rules = sharding.rules_from_config(cfg.rules)
    config = state_lib.model_config(cfg)
    model = Blip2(config)
    args, kwargs = _init_inputs(config)
    with nn.logical_axis_rules(rules):
        boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *args, **kwargs))["params"]
        param_sh = sharding.logical_shardings(boxed, mesh, rules)
    params = _abstract(nn.unbox(boxed), param_sh)
    trainable, frozen = partition.split(params, cfg.trainable)
    optimizer = optim.make_optimizer(cfg.optim)
    opt_shapes = jax.eval_shape(optimizer.init, trainable)
    opt_state = _abstract(opt_shapes, state_lib.opt_state_shardings(
        opt_shapes, jax.tree.map(lambda x: x.sharding, trainable), mesh))
    rep = sharding.replicated(mesh)
    scalar = lambda dtype, shape=(): jax.ShapeDtypeStruct(shape, dtype, sharding=rep)  # noqa: E731
    train = {"params": trainable, "opt_state": opt_state, "step": scalar("int32"),
             "rng": scalar("uint32", (2,)), "bad_step": scalar("int32")}
    encoder_decoder = bool(config.family and config.family.encoder_decoder)
    batch = inputs.batch_shapes(cfg, config.vision.image_size, encoder_decoder)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding.batch_sharding(mesh)) for k, v in batch.items()}
    step = make_train_step(model, optimizer, cfg, mesh, jax.tree.map(lambda x: x.sharding, train),
                           jax.tree.map(lambda x: x.sharding, frozen))
    with mesh:
        compiled = step.lower(train, frozen, batch).compile()
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    count = lambda tree: int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))  # noqa: E731
    gib = 1 << 30
    per_device = {name: round(getattr(memory, f"{name}_size_in_bytes") / gib, 3)
                  for name in ("argument", "output", "temp", "generated_code", "alias")}
    per_device["peak_estimate"] = round(per_device["argument"] + per_device["output"] + per_device["temp"]
                                        - per_device["alias"], 3)
    return {
        "mesh": dict(zip(sharding.MESH_AXES, mesh.devices.shape)),
        "devices": int(mesh.devices.size),
        "global_batch": int(cfg.batch_size),
        "parameters": {"trainable": count(trainable), "frozen": count(frozen)},
        "per_device_gib": per_device,
        "flops_per_step_per_device": float(cost.get("flops", float("nan"))) if cost else None,
        "trainable_paths_sample": sorted(traverse_util.flatten_dict(trainable, sep="/"))[:3],
    }
