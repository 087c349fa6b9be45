"""CapFilt (blip_jax.capfilt) end to end on tiny converted caption + retrieval models and a tiny JSON
folder of synthetic-shape images with one corrupt and one missing image: counts, decisions, resuming
from shards, the itc_topk variant (BLIP and BLIP-2 filters), the packed output and determinism."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from blip_jax import capfilt
from blip_jax.config_files import load_config

ROOT = Path(__file__).resolve().parents[1]
NUM_GOOD = 7
NUM_CAPTIONS = 2


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _config(preset: str = "tiny"):
    return load_config(ROOT / "configs" / "capfilt.py", preset)


# ---------------------------------------------------------------------------------- pure pieces
def test_filter_decisions():
    keep = capfilt.filter_decisions([0.2, 0.5, 0.51, 0.49999, 1.0], 0.5)
    assert keep.tolist() == [False, True, True, False, True]
    assert capfilt.filter_decisions([], 0.5).tolist() == []


def test_topk_decisions():
    assert capfilt.topk_decisions([0.1, 0.9, 0.5, 0.7], 2).tolist() == [False, True, False, True]
    assert capfilt.topk_decisions([0.3, 0.3, 0.3], 2).tolist() == [True, True, False]  # ties: earlier first
    assert capfilt.topk_decisions([0.3, -0.2], 5).tolist() == [True, True]
    assert capfilt.topk_decisions([0.3, -0.2], 0).tolist() == [False, False]


def test_decide_and_helpers():
    rows = [{"source_index": 0, "text": t, "itm_probability": p, "itc_similarity": s, "provenance": "web"}
            for t, p, s in (("a", 0.9, 0.1), ("", 0.95, 0.9), ("b", 0.2, 0.5))]
    itm = capfilt.decide(rows, "itm", 0.5, 2)
    assert [r["kept"] for r in itm] == [True, False, False]
    assert [r["drop_reason"] for r in itm] == [None, "empty_text", "below_threshold"]
    top = capfilt.decide(rows, "itc_topk", 0.5, 1)
    assert [r["kept"] for r in top] == [False, False, True] and top[0]["drop_reason"] == "not_top_k"
    assert capfilt.strip_prompt("a picture of a red circle", "a picture of ") == "a red circle"
    assert capfilt.strip_prompt("A Picture Of x", "a picture of ") == "x"
    assert capfilt.strip_prompt("two squares", "a picture of ") == "two squares"
    assert capfilt.derive_seed(0, 4) == capfilt.derive_seed(0, 4) != capfilt.derive_seed(0, 8)
    assert capfilt.derive_seed(1, 4) != capfilt.derive_seed(0, 4)
    assert 0 <= capfilt.derive_seed(2**40, 10**9) < 2**31


def test_presets_and_cli_usage():
    from blip_jax import cli

    for preset in ("web", "coco", "blip2", "tiny"):
        cfg = _config(preset)
        assert cfg.top_p == 0.9 and cfg.prompt == "a picture of " and cfg.threshold == 0.5
    assert _config("blip2").mode == "itc_topk" and _config("web").num_captions == 1
    with pytest.raises(ValueError):
        _config("nope")
    assert cli.main(["capfilt"]) == 2  # dispatched; no --config / --workdir: usage


# ---------------------------------------------------------------------------------- the job
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """NUM_GOOD synthetic-shape PNGs with their captions, plus a corrupt and a missing image."""
    from PIL import Image

    from blip_jax.data.synthetic import SyntheticShapes

    root = tmp_path_factory.mktemp("capfilt_data")
    (root / "images").mkdir()
    source = SyntheticShapes(NUM_GOOD, seed=5, image_size=32)
    entries = []
    for i in range(NUM_GOOD):
        record = source[i]
        Image.fromarray(record["image"]).save(root / "images" / f"{i}.png")
        entries.append({"image": f"{i}.png", "image_id": i, "caption": record["caption"] + "."})
        if i == 2:
            (root / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
            entries.append({"image": "broken.png", "image_id": 100, "caption": "a broken image"})
        if i == 4:
            entries.append({"image": "missing.png", "image_id": 101, "caption": "a missing image"})
    (root / "web.json").write_text(json.dumps(entries))
    return root


def _overrides(data: Path, converted) -> dict:
    return {"data.kind": "json", "data.path": str(data / "web.json"), "data.image_root": str(data / "images"),
            "captioner": str(converted("caption")), "filter": str(converted("retrieval")),
            "num_captions": NUM_CAPTIONS, "shard_size": 3, "batch_size": 2, "max_new_tokens": 6,
            "min_new_tokens": 2}


def _cfg(overrides: dict):
    cfg = _config("tiny")
    cfg.update_from_flattened_dict(overrides)
    return cfg


def _snapshot(workdir: Path) -> dict:
    return {"all": _read_jsonl(workdir / "all.jsonl"), "cleaned": _read_jsonl(workdir / "cleaned.jsonl"),
            "all_bytes": (workdir / "all.jsonl").read_bytes(),
            "cleaned_bytes": (workdir / "cleaned.jsonl").read_bytes(),
            "summary": json.loads((workdir / "summary.json").read_text())}


@pytest.fixture(scope="module")
def runs(data, converted, tmp_path_factory):
    """Every run of the module, in order, with snapshots of their outputs."""
    from blip_jax import cli
    from blip_jax.data.packed import PackedSource

    overrides = _overrides(data, converted)
    workdir = tmp_path_factory.mktemp("capfilt_run")
    out = {"workdir": workdir}
    # 1. the command line, threshold 0.5
    argv = ["capfilt", "--config=" + str(ROOT / "configs" / "capfilt.py") + ":tiny", f"--workdir={workdir}",
            "--noprogress"] + [f"--config.{k}={v}" for k, v in overrides.items()]
    assert cli.main(argv) == 0
    out["first"] = _snapshot(workdir)
    # 2. a threshold at the median probability: re-decided from the shards, nothing recomputed
    models = capfilt.load_models(_cfg(overrides), workdir)
    out["models"] = models
    threshold = float(np.median([r["itm_probability"] for r in out["first"]["all"]]))
    out["threshold"] = threshold
    itm = {**overrides, "threshold": threshold}
    capfilt.run(_cfg(itm), workdir, progress=False, models=models)
    out["itm"] = _snapshot(workdir)
    packed = PackedSource(workdir / "cleaned_packed")
    out["packed"] = [packed[i] for i in range(len(packed))]
    # 3. one shard deleted: recomputed alone, identical outputs
    shards = workdir / "shards" / "capfilt"
    mtimes = {p.name: p.stat().st_mtime_ns for p in shards.glob("*.jsonl")}
    (shards / "00001.jsonl").unlink()
    capfilt.run(_cfg(itm), workdir, progress=False, models=models)
    out["resumed"] = _snapshot(workdir)
    out["mtimes"] = (mtimes, {p.name: p.stat().st_mtime_ns for p in shards.glob("*.jsonl")})
    # 4. the itc_topk variant over the same shards
    capfilt.run(_cfg({**overrides, "mode": "itc_topk", "top_k": 2}), workdir, progress=False, models=models)
    out["topk"] = _snapshot(workdir)
    return out


def test_counts_are_consistent(runs):
    for name in ("first", "itm"):
        s, rows = runs[name]["summary"], runs[name]["all"]
        assert s["images"] == NUM_GOOD + 2 and s["readable_images"] == NUM_GOOD
        unreadable = s["unreadable_images"]
        assert unreadable["total"] == 2 and unreadable["by_reason"] == {"corrupt_image": 1, "missing_file": 1}
        assert [Path(e["image"]).name for e in unreadable["examples"]] == ["broken.png", "missing.png"]
        assert s["web"]["candidates"] == NUM_GOOD
        assert s["synthetic"]["candidates"] == NUM_GOOD * NUM_CAPTIONS
        for part in ("web", "synthetic"):
            assert s[part]["kept"] + s[part]["dropped"] == s[part]["candidates"]
        assert s["kept"] + s["dropped"] == s["candidates"] == len(rows) == NUM_GOOD * (1 + NUM_CAPTIONS)
        assert len(runs[name]["cleaned"]) == s["kept"] == sum(r["kept"] for r in rows)
        assert s["shards"]["total"] == 3
    assert runs["first"]["summary"]["shards"]["computed_this_run"] == 3
    assert runs["itm"]["summary"]["shards"]["computed_this_run"] == 0  # re-decided only
    assert runs["first"]["summary"]["settings"]["threshold"] == 0.5
    # the scores do not depend on the threshold
    strip = [{k: r[k] for k in ("text", "itm_probability", "itc_similarity")} for r in runs["first"]["all"]]
    assert strip == [{k: r[k] for k in ("text", "itm_probability", "itc_similarity")} for r in runs["itm"]["all"]]


def test_itm_decisions(runs):
    threshold, rows = runs["threshold"], runs["itm"]["all"]
    kept = [r for r in rows if r["kept"]]
    dropped = [r for r in rows if not r["kept"]]
    assert kept and dropped
    assert all(r["itm_probability"] >= threshold for r in kept)
    assert all(r["itm_probability"] < threshold for r in dropped if r["drop_reason"] == "below_threshold")
    assert {r["drop_reason"] for r in dropped} <= {"below_threshold", "empty_text"}
    assert all(r["itm_probability"] >= 0.5 for r in runs["first"]["all"] if r["kept"])
    cleaned = runs["itm"]["cleaned"]
    assert [(r["source_index"], r["text"]) for r in cleaned] == [(r["source_index"], r["text"]) for r in kept]
    for r in cleaned:
        assert set(r) == {"image", "text", "provenance", "itm_probability", "itc_similarity", "source_index",
                          "image_id"}
        assert r["image"].endswith(".png") and Path(r["image"]).is_file()


def test_candidates(runs, data):
    rows = runs["itm"]["all"]
    web = [r for r in rows if r["provenance"] == "web"]
    synthetic = [r for r in rows if r["provenance"] == "synthetic"]
    entries = [e for e in json.loads((data / "web.json").read_text()) if e["image_id"] < 100]
    assert [r["text"] for r in web] == [e["caption"].rstrip(".") for e in entries]  # cleaned as BLIP does
    assert all(r["original_text"].endswith(".") for r in web)
    assert len(synthetic) == NUM_GOOD * NUM_CAPTIONS
    assert all(not r["text"].startswith("a picture of") for r in synthetic)
    assert len({r["text"] for r in synthetic}) > 1
    for r in rows:
        assert 0.0 <= r["itm_probability"] <= 1.0 and -1.0 - 1e-5 <= r["itc_similarity"] <= 1.0 + 1e-5


def test_resume_recomputes_only_the_deleted_shard(runs):
    before, after = runs["mtimes"]
    assert set(before) == set(after) == {"00000.jsonl", "00001.jsonl", "00002.jsonl"}
    assert {k for k in before if before[k] != after[k]} == {"00001.jsonl"}
    assert runs["resumed"]["summary"]["shards"]["computed_this_run"] == 1
    assert runs["resumed"]["all_bytes"] == runs["itm"]["all_bytes"]
    assert runs["resumed"]["cleaned_bytes"] == runs["itm"]["cleaned_bytes"]
    drop = {"seconds", "finished", "shards"}
    assert ({k: v for k, v in runs["resumed"]["summary"].items() if k not in drop}
            == {k: v for k, v in runs["itm"]["summary"].items() if k not in drop})


def test_itc_topk_keeps_top_k_per_image(runs):
    rows = runs["topk"]["all"]
    assert runs["topk"]["summary"]["shards"]["computed_this_run"] == 0
    by_image: dict[int, list[dict]] = {}
    for r in rows:
        by_image.setdefault(r["source_index"], []).append(r)
    assert len(by_image) == NUM_GOOD
    for group in by_image.values():
        kept = [r for r in group if r["kept"]]
        assert len(kept) == 2
        assert min(r["itc_similarity"] for r in kept) >= max(r["itc_similarity"] for r in group if not r["kept"])
        assert sorted(r["itc_rank"] for r in kept) == [0, 1]
    assert runs["topk"]["summary"]["kept"] == 2 * NUM_GOOD == len(runs["topk"]["cleaned"])


def test_packed_output_reads_back(runs):
    from blip_jax.data.transforms import decode_image

    cleaned, packed = runs["itm"]["cleaned"], runs["packed"]
    assert [p["caption"] for p in packed] == [r["text"] for r in cleaned]
    assert [p["provenance"] for p in packed] == [r["provenance"] for r in cleaned]
    assert [p["source_index"] for p in packed] == [r["source_index"] for r in cleaned]
    for p, r in zip(packed, cleaned):
        assert p["image"] == Path(r["image"]).read_bytes()
        assert decode_image(p["image"]).shape == (32, 32, 3)
    manifest = json.loads((runs["workdir"] / "cleaned_packed" / "pack.json").read_text())
    assert manifest["records"] == runs["topk"]["summary"]["kept"]  # rewritten by the last run


def test_gallery(runs):
    page = (runs["workdir"] / "gallery.html").read_text()
    assert "KEPT" in page and "dropped" in page and ".png" in page


def test_changed_settings_are_refused(runs, data, converted):
    cfg = _cfg({**_overrides(data, converted), "seed": 7})
    with pytest.raises(ValueError, match="seed"):
        capfilt.run(cfg, runs["workdir"], progress=False, models=runs["models"])


def test_deterministic_given_seed(runs, data, converted, tmp_path):
    overrides = _overrides(data, converted)
    first = [r["text"] for r in runs["itm"]["all"] if r["provenance"] == "synthetic"]
    capfilt.run(_cfg(overrides), tmp_path / "same", progress=False, models=runs["models"])
    again = [r["text"] for r in _read_jsonl(tmp_path / "same" / "all.jsonl") if r["provenance"] == "synthetic"]
    assert again == first
    capfilt.run(_cfg({**overrides, "seed": 1}), tmp_path / "other", progress=False, models=runs["models"])
    other = [r["text"] for r in _read_jsonl(tmp_path / "other" / "all.jsonl") if r["provenance"] == "synthetic"]
    assert len(other) == len(first) and other != first


def test_in_memory_images_and_blip2_filter(runs, tmp_path):
    """Synthetic (array) images: references "synthetic:<i>", gallery thumbnails; the BLIP-2 variant
    with a BLIP-2 retrieval filter keeps top_k per image."""
    from blip_jax.convert import convert
    from blip_jax.testing import write_tiny_blip2_checkpoint

    blip2 = tmp_path / "blip2_retrieval"
    convert(write_tiny_blip2_checkpoint(tmp_path / "hf_blip2", "retrieval"), blip2, progress=False)
    cfg = _cfg({"data.num_records": 5, "captioner": str(runs["models"][0].path), "filter": str(blip2),
                "num_captions": 3, "mode": "itc_topk", "top_k": 2, "shard_size": 5, "batch_size": 4,
                "max_new_tokens": 6, "min_new_tokens": 2})
    summary = capfilt.run(cfg, tmp_path / "w", progress=False)
    assert summary["models"]["filter"]["class"] == "Blip2Model"
    assert summary["synthetic"]["candidates"] == 15 and summary["web"]["candidates"] == 5
    assert summary["kept"] == 10
    cleaned = _read_jsonl(tmp_path / "w" / "cleaned.jsonl")
    assert {r["image"] for r in cleaned} <= {f"synthetic:{i}" for i in range(5)}
    thumbs = sorted(p.name for p in (tmp_path / "w" / "gallery_images").glob("*.png"))
    assert thumbs == [f"{i:08d}.png" for i in range(5)]
    shutil.rmtree(tmp_path / "w")


def test_a_sigkilled_job_resumes_to_the_same_outputs_and_refuses_another_model(runs, data, converted, tmp_path):
    """SIGKILL once the first shard is written; the rerun computes only the rest and writes what an
    uninterrupted run wrote. Another captioner is then refused (blip_jax.jobs), the outputs untouched."""
    import os
    import signal
    import subprocess
    import sys
    import time

    overrides = _overrides(data, converted)
    workdir = tmp_path / "killed"
    argv = ["capfilt", "--config=" + str(ROOT / "configs" / "capfilt.py") + ":tiny", f"--workdir={workdir}",
            "--noprogress"] + [f"--config.{k}={v}" for k, v in overrides.items()]
    proc = subprocess.Popen([sys.executable, "-m", "blip_jax.cli", *argv], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    first_shard = workdir / "shards" / "capfilt" / "00000.jsonl"
    deadline = time.time() + 300
    while not first_shard.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (workdir / "summary.json").exists()
    done = sorted(p.name for p in first_shard.parent.glob("[0-9]*.jsonl"))
    assert 1 <= len(done) < 3
    resumed = subprocess.run([sys.executable, "-m", "blip_jax.cli", *argv], cwd=ROOT, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = _snapshot(workdir)
    assert after["summary"]["shards"]["computed_this_run"] == 3 - len(done)
    assert after["all_bytes"] == runs["first"]["all_bytes"] and after["cleaned_bytes"] == runs["first"]["cleaned_bytes"]
    other = subprocess.run([sys.executable, "-m", "blip_jax.cli", *argv,
                            f"--config.captioner={converted('caption', True)}"], cwd=ROOT, capture_output=True,
                           text=True, timeout=600)
    assert other.returncode == 2 and "holds outputs of another capfilt" in other.stderr, other.stderr[-2000:]
    assert "models.captioner.fingerprint" in other.stderr and "Traceback" not in other.stderr
    assert (workdir / "all.jsonl").read_bytes() == after["all_bytes"]
