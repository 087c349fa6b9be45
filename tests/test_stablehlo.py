"""`blip-jax export M OUT --to stablehlo` (`blip_jax.convert.stablehlo`): the exported programs run
in a process that cannot import blip_jax (JAX and numpy alone) and give the library's outputs:
caption ids identical (greedy and beam), features and logits within 1e-5, at batch sizes other than
any compiled before (the batch is symbolic)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
# runs each program of OUT on the inputs in IN.npz, writes OUT.npz; blip_jax is made unimportable
RUNNER = r"""
import json, sys
sys.modules["blip_jax"] = None
import numpy as np, jax
from jax import export
out, inputs, result = sys.argv[1], np.load(sys.argv[2]), sys.argv[3]
manifest = json.load(open(f"{out}/programs.json"))
params = dict(np.load(f"{out}/{manifest['params']}"))
outputs = {}
for name, entry in manifest["programs"].items():
    program = export.deserialize(bytearray(open(f"{out}/{entry['file']}", "rb").read()))
    args = [inputs[f"{name}.{spec['name']}"] for spec in entry["inputs"]]
    outputs[name] = np.asarray(program.call(params, *args))
np.savez(result, **outputs)
"""


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "blip_jax.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=900, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def _run_exported(out: Path, inputs: dict, tmp: Path) -> dict:
    np.savez(tmp / "in.npz", **inputs)
    done = subprocess.run([sys.executable, "-c", RUNNER, str(out), str(tmp / "in.npz"), str(tmp / "result.npz")],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu"},
                          cwd=tmp)
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(np.load(tmp / "result.npz"))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from blip_jax.convert import convert
    from blip_jax.testing import write_tiny_blip2_checkpoint, write_tiny_checkpoint

    root = tmp_path_factory.mktemp("hlo")
    out = {}
    for arch in ("caption", "retrieval"):
        convert(write_tiny_checkpoint(root / f"hf_{arch}", arch), root / arch, progress=False)
        out[arch] = root / arch
    convert(write_tiny_blip2_checkpoint(root / "hf_blip2", "retrieval"), root / "blip2", progress=False)
    out["blip2"] = root / "blip2"
    return out


def test_caption_programs_give_the_library_captions(models, tmp_path):
    import blip_jax
    from blip_jax.testing import sample_images

    out = tmp_path / "caption_hlo"
    done = _cli("export", str(models["caption"]), str(out), "--to", "stablehlo")
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((out / "programs.json").read_text())
    assert sorted(manifest["programs"]) == ["caption_beam", "caption_greedy", "encode_image"]
    assert all(p["symbolic"] == ["b"] for p in manifest["programs"].values())
    model = blip_jax.load(models["caption"])
    for n in (3, 1):  # neither batch was compiled at export time
        images = sample_images(n, size=40, seed=n)
        pixels = model.preprocess(images)
        got = _run_exported(out, {f"{p}.pixels": pixels for p in manifest["programs"]}, tmp_path)
        np.testing.assert_allclose(got["encode_image"], model.image_embeddings(images), atol=1e-5)
        decode = lambda ids: [t.strip() for t in model.tokenizer.batch_decode(ids, skip_special_tokens=True)]  # noqa: E731
        assert decode(got["caption_beam"]) == model.caption(images)
        assert decode(got["caption_greedy"]) == model.caption(images, num_beams=1)


@pytest.mark.parametrize("name", ["retrieval", "blip2"])
def test_feature_and_itm_programs_equal_the_library(models, name, tmp_path):
    import jax

    import blip_jax
    from blip_jax.testing import sample_images

    out = tmp_path / f"{name}_hlo"
    done = _cli("export", str(models[name]), str(out), "--to", "stablehlo")
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((out / "programs.json").read_text())
    assert sorted(manifest["programs"]) == ["encode_image", "image_features", "itm", "text_features"]
    model = blip_jax.load(models[name])
    images = sample_images(3, size=40, seed=5)
    texts = ["a red circle", "two blue squares and a green triangle", "a square"]
    pixels = model.preprocess(images)
    ids, mask = (np.asarray(a, np.int32) for a in model._tokenize(texts))
    inputs = {"encode_image.pixels": pixels, "image_features.pixels": pixels, "itm.pixels": pixels,
              "text_features.input_ids": ids, "text_features.attention_mask": mask,
              "itm.input_ids": ids, "itm.attention_mask": mask}
    got = _run_exported(out, inputs, tmp_path)
    np.testing.assert_allclose(got["image_features"], model.image_features(images), atol=1e-5)
    np.testing.assert_allclose(got["text_features"], model.text_features(texts), atol=1e-5)
    np.testing.assert_allclose(np.asarray(jax.nn.softmax(got["itm"], -1))[:, 1], model.itm(images, texts), atol=1e-5)


def test_a_program_the_model_lacks_is_one_line(models, tmp_path):
    done = _cli("export", str(models["retrieval"]), str(tmp_path / "x"), "--to", "stablehlo",
                "--programs", "itm,caption_greedy")
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "has no caption_greedy program; it exports encode_image, image_features, text_features, itm" in done.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("kind", ["opt", "instruct_llama"])
def test_blip2_generation_programs_give_the_library_captions(kind, tmp_path):
    """BLIP-2 / InstructBLIP: the soft prompt and the LLM's decode loop, greedy and beam, from the
    artifact: the library's caption ids (prompts padded to the program's length as the model pads)."""
    import blip_jax
    from blip_jax.convert import convert
    from blip_jax.convert.stablehlo import PROMPT_LENGTH
    from blip_jax.prompts import CAPTION_PROMPTS
    from blip_jax.testing import sample_images, write_tiny_blip2_checkpoint

    src = tmp_path / "model"
    convert(write_tiny_blip2_checkpoint(tmp_path / "hf", kind), src, progress=False)
    out = tmp_path / "hlo"
    done = _cli("export", str(src), str(out), "--to", "stablehlo", "--programs", "generate_greedy,generate_beam")
    assert done.returncode == 0, done.stderr[-3000:]
    model = blip_jax.load(src)
    images = sample_images(3, size=40, seed=2)
    prompt = CAPTION_PROMPTS["instruct" if model.config.instruct else "blip2"]
    ids, mask = model._llm_tokens([prompt] * 3)
    ids, mask = np.asarray(ids, np.int32), np.asarray(mask, np.int32)
    pad = PROMPT_LENGTH - ids.shape[1]  # decoder LLMs: left padding
    ids = np.pad(ids, ((0, 0), (pad, 0)), constant_values=model.tokenizer.pad_token_id)
    mask = np.pad(mask, ((0, 0), (pad, 0)))
    inputs = {}
    for name in ("generate_greedy", "generate_beam"):
        inputs.update({f"{name}.pixels": model.preprocess(images), f"{name}.prompt_ids": ids,
                       f"{name}.prompt_mask": mask})
        if model.config.instruct:
            enc = model.qformer_tokenizer([prompt] * 3, padding="longest")
            inputs.update({f"{name}.qformer_ids": np.asarray(enc["input_ids"], np.int32),
                           f"{name}.qformer_mask": np.asarray(enc["attention_mask"], np.int32)})
    got = _run_exported(out, inputs, tmp_path)
    assert model._decode_texts(got["generate_greedy"]) == model.caption(images, num_beams=1)
    assert model._decode_texts(got["generate_beam"]) == model.caption(images)
