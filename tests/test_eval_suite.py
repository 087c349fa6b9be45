"""`blip-jax eval-suite` with InstructBLIP's held-out suite (configs/eval/instructblip_heldout.py)
on a tiny InstructBLIP converted here: the jobs whose data exist run, each table value is its
job's results.json metric, missing data and unsupported datasets are listed and counted, a rerun
resumes, and another model in the same workdir is refused, job by job."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUITE = "configs/eval/instructblip_heldout.py"
FAST = ["--set", "batch_size=4", "--set", "shard_size=4", "--set", 'generation={"num_beams": 1, "max_new_tokens": 3}',
        "--no-progress"]


def _suite(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "blip_jax.cli", "eval-suite", f"--suite={SUITE}", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=900, env={**os.environ, "JAX_PLATFORMS": "cpu"})


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Two tiny InstructBLIP models; NoCaps, GQA and ScienceQA-IMG files in the suite's layout."""
    from blip_jax.convert import convert
    from blip_jax.data.synthetic import SyntheticShapes
    from blip_jax.testing import write_tiny_blip2_checkpoint
    from PIL import Image

    root = tmp_path_factory.mktemp("suite")
    models = []
    for seed in (0, 1):
        hf = write_tiny_blip2_checkpoint(root / f"hf{seed}", "instruct_llama", seed=seed)
        convert(hf, root / f"model{seed}", progress=False)
        models.append(root / f"model{seed}")
    data = root / "data"
    records = [SyntheticShapes(6, seed=5, image_size=32)[i] for i in range(6)]
    for folder in ("nocaps", "gqa", "scienceqa"):
        (data / folder / "images").mkdir(parents=True)
        for i, r in enumerate(records):
            Image.fromarray(r["image"]).save(data / folder / "images" / f"{i}.png")
    (data / "nocaps" / "nocaps_val.json").write_text(json.dumps(
        [{"image": f"{i}.png", "image_id": i, "caption": [r["caption"], "a shape"]} for i, r in enumerate(records)]))
    (data / "gqa" / "testdev_balanced_questions.json").write_text(json.dumps(
        [{"image": f"{i}.png", "question_id": i, "question": r["question"], "answer": r["answer"]}
         for i, r in enumerate(records)]))
    (data / "scienceqa" / "scienceqa_img_test.json").write_text(json.dumps(
        [{"image": f"{i}.png", "question_id": i, "question": r["question"], "context": "",
          "choices": sorted({r["answer"], "yes"}), "answer_index": sorted({r["answer"], "yes"}).index(r["answer"])}
         for i, r in enumerate(records)]))
    return models, data, root


def test_suite_runs_what_has_data_and_writes_one_table(setup):
    models, data, root = setup
    workdir = root / "run"
    done = _suite(f"--ckpt={models[0]}", f"--data_root={data}", f"--workdir={workdir}", *FAST)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((workdir / "suite.json").read_text())
    rows = {r["job"]: r for r in report["rows"]}
    assert report["counts"] == {"ok": 3, "missing_data": 6, "failed": 0, "unsupported": 4}
    assert len(rows) == 13  # the paper's 13 held-out datasets
    for job, metric, scale in (("nocaps", "cider", 100.0), ("gqa", "accuracy", 1.0), ("scienceqa_img", "accuracy", 1.0)):
        results = json.loads((workdir / job / "results.json").read_text())
        assert rows[job]["status"] == "ok"
        assert rows[job]["value"] == round(scale * results["metrics"][metric], 2)
        assert rows[job]["examples"] == 6
    assert rows["textvqa"]["status"] == f"missing data: {data}/textvqa/textvqa_val.json"
    assert rows["msvd_qa"]["status"].startswith("unsupported: video QA")
    assert rows["gqa"]["paper"] == {"flant5xl": 48.4, "vicuna7b": 49.2}
    table = (workdir / "suite.md").read_text()
    assert table.startswith("| job | metric | blip-jax | paper flant5xl | paper vicuna7b | status |")
    assert f"| gqa | accuracy | {rows['gqa']['value']:.2f} | 48.4 | 49.2 | ok |" in table
    assert table in done.stdout

    # a rerun resumes every job (their shards are reused) and writes the same table
    shards = {p: p.stat().st_mtime_ns for p in (workdir / "gqa" / "shards").rglob("*") if p.is_file()}
    again = _suite(f"--ckpt={models[0]}", f"--data_root={data}", f"--workdir={workdir}", *FAST)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (workdir / "suite.md").read_text() == table
    assert {p: p.stat().st_mtime_ns for p in shards} == shards

    # another model into the same workdir: every job refuses, nothing is mixed
    other = _suite(f"--ckpt={models[1]}", f"--data_root={data}", f"--workdir={workdir}", "--only=gqa", *FAST)
    assert other.returncode == 0 and "Traceback" not in other.stderr
    row = json.loads((workdir / "suite.json").read_text())["rows"][0]
    assert row["status"].startswith("failed: ") and "holds outputs of another eval" in row["status"]


def test_bad_arguments_are_one_line(setup, tmp_path):
    models, data, _ = setup
    done = _suite(f"--ckpt={models[0]}", f"--data_root={data}", f"--workdir={tmp_path}", "--only=gqa,coco")
    assert done.returncode == 2 and "--only names unknown jobs ['coco']" in done.stderr
    done = _suite(f"--ckpt={models[0]}", f"--data_root={data}", f"--workdir={tmp_path}", "--set", "beams=3")
    assert done.returncode != 0 and "Traceback" not in done.stderr and "no field 'beams'" in done.stderr
    helped = subprocess.run([sys.executable, "-m", "blip_jax.cli", "eval-suite", "--help"], cwd=ROOT,
                            capture_output=True, text=True)
    assert helped.returncode == 0 and "--data_root" in helped.stdout
