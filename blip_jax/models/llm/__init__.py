"""Frozen language models used as BLIP-2 decoders."""

from blip_jax.models.llm.opt import OPT, OptConfig, decode_step, init_cache, load_opt_params

__all__ = ["OPT", "OptConfig", "decode_step", "init_cache", "load_opt_params"]
