"""`blip-jax train --dry_run`: compile the train step for the config's mesh ahead of time, without
allocating a parameter, and report per-device memory (XLA's memory_analysis) and FLOPs.

Run it with as many (fake) devices as the target mesh, e.g. a 64-chip pod on a laptop:
    XLA_FLAGS=--xla_force_host_platform_device_count=64 blip-jax train --dry_run \\
        --config=configs/blip2_stage2_t5.py:vitg_flant5xxl --config.mesh.fsdp=64
CPU memory figures stand in for the accelerator's: the same buffers, laid out by another backend.
With `--topology=v5p:4x4x4` (libtpu installed, no TPU needed) it compiles for that TPU slice instead
and adds what the TPU compiler knows: memory per chip against its HBM, its estimated step time
(`cost_analysis()`'s optimal_seconds), the projected MFU, and the bytes each kind of collective moves.
"""

from __future__ import annotations

import math
import re

import jax
from flax import traverse_util

from blip_jax.train import inputs, optim, sharding
from blip_jax.train import state as state_lib
from blip_jax.train.trainer import make_train_step


def plan(cfg, tpu=None) -> dict:
    """Compile the train step of `cfg` for its mesh against the abstract train state the trainer
    fills (`state.abstract`), and report per-device memory and FLOPs; `tpu` (a
    `hardware.Slice`) compiles for that TPU slice's devices instead of this machine's."""
    mesh = sharding.make_mesh(cfg.mesh.to_dict(), None if tpu is None else tpu.devices)
    optimizer = optim.make_optimizer(cfg.optim)
    bert, llm = inputs.tokenizers(cfg)
    inputs.prepare_loss(cfg, mesh, bert, llm)
    st = state_lib.abstract(cfg, mesh, optimizer, inputs.vocab(bert, llm))
    if tpu is not None:
        _check_fits(st, tpu)
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
    report = {
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
    if tpu is not None:
        seconds = float(cost.get("optimal_seconds", float("nan")))
        flops = report["flops_per_step_per_device"]
        report["tpu"] = {
            "topology": tpu.name, "chip": tpu.chip.name, "chips": tpu.chips,
            "hbm_gib_per_device": round(tpu.device_memory_bytes / gib, 3),
            "fits": per_device["peak_estimate"] * gib <= tpu.device_memory_bytes,
            "estimated_step_seconds": seconds,
            # XLA's FLOPs (remat recomputation included) over the compiler's step time and the peak
            "projected_mfu": round(flops / (seconds * tpu.device_peak_flops), 4) if seconds > 0 else None,
            "collective_bytes_per_device": collective_bytes(compiled.as_text()),
        }
    return report


def _check_fits(st, tpu) -> None:
    """Refuse, before compiling, a slice whose memory cannot hold the train state even spread
    evenly over every device (the compile of a large model takes minutes)."""
    state_bytes = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves((st.train, st.frozen)))
    per_device = state_bytes / len(tpu.devices)
    if per_device > tpu.device_memory_bytes:
        raise ValueError(f"--topology {tpu.name}: too small for this model: its train state alone is "
                         f"{state_bytes / (1 << 30):.1f} GiB, {per_device / (1 << 30):.1f} GiB per device even "
                         f"fully sharded, above the {tpu.device_memory_bytes / (1 << 30):.1f} GiB of HBM each of its "
                         f"{len(tpu.devices)} devices has; pick a larger slice")


_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4,
                "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_COLLECTIVE = re.compile(r"= (?P<shape>\(.*?\)|[a-z0-9]+\[[0-9,]*\](?:\{[^}]*\})?) "
                         r"(?P<op>all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(?P<start>-start)?\(")
_ARRAY = re.compile(r"([a-z0-9]+)\[([0-9,]*)\]")


def collective_bytes(hlo: str) -> dict[str, int]:
    """Bytes each kind of collective writes per device in one step, from the compiled HLO: the
    result shapes (an async start's tuple also holds its operand: its last element is the result)."""
    out: dict[str, int] = {}
    for match in _COLLECTIVE.finditer(hlo):
        arrays = [_DTYPE_BYTES.get(t, 4) * math.prod(int(d) for d in dims.split(",") if d)
                  for t, dims in _ARRAY.findall(match["shape"])]
        if match["start"] and match["op"] in ("all-gather", "collective-permute") and arrays:
            arrays = arrays[-1:]
        out[match["op"]] = out.get(match["op"], 0) + sum(arrays)
    return out
