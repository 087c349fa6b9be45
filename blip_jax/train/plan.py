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
from flax import traverse_util

from blip_jax.train import inputs, optim, sharding
from blip_jax.train import state as state_lib
from blip_jax.train.trainer import make_train_step


def plan(cfg) -> dict:
    """Compile the train step of `cfg` for its mesh against the abstract train state the trainer
    fills (`state.abstract`), and report per-device memory and FLOPs."""
    mesh = sharding.make_mesh(cfg.mesh.to_dict())
    optimizer = optim.make_optimizer(cfg.optim)
    bert, llm = inputs.tokenizers(cfg)
    inputs.prepare_loss(cfg, mesh, bert, llm)
    st = state_lib.abstract(cfg, mesh, optimizer, inputs.vocab(bert, llm))
    encoder_decoder = bool(getattr(st.config, "family", None) and st.config.family.encoder_decoder)
    batch_sh = sharding.batch_sharding(mesh)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sh)
             for k, v in inputs.batch_shapes(cfg, st.config.vision.image_size, encoder_decoder).items()}
    step = make_train_step(st.model, optimizer, cfg, mesh, state_lib.shardings_of(st.train),
                           state_lib.shardings_of(st.frozen))
    with mesh:
        compiled = step.lower(st.train, st.frozen, batch).compile()
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
        "objective": cfg.objective,
        "mesh": dict(zip(sharding.MESH_AXES, mesh.devices.shape)),
        "devices": int(mesh.devices.size),
        "global_batch": int(cfg.batch_size),
        "parameters": {"trainable": count(st.train["params"]), "frozen": count(st.frozen),
                       "extra_state": count(st.train["extra"])},
        "per_device_gib": per_device,
        "flops_per_step_per_device": float(cost.get("flops", float("nan"))) if cost else None,
        "trainable_paths_sample": sorted(traverse_util.flatten_dict(st.train["params"], sep="/"))[:3],
    }
