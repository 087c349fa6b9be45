"""Every example in README.md runs as written, against tiny stand-ins for the checkpoints and images
it names (a `blip-jax convert` source under path/to/..., converted model directories by name).

A block that cannot run here (it installs a venv, or needs a dataset or a pod) is preceded by
`<!-- not run: REASON -->`; the reason must name where its behaviour is tested instead.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"(?:<!-- not run: (?P<reason>[^>]*?) -->\s*\n)?```(?P<lang>\w+)\n(?P<body>.*?)```", re.S)
IMAGES = ("photo.jpg", "photo1.jpg", "photo2.jpg", "blip.jpg", "q.jpg")


def _blocks():
    text = (ROOT / "README.md").read_text()
    out = []
    for m in FENCE.finditer(text):
        heading = [line for line in text[: m.start()].splitlines() if line.startswith("#")][-1].strip("# ")
        out.append({"heading": heading, "lang": m["lang"], "body": m["body"], "reason": m["reason"],
                    "line": text[: m.start()].count("\n") + 1})
    return out


BLOCKS = _blocks()
RUN = [b for b in BLOCKS if not b["reason"]]


def _kind(name: str) -> tuple[str, str]:
    """A model directory's name -> (family, kind) of the tiny stand-in made for it."""
    n = name.lower()
    if "instructblip" in n:
        return "blip2", "instruct_llama" if "vicuna" in n else "instruct_t5"
    if "blip2" in n:
        return "blip2", "retrieval" if "itm" in n else "t5" if "t5" in n else "opt"
    return "blip", "retrieval" if "itm" in n else "vqa" if "vqa" in n else "caption"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A directory laid out as the README's examples expect; `need(block)` adds what a block names."""
    from blip_jax.convert import convert
    from blip_jax.testing import sample_images, write_tiny_blip2_checkpoint, write_tiny_checkpoint

    root = tmp_path_factory.mktemp("readme")
    (root / "configs").symlink_to(ROOT / "configs")  # the examples run from a checkout's root
    for name, image in zip(IMAGES, sample_images(len(IMAGES))):
        image.save(root / name)
    sources = {"path/to/blip-image-captioning-large": ("blip", "caption"), "path/to/blip2-opt-2.7b": ("blip2", "opt")}

    def source(path: str, family: str, kind: str) -> Path:
        dst = root / path
        if not dst.exists():
            (write_tiny_checkpoint if family == "blip" else write_tiny_blip2_checkpoint)(dst, kind)
        return dst

    def need(body: str):
        for path, (family, kind) in sources.items():
            if path in body:
                source(path, family, kind)
        converted_here = set(re.findall(r"blip-jax convert \S+ (\S+)", body))
        names = set(re.findall(r"--ckpt[= ](\S+)", body)) | set(re.findall(r"""load\(["']([^"']+)["']\)""", body))
        for name in sorted(names - converted_here):
            if not (root / name / "config.json").exists():
                family, kind = _kind(name)
                convert(source(f"hf/{name}", family, kind), root / name, progress=False)
        return root

    return need


def test_every_block_runs_or_says_why_not():
    assert RUN, "no runnable block found"
    for b in BLOCKS:
        assert b["reason"] is None or len(b["reason"]) > 20, f"README line {b['line']}: give the reason in words"


@pytest.mark.parametrize("block", RUN, ids=[f"line{b['line']}-{b['lang']}" for b in RUN])
def test_readme_block(block, world, tmp_path):
    cwd = world(block["body"])
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(ROOT)}
    if block["lang"] == "bash":
        out = subprocess.run(["bash", "-euo", "pipefail", "-c", block["body"]], cwd=cwd, env=env,
                             capture_output=True, text=True, timeout=900)
    elif block["lang"] == "python":
        # the names the examples use for their inputs
        prelude = ("import numpy as np\nfrom PIL import Image\n"
                   f"pil_image = Image.open({str(cwd / 'photo.jpg')!r})\n"
                   "uint8_array = np.asarray(pil_image)\n"
                   "images = [pil_image, uint8_array]\n"
                   "texts = ['a red circle', 'a blue square']\n"
                   "questions = ['what shape is it?', 'what colour is it?']\n"
                   "from blip_jax.train import defaults\nc = defaults.base()\n")
        out = subprocess.run([sys.executable, "-c", prelude + block["body"]], cwd=cwd, env=env,
                             capture_output=True, text=True, timeout=900)
    else:
        pytest.skip(f"{block['lang']} block")
    assert out.returncode == 0, f"README line {block['line']} ({block['heading']}):\n{out.stderr[-3000:]}"
    assert "Traceback" not in out.stderr
