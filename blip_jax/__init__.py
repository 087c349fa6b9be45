"""BLIP, BLIP-2 and InstructBLIP in JAX/Flax."""

__version__ = "0.1.0"


def load(path, **kwargs):
    """Load a blip-jax model directory (made by `blip-jax convert`, or a training workdir's W/model,
    which W itself names); see `blip_jax.api.BlipModel`."""
    from blip_jax.api import load as _load
    from blip_jax.checkpoint import model_dir

    return _load(model_dir(path), **kwargs)
