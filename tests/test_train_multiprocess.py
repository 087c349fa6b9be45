"""A 2-process job on localhost: jax.distributed (coordinator 127.0.0.1) with gloo CPU collectives,
started by launch/local_multiprocess.sh, 2 CPU devices per process (a 4-device mesh, data=2 x
fsdp=2, so parameters are sharded across the processes too).

  * the data: each process reads its own rows (grain, strided over processes), and
    `jax.make_array_from_process_local_data` places them on its devices, so the global batch is the
    single-process batch with its rows grouped by process: positions [0, 2, 4, 6, 1, 3, 5, 7] of
    the same 8 records;
  * `blip-jax train` on the tiny stage-1 preset: a few steps with checkpoints, then a second
    invocation resumes; metrics.jsonl is written by process 0 alone (each step once).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch" / "local_multiprocess.sh"
CONFIG = "configs/blip2_stage1.py:tiny"
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"  # as in test_train.py


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(cache: Path, devices: int = 2) -> dict:
    env = dict(os.environ)
    env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}",
               JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p))
    return env


def _train_command() -> str:
    exe = Path(sys.executable).with_name("blip-jax")
    return f"{exe} train" if exe.exists() else f"{sys.executable} -m blip_jax.cli train"


# one process of the data check: its rows of the first 2 global batches, gathered to every process
DATA_CHECK = textwrap.dedent("""
    import json, sys
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
    import importlib.util
    import numpy as np
    from jax.experimental import multihost_utils
    from blip_jax.train import inputs, sharding
    spec = importlib.util.spec_from_file_location("cfg", "configs/blip2_stage1.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config("tiny")
    mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=1))
    task = inputs.make_task(cfg, cfg.model.vision.image_size, False)
    it = task.iterator(process_index=jax.process_index(), process_count=jax.process_count())
    out = {}
    for step in range(2):
        batch = task.global_batch(next(it), mesh)
        for k, v in batch.items():
            assert v.shape[0] == cfg.batch_size and len(v.addressable_shards) == 2
            out[f"{step}/{k}"] = np.asarray(multihost_utils.process_allgather(v, tiled=True))
    if jax.process_index() == 0:
        np.savez(sys.argv[3], **out)
    print("DATA_OK", jax.process_index(), jax.process_count(), len(jax.devices()), flush=True)
""")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("jax_cache_mp")


def _check_bash():
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash is needed for launch/local_multiprocess.sh")
    version = subprocess.run([bash, "-c", "echo ${BASH_VERSINFO[0]}${BASH_VERSINFO[1]}"], capture_output=True,
                             text=True).stdout.strip()
    if int(version or 0) < 51:
        pytest.skip("launch/local_multiprocess.sh needs bash >= 5.1 (wait -n -p)")


def test_global_batch_from_two_processes(tmp_path, cache):
    """Each process's grain rows land on its own devices: the global batch holds the same records as
    a single process's batch, grouped by process."""
    port = _free_port()
    out = tmp_path / "batches.npz"
    procs = [subprocess.Popen([sys.executable, "-c", DATA_CHECK, f"127.0.0.1:{port}", str(i), str(out)],
                              env=_env(cache), cwd=str(ROOT), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    for p, (stdout, stderr) in zip(procs, results):
        assert p.returncode == 0, stderr[-4000:]
        assert "DATA_OK" in stdout and " 2 4" in stdout, stdout

    from blip_jax.train import inputs

    spec_cfg = _stage1_config()
    task = inputs.make_task(spec_cfg, spec_cfg.model.vision.image_size, False)
    it = task.iterator(process_index=0, process_count=1)
    got = np.load(out)
    order = [0, 2, 4, 6, 1, 3, 5, 7]  # process 0's rows (stream positions 0, 2, ...), then process 1's
    for step in range(2):
        single = next(it)
        for k, v in single.items():
            np.testing.assert_array_equal(got[f"{step}/{k}"], np.asarray(v)[order], err_msg=f"step {step} {k}")


def _stage1_config():
    import importlib.util

    spec = importlib.util.spec_from_file_location("mp_stage1_config", ROOT / "configs" / "blip2_stage1.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config("tiny")


def _launch(workdir: Path, cache: Path, *flags: str, config: str = CONFIG) -> subprocess.CompletedProcess:
    env = _env(cache)
    env["XLA_FLAGS"] = FAST_COMPILE  # the script adds the device count
    env.update(LOCAL_DEVICES="2", BLIP_JAX_TRAIN=_train_command(), COORDINATOR_PORT=str(_free_port()))
    extra = ["--config.report=False"] if "report" in _stage1_config() else []
    cmd = ["bash", str(LAUNCH), "2", config, str(workdir), "--config.mesh.data=2", "--config.mesh.fsdp=2",
           "--config.log_every=1", "--config.checkpoint_every=2", *extra, *flags]
    return subprocess.run(cmd, env=env, cwd=str(ROOT), capture_output=True, text=True, timeout=600)


def _rows(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_two_process_train_and_resume(tmp_path, cache):
    _check_bash()
    workdir = tmp_path / "run"
    first = _launch(workdir, cache, "--config.total_steps=4")
    logs = workdir / "logs"
    assert first.returncode == 0, (first.stdout[-3000:], first.stderr[-3000:],
                                   (logs / "process_1.log").read_text()[-3000:] if logs.exists() else "")
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "4"]
    assert [r["step"] for r in _rows(workdir)] == [1, 2, 3, 4]
    # both processes took part: gloo connected them, process 1 ran silently (process 0 reports)
    log1 = (logs / "process_1.log").read_text()
    assert "Gloo" in log1 or "gloo" in log1.lower()

    second = _launch(workdir, cache, "--config.total_steps=6")
    assert second.returncode == 0, (second.stdout[-3000:], second.stderr[-3000:])
    rows = _rows(workdir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # resumed at 4, one writer
    assert all(np.isfinite(r["loss"]) for r in rows)
    assert "6" in [p.name for p in (workdir / "checkpoints").iterdir()]
    start = second.stdout.rindex("\n{\n")  # process 0's printout: the last metrics, as indented JSON
    summary = json.loads(second.stdout[start:second.stdout.index("\n}", start) + 2])
    assert summary["step"] == 6
    print("2-process losses:", [round(r["loss"], 4) for r in rows])


def test_two_process_blip_run_exports_its_model(tmp_path, cache):
    """A 2-process BLIP pre-training run gathers its parameters and writes W/model once; it equals
    what one process exports after restoring the run's final checkpoint (a resume with no steps
    left), bit for bit."""
    _check_bash()
    import blip_jax
    from flax import traverse_util

    steps = ("--config.total_steps=3", "--config.checkpoint_every=100")
    run = tmp_path / "run"
    result = _launch(run, cache, *steps, config="configs/blip_pretrain.py:tiny")
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    two = tmp_path / "two_process_model"
    shutil.copytree(run / "model", two)
    subprocess.run([*_train_command().split(), "--config=configs/blip_pretrain.py:tiny", f"--workdir={run}",
                    "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.report=False", *steps],
                   env=_env(cache, devices=4), cwd=str(ROOT), check=True, capture_output=True, timeout=600)
    a = traverse_util.flatten_dict(blip_jax.load(two).params, sep="/")
    b = traverse_util.flatten_dict(blip_jax.load(run / "model").params, sep="/")
    assert a.keys() == b.keys() and len(a) > 50
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


def test_launcher_propagates_failure(tmp_path):
    """One process failing makes the script fail with its status, and stops the others."""
    _check_bash()
    fake = tmp_path / "fake_train.sh"
    fake.write_text("#!/usr/bin/env bash\n"
                    'for a in "$@"; do [[ "$a" == --process_id=1 ]] && { echo failing >&2; exit 3; }; done\n'
                    "sleep 120\n")
    fake.chmod(0o755)
    env = dict(os.environ, BLIP_JAX_TRAIN=str(fake), COORDINATOR_PORT=str(_free_port()))
    result = subprocess.run(["bash", str(LAUNCH), "3", CONFIG, str(tmp_path / "w")], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 3, (result.stdout, result.stderr)
    assert "stopping the others" in result.stderr
    assert "failing" in (tmp_path / "w" / "logs" / "process_1.log").read_text()
