"""The command line: convert (with --verify), caption, itm, vqa; bad input is reported, not fatal."""

import json
import subprocess
import sys

import pytest

from blip_jax.cli import main
from blip_jax.testing import sample_images


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    paths = []
    for i, image in enumerate(sample_images(2)):
        paths.append(str(d / f"{i}.jpg"))
        image.save(paths[-1])
    corrupt = d / "corrupt.jpg"
    corrupt.write_bytes(b"not a jpeg at all")
    return paths, str(corrupt), str(d / "missing.png")


def _json(capsys):
    return json.loads(capsys.readouterr().out)


def test_convert_with_verify(hf_checkpoint, tmp_path, capsys):
    out = tmp_path / "report.json"
    assert main(["convert", str(hf_checkpoint("vqa")), str(tmp_path / "dst"), "--verify", "--output", str(out)]) == 0
    report = _json(capsys)
    assert report == json.loads(out.read_text())
    assert len(report["verify_max_abs_diff"]) == 3
    assert max(report["verify_max_abs_diff"].values()) < 1e-4


def test_convert_error_is_one_clear_message(hf_checkpoint, tmp_path, capsys):
    assert main(["convert", str(tmp_path / "nowhere"), str(tmp_path / "dst")]) == 2
    assert "config.json not found" in capsys.readouterr().err
    assert not (tmp_path / "dst").exists()


def test_caption_skips_and_counts_bad_images(converted, image_files, capsys):
    good, corrupt, missing = image_files
    assert main(["caption", "--ckpt", str(converted("caption")), *good, corrupt, missing,
                 "--num-beams", "2", "--max-new-tokens", "6"]) == 0
    out = _json(capsys)
    assert out["counts"] == {"ok": 2, "skipped": 2}
    assert [r["image"] for r in out["results"]] == good
    assert all(isinstance(r["caption"], str) for r in out["results"])
    assert {s["path"] for s in out["skipped"]} == {corrupt, missing}


def test_itm_and_vqa_commands(converted, image_files, capsys):
    good, _, _ = image_files
    assert main(["itm", "--ckpt", str(converted("retrieval")), *good, "--text", "a dog", "--text", "a red car"]) == 0
    rows = _json(capsys)["results"]
    assert len(rows) == 4 and all(0 <= r["itm_probability"] <= 1 and -1 <= r["itc_similarity"] <= 1 for r in rows)
    assert main(["vqa", "--ckpt", str(converted("vqa")), good[0], "--question", "what color is the car"]) == 0
    assert _json(capsys)["results"][0]["question"] == "what color is the car"


def test_wrong_task_for_the_checkpoint(converted, image_files, capsys):
    assert main(["caption", "--ckpt", str(converted("retrieval")), image_files[0][0]]) == 2
    assert "serves: itm, itc" in capsys.readouterr().err


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "blip_jax.cli", "--help"], capture_output=True, text=True, check=True)
    for command in ("convert", "caption", "itm", "vqa", "demo"):
        assert command in out.stdout


def test_commands_fill_the_compilation_cache_and_say_what_they_do(converted, image_files, tmp_path):
    import os

    cache = tmp_path / "jax_cache"
    ckpt = str(converted("caption"))
    run = [sys.executable, "-m", "blip_jax.cli", "caption", "--ckpt", ckpt, image_files[0][0], "--max-new-tokens", "3"]
    proc = subprocess.run(run, capture_output=True, text=True, env={**os.environ, "BLIP_JAX_CACHE_DIR": str(cache)})
    assert proc.returncode == 0, proc.stderr
    assert f"loading {ckpt}..." in proc.stderr and "compiling and running caption on 1 images..." in proc.stderr
    assert any(cache.iterdir())  # compiled programs were written for the next call
    off = subprocess.run(run, capture_output=True, text=True, env={**os.environ, "BLIP_JAX_CACHE_DIR": "off"})
    assert off.returncode == 0 and json.loads(off.stdout)["results"] == json.loads(proc.stdout)["results"]
