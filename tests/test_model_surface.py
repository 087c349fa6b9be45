"""Every public method of every architecture's model object, and every inference command of the CLI,
either works or raises / prints one UnsupportedTaskError naming what the model serves."""

import dataclasses
import inspect
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from blip_jax import atomic
import blip_jax
from blip_jax.model_base import UnsupportedTaskError
from blip_jax.testing import sample_images, write_tiny_blip2_checkpoint

BLIP_ARCHS = ("caption", "retrieval", "vqa", "pretrain")
BLIP2_KINDS = ("opt", "t5", "retrieval", "instruct_t5", "instruct_llama")
MODELS = [f"blip_{a}" for a in BLIP_ARCHS] + ["blip_nlvr"] + [f"blip2_{k}" for k in BLIP2_KINDS]
LAVIS_FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "lavis")
COMMANDS = ("caption", "itm", "vqa", "generate")


def _blip_pretrain_dir(retrieval_dir, dst):
    """A tiny BLIP pretrain model directory: the retrieval model's config and tokenizer, random weights."""
    from flax import linen as nn

    from blip_jax import checkpoint
    from blip_jax.models.blip import Blip, init_params
    from blip_jax.models.tying import untie

    config = dataclasses.replace(checkpoint.read_config(retrieval_dir), architecture="pretrain")
    params = nn.unbox(init_params(Blip(config), jax.random.PRNGKey(0)))
    with atomic.directory(dst) as tmp:
        checkpoint.write_config(tmp, config)
        checkpoint.save_params(tmp, jax.device_get(untie(params)))
        for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                     "preprocessor_config.json"):
            if (retrieval_dir / name).exists():
                shutil.copy2(retrieval_dir / name, tmp / name)
    return dst


@pytest.fixture(scope="module")
def model_dirs(converted, tmp_path_factory):
    """name (see MODELS) -> a tiny blip-jax model directory."""
    from blip_jax.convert import convert

    dirs = {f"blip_{a}": converted(a) for a in ("caption", "retrieval", "vqa")}
    dirs["blip_pretrain"] = _blip_pretrain_dir(converted("retrieval"), tmp_path_factory.mktemp("pre") / "blip")
    nlvr = tmp_path_factory.mktemp("nlvr") / "jax"  # LAVIS's BlipNLVR fixture (transformers has no such class)
    done = _cli("convert", os.path.join(LAVIS_FIXTURES, "blip_nlvr", "model.pth"), nlvr, "--lavis", "blip_nlvr/nlvr",
                "--tokenizer", os.path.join(LAVIS_FIXTURES, "bert_tokenizer"), "--heads", "vision=4,text=4")
    assert done.returncode == 0, done.stderr[-2000:]
    dirs["blip_nlvr"] = nlvr
    for kind in BLIP2_KINDS:
        root = tmp_path_factory.mktemp(f"surface_{kind}")
        convert(write_tiny_blip2_checkpoint(root / "hf", kind), root / "jax", progress=False)
        dirs[f"blip2_{kind}"] = root / "jax"
    return dirs


def _arguments(model, name):
    """Small valid arguments for a public method, chosen by parameter name."""
    images = sample_images(1)
    blip2 = model.family == "BLIP-2"
    by_name = {
        "images": images, "texts": ["a dog"], "prompts": ["a dog on the"], "questions": ["what is it"],
        "answer_list": ["a dog", "a cat"], "candidates": ["dog", "cat"], "image_index": [0],
        "image_embeddings": lambda: model.image_embeddings(images),
        "image_features": lambda: np.ones((1, 4, 8) if blip2 else (1, 8), np.float32),
        "text_features": lambda: np.ones((2, 8), np.float32),
        "mesh": lambda: jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",)),
        "path": model.path, "task": model.tasks[0],
        "left_images": images, "right_images": images, "statements": ["a dog"],
    }
    args, kwargs = [], {}
    for p in inspect.signature(getattr(model, name)).parameters.values():
        if p.name == "generation_options":
            kwargs["max_new_tokens"] = 3
        elif p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            value = by_name[p.name]  # a KeyError here: a new parameter name needs an example
            args.append(value() if callable(value) else value)
    return args, kwargs


@pytest.mark.parametrize("name", MODELS)
def test_every_public_method_works_or_names_the_served_tasks(model_dirs, name):
    model = blip_jax.load(model_dirs[name])
    methods = [m for m, _ in inspect.getmembers(type(model)) if not m.startswith("_") and callable(getattr(model, m))]
    assert {"preprocess", "require", "itm", "itc"} <= set(methods)
    outcome = {}
    for method in methods:
        args, kwargs = _arguments(model, method)
        try:
            getattr(model, method)(*args, **kwargs)
            outcome[method] = "ok"
        except UnsupportedTaskError as e:
            assert str(e).endswith("which serves: " + ", ".join(model.tasks)), str(e)
            assert "\n" not in str(e)
            outcome[method] = "unsupported"
    for task in model.tasks:  # what the model says it serves does work
        assert outcome[task] == "ok", (task, outcome)
    print(name, outcome)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "blip_jax.cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)


CLI_ARGS = {"caption": [], "itm": ["--text", "a dog"], "vqa": ["--question", "what is it"],
            "generate": ["--prompt", "a dog on the"]}


@pytest.mark.parametrize("name", MODELS)
def test_every_inference_command_works_or_exits_2_with_one_line(model_dirs, tmp_path, name):
    image = tmp_path / "0.png"
    sample_images(1)[0].save(image)
    tasks = blip_jax.load(model_dirs[name]).tasks
    for command in COMMANDS:
        limits = ["--max-new-tokens", "3"] if command != "itm" else []
        proc = _cli(command, "--ckpt", model_dirs[name], image, *CLI_ARGS[command], *limits)
        if command in tasks:
            assert proc.returncode == 0, (command, proc.stderr[-2000:])
            assert f"compiling and running {command} on 1 images" in proc.stderr
        else:
            lines = [line for line in proc.stderr.splitlines() if "error" in line]
            assert proc.returncode == 2, (command, proc.stderr[-2000:])
            assert len(lines) == 1 and lines[0].startswith(f"blip-jax {command}: error: {command} needs"), lines
            assert lines[0].endswith("which serves: " + ", ".join(tasks)), lines
            assert "Traceback" not in proc.stderr
