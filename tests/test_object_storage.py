"""Workdirs and model directories in a bucket: a real GCS API server (PyPI gcp-storage-emulator,
tests/gcs_server.py) on 127.0.0.1, started and stopped here, with the clients pointed at it by their
documented endpoint settings (gcsfs: STORAGE_EMULATOR_HOST; TensorStore, which Orbax writes
through: TENSORSTORE_GCS_HTTP_URL and a test token). Nothing of the project is mocked."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "blip-jax-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def gcs():
    """The emulator's endpoint settings, also set in this process (the tests read the bucket)."""
    port = _free_port()
    server = subprocess.Popen([sys.executable, str(ROOT / "tests" / "gcs_server.py"), str(port), BUCKET],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    url = f"http://127.0.0.1:{port}"
    env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test",
           "TENSORSTORE_GCS_HTTP_VERSION": "1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield env
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.terminate()
        server.wait(10)


TRAIN = ["--config=configs/blip2_stage1.py:tiny", "--config.total_steps=24", "--config.checkpoint_every=4",
         "--config.log_every=1", "--config.report=False"]


def _train(workdir: str, *extra: str, wait: bool = True):
    cmd = [sys.executable, "-m", "blip_jax.cli", "train", f"--workdir={workdir}", *TRAIN, *extra]
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _losses(text: str) -> dict[int, float]:
    """step -> loss, the last line of each step winning (a resumed run logs its steps again)."""
    return {row["step"]: row["loss"] for row in map(json.loads, text.splitlines())}


def test_a_stage1_run_in_a_bucket_killed_and_resumed_equals_an_uninterrupted_one(gcs, tmp_path):
    from etils import epath

    _train(str(tmp_path / "local"))
    expected = _losses((tmp_path / "local" / "metrics.jsonl").read_text())
    workdir = f"gs://{BUCKET}/run"
    metrics = epath.Path(workdir) / "metrics.jsonl"
    job = _train(workdir, wait=False)
    deadline = time.time() + 600
    while time.time() < deadline and job.poll() is None:  # killed once step 9 is logged: after a save
        if metrics.exists() and max(_losses(metrics.read_text()), default=0) >= 9:
            job.send_signal(signal.SIGKILL)
            break
        time.sleep(0.5)
    assert job.wait(60) == -signal.SIGKILL, job.stderr.read()[-3000:]
    assert max(_losses(metrics.read_text())) < 24  # killed mid-run, not after it
    resumed = _train(workdir)
    assert "resumed from step" in resumed.stderr
    assert _losses(metrics.read_text()) == expected  # bit for bit, every step
    model = epath.Path(workdir) / "model"
    assert (model / "config.json").exists() and (model / "params" / "parts.json").exists()
    assert any((epath.Path(workdir) / "tensorboard").iterdir())
    assert max(int(p.name) for p in (epath.Path(workdir) / "checkpoints").iterdir() if p.name.isdigit()) == 24


def test_a_conversion_writes_its_model_into_the_bucket(gcs, tmp_path):
    """`blip-jax convert SRC gs://...`: the model directory is built locally and uploaded with its
    config.json last (a reader sees a model only once it is whole); an existing one is replaced only
    with --overwrite."""
    import fsspec
    from etils import epath

    lavis = ROOT / "tests" / "fixtures" / "lavis"
    dst = f"gs://{BUCKET}/models/caption"
    cmd = [sys.executable, "-m", "blip_jax.cli", "convert", str(lavis / "blip_caption" / "model.pth"), dst, "--lavis",
           "blip_caption/base_coco", "--tokenizer", str(lavis / "bert_tokenizer"), "--heads", "vision=4,text=3"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    model = epath.Path(dst)
    bucket = fsspec.filesystem("gs")
    listing = lambda: {f.split("/models/caption/", 1)[1] for f in bucket.find(dst)}  # noqa: E731
    bucket.invalidate_cache()
    names = listing()
    assert {"config.json", "params/parts.json", "tokenizer.json", "conversion.json"} <= names
    assert json.loads((model / "config.json").read_text())["architecture"] == "caption"
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "already exists" in again.stderr and "Traceback" not in again.stderr
    replaced = subprocess.run(cmd + ["--overwrite"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    bucket.invalidate_cache()
    now = listing()  # the same files, none of the old model's left (Orbax names its data files anew)
    data = lambda files: {f for f in files if "/d/" in f}  # noqa: E731
    assert not data(now) & data(names)
    assert now - data(now) == names - data(names)


def _eval(ckpt: str, workdir: str, data: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "blip_jax.cli", "eval", "--config=configs/eval/caption.py:coco", f"--ckpt={ckpt}",
           f"--workdir={workdir}", "--config.data.kind=json", f"--config.data.path={data / 'captions.json'}",
           f"--config.data.image_root={data / 'images'}", "--config.batch_size=2", "--config.shard_size=2",
           "--progress=false"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "BLIP_JAX_CACHE": str(data / "cache")})
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_an_eval_job_reads_its_model_from_the_bucket_writes_there_and_resumes_its_shards(gcs, tmp_path):
    """The model (a conversion written into the bucket) and the workdir both in the bucket: a rerun
    after a lost shard recomputes that shard only and gives the same results; `blip_jax.load` of
    the bucket's model answers as the local one."""
    import fsspec
    from PIL import Image

    import blip_jax
    from blip_jax.convert import convert_lavis
    from blip_jax.data.synthetic import SyntheticShapes

    lavis = ROOT / "tests" / "fixtures" / "lavis"
    local_model = tmp_path / "model"
    kw = dict(tokenizer=lavis / "bert_tokenizer", heads={"vision": 4, "text": 3}, progress=False)
    convert_lavis(lavis / "blip_caption" / "model.pth", local_model, "blip_caption/base_coco", **kw)
    ckpt = f"gs://{BUCKET}/models/eval_caption"
    convert_lavis(lavis / "blip_caption" / "model.pth", ckpt, "blip_caption/base_coco", **kw)

    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    source = SyntheticShapes(6, seed=3, image_size=40)
    records = [source[i] for i in range(6)]
    for i, r in enumerate(records):
        Image.fromarray(r["image"]).save(data / "images" / f"{i}.png")
    (data / "captions.json").write_text(json.dumps([{"image": f"{i}.png", "image_id": i, "caption": [r["caption"]]}
                                                    for i, r in enumerate(records)]))
    workdir = f"gs://{BUCKET}/eval/caption"
    first = json.loads(_eval(ckpt, workdir, data).stdout)
    bucket = fsspec.filesystem("gs")
    bucket.invalidate_cache()
    shards = {f: bucket.info(f)["generation"] for f in bucket.find(f"{workdir}/shards")}
    assert len(shards) == 3 and bucket.exists(f"{workdir}/results.json")
    lost = sorted(shards)[1]
    bucket.rm(lost)
    bucket.rm(f"{workdir}/results.json")
    again = json.loads(_eval(ckpt, workdir, data).stdout)
    bucket.invalidate_cache()
    now = {f: bucket.info(f)["generation"] for f in bucket.find(f"{workdir}/shards")}
    assert set(now) == set(shards) and now[lost] != shards[lost]
    assert all(now[f] == g for f, g in shards.items() if f != lost)  # the others were not recomputed
    assert again["metrics"] == first["metrics"]
    assert any(bucket.find(f"{workdir}/tensorboard"))

    images = [Image.fromarray(r["image"]) for r in records[:2]]
    os.environ["BLIP_JAX_CACHE"] = str(tmp_path / "cache")
    remote, local = blip_jax.load(ckpt), blip_jax.load(local_model)
    assert remote.caption(images, max_new_tokens=4) == local.caption(images, max_new_tokens=4)
    assert remote.path != local.path and blip_jax.load(ckpt).path == remote.path  # one cached copy


def test_a_missing_bucket_and_missing_credentials_fail_in_one_line(gcs, tmp_path):
    """Within seconds, without a traceback, before anything is written."""
    started = time.time()
    cmd = [sys.executable, "-m", "blip_jax.cli", "train", "--workdir=gs://no-such-bucket/run", *TRAIN]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "gs://no-such-bucket/run: the bucket 'no-such-bucket' does not exist" in done.stderr
    # no emulator, no key file, no gcloud login under HOME
    no_credentials = {k: v for k, v in os.environ.items() if k not in gcs and k != "GOOGLE_APPLICATION_CREDENTIALS"}
    no_credentials["HOME"] = str(tmp_path)
    cmd = [sys.executable, "-m", "blip_jax.cli", "train", f"--workdir=gs://{BUCKET}/creds", *TRAIN]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, env=no_credentials)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert f"gs://{BUCKET}/creds: no Google Cloud credentials found" in done.stderr
    assert time.time() - started < 60
