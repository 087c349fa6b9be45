"""Evaluation jobs end to end on tiny converted models and tiny data: every task on 8 fake CPU
devices equals the 1-device run; retrieval equals the reference procedure run with transformers'
PyTorch model; a killed job resumes from its finished shards; `blip-jax score` agrees.

Device counts must be fixed before jax is imported, so the jobs run in fresh processes: this file
is also their script (`python tests/test_eval_jobs.py SPEC_JSON`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("retrieval", "retrieval_blip2", "caption", "vqa", "choice", "classification")


def _config(task: str, overrides: dict):
    from blip_jax.config_files import load_config

    name = {"retrieval_blip2": "retrieval"}.get(task, task)
    preset = {"retrieval": "coco", "caption": "coco", "vqa": "vqav2", "choice": "aokvqa"}.get(name)
    cfg = load_config(ROOT / "configs" / "eval" / f"{name}.py", preset)
    cfg.update_from_flattened_dict(overrides)
    return cfg


def _job(spec: dict) -> dict:
    """Subprocess side: run each task of `spec` and return their results."""
    from blip_jax.eval.main import run

    out = {}
    for task, job in spec["jobs"].items():
        cfg = _config(task, job["overrides"])
        out[task] = run(cfg, job["ckpt"], job["workdir"], progress=False)
    return out


def _run_jobs(spec: dict, devices: int) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    proc = subprocess.run([sys.executable, __file__, json.dumps(spec)], env=env, capture_output=True, text=True,
                          timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Tiny evaluation splits of every kind over synthetic-shapes images (one unreadable image)."""
    from PIL import Image

    from blip_jax.data.synthetic import SyntheticShapes

    root = tmp_path_factory.mktemp("evaldata")
    (root / "images").mkdir()
    source = SyntheticShapes(10, seed=3, image_size=40)
    records = [source[i] for i in range(10)]
    for i, r in enumerate(records):
        Image.fromarray(r["image"]).save(root / "images" / f"{i}.png")
    (root / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    captions = [{"image": f"{i}.png", "image_id": i, "caption": [r["caption"], f"a picture with {r['caption']}"]}
                for i, r in enumerate(records)]
    captions.append({"image": "broken.png", "image_id": 99, "caption": ["nothing to see"]})
    (root / "captions.json").write_text(json.dumps(captions))
    vqa = [{"image": f"{i}.png", "question_id": i, "question": r["question"],
            "answer": [r["answer"]] * 7 + ["no", "two", r["answer"]]} for i, r in enumerate(records)]
    (root / "vqa.json").write_text(json.dumps(vqa))
    choice = [{"image": f"{i}.png", "question_id": i, "question": r["question"],
               "choices": sorted({r["answer"], "yes", "red"}), "answer_index": sorted({r["answer"], "yes", "red"}).index(
                   r["answer"])} for i, r in enumerate(records)]
    (root / "choice.json").write_text(json.dumps(choice))
    for i, r in enumerate(records[:6]):
        folder = root / "classes" / r["caption"].split()[-1]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(r["image"]).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def models(converted, tmp_path_factory):
    from blip_jax.convert import convert
    from blip_jax.testing import write_tiny_blip2_checkpoint

    root = tmp_path_factory.mktemp("evalmodels")
    blip2 = {}
    for kind in ("retrieval", "instruct_t5"):
        convert(write_tiny_blip2_checkpoint(root / f"hf_{kind}", kind), root / f"jax_{kind}", progress=False)
        blip2[kind] = str(root / f"jax_{kind}")
    return {"retrieval": str(converted("retrieval")), "caption": str(converted("caption")),
            "vqa": str(converted("vqa")), "blip2_retrieval": blip2["retrieval"], "instruct_t5": blip2["instruct_t5"]}


def _spec(data: Path, models: dict, workdir: Path) -> dict:
    def source(name, **more):
        return {"data.kind": "json", "data.path": str(data / name), "data.image_root": str(data / "images"),
                "batch_size": 4, "shard_size": 4, **more}

    jobs = {
        "retrieval": (models["retrieval"], source("captions.json", k=5, itm_shard_pairs=16)),
        "retrieval_blip2": (models["blip2_retrieval"], source("captions.json", k=-1, itm_shard_pairs=16)),
        "caption": (models["caption"], source("captions.json", **{"generation": {"num_beams": 2, "max_new_tokens": 6}})),
        "vqa": (models["vqa"], source("vqa.json", **{"generation": {"max_new_tokens": 4}})),
        "choice": (models["instruct_t5"], source("choice.json")),
        "classification": (models["retrieval"], {"data.path": str(data / "classes"), "batch_size": 4,
                                                  "shard_size": 4}),
    }
    return {"jobs": {t: {"ckpt": ckpt, "overrides": o, "workdir": str(workdir / t)} for t, (ckpt, o) in jobs.items()}}


@pytest.fixture(scope="module")
def runs(data, models, tmp_path_factory):
    out = {}
    for devices in (1, 8):
        workdir = tmp_path_factory.mktemp(f"eval{devices}")
        out[devices] = (_run_jobs(_spec(data, models, workdir), devices), workdir)
    return out


def _predictions(workdir: Path, task: str) -> list[dict]:
    return [json.loads(line) for line in (workdir / task / "predictions.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("task", TASKS)
def test_eight_devices_equal_one(runs, task):
    (one, dir1), (eight, dir8) = runs[1], runs[8]
    m1, m8 = one[task]["metrics"], eight[task]["metrics"]
    assert m1.keys() == m8.keys()
    for key in m1:
        if isinstance(m1[key], float):
            assert m8[key] == pytest.approx(m1[key], abs=1e-6), key
        elif not isinstance(m1[key], dict):
            assert m8[key] == m1[key], key
    p1, p8 = _predictions(dir1, task), _predictions(dir8, task)
    for a, b in zip(p1, p8):
        for key in a:
            if key == "scores":
                np.testing.assert_allclose(a[key], b[key], atol=1e-4)
            else:
                assert a[key] == b[key], (task, key)
    for name in ("results.json", "predictions.jsonl", "tensorboard"):
        assert (dir1 / task / name).exists()


def test_outputs_report_unreadable_images_and_settings(runs):
    one, workdir = runs[1]
    for task in ("retrieval", "caption"):
        assert one[task]["metrics"]["unreadable_images"] == 1
    caption = one["caption"]
    assert set(caption["metrics"]) >= {"bleu_1", "bleu_4", "rouge_l", "cider"}
    assert caption["settings"]["prompt"] == "a picture of "
    assert (workdir / "caption" / "gallery.html").read_text().count("<img") == 10
    preds = _predictions(workdir, "caption")
    assert sum("error" in p for p in preds) == 1 and all(not p.get("caption", "").startswith("a picture of")
                                                          for p in preds)
    assert one["retrieval"]["metrics"]["k"] == 5 and one["retrieval_blip2"]["metrics"]["k"] == 128
    assert one["vqa"]["metrics"]["questions"] == 10 and 0 <= one["vqa"]["metrics"]["accuracy"] <= 100
    assert one["classification"]["metrics"]["images"] == 6
    assert one["choice"]["metrics"]["questions"] == 10 and 0 <= one["choice"]["metrics"]["accuracy"] <= 100


def test_retrieval_equals_the_reference_procedure_with_transformers(runs, data, hf_model, hf_checkpoint):
    """ITC similarities from transformers' BlipForImageTextRetrieval, its ITM "match" logit on each
    query's top-k, score = logit + similarity, -100 elsewhere (LAVIS), R@K: the same numbers."""
    import torch
    from PIL import Image
    from transformers import BlipProcessor

    from blip_jax.data.transforms import pre_caption
    from blip_jax.eval.retrieval_metrics import recall_at_k

    model = hf_model("retrieval")
    processor = BlipProcessor.from_pretrained(hf_checkpoint("retrieval"))
    records = json.loads((data / "captions.json").read_text())[:-1]  # the broken image is left out
    images = [Image.open(data / "images" / r["image"]).convert("RGB") for r in records]
    texts = [pre_caption(c) for r in records for c in r["caption"]]
    txt2img = np.array([i for i, r in enumerate(records) for _ in r["caption"]])
    img2txt = [list(np.flatnonzero(txt2img == i)) for i in range(len(records))]
    k = 5
    with torch.no_grad():
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        enc = processor.tokenizer(texts, padding="longest", return_tensors="pt")
        vision = model.vision_model(pixel_values=pixels)[0]
        img_feat = torch.nn.functional.normalize(model.vision_proj(vision[:, 0]), dim=-1)
        text = model.text_encoder(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])[0]
        txt_feat = torch.nn.functional.normalize(model.text_proj(text[:, 0]), dim=-1)
        sim = (img_feat @ txt_feat.T).numpy()

        def itm(image_rows, text_rows):
            out = model(pixel_values=pixels[image_rows], input_ids=enc["input_ids"][text_rows],
                        attention_mask=enc["attention_mask"][text_rows], use_itm_head=True)
            return out.itm_score[:, 1].numpy()

        i2t = np.full(sim.shape, -100.0, np.float32)
        for i in range(len(records)):
            top = np.argsort(-sim[i], kind="stable")[:k]
            i2t[i, top] = itm([i] * k, list(top)) + sim[i, top]
        t2i = np.full(sim.T.shape, -100.0, np.float32)
        for t in range(len(texts)):
            top = np.argsort(-sim[:, t], kind="stable")[:k]
            t2i[t, top] = itm(list(top), [t] * k) + sim[top, t]
    expected = recall_at_k(i2t, t2i, txt2img, img2txt)
    ours = runs[1][0]["retrieval"]["metrics"]
    for key, value in expected.items():
        assert ours[key] == pytest.approx(value, abs=1e-9), key
    itc = recall_at_k(sim, sim.T.copy(), txt2img, img2txt)
    assert ours["itc_only"]["txt_r1"] == pytest.approx(itc["txt_r1"])


def test_a_killed_job_resumes_from_its_shards(runs, data, models, tmp_path):
    _, workdir = runs[1]
    job = workdir / "retrieval"
    shards = sorted((job / "shards").rglob("*.npz"))
    assert len(shards) >= 4
    removed, kept = shards[1], shards[:1] + shards[2:]
    mtimes = {p: p.stat().st_mtime_ns for p in kept}
    removed.unlink()
    (job / "results.json").unlink()
    spec = _spec(data, models, workdir)
    spec["jobs"] = {"retrieval": spec["jobs"]["retrieval"]}
    again = _run_jobs(spec, 1)["retrieval"]
    assert removed.exists() and all(p.stat().st_mtime_ns == t for p, t in mtimes.items())
    assert again["metrics"] == runs[1][0]["retrieval"]["metrics"]


def test_two_processes_split_the_work_and_agree(runs, data, models, tmp_path):
    """`blip-jax eval` in 2 processes (jax.distributed on 127.0.0.1, gloo): each computes its shards,
    both read all of them, process 0 writes the same results as one process."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    job = _spec(data, models, tmp_path)["jobs"]["retrieval"]
    flags = [f"--config.{k}={v}" for k, v in job["overrides"].items()]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    procs = [subprocess.Popen([sys.executable, "-m", "blip_jax.cli", "eval", "--config=configs/eval/retrieval.py:coco",
                               f"--ckpt={job['ckpt']}", f"--workdir={tmp_path / 'two'}", "--noprogress",
                               f"--coordinator=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}",
                               "--cpu_collectives", *flags], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-3000:] for o in outputs]
    results = json.loads((tmp_path / "two" / "results.json").read_text())
    assert results["metrics"] == runs[1][0]["retrieval"]["metrics"]
    shards = sorted((tmp_path / "two" / "shards" / "image_embeddings").glob("*.npz"))
    assert len(shards) == 3  # 11 images in shards of 4, computed by processes 0, 1, 0


def test_score_command_agrees_with_the_jobs(runs, data, tmp_path, capsys):
    from blip_jax.cli import main

    _, workdir = runs[1]
    preds = [p for p in _predictions(workdir, "caption") if "caption" in p]
    (tmp_path / "caps.json").write_text(json.dumps(preds))
    assert main(["score", "caption", "--predictions", str(tmp_path / "caps.json"),
                 "--annotations", str(data / "captions.json")]) == 0
    scored = json.loads(capsys.readouterr().out)
    job = runs[1][0]["caption"]["metrics"]
    for key in ("bleu_4", "rouge_l", "cider"):
        assert scored[key] == pytest.approx(job[key], abs=1e-9)
    answers = [{"question_id": p["question_id"], "answer": p["answer"]} for p in _predictions(workdir, "vqa")]
    (tmp_path / "answers.json").write_text(json.dumps(answers))
    assert main(["score", "vqa", "--predictions", str(tmp_path / "answers.json"),
                 "--annotations", str(data / "vqa.json")]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == runs[1][0]["vqa"]["metrics"]["accuracy"]


if __name__ == "__main__":
    print(json.dumps(_job(json.loads(sys.argv[1]))))
