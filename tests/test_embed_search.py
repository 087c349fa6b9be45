"""`blip-jax embed` and `blip-jax search` (`blip_jax.embed`, `blip_jax.search.Index`) on a tiny BLIP
and a tiny BLIP-2 converted here, over a few hundred generated images: the index's recall equals the
retrieval eval job's on the same data (ITC, and ITM re-ranked), a killed embed resumes to the same
features, search over 20k rows equals brute force, bad input is one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
N_IMAGES = 200
K = 8  # the eval job's ITM candidates, and search's re-rank depth


def _cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "blip_jax.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=900, env={**os.environ, "JAX_PLATFORMS": "cpu"}, **kw)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from PIL import Image

    from blip_jax.convert import convert
    from blip_jax.data.synthetic import SyntheticShapes
    from blip_jax.testing import write_tiny_blip2_checkpoint, write_tiny_checkpoint

    root = tmp_path_factory.mktemp("search")
    models = {}
    convert(write_tiny_checkpoint(root / "hf_blip", "retrieval"), root / "blip", progress=False)
    convert(write_tiny_blip2_checkpoint(root / "hf_blip2", "retrieval"), root / "blip2", progress=False)
    models = {"blip": root / "blip", "blip2": root / "blip2"}
    (root / "images").mkdir()
    source = SyntheticShapes(5000, seed=9, image_size=32)
    entries, seen = [], set()
    for j in range(len(source)):  # distinct captions: recall is then free of ties between equal texts
        r = source[j]
        if r["caption"] in seen:
            continue
        seen.add(r["caption"])
        i = len(entries)
        Image.fromarray(r["image"]).save(root / "images" / f"{i:03d}.png")
        entries.append({"image": f"{i:03d}.png", "image_id": i, "caption": [r["caption"]]})
        if len(entries) == N_IMAGES:
            break
    assert len(entries) == N_IMAGES
    (root / "captions.json").write_text(json.dumps(entries))
    return models, root


def _embed(model, kind, src, workdir, *extra):
    done = _cli("embed", f"--ckpt={model}", f"--{kind}={src}", f"--workdir={workdir}", "--shard-size=64",
                "--batch-size=16", "--no-progress", *extra)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def indexes(setup):
    models, root = setup
    out = {}
    for name, model in models.items():
        _embed(model, "images", root / "captions.json", root / f"{name}_images", f"--image-root={root / 'images'}")
        _embed(model, "texts", root / "captions.json", root / f"{name}_texts")
        out[name] = (root / f"{name}_images", root / f"{name}_texts")
    return out


def _recalls(rank_of_truth: np.ndarray) -> dict:
    return {k: round(100.0 * float(np.mean(rank_of_truth < k)), 10) for k in (1, 5, 10)}


@pytest.mark.parametrize("name", ["blip", "blip2"])
def test_recall_equals_the_retrieval_eval_job(setup, indexes, name):
    """Text -> image through the image index, image -> text through the text index: R@1/5/10 equal
    the eval job's ITC-only recalls; re-ranked by ITM over the top K, its full recalls."""
    import blip_jax
    from blip_jax.search import Index

    models, root = setup
    workdir = root / f"eval_{name}"
    done = _cli("eval", "--config=configs/eval/retrieval.py:coco", f"--ckpt={models[name]}", f"--workdir={workdir}",
                f"--config.data.path={root / 'captions.json'}", f"--config.data.image_root={root / 'images'}",
                f"--config.k={K}", "--config.batch_size=16", "--config.shard_size=64", "--noprogress")
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((workdir / "results.json").read_text())["metrics"]
    model = blip_jax.load(models[name])
    images, texts = Index(indexes[name][0]), Index(indexes[name][1])
    assert len(images) == len(texts) == N_IMAGES and images.manifest["unreadable"] == 0
    captions = [json.loads(line)["text"] for line in (indexes[name][1] / "ids.jsonl").read_text().splitlines()]
    t2i, t2i_rerank = [], []
    for i, caption in enumerate(captions):  # caption i belongs to image i
        rows = [h["row"] for h in images.query(model, text=caption, k=N_IMAGES)]
        t2i.append(rows.index(i))
        reranked = [h["row"] for h in images.query(model, text=caption, k=K, rerank=K)]
        t2i_rerank.append(reranked.index(i) if i in reranked else N_IMAGES)
    image_rows = np.concatenate([features for _, features, _ in images.shards()])
    i2t = [list(texts.top_k(features, N_IMAGES)[0]).index(i) for i, features in enumerate(image_rows)]
    itc = metrics["itc_only"]
    assert _recalls(np.array(t2i)) == {k: round(itc[f"img_r{k}"], 10) for k in (1, 5, 10)}
    assert _recalls(np.array(i2t)) == {k: round(itc[f"txt_r{k}"], 10) for k in (1, 5, 10)}
    # within the K re-ranked (beyond them the eval job's -100 fill decides by index)
    reranked_recalls = _recalls(np.array(t2i_rerank))
    assert {k: reranked_recalls[k] for k in (1, 5)} == {k: round(metrics[f"img_r{k}"], 10) for k in (1, 5)}
    print(f"{name}: index R@1/5/10 text->image {_recalls(np.array(t2i))}, re-ranked {_recalls(np.array(t2i_rerank))}")


def test_search_cli_writes_json_and_html(setup, indexes, tmp_path):
    models, root = setup
    out, page = tmp_path / "hits.json", tmp_path / "hits.html"
    done = _cli("search", f"--index={indexes['blip'][0]}", "--text=two red circles", "--k=5", "--rerank=16",
                f"--output={out}", f"--html={page}")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [h["rank"] for h in result["hits"]] == [1, 2, 3, 4, 5] and all("itm" in h for h in result["hits"])
    scores = [h["score"] for h in result["hits"]]
    assert scores == sorted(scores, reverse=True)
    assert page.read_text().count("<img") == 5
    done = _cli("search", f"--index={indexes['blip'][1]}", f"--image={root / 'images' / '003.png'}", "--k=3")
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(json.loads(done.stdout)["hits"]) == 3


def test_a_killed_embed_resumes_to_the_same_features(setup, tmp_path):
    models, root = setup
    whole = tmp_path / "whole"
    _embed(models["blip"], "images", root / "captions.json", whole, "--shard-size=16", f"--image-root={root / 'images'}")
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "blip_jax.cli", "embed", f"--ckpt={models['blip']}",
                             f"--images={root / 'captions.json'}", f"--workdir={killed}", "--shard-size=16",
                             f"--image-root={root / 'images'}",
                             "--batch-size=16", "--no-progress"], cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and len(list((killed / "shards" / "images").glob("*.npz"))
                                         if (killed / "shards" / "images").is_dir() else []) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = len(list((killed / "shards" / "images").glob("*.npz")))
    assert 2 <= written < 13 and not (killed / "index.json").exists()
    _embed(models["blip"], "images", root / "captions.json", killed, "--shard-size=16", f"--image-root={root / 'images'}")
    for shard in sorted((whole / "shards" / "images").glob("*.npz")):
        a, b = np.load(shard), np.load(killed / "shards" / "images" / shard.name)
        np.testing.assert_array_equal(a["features"], b["features"])
        np.testing.assert_array_equal(a["ok"], b["ok"])


def test_exact_top_k_over_20k_rows_equals_brute_force(setup, tmp_path):
    """A 20,000-row index in 7 shards: top-k by shard streaming equals a full sort, ties to the lower row."""
    from blip_jax.search import Index
    from blip_jax.testing import write_synthetic_index

    models, _ = setup
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((20_000, 16)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    rows[12345] = rows[77]  # a tie straddling two shards
    index = Index(write_synthetic_index(tmp_path / "big", rows, model_path=models["blip"], shard_size=3000))
    for q in [rows[77], rng.standard_normal(16).astype(np.float32)]:
        got_rows, got_scores = index.top_k(q, 25)
        scores = rows @ q
        want = np.lexsort((np.arange(len(rows)), -scores))[:25]
        np.testing.assert_array_equal(got_rows, want)
        np.testing.assert_allclose(got_scores, scores[want], rtol=1e-6)


def test_unreadable_images_are_counted_and_never_returned(setup, tmp_path):
    import blip_jax
    from blip_jax.search import Index

    models, root = setup
    folder = tmp_path / "folder"
    folder.mkdir()
    for name in ("000.png", "001.png", "002.png"):
        (folder / name).write_bytes((root / "images" / name).read_bytes())
    (folder / "broken.png").write_bytes(b"\x89PNG not an image")
    manifest = _embed(models["blip"], "images", folder, tmp_path / "idx")
    assert manifest["count"] == 4 and manifest["unreadable"] == 1 and manifest["skipped"] == {"corrupt_image": 1}
    hits = Index(tmp_path / "idx").query(blip_jax.load(models["blip"]), text="a red circle", k=10)
    assert len(hits) == 3 and "broken.png" not in {h["id"] for h in hits}


def test_bad_input_is_one_line(setup, indexes, tmp_path):
    models, root = setup
    done = _cli("search", f"--index={indexes['blip'][0]}", "--text=a circle", f"--ckpt={models['blip2']}")
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "was built by another model" in done.stderr
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"no image here")
    done = _cli("search", f"--index={indexes['blip'][1]}", f"--image={bad}")
    assert done.returncode != 0 and "Traceback" not in done.stderr and "the query image cannot be read" in done.stderr
    done = _cli("search", f"--index={tmp_path}", "--text=x")
    assert done.returncode != 0 and "is not an embedding index" in done.stderr
    done = _cli("search", f"--index={indexes['blip'][0]}", f"--image={root / 'images' / '000.png'}")
    assert done.returncode != 0 and "indexes images; search it with a text" in done.stderr
    done = _cli("embed", f"--ckpt={models['blip2']}", f"--images={root / 'captions.json'}",
                f"--workdir={indexes['blip'][0]}", "--no-progress")
    assert done.returncode != 0 and "holds outputs of another embed" in done.stderr


def test_webdataset_shards_and_text_files_embed(setup, tmp_path):
    """`--images` WebDataset shards (ids "<shard>/<key>") and `--texts` a .txt file, one text a line."""
    from blip_jax.search import Index
    from blip_jax.testing import write_tar

    models, root = setup
    members = []
    for i in range(3):
        members += [(f"{i:04d}.png", (root / "images" / f"{i:03d}.png").read_bytes()), (f"{i:04d}.txt", b"a caption")]
    (tmp_path / "shards").mkdir()
    write_tar(tmp_path / "shards" / "train-0000.tar", members)
    manifest = _embed(models["blip"], "images", tmp_path / "shards", tmp_path / "wds")
    assert manifest["count"] == 3 and manifest["unreadable"] == 0
    ids = [h["id"] for h in Index(tmp_path / "wds").ids]
    assert len(ids) == 3 and all(i.endswith(k) for i, k in zip(ids, ("0000", "0001", "0002")))
    (tmp_path / "texts.txt").write_text("a red circle\n\ntwo blue squares\n")
    manifest = _embed(models["blip"], "texts", tmp_path / "texts.txt", tmp_path / "txt")
    assert manifest["count"] == 2 and [h["text"] for h in Index(tmp_path / "txt").ids] == ["a red circle",
                                                                                          "two blue squares"]
