"""Frozen language models used as BLIP-2 / InstructBLIP decoders, and the registry that lets the
BLIP-2 model, the converter and the API treat them alike.

Each family module provides a frozen config dataclass with `from_hf(dict)`, a Flax module taking
`inputs_embeds` (the soft prompt, placed before the text), `init_cache`, `decode_step(config)` (a
`blip_jax.generation` step function), `hf_key` and a loader `load_*_params(tensors, config, *,
scan_layers, prefix, dtype)`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from blip_jax.models.llm import opt
from blip_jax.models.llm.opt import OPT, OptConfig, decode_step, init_cache, load_opt_params


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    config: type
    module: type
    load_params: Callable[..., Any]
    encoder_decoder: bool
    embed_dim: Callable[[Any], int]  # width of the word embeddings the soft prompt must match


FAMILIES = {
    "opt": Family("opt", OptConfig, OPT, load_opt_params, False, lambda c: c.embed_dim),
}

__all__ = ["FAMILIES", "Family", "OPT", "OptConfig", "decode_step", "init_cache", "load_opt_params", "opt"]
