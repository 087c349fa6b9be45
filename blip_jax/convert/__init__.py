"""`blip-jax convert`: transformers checkpoints -> blip-jax model directories."""

from blip_jax.convert.convert import ConversionError, convert

__all__ = ["ConversionError", "convert"]
