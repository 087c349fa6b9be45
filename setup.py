from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
REQUIREMENTS = [
    line.split("#")[0].strip()
    for line in (HERE / "requirements.txt").read_text().splitlines()
    if line.split("#")[0].strip()
]
# torch is pinned to the CPU build that pip finds on local disk; an unpinned torch pulls CUDA wheels.
# sentencepiece reads LLaMA / Vicuna tokenizer.model files (LAVIS's Vicuna directories have no tokenizer.json).
CONVERT = ["torch==2.13.0", "transformers>=5.0", "sentencepiece"]
# `blip-jax train --dry_run --topology=v5p:4x4x4` compiles for a TPU slice on any Linux x86 machine
TPU_PLAN = ['jax[tpu]; platform_system == "Linux" and platform_machine == "x86_64"']  # libtpu at jax's pin
# workdirs, checkpoints and model directories in buckets (etils epath over fsspec; Orbax uses TensorStore)
GCS = ["gcsfs"]

setup(
    name="blip-jax",
    version="0.1.0",
    description="BLIP, BLIP-2 and InstructBLIP in JAX/Flax, sharded for TPU and GPU meshes",
    long_description=(HERE / "README.md").read_text() if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["blip_jax", "blip_jax.*"]),
    package_data={"blip_jax.data": ["*.json"]},
    install_requires=REQUIREMENTS,
    extras_require={
        "convert": CONVERT,
        # pycocoevalcap ships the jars METEOR (and the Java PTB tokenizer) run from; tests compare against it
        "eval": ["pycocoevalcap==1.2"],
        "tpu-plan": TPU_PLAN,
        "gcs": GCS,
        # the object-store tests run a real GCS API server on 127.0.0.1 (pinned: tests/gcs_server.py adds to it)
        # pytest-xdist: the suite runs on both cores (-n 2), about 60 minutes instead of 90+ on one
        "test": CONVERT + TPU_PLAN + GCS + ["gcp-storage-emulator==2026.7.19", "pytest>=8.0", "pytest-xdist>=3.5",
                                           "pycocoevalcap==1.2"],
    },
    entry_points={"console_scripts": ["blip-jax=blip_jax.cli:main"]},
)
