"""InstructBLIP's 13 held-in datasets as one mixture (`blip_jax.data.held_in`, the `tiny_mixture`
and paper presets of configs/instructblip_*.py): sqrt-balanced shares with the manual weights,
each source's template family, LLaVA conversations, `data.root`, and a training run."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "blip_jax.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=900, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_held_in_shares_and_templates():
    """Drawn records follow weight * sqrt(size) per source; each source's records become
    instructions of its family (VQG asks for a question, LLaVA keeps its own pair)."""
    from blip_jax.config_files import load_config
    from blip_jax.data.held_in import HELD_IN
    from blip_jax.data.instructions import TEMPLATES, instruct
    from blip_jax.data.sources import build_records

    cfg = load_config(ROOT / "configs/instructblip_vicuna.py", "tiny_mixture")
    mix = cfg.data.mixture
    assert sorted(mix) == sorted(HELD_IN) and len(mix) == 13 and cfg.data.balance == "sqrt"
    records, _ = build_records(cfg.data, seed=0)
    n = 4000
    drawn = [records[i] for i in range(n)]
    counts = Counter(r["source"] for r in drawn)
    raw = {k: mix[k].weight * math.sqrt(mix[k].num_records) for k in mix}
    for name, w in raw.items():
        expected = n * w / sum(raw.values())
        assert abs(counts[name] - expected) < 4 * math.sqrt(expected) + 2, (name, counts[name], expected)
    assert counts["okvqa"] > counts["aokvqa"]  # the paper's manual adjustment
    rng = np.random.default_rng(0)
    by_source = {r["source"]: r for r in drawn}
    vqg, _ = instruct(by_source["vqg_okvqa"], "", rng)
    assert any(vqg.split("{")[0].strip() and vqg.startswith(t.split("{")[0]) for t in TEMPLATES["vqg"]), vqg
    ocr, _ = instruct(by_source["ocrvqa"], "", rng)
    assert any(ocr.startswith(t.split("{")[0]) for t in TEMPLATES["ocr_vqa"]), ocr
    llava = by_source["llava_detail"]
    assert instruct(llava, "", rng) == (llava["instruction"], llava["output"])


def test_paper_presets_name_the_13_files_under_data_root():
    from blip_jax.config_files import load_config
    from blip_jax.data.sources import under_root

    for file, preset in (("instructblip_vicuna.py", "vitg_vicuna7b"), ("instructblip_t5.py", "vitg_flant5xl")):
        cfg = load_config(ROOT / "configs" / file, preset)
        assert len(cfg.data.mixture) == 13 and cfg.data.balance == "sqrt"
        spec = under_root({**cfg.data.mixture.okvqa, "root": "gs://bucket/ib"})
        assert spec["path"] == "gs://bucket/ib/okvqa/okvqa_train.json" and spec["image_root"] == "gs://bucket/ib/coco/images"
    done = _cli("train", "--config=configs/instructblip_vicuna.py:vitg_vicuna7b", "--workdir=/tmp/never",
                "--config.data.root=/nonexistent/ib")
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "config.data.mixture.aokvqa.path = '/nonexistent/ib/aokvqa/aokvqa_v1p0_train.json': no such file" in done.stderr


def test_llava_conversations_and_root(tmp_path):
    """LLaVA-Instruct's files: each (human, gpt) pair is one record, the <image> marker dropped;
    relative paths resolve under `root`."""
    from blip_jax.data.sources import build_source
    from blip_jax.testing import sample_images

    (tmp_path / "images").mkdir()
    sample_images(1, size=32)[0].save(tmp_path / "images" / "a.jpg")
    (tmp_path / "llava.json").write_text(json.dumps([{"id": "1", "image": "a.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat color is the circle?"}, {"from": "gpt", "value": "It is red."},
        {"from": "human", "value": "And the square?"}, {"from": "gpt", "value": "Blue."}]}]))
    source = build_source({"kind": "json", "root": str(tmp_path), "path": "llava.json", "image_root": "images"})
    assert len(source) == 2
    first, second = source[0], source[1]
    assert (first["instruction"], first["output"]) == ("What color is the circle?", "It is red.")
    assert (second["instruction"], second["output"]) == ("And the square?", "Blue.")
    assert first["image"] == str(tmp_path / "images" / "a.jpg")


def test_bad_family_is_one_line():
    done = _cli("train", "--config=configs/instructblip_vicuna.py:tiny_mixture", "--dry_run",
                "--config.data.mixture.okvqa.instruction_family=knowledge")
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "data.mixture.okvqa.instruction_family" in done.stderr and "knowledge_vqa" in done.stderr


def test_tiny_mixture_trains_and_answers(tmp_path):
    import blip_jax
    from blip_jax.testing import sample_images

    workdir = tmp_path / "run"
    done = _cli("train", "--config=configs/instructblip_vicuna.py:tiny_mixture", f"--workdir={workdir}",
                "--config.report=False")
    assert done.returncode == 0, done.stderr[-3000:]
    losses = [json.loads(line)["loss"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses
    model = blip_jax.load(workdir)
    assert len(model.generate(sample_images(2, size=32), "describe the image.", max_new_tokens=3)) == 2
