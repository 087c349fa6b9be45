"""BLIP, BLIP-2 and InstructBLIP in JAX/Flax."""

__version__ = "0.1.0"


def load(path, **kwargs):
    """Load a blip-jax model directory (made by `blip-jax convert`); see `blip_jax.api.BlipModel`."""
    from blip_jax.api import load as _load

    return _load(path, **kwargs)
