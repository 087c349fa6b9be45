"""A training config points at a COCO-style folder, WebDataset shards, a prepared TFDS dataset, a
packed dataset or a mixture by settings alone, and `blip-jax train` reports the records it skipped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from blip_jax.config_files import load_config
from blip_jax.testing import write_caption_folder

ROOT = Path(__file__).resolve().parents[1]
tfds = pytest.importorskip("tensorflow_datasets")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """kind -> the data settings of one source of each kind (same images and captions)."""
    from blip_jax.data.packed import pack
    from blip_jax.data.sources import build_source
    from test_data_sources_wds_tfds import TinyCaps, sample, write_tar

    root = tmp_path_factory.mktemp("sources")
    folder = write_caption_folder(root / "coco")
    json_spec = {"kind": "json", "path": folder["annotations"], "image_root": folder["image_root"]}
    good = sorted(Path(folder["image_root"]).glob("mode_*")) + sorted(Path(folder["image_root"]).glob("rgb.*"))
    (root / "wds").mkdir()
    members = []
    for i, path in enumerate(good):
        members += sample(f"{i:06d}", path.read_bytes(), path.suffix[1:], f"a picture number {i}")
    members += sample("999999", None, text="a sample without an image")
    write_tar(root / "wds" / "00000.tar", members)
    TinyCaps(data_dir=root / "tfds", file_format="array_record").download_and_prepare()
    pack(build_source(json_spec), root / "packed", progress=False)
    return {"folder": folder, "specs": {
        "json": json_spec,
        "webdataset": {"kind": "webdataset", "path": str(root / "wds")},
        "tfds": {"kind": "tfds", "tfds_name": "tiny_caps", "data_dir": str(root / "tfds")},
        "packed": {"kind": "packed", "path": str(root / "packed")},
    }}


def _config(preset: str, data_settings: dict, **data_overrides):
    cfg = load_config(ROOT / "configs" / f"{preset}.py", "tiny")
    cfg.data.update({**data_settings, **data_overrides})
    return cfg


@pytest.mark.parametrize("kind", ["json", "webdataset", "tfds", "packed", "mixture"])
def test_a_training_config_reads_each_kind_of_source(data, kind):
    from blip_jax.train import inputs
    from blip_jax.train.defaults import source_defaults

    specs = data["specs"]
    if kind == "mixture":
        mix = {name: {**source_defaults(), **specs[name], "weight": 1.0} for name in ("json", "webdataset")}
        cfg = _config("blip2_stage1", {}, mixture=mix, balance="sqrt", augment="blip2_train")
    else:
        cfg = _config("blip2_stage1", specs[kind], augment="blip2_train")
    task = inputs.make_task(cfg, cfg.model.vision.image_size, False)
    it = task.iterator(process_index=0, process_count=1)
    for _ in range(3):
        batch = next(it)
        assert batch["pixels"].shape == (8, 32, 32, 3) and batch["pixels"].dtype == np.float32
        assert np.isfinite(batch["pixels"]).all() and batch["pixels"].std() > 0.1
        assert batch["text_ids"].shape == (8, 16) and (batch["text_mask"].sum(1) >= 2).all()
    if kind in ("json", "packed", "mixture"):
        assert sum(task.skipped(it).values()) > 0  # the folder's bad records were met and dropped


def test_an_instruction_config_templates_plain_captions(data):
    from blip_jax.train import inputs

    cfg = _config("instructblip_t5", data["specs"]["json"], augment="blip2_train")
    task = inputs.make_task(cfg, cfg.model.vision.image_size, True)
    batch = next(task.iterator(process_index=0, process_count=1))
    assert {"qformer_ids", "qformer_mask", "ids", "mask", "targets", "target_mask"} <= set(batch)
    assert (batch["qformer_mask"].sum(1) > 2).all() and (batch["target_mask"].sum(1) >= 1).all()


def test_blip_jax_train_on_a_folder_writes_the_skip_report(data, tmp_path):
    from blip_jax.train import inputs

    spec = data["specs"]["json"]
    steps = 4
    workdir = tmp_path / "run"
    flags = [f"--config.data.{k}={v}" for k, v in spec.items()] + [
        f"--config.total_steps={steps}", "--config.log_every=2", "--config.checkpoint_every=2"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "blip_jax.cli", "train", "--config=configs/blip2_stage1.py:tiny",
                           f"--workdir={workdir}", *flags], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((workdir / "data_report.json").read_text())
    # the oracle: the same pipeline, read in-process for the same number of batches
    cfg = _config("blip2_stage1", spec)
    task = inputs.make_task(cfg, cfg.model.vision.image_size, False)
    it = task.iterator(process_index=0, process_count=1)
    for _ in range(steps):
        next(it)
    expected = dict(task.skipped(it))
    expected["malformed_json"] = expected.get("malformed_json", 0) + task.source_skipped["malformed_json"]
    assert report == {"step": steps, "skipped": expected, "skipped_total": sum(expected.values())}
    assert set(expected) == set(data["folder"]["skipped"])  # every kind of bad record was met
    metrics = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["skipped_records"] == sum(expected.values())
    assert not (workdir / "report.json").exists()  # the synthetic-data report is not made for real data
