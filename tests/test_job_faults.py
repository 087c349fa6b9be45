"""The fault suite, part 2: jobs. Each test names the guarantee it checks.

- a bad config value: exit 2 within seconds, one line naming the field, nothing built
- a workdir resumes only the job that wrote it (eval, train; capfilt in test_capfilt.py)
- a damaged checkpoint is refused naming its step, and the previous one is offered
- a killed conversion's leftovers are removed by the next one
- unreadable weight files: one line naming the file; legacy torch.save files convert
- empty texts are refused by itm / itc / vqa / rank (API and CLI)
- SIGKILL between training checkpoints, mid-evaluation, mid-conversion (CapFilt: test_capfilt.py),
  then the same command: the outputs of an uninterrupted run
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGE1 = f"--config={ROOT / 'configs' / 'blip2_stage1.py'}:tiny"


def blip_jax(*args, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "blip_jax.cli", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def one_line_error(out: subprocess.CompletedProcess, *needles: str) -> str:
    assert out.returncode == 2, out.stderr[-3000:]
    lines = [line for line in out.stderr.splitlines() if line.strip() and "WARNING" not in line]
    errors = [line for line in lines if ": error: " in line]
    assert len(errors) == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


# ------------------------------------------------------------------ config validation
BAD_VALUES = [
    ("log_every=0", "config.log_every"),
    ("checkpoint_every=0", "config.checkpoint_every"),
    ("total_steps=0", "config.total_steps"),
    ("total_steps=-5", "config.total_steps"),
    ("grad_accum_steps=3", "config.grad_accum_steps"),
    ("batch_size=6", "config.batch_size"),  # 8 devices below
    ("optim.lr=-1.0", "config.optim.lr"),
    ("optim.b2=1.5", "config.optim.b2"),
    ("optim.schedule=linear", "config.optim.schedule"),
    ("nonfinite=ignore", "config.nonfinite"),
    ("mesh.fsdp=3", "config.mesh"),
    ("data.kind=json", "config.data.path"),
    ("data.augment=heavy", "config.data.augment"),
    ("model.init_from=/no/such/model", "config.model.init_from"),
    ("lod_every=3", "--config.lod_every"),  # a misspelled field
    ("log_every=ten", "--config.log_every"),  # not an integer
]


@pytest.mark.parametrize("override,field", BAD_VALUES, ids=[v for v, _ in BAD_VALUES])
def test_a_bad_config_value_exits_2_at_once_naming_the_field(override, field, tmp_path):
    start = time.time()
    out = blip_jax("train", STAGE1, f"--workdir={tmp_path / 'w'}", f"--config.{override}",
                   env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"})
    seconds = time.time() - start
    one_line_error(out, field)
    assert seconds < 15, seconds
    assert not (tmp_path / "w" / "checkpoints").exists()


def test_an_unknown_preset_or_config_file_is_one_line(tmp_path):
    out = blip_jax("train", f"--config={ROOT / 'configs' / 'blip2_stage1.py'}:huge", f"--workdir={tmp_path}")
    assert out.returncode == 2 and "unknown preset 'huge'" in out.stderr and "Traceback" not in out.stderr
    one_line_error(blip_jax("train", "--config=configs/nope.py:tiny", f"--workdir={tmp_path}"), "nope.py")
    debug = blip_jax("train", STAGE1, f"--workdir={tmp_path}", "--config.log_every=0", "--debug")
    assert debug.returncode != 0 and "Traceback" in debug.stderr


# ------------------------------------------------------------------ training: identity and damaged checkpoints
def _train(workdir: Path, *overrides: str) -> subprocess.CompletedProcess:
    return blip_jax("train", STAGE1, f"--workdir={workdir}", "--config.total_steps=4", "--config.checkpoint_every=2",
                    "--config.log_every=2", "--config.report=False", *overrides)


def test_training_resumes_only_its_own_run_and_refuses_a_damaged_checkpoint(tmp_path):
    w = tmp_path / "w"
    assert _train(w).returncode == 0
    identity = json.loads((w / "job.json").read_text())
    assert identity["job"] == "train" and identity["settings"]["optim"]["lr"] == 2e-3
    # another learning rate would mix two runs in one workdir
    one_line_error(_train(w, "--config.optim.lr=0.5"), "settings.optim.lr", "--workdir")
    # a longer run of the same job resumes
    longer = _train(w, "--config.total_steps=6")
    assert longer.returncode == 0, longer.stderr[-2000:]
    assert "resumed from step 4" in longer.stderr
    # damage the latest checkpoint (step 6): its state's _METADATA goes missing
    checkpoints = w / "checkpoints"
    assert sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()) == [2, 4, 6]
    (checkpoints / "6" / "state" / "_METADATA").unlink()
    line = one_line_error(_train(w, "--config.total_steps=8"), "checkpoint step 6", "step 4")
    shutil.rmtree(checkpoints / "6")  # what the message offers
    resumed = _train(w, "--config.total_steps=8")
    assert resumed.returncode == 0 and "resumed from step 4" in resumed.stderr, (line, resumed.stderr[-2000:])
    # a truncated data file of the latest checkpoint (step 8)
    parts = sorted((p for p in (checkpoints / "8" / "state").rglob("*") if p.is_file() and p.stat().st_size > 1000),
                   key=lambda p: -p.stat().st_size)
    os.truncate(parts[0], parts[0].stat().st_size // 3)
    one_line_error(_train(w, "--config.total_steps=10"), "checkpoint step 8", "step 6")


# ------------------------------------------------------------------ evaluation: identity
@pytest.fixture(scope="module")
def eval_data(tmp_path_factory):
    from PIL import Image

    from blip_jax.data.synthetic import SyntheticShapes

    root = tmp_path_factory.mktemp("eval_faults")
    (root / "images").mkdir()
    source = SyntheticShapes(4, seed=1, image_size=32)
    entries = []
    for i in range(4):
        Image.fromarray(source[i]["image"]).save(root / "images" / f"{i}.png")
        entries.append({"image": f"{i}.png", "image_id": i, "caption": [source[i]["caption"]]})
    (root / "captions.json").write_text(json.dumps(entries))
    return root


def test_an_eval_workdir_never_returns_another_models_results(eval_data, converted, tmp_path_factory):
    from blip_jax.convert import convert
    from blip_jax.testing import write_tiny_checkpoint

    other = tmp_path_factory.mktemp("other") / "caption_seed1"
    convert(write_tiny_checkpoint(other.parent / "hf", "caption", seed=1), other, progress=False)
    first = converted("caption")
    w = tmp_path_factory.mktemp("eval_w")
    args = ["eval", f"--config={ROOT / 'configs' / 'eval' / 'caption.py'}:coco", f"--workdir={w}", "--noprogress",
            "--config.data.kind=json", f"--config.data.path={eval_data / 'captions.json'}",
            f"--config.data.image_root={eval_data / 'images'}", "--config.batch_size=2", "--config.shard_size=2"]
    done = blip_jax(*args, f"--ckpt={first}")
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((w / "results.json").read_text())
    model = results["models"]["model"]
    assert model["path"] == str(Path(first).resolve()) and len(model["fingerprint"]) == 16
    line = one_line_error(blip_jax(*args, f"--ckpt={other}"), "holds outputs of another eval", str(Path(first).resolve()))
    assert "--workdir" in line
    assert json.loads((w / "results.json").read_text()) == results  # untouched
    again = blip_jax(*args, f"--ckpt={first}")  # the same model resumes (every shard is done)
    assert again.returncode == 0
    assert json.loads((w / "results.json").read_text())["metrics"] == results["metrics"]
    one_line_error(blip_jax(*args, f"--ckpt={first}", "--config.max_words=20"), "settings.max_words")


# ------------------------------------------------------------------ conversion
def test_a_killed_conversions_leftovers_are_removed(hf_checkpoint, tmp_path):
    src = hf_checkpoint("caption")
    dst = tmp_path / "dst"
    proc = subprocess.Popen([sys.executable, "-m", "blip_jax.cli", "convert", str(src), str(dst)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".dst.partial-*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_early = proc.returncode == -signal.SIGKILL and not dst.exists()
    # a leftover of a writer that is gone, whether or not the kill above landed mid-write
    fake = tmp_path / f".dst.partial-{2**22 + 12345}@{os.uname().nodename}-abcdefgh"
    fake.mkdir()
    (fake / "half.bin").write_bytes(b"\0" * 100)
    done = blip_jax("convert", src, dst, "--overwrite")
    assert done.returncode == 0, done.stderr[-2000:]
    assert not list(tmp_path.glob(".dst.*")), list(tmp_path.iterdir())
    assert (dst / "config.json").is_file()
    print(f"the SIGKILL landed mid-conversion: {killed_early}")


def _hf_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_unreadable_weight_files_are_one_line_naming_the_file(hf_checkpoint, tmp_path):
    import torch

    src = hf_checkpoint("caption")
    empty = _hf_copy(src, tmp_path / "empty")
    (empty / "model.safetensors").write_bytes(b"")
    one_line_error(blip_jax("convert", empty, tmp_path / "o1"), str(empty / "model.safetensors"), "empty")
    cut = _hf_copy(src, tmp_path / "cut")
    weights = cut / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    one_line_error(blip_jax("convert", cut, tmp_path / "o2"), str(weights))
    garbage = _hf_copy(src, tmp_path / "garbage")
    (garbage / "model.safetensors").write_bytes(os.urandom(4096))
    one_line_error(blip_jax("convert", garbage, tmp_path / "o3"), str(garbage / "model.safetensors"))
    pickled = _hf_copy(src, tmp_path / "pickled")
    (pickled / "model.safetensors").unlink()
    torch.save({"weights": torch.zeros(2), "hook": np.random.default_rng(0)}, pickled / "pytorch_model.bin")
    one_line_error(blip_jax("convert", pickled, tmp_path / "o4"), "pytorch_model.bin", "pickled objects")


def test_a_legacy_torch_save_file_converts_to_the_same_model(hf_checkpoint, converted, tmp_path):
    import torch
    from safetensors.torch import load_file

    import blip_jax as bj

    src = hf_checkpoint("caption")
    legacy = _hf_copy(src, tmp_path / "legacy")
    state = load_file(legacy / "model.safetensors")
    (legacy / "model.safetensors").unlink()
    torch.save(state, legacy / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    import zipfile

    assert not zipfile.is_zipfile(legacy / "pytorch_model.bin")
    out = blip_jax("convert", legacy, tmp_path / "dst")
    assert out.returncode == 0, out.stderr[-2000:]
    import jax

    ours, reference = bj.load(tmp_path / "dst"), bj.load(converted("caption"))
    for a, b in zip(jax.tree.leaves(ours.params), jax.tree.leaves(reference.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ------------------------------------------------------------------ empty texts
def test_empty_texts_are_refused_naming_the_argument(converted, hf_checkpoint, tmp_path):
    import blip_jax as bj
    from blip_jax.testing import sample_images

    image = sample_images(1)[0]
    retrieval = bj.load(converted("retrieval"))
    with pytest.raises(ValueError, match=r"texts is an empty text"):
        retrieval.itm([image], "")
    with pytest.raises(ValueError, match=r"texts\[1\] is an empty text"):
        retrieval.itc([image], ["a red circle", "  "])
    with pytest.raises(ValueError, match=r"texts is empty"):
        retrieval.itm([image], [])
    vqa = bj.load(converted("vqa"))
    with pytest.raises(ValueError, match=r"questions is an empty text"):
        vqa.vqa([image], "")
    with pytest.raises(ValueError, match=r"answer_list\[0\] is an empty text"):
        vqa.vqa_rank([image], "what is it?", ["", "yes"])
    path = tmp_path / "photo.png"
    image.save(path)
    one_line_error(blip_jax("itm", "--ckpt", converted("retrieval"), path, "--text", ""), "texts is an empty text")
    one_line_error(blip_jax("vqa", "--ckpt", converted("vqa"), path, "--question", " "), "questions is an empty text")


def test_blip2_rank_refuses_an_empty_candidate(tmp_path):
    import blip_jax as bj
    from blip_jax.convert import convert
    from blip_jax.testing import sample_images, write_tiny_blip2_checkpoint

    convert(write_tiny_blip2_checkpoint(tmp_path / "hf", "opt"), tmp_path / "opt", progress=False)
    model = bj.load(tmp_path / "opt")
    with pytest.raises(ValueError, match=r"candidates\[1\] is an empty text"):
        model.rank(sample_images(1), "Question: what? Answer:", ["yes", ""])
    with pytest.raises(ValueError, match=r"questions is an empty text"):
        model.vqa(sample_images(1), "")


def test_eval_and_capfilt_configs_are_validated_first(tmp_path):
    eval_cfg = f"--config={ROOT / 'configs' / 'eval' / 'caption.py'}:coco"
    one_line_error(blip_jax("eval", eval_cfg, "--ckpt=/no/model", f"--workdir={tmp_path}", "--config.shard_size=0"),
                   "config.shard_size")
    one_line_error(blip_jax("eval", eval_cfg, "--ckpt=/no/model", f"--workdir={tmp_path}"), "config.data.path")
    classes = f"--config={ROOT / 'configs' / 'eval' / 'classification.py'}"
    one_line_error(blip_jax("eval", classes, "--ckpt=/no/model", f"--workdir={tmp_path}",
                            f"--config.data.path={tmp_path / 'none'}"), "config.data.path")
    capfilt_cfg = f"--config={ROOT / 'configs' / 'capfilt.py'}:tiny"
    one_line_error(blip_jax("capfilt", capfilt_cfg, f"--workdir={tmp_path}", "--config.top_p=2.0"), "config.top_p")
    one_line_error(blip_jax("capfilt", capfilt_cfg, f"--workdir={tmp_path}", "--config.mode=best"), "config.mode")


# ------------------------------------------------------------------ SIGKILL, then the same command again
def _kill_when(cmd: list[str], ready, timeout: float = 300) -> None:
    """Start `blip-jax cmd`, SIGKILL it as soon as `ready()` holds (it must not have finished)."""
    proc = subprocess.Popen([sys.executable, "-m", "blip_jax.cli", *map(str, cmd)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while not ready() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the job ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def _model_params(directory: Path) -> list[np.ndarray]:
    import jax

    import blip_jax as bj

    return [np.asarray(x) for x in jax.tree.leaves(bj.load(directory).params)]


def test_training_killed_between_checkpoints_resumes_to_the_uninterrupted_model(tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    steps = ["--config.total_steps=60", "--config.checkpoint_every=4", "--config.log_every=4"]
    assert _train(whole, *steps).returncode == 0
    args = ["train", STAGE1, f"--workdir={killed}", "--config.report=False", *steps]
    _kill_when(args, lambda: (killed / "checkpoints" / "4").is_dir())
    assert not (killed / "model").exists()
    resumed = _train(killed, *steps)
    assert resumed.returncode == 0 and "resumed from step" in resumed.stderr, resumed.stderr[-2000:]
    for a, b in zip(_model_params(whole / "model"), _model_params(killed / "model")):
        np.testing.assert_array_equal(a, b)


def test_evaluation_killed_mid_job_resumes_to_the_same_results(eval_data, converted, tmp_path):
    # The killed run's last image is a named pipe: reading it blocks, so the job is surely mid-way
    # (some shards written, never all) when it is killed, however fast the machine; then the real
    # image takes the pipe's place and the job resumes.
    data = tmp_path / "data"
    shutil.copytree(eval_data, data)
    args = ["eval", f"--config={ROOT / 'configs' / 'eval' / 'caption.py'}:coco", "--noprogress",
            f"--ckpt={converted('caption')}", "--config.data.kind=json", f"--config.data.path={data / 'captions.json'}",
            f"--config.data.image_root={data / 'images'}", "--config.batch_size=1", "--config.shard_size=1"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert blip_jax(*args, f"--workdir={whole}").returncode == 0
    last = data / "images" / "3.png"
    last.unlink()
    os.mkfifo(last)
    shards = killed / "shards" / "captions"
    _kill_when([*args, f"--workdir={killed}"], lambda: shards.is_dir() and any(shards.glob("[0-9]*.jsonl")))
    assert len(list(shards.glob("[0-9]*.jsonl"))) < 4 and not (killed / "results.json").exists()
    last.unlink()
    shutil.copy(eval_data / "images" / "3.png", last)
    assert blip_jax(*args, f"--workdir={killed}").returncode == 0
    ours, reference = (json.loads((w / "results.json").read_text()) for w in (killed, whole))
    assert ours["metrics"] == reference["metrics"]
    assert (killed / "predictions.jsonl").read_text() == (whole / "predictions.jsonl").read_text()
