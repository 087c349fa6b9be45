"""BLIP-2 / InstructBLIP checkpoints: transformers config.json -> Blip2Config, and where each
parameter comes from.

The ViT, Q-Former and heads are mapped here; the language model (`language_model.*`) by its
family's own loader in `blip_jax.models.llm`. Keys missing from a config.json take transformers'
class defaults, as transformers itself reads the file.
"""

from __future__ import annotations

import re

import numpy as np
from flax import traverse_util

from blip_jax.convert import blip_keys
from blip_jax.models.weights import expected_params, map_weights, rename
from blip_jax.models import qformer
from blip_jax.models.blip2 import Blip2Config, param_shapes
from blip_jax.models.config import DTYPES, VisionConfig
from blip_jax.models.layout import stack_layers
from blip_jax.models.llm import FAMILIES
from blip_jax.models.qformer import QFormerConfig

# transformers class -> (architecture, instruct)
ARCHITECTURES = {
    "Blip2ForConditionalGeneration": ("generation", False),
    "Blip2ForImageTextRetrieval": ("retrieval", False),
    "InstructBlipForConditionalGeneration": ("generation", True),
}
HF_VISION_DEFAULTS = dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16,
                          image_size=224, patch_size=14, hidden_act="gelu", layer_norm_eps=1e-6,
                          attention_dropout=0.0, qkv_bias=True)
HF_QFORMER_DEFAULTS = dict(vocab_size=30522, max_position_embeddings=512, pad_token_id=0)
# text_config model_type -> blip-jax LLM family
LLM_TYPES = {"opt": "opt", "t5": "t5", "llama": "llama", "mistral": "llama", "qwen2": "llama"}

# Keys that carry nothing: buffers.
IGNORED = re.compile(r"position_ids$")
# Parameters transformers has no place for: stage 1's ITG head and learned ITC temperature.
STAGE1_ONLY = re.compile(r"^(itg_dense|itg_norm|itg_bias|temp)(/|$)")


def blip2_config_from_hf(hf: dict, **overrides) -> Blip2Config:
    names = hf.get("architectures") or []
    architecture, instruct = next((ARCHITECTURES[n] for n in names if n in ARCHITECTURES), (None, None))
    if architecture is None:
        raise ValueError(f"unsupported architecture {names or '(none listed)'}; blip-jax converts {', '.join(ARCHITECTURES)}")
    v = {**HF_VISION_DEFAULTS, **(hf.get("vision_config") or {})}
    if v["hidden_act"] != "gelu" or not v["qkv_bias"]:
        raise ValueError(f"vision_config: hidden_act {v['hidden_act']!r} / qkv_bias {v['qkv_bias']} not supported "
                         "(BLIP-2's EVA ViT uses exact gelu with q/v biases)")
    vision = VisionConfig(hidden_size=v["hidden_size"], intermediate_size=v["intermediate_size"],
                          num_layers=v["num_hidden_layers"], num_heads=v["num_attention_heads"],
                          image_size=v["image_size"], patch_size=v["patch_size"], layer_norm_eps=v["layer_norm_eps"],
                          attention_dropout=v["attention_dropout"], final_norm=False)
    q = {**HF_QFORMER_DEFAULTS, **(hf.get("qformer_config") or {})}
    # transformers sets the Q-Former's encoder width to the vision width whatever the file says
    q["encoder_hidden_size"] = vision.hidden_size
    if instruct:  # InstructBLIP's Q-Former layers always have the text FFN
        q["use_qformer_text_input"] = True
    qcfg = QFormerConfig.from_hf(q)
    family, llm = "", None
    if architecture == "generation":
        text = hf.get("text_config") or {"model_type": "opt"}
        family = LLM_TYPES.get(text.get("model_type"))
        if family is None or family not in FAMILIES:
            raise ValueError(f"text_config model_type {text.get('model_type')!r} is not supported; "
                             f"blip-jax has {sorted(FAMILIES)}")
        llm = FAMILIES[family].config.from_hf(text)
    return Blip2Config(architecture=architecture, instruct=instruct, vision=vision, qformer=qcfg, llm_family=family,
                       llm=llm, num_query_tokens=hf.get("num_query_tokens", 32),
                       embed_dim=hf.get("image_text_hidden_size", 256), qformer_vocab_size=q["vocab_size"],
                       qformer_max_positions=q["max_position_embeddings"], qformer_pad_token_id=q["pad_token_id"],
                       image_token_id=hf.get("image_token_index", hf.get("image_token_id")), **overrides)


def blip2_transformers_config(config: Blip2Config) -> dict:
    """The transformers config.json dict `blip2_config_from_hf` reads back to `config` (for models
    converted from LAVIS or trained here, which have no transformers file of their own)."""
    names = {("generation", False): ("Blip2ForConditionalGeneration", "blip-2"),
             ("retrieval", False): ("Blip2ForImageTextRetrieval", "blip-2"),
             ("generation", True): ("InstructBlipForConditionalGeneration", "instructblip")}
    name, model_type = names[config.architecture, config.instruct]
    v, q = config.vision, config.qformer
    hf = {"architectures": [name], "model_type": model_type, "num_query_tokens": config.num_query_tokens,
          "image_text_hidden_size": config.embed_dim,
          "vision_config": {"hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
                            "num_hidden_layers": v.num_layers, "num_attention_heads": v.num_heads,
                            "image_size": v.image_size, "patch_size": v.patch_size,
                            "layer_norm_eps": v.layer_norm_eps, "attention_dropout": v.attention_dropout,
                            "hidden_act": "gelu", "qkv_bias": True},
          "qformer_config": {"vocab_size": config.qformer_vocab_size, "hidden_size": q.hidden_size,
                             "intermediate_size": q.intermediate_size, "num_hidden_layers": q.num_layers,
                             "num_attention_heads": q.num_heads, "encoder_hidden_size": v.hidden_size,
                             "cross_attention_frequency": q.cross_attention_frequency,
                             "layer_norm_eps": q.layer_norm_eps, "hidden_dropout_prob": q.hidden_dropout,
                             "attention_probs_dropout_prob": q.attention_dropout,
                             "max_position_embeddings": config.qformer_max_positions,
                             "pad_token_id": config.qformer_pad_token_id, "hidden_act": "gelu",
                             "use_qformer_text_input": q.use_qformer_text_input}}
    if config.llm is not None:
        hf["text_config"] = config.llm.to_hf()
    if config.image_token_id is not None:
        hf["image_token_index"] = config.image_token_id
    return hf


def hf_key(path: str, config: Blip2Config) -> tuple[str, str]:
    """Unrolled blip-jax path -> (transformers key, kind); the language model's by its family."""
    top, _, rest = path.partition("/")
    if top == "vision":
        return rename(path, blip_keys.VISION)
    if top == "ln_vision":
        return rename(f"vision_model.post_layernorm/{rest}", [])
    text_embeddings = "qformer.embeddings." if config.instruct else "embeddings."
    if top == "qformer":
        if config.instruct and rest.startswith("layernorm/"):
            return rename(f"qformer.embeddings.{rest}", [])
        return qformer.hf_key(rest, "qformer.")
    if top == "qformer_word":
        return rename(f"{text_embeddings}word_embeddings/{rest}", [])
    if top == "qformer_position":
        return rename(f"{text_embeddings}position_embeddings/{rest}", [])
    if top == "language_model":
        return config.family.hf_key(rest, "language_model.")
    return rename(path, [])  # query_tokens, language_projection, vision_projection, text_projection, itm_head


def load_params(tensors, config: Blip2Config, *, progress: bool = False, what: str = "") -> tuple[dict, list[str]]:
    """(params, ignored keys) of `Blip2(config)` from transformers tensors (any mapping read one
    tensor at a time). Missing, unexpected or misshapen tensors raise ConversionError."""
    shapes = param_shapes(config.replace(scan_layers=False))  # each leaf in its storage dtype
    shapes.pop("language_model", None)
    flat, ignored = map_weights(tensors, expected_params(shapes), lambda p: hf_key(p, config),
                                what=what or "BLIP-2 weights do not match the config",
                                ignore=re.compile(rf"{IGNORED.pattern}|^language_model\."), progress=progress)
    ignored = [k for k in ignored if not k.startswith("language_model.")]
    params = traverse_util.unflatten_dict(flat, sep="/")
    del flat
    if config.architecture == "generation":
        params["language_model"] = config.family.load_params(
            tensors, config.llm, prefix="language_model.", dtype=np.dtype(DTYPES[config.frozen_param_dtype]))
    if config.scan_layers:
        params = stack_params(params, config)
    return params, ignored


def stack_params(params: dict, config: Blip2Config) -> dict:
    """Unrolled -> scanned layout: the ViT and LLM stacks by layer, the Q-Former by cross-attention group."""
    out = {k: v for k, v in params.items() if k != "qformer"}
    out = stack_layers(out)
    out["qformer"] = qformer.stack_qformer_params(params["qformer"], config.qformer)
    return out
