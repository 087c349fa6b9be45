"""`blip-jax train --dry_run`: the memory plan compiles the real train step against the abstract
state the trainer fills, for every training config, and for a paper preset on a 64-chip mesh."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAIN_CONFIGS = sorted(p.name for p in (ROOT / "configs").glob("*.py") if p.name != "capfilt.py")


def _dry_run(config: str, devices: int = 1, *overrides: str) -> dict:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    out = subprocess.run([sys.executable, "-m", "blip_jax.cli", "train", f"--config=configs/{config}", "--dry_run",
                          *overrides], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def test_every_stage_has_a_training_config():
    from blip_jax.config_files import load_config
    from blip_jax.train.objectives import STAGES

    covered = {load_config(str(ROOT / "configs" / name), "tiny").objective for name in TRAIN_CONFIGS}
    assert covered == set(STAGES)


@pytest.mark.parametrize("config", TRAIN_CONFIGS)
def test_dry_run_of_every_tiny_config(config):
    plan = _dry_run(f"{config}:tiny")
    assert plan["per_device_gib"]["peak_estimate"] > 0
    assert plan["flops_per_step_per_device"] > 0
    assert plan["parameters"]["trainable"] > 0


def test_dry_run_matches_the_state_training_builds():
    """The plan's parameter counts are those of the state a run creates (one builder for both)."""
    import jax

    from blip_jax.config_files import load_config
    from blip_jax.train import sharding, trainer

    plan = _dry_run("blip_pretrain.py:tiny")
    cfg = load_config(str(ROOT / "configs" / "blip_pretrain.py"), "tiny")
    st, _, _, _ = trainer.setup(cfg, sharding.make_mesh(cfg.mesh.to_dict(), jax.devices()[:1]))
    count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))  # noqa: E731
    assert plan["parameters"] == {"trainable": count(st.train["params"]), "frozen": count(st.frozen),
                                  "extra_state": count(st.train["extra"])}


def test_paper_preset_on_64_devices():
    """BLIP ViT-B pre-training at the paper's batch 2880 on a 64-device data-parallel mesh."""
    plan = _dry_run("blip_pretrain.py:base", 64)
    assert plan["devices"] == 64 and plan["global_batch"] == 2880
    assert plan["parameters"]["trainable"] > 200e6  # ViT-B/16 + BERT-base encoder / decoder + heads
    per = plan["per_device_gib"]
    assert 1 < per["argument"] < per["peak_estimate"] < 80  # a copy of the state per device, 45 examples' activations


def _topology_run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "blip_jax.cli", "train", "--dry_run", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=600)


def test_tiny_preset_compiles_for_a_tpu_slice():
    """libtpu compiles the real train step for 8 TPU v5p chips on this CPU machine: memory per chip
    against its HBM, the compiler's step time, the projected MFU and the collectives' bytes."""
    done = _topology_run("--config=configs/blip2_stage1.py:tiny", "--topology=v5p:2x2x2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "WARNING" not in done.stderr  # libtpu told there is no TPU to look for
    plan = json.loads(done.stdout)
    tpu = plan["tpu"]
    assert plan["devices"] == 8 and tpu["chip"] == "TPU v5p" and tpu["chips"] == 8
    assert tpu["hbm_gib_per_device"] == 95.74 and tpu["fits"]
    assert 0 < tpu["estimated_step_seconds"] < 1 and 0 < tpu["projected_mfu"] <= 1
    assert tpu["collective_bytes_per_device"]["all-reduce"] > 0  # data-parallel gradients


def test_fsdp_activations_stay_batch_sharded_on_a_tpu_slice():
    """Stage 2 with FSDP (the paper presets' mesh) in bf16, scanned and rematted: the compiler
    all-gathers the weights and all-reduces no more than the trainable gradients. With the
    models' activation constraints dropped (as under a plain `with mesh:`), it sharded the
    activations' hidden axis instead and all-reduced 5x the gradients (80x at paper size)."""
    done = _topology_run("--config=configs/blip2_stage2_opt.py:tiny", "--topology=v5p:2x2x1", "--config.mesh.data=1",
                         "--config.mesh.fsdp=-1", "--config.model.precision=bf16", "--config.model.scan_layers=True",
                         "--config.model.remat_policy=full")
    assert done.returncode == 0, done.stderr[-3000:]
    plan = json.loads(done.stdout)
    gradient_bytes = 4 * plan["parameters"]["trainable"]
    assert plan["tpu"]["collective_bytes_per_device"]["all-reduce"] <= 1.1 * gradient_bytes


@pytest.mark.parametrize("topology,message", [
    ("v9x:2x2", "expected GENERATION:SHAPE"),
    ("v5p:3x3x3", "libtpu refuses it"),
])
def test_a_topology_libtpu_does_not_know_is_one_line(topology, message):
    done = _topology_run("--config=configs/blip2_stage1.py:tiny", f"--topology={topology}")
    assert done.returncode == 2 and message in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_a_slice_too_small_for_the_model_is_refused_before_compiling():
    """InstructBLIP Vicuna-13B with every parameter trained (Adam moments for all 14B) on the
    smallest v5e slice, 4 chips of 16 GiB: refused from the state's size, in seconds."""
    import time

    from blip_jax.config_files import load_config
    from blip_jax.hardware import tpu_slice
    from blip_jax.train import plan

    cfg = load_config(str(ROOT / "configs" / "instructblip_vicuna.py"), "vitg_vicuna13b")
    cfg.trainable = [r".*"]
    start = time.time()
    with pytest.raises(ValueError, match=r"--topology v5e:2x2: too small for this model: .* above the 16.0 GiB"):
        plan.plan(cfg, tpu_slice("v5e:2x2"))
    assert time.time() - start < 60
