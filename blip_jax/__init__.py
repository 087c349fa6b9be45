"""BLIP, BLIP-2 and InstructBLIP in JAX/Flax."""

__version__ = "0.1.0"

from blip_jax.prompts import INSTRUCT_PAPER  # noqa: E402,F401 (a plain dict: importing it is cheap)


def load(path, **kwargs):
    """Load a blip-jax model directory (made by `blip-jax convert`, or a training workdir's W/model,
    which W itself names): a `blip_jax.api.BlipModel` or a `blip_jax.blip2_api.Blip2Model`."""
    from blip_jax.model_base import load as _load
    from blip_jax.checkpoint import model_dir

    return _load(model_dir(path), **kwargs)


def __getattr__(name):
    """`blip_jax.search` (Index) without importing it, or JAX, at `import blip_jax`."""
    if name == "search":
        import importlib

        return importlib.import_module("blip_jax.search")
    raise AttributeError(f"module 'blip_jax' has no attribute {name!r}")
