"""`blip-jax convert`: transformers checkpoints and LAVIS `.pth` files -> blip-jax model directories."""

from blip_jax.convert.converter import convert, convert_lavis
from blip_jax.models.weights import ConversionError

__all__ = ["ConversionError", "convert", "convert_lavis"]
