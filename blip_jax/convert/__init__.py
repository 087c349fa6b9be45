"""`blip-jax convert`: transformers checkpoints -> blip-jax model directories."""

from blip_jax.convert.mapping import ConversionError


def convert(*args, **kwargs):
    """See `blip_jax.convert.converter.convert` (imported on use: the models import this package's
    weight-mapping helpers, and the converter imports the models)."""
    from blip_jax.convert.converter import convert as _convert

    return _convert(*args, **kwargs)


__all__ = ["ConversionError", "convert"]
