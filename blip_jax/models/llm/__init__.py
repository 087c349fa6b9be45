"""Frozen language models used as BLIP-2 / InstructBLIP decoders, and the registry that lets the
BLIP-2 model, the converter and the API treat them alike.

Each family module provides a frozen config dataclass with `from_hf(dict)`, a Flax module taking
`inputs_embeds` (the soft prompt, placed before the text), `init_cache`, `decode_step(config)` (a
`blip_jax.generation` step function), `hf_key`, the config's `to_hf()` (its transformers dict) and a loader `load_*_params(tensors, config, *,
scan_layers, prefix, dtype)`. Encoder-decoder families add `cross_cache` (the encoder's
cross-attention keys/values, computed once per example and shared by its beams).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from blip_jax.models.llm import llama, opt, t5
from blip_jax.models.llm.llama import Llama, LlamaConfig, load_llama_params
from blip_jax.models.llm.opt import OPT, OptConfig, load_opt_params
from blip_jax.models.llm.t5 import T5, T5Config, load_t5_params


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    config: type
    module: type
    load_params: Callable[..., Any]
    init_cache: Callable[..., Any]
    decode_step: Callable[..., Any]
    embed_dim: Callable[[Any], int]  # width of the word embeddings the soft prompt must match
    hf_key: Callable[..., tuple[str, str]]  # (unrolled path, prefix) -> (transformers key, kind)
    cross_cache: Callable[..., Any] | None = None  # encoder-decoder families only

    @property
    def encoder_decoder(self) -> bool:
        return self.cross_cache is not None


FAMILIES = {
    "opt": Family("opt", OptConfig, OPT, load_opt_params, opt.init_cache, opt.decode_step, lambda c: c.embed_dim,
                  opt.hf_key),
    "t5": Family("t5", T5Config, T5, load_t5_params, t5.init_cache, t5.decode_step, lambda c: c.d_model, t5.hf_key,
                 cross_cache=t5.cross_cache),
    "llama": Family("llama", LlamaConfig, Llama, load_llama_params, llama.init_cache, llama.decode_step,
                    lambda c: c.hidden_size, llama.hf_key),
}

__all__ = ["FAMILIES", "Family", "Llama", "LlamaConfig", "OPT", "OptConfig", "T5", "T5Config"]
