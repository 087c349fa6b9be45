"""Model FLOPs (blip_jax.train.flops): frozen-aware counts checked by hand and against XLA's own
count, and MFU with its rates in metrics.jsonl and TensorBoard of a `blip-jax train` run."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from blip_jax import hardware
from blip_jax.train import flops

ROOT = Path(__file__).resolve().parents[1]


def test_counts_by_what_needs_a_gradient():
    """frozen ViT-like layer 2N, trainable 6N (4N where its input needs no gradient), a frozen
    LLM-like layer after trainables 4N, a stop_gradient'ed (momentum) layer 2N, a scan per step."""
    b, d = 4, 8
    mm = 2 * b * d * d  # one [b, d] x [d, d] forward

    def loss(trainable, frozen, x):
        h = x @ frozen["vit"]  # neither operand needs a gradient: forward only
        h = h @ trainable["first"]  # the weight's gradient: 2 mm
        h = h @ trainable["deep"]  # weight and input: 3 mm
        h = h @ frozen["llm"]  # the input's gradient only: 2 mm
        m = jax.lax.stop_gradient(h) @ frozen["momentum"]  # 1 mm

        def layer(carry, w):
            return carry @ w, None  # each of 3 steps: weight and input, 3 mm

        h, _ = jax.lax.scan(layer, h, trainable["stack"])
        return (h + m).sum()

    w = jnp.ones((d, d))
    trainable = {"first": w, "deep": w, "stack": jnp.ones((3, d, d))}
    frozen = {"vit": w, "llm": w, "momentum": w}
    assert flops.loss_flops(loss, trainable, frozen, jnp.ones((b, d))) == mm * (1 + 2 + 3 + 2 + 1 + 3 * 3)
    # the same under jit, remat and a custom_jvp (gelu) boundary
    wrapped = jax.jit(jax.checkpoint(lambda t, f, x: loss(t, f, jax.nn.gelu(x))))
    assert flops.loss_flops(wrapped, trainable, frozen, jnp.ones((b, d))) == mm * 18


@pytest.mark.parametrize("preset", ["blip2_stage2_opt", "blip_caption"])
def test_analytic_count_against_xla(preset):
    """XLA counts the matmuls the same way and adds elementwise work (a large share of tiny
    models: measured 15-20%), so the analytic count is a little below it, never above."""
    from blip_jax.config_files import load_config
    from blip_jax.train import sharding, trainer

    cfg = load_config(ROOT / "configs" / f"{preset}.py", "tiny")
    mesh = sharding.make_mesh(cfg.mesh.to_dict())
    st, task, step_fn, _ = trainer.setup(cfg, mesh)
    batch = task.global_batch(next(task.iterator(process_index=0, process_count=1)), mesh)
    cost = step_fn.lower(st.train, st.frozen, batch).compile().cost_analysis()
    xla = (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]
    ours = trainer.model_flops(st.model, cfg, mesh, st.train, st.frozen, batch)
    assert 0.7 * xla <= ours <= xla, (ours, xla)


def test_peak_table():
    cpu = jax.devices("cpu")[0]
    peak, what = hardware.peak_flops(cpu)
    assert peak > 1e8 and "measured" in what

    class Device:
        platform = "tpu"
        device_kind = "TPU v5 lite"

    assert hardware.peak_flops(Device())[0] == hardware.CHIPS["v5e"].peak_bf16_flops
    Device.device_kind = "NVIDIA H100 80GB HBM3"
    Device.platform = "gpu"
    assert hardware.peak_flops(Device())[0] == hardware.CHIPS["h100"].peak_bf16_flops


def _tensorboard_tags(directory: Path) -> set[str]:
    """Scalar tags in the TensorBoard event files under `directory` (TFRecord framing)."""
    from tensorboardX.proto import event_pb2

    tags = set()
    for path in directory.rglob("events.out.tfevents.*"):
        data = path.read_bytes()
        at = 0
        while at + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            event = event_pb2.Event.FromString(data[at + 12:at + 12 + length])
            tags.update(v.tag for v in event.summary.value)
            at += 12 + length + 4
    return tags


def test_mfu_in_metrics_and_tensorboard(tmp_path):
    workdir = tmp_path / "run"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "blip_jax.cli", "train", "--config=configs/blip2_stage2_opt.py:tiny",
                           f"--workdir={workdir}", "--config.total_steps=4", "--config.log_every=2",
                           "--config.checkpoint_every=4", "--config.report=False"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "GFLOP a step (model FLOPs)" in proc.stderr
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    keys = ("model_flops_per_step", "tflops_per_sec_per_device", "mfu", "images_per_sec_per_device",
            "tokens_per_sec_per_device")
    for row in rows:
        assert all(row[k] > 0 for k in keys), row
        assert row["mfu"] < 1
        devices = row["examples_per_sec"] / row["images_per_sec_per_device"]  # one image an example
        assert devices == pytest.approx(round(devices)) and devices >= 1
    assert set(keys) <= _tensorboard_tags(workdir / "tensorboard")
