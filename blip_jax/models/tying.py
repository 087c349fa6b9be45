"""BLIP's encoder-decoder weight tying, held once in the parameter tree.

BLIP's text decoder shares every parameter with the text encoder except its causal self-attention
(and its LM head): embeddings, cross-attention and feed-forward blocks are one set of weights. The
stored (optimised, checkpointed and exported) tree of a "pretrain" model therefore keeps
`text_encoder` whole and, under `text_decoder`, only what is the decoder's own; `tie` assembles the full decoder view at apply time
from the same arrays (no copy: gradients of both uses reach the one parameter), `untie` drops the
shared entries from a full tree. Only the "pretrain" architecture is tied: the VQA model's encoder
and decoder are separate weights, so callers go through `stored_form` / `applied_form`, which ask
the config, rather than calling `tie` / `untie` on any tree.
"""

from __future__ import annotations

from flax import traverse_util

from blip_jax.models.config import BlipConfig

ENCODER, DECODER = "text_encoder", "text_decoder"


def decoder_owns(path: str) -> bool:
    """Whether a decoder parameter (path below text_decoder/) is the decoder's own."""
    return "/self_attn/" in f"/{path}" or path.startswith("head_")


def untie(params: dict) -> dict:
    """A full tree with the decoder's shared parameters removed (the stored form)."""
    if DECODER not in params or ENCODER not in params:
        return params
    flat = traverse_util.flatten_dict(params[DECODER], sep="/")
    own = {k: v for k, v in flat.items() if decoder_owns(k)}
    return {**params, DECODER: traverse_util.unflatten_dict(own, sep="/")}


def tie(params: dict) -> dict:
    """The full tree a `Blip` module applies: the decoder's own parameters plus the encoder's shared ones."""
    if DECODER not in params or ENCODER not in params:
        return params
    encoder = traverse_util.flatten_dict(params[ENCODER], sep="/")
    own = traverse_util.flatten_dict(params[DECODER], sep="/")
    shared = {k: v for k, v in encoder.items() if not decoder_owns(k)}
    return {**params, DECODER: traverse_util.unflatten_dict({**shared, **own}, sep="/")}


def is_tied(config) -> bool:
    """Whether a model stores its decoder tied to its encoder (BLIP's "pretrain" architecture)."""
    return isinstance(config, BlipConfig) and config.architecture == "pretrain"


def stored_form(config, params: dict) -> dict:
    """The tree a model of `config` stores, optimises and checkpoints."""
    return untie(params) if is_tied(config) else params


def applied_form(config, params: dict) -> dict:
    """The tree a model of `config` applies (from its stored form)."""
    return tie(params) if is_tied(config) else params
