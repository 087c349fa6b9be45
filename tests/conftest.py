"""Shared fixtures: tiny random transformers BLIP checkpoints and their blip-jax conversions."""

import atexit
import gc
import os
import shutil
import tempfile

import numpy as np
import pytest

# `blip-jax` commands (in process or as subprocesses) keep JAX's compilation cache here, never in ~/.cache.
os.environ["BLIP_JAX_CACHE_DIR"] = tempfile.mkdtemp(prefix="blip_jax_test_jax_cache_")
atexit.register(shutil.rmtree, os.environ["BLIP_JAX_CACHE_DIR"], True)
# The tests run on CPU; libtpu (installed for the --topology plans) would otherwise look for a TPU in
# every process and print its warnings. Topology plans compile for TPU all the same.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

ARCHITECTURES = ("caption", "retrieval", "vqa")


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop JAX's compiled programs after each test module. Each CPU executable holds memory maps of
    its own, and the whole suite in one process compiles enough of them to pass the kernel's
    vm.max_map_count (65530): the next compile then segfaults inside XLA."""
    yield
    import jax

    jax.clear_caches()
    gc.collect()


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """architecture -> directory of a tiny random transformers checkpoint (built once per session)."""
    from blip_jax.testing import write_tiny_checkpoint

    made = {}

    def get(architecture, weights_format="safetensors"):
        key = (architecture, weights_format)
        if key not in made:
            d = tmp_path_factory.mktemp(f"hf_{architecture}_{weights_format}")
            made[key] = write_tiny_checkpoint(d, architecture, weights_format=weights_format)
        return made[key]

    return get


@pytest.fixture(scope="session")
def converted(hf_checkpoint, tmp_path_factory):
    """(architecture, scan_layers) -> blip-jax model directory converted from `hf_checkpoint`."""
    from blip_jax.convert import convert

    made = {}

    def get(architecture, scan_layers=False):
        key = (architecture, scan_layers)
        if key not in made:
            dst = tmp_path_factory.mktemp("jax") / f"{architecture}_{'scan' if scan_layers else 'unrolled'}"
            convert(hf_checkpoint(architecture), dst, scan_layers=scan_layers, progress=False)
            made[key] = dst
        return made[key]

    return get


@pytest.fixture(scope="session")
def hf_model(hf_checkpoint):
    from blip_jax.convert.verify import load_transformers_model

    made = {}

    def get(architecture):
        if architecture not in made:
            made[architecture] = load_transformers_model(hf_checkpoint(architecture))
        return made[architecture]

    return get


@pytest.fixture
def rng():
    return np.random.default_rng(0)
