"""A fresh install as users make it: the wheel (not the editable tree) holds every module, every
`blip-jax` subcommand answers --help, and the README's training command trains and exports a model."""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUBCOMMANDS = ("convert", "caption", "generate", "itm", "vqa", "demo", "data check", "data pack", "score", "train",
               "eval", "capfilt")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(directory the wheel is installed into, its blip-jax script): pip install of the built wheel,
    without dependencies (this venv has them), so the source tree is not what runs."""
    tmp = tmp_path_factory.mktemp("install")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp / "wheel"), str(ROOT)], check=True, capture_output=True)
    wheel = next((tmp / "wheel").glob("blip_jax-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(tmp / "site"),
                    str(wheel)], check=True, capture_output=True)
    return wheel, tmp / "site"


def _run(site: Path, *args: str, cwd: Path = ROOT, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site)}
    return subprocess.run([sys.executable, "-c", "import sys; from blip_jax.cli import main; sys.exit(main())", *args],
                          capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)


def test_the_wheel_holds_every_module_and_package_file(installed):
    wheel, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = {p.relative_to(ROOT).as_posix() for p in (ROOT / "blip_jax").rglob("*.py")}
    assert sources - names == set()
    packages = {p.parent for p in (ROOT / "blip_jax").rglob("*.py")}
    assert [str(p) for p in packages if not (p / "__init__.py").exists()] == []
    assert {p.relative_to(ROOT).as_posix() for p in (ROOT / "blip_jax").rglob("*.json")} <= names


def test_the_installed_package_is_what_runs(installed):
    _, site = installed
    out = subprocess.run([sys.executable, "-c", "import blip_jax.train.trainer as t; print(t.__file__)"],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(site)}, cwd="/",
                         check=True)
    assert out.stdout.strip().startswith(str(site))


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_answers_help(installed, command):
    _, site = installed
    out = _run(site, *command.split(), "--help")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "usage" in out.stdout.lower()
    assert "Traceback" not in out.stdout + out.stderr


def test_readme_training_command_from_the_wheel(installed, tmp_path):
    """`blip-jax train --config=configs/blip2_stage1.py:tiny --workdir=w` (shortened): it trains,
    reports, and its W/model loads, also through the workdir itself."""
    _, site = installed
    w = tmp_path / "w"
    out = _run(site, "train", "--config=configs/blip2_stage1.py:tiny", f"--workdir={w}", "--config.total_steps=4",
               "--config.log_every=2", "--config.checkpoint_every=2")
    assert out.returncode == 0, out.stderr[-3000:]
    last = json.loads(out.stdout)
    assert last["step"] == 4 and "itc_image_to_text_r1" in last["report"]
    assert "compiled in" in out.stderr
    assert (w / "model" / "config.json").exists()
    check = subprocess.run(
        [sys.executable, "-c", "import sys, numpy as np, blip_jax; m = blip_jax.load(sys.argv[1]); "
         "print(m.itm([np.zeros((32, 32, 3), np.uint8)], ['a red circle']).shape)", str(w)],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(site)}, cwd="/")
    assert check.returncode == 0, check.stderr[-2000:]
    assert check.stdout.strip() == "(1,)"
    again = _run(site, "train", "--config=configs/blip2_stage1.py:tiny", f"--workdir={w}", "--config.total_steps=6",
                 "--config.log_every=2", "--config.checkpoint_every=2")
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from step 4 of {w}" in again.stderr
