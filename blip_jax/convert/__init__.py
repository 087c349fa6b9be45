"""`blip-jax convert`: transformers checkpoints -> blip-jax model directories."""

from blip_jax.convert.converter import convert
from blip_jax.models.weights import ConversionError

__all__ = ["ConversionError", "convert"]
