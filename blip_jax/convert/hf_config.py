"""Translate a transformers `config.json` into blip-jax model configs.

Keys missing from a config.json take transformers' class defaults (listed here), exactly as
transformers reads the file: an old BLIP text config without `num_attention_heads` really has 8 heads.
"""

from __future__ import annotations

import json
from pathlib import Path

from blip_jax.models.config import BlipConfig, TextConfig, VisionConfig

# transformers class name -> (model family, blip-jax architecture)
ARCHITECTURES = {
    "BlipForConditionalGeneration": ("blip", "caption"),
    "BlipForImageTextRetrieval": ("blip", "retrieval"),
    "BlipForQuestionAnswering": ("blip", "vqa"),
}

HF_BLIP_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                               image_size=384, patch_size=16, hidden_act="gelu", layer_norm_eps=1e-5,
                               attention_dropout=0.0)
HF_BLIP_TEXT_DEFAULTS = dict(vocab_size=30524, hidden_size=768, encoder_hidden_size=768, intermediate_size=3072,
                             num_hidden_layers=12, num_attention_heads=8, max_position_embeddings=512,
                             hidden_act="gelu", layer_norm_eps=1e-12, hidden_dropout_prob=0.0,
                             attention_probs_dropout_prob=0.0, bos_token_id=30522, pad_token_id=0,
                             sep_token_id=102, is_decoder=True, tie_word_embeddings=True)


def read_hf_config(directory: str | Path) -> dict:
    path = Path(directory) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: a transformers model directory has a config.json")
    return json.loads(path.read_text())


def detect_architecture(hf: dict) -> tuple[str, str]:
    names = hf.get("architectures") or []
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    raise ValueError(
        f"unsupported architecture {names or '(none listed)'} (model_type {hf.get('model_type')!r}); "
        f"blip-jax converts: {', '.join(ARCHITECTURES)}"
    )


def _with_defaults(section: dict | None, defaults: dict, what: str) -> dict:
    merged = {**defaults, **(section or {})}
    if merged["hidden_act"] != "gelu":
        raise ValueError(f"{what}: hidden_act {merged['hidden_act']!r} is not supported (BLIP uses exact 'gelu')")
    return merged


def blip_config_from_hf(hf: dict, **overrides) -> BlipConfig:
    _, architecture = detect_architecture(hf)
    v = _with_defaults(hf.get("vision_config"), HF_BLIP_VISION_DEFAULTS, "vision_config")
    t = _with_defaults(hf.get("text_config"), HF_BLIP_TEXT_DEFAULTS, "text_config")
    vision = VisionConfig(
        hidden_size=v["hidden_size"], intermediate_size=v["intermediate_size"], num_layers=v["num_hidden_layers"],
        num_heads=v["num_attention_heads"], image_size=v["image_size"], patch_size=v["patch_size"],
        layer_norm_eps=v["layer_norm_eps"], attention_dropout=v["attention_dropout"],
    )
    text = TextConfig(
        vocab_size=t["vocab_size"], hidden_size=t["hidden_size"], intermediate_size=t["intermediate_size"],
        num_layers=t["num_hidden_layers"], num_heads=t["num_attention_heads"],
        max_position_embeddings=t["max_position_embeddings"], layer_norm_eps=t["layer_norm_eps"],
        # BlipConfig's __post_init__ sets the text encoder_hidden_size to the vision width.
        encoder_hidden_size=v["hidden_size"], cross_attention=bool(t["is_decoder"]),
        hidden_dropout=t["hidden_dropout_prob"], attention_dropout=t["attention_probs_dropout_prob"],
        pad_token_id=t["pad_token_id"], bos_token_id=t["bos_token_id"], sep_token_id=t["sep_token_id"],
        tie_word_embeddings=bool(t["tie_word_embeddings"] and hf.get("tie_word_embeddings", True)),
    )
    return BlipConfig(architecture=architecture, vision=vision, text=text,
                      embed_dim=hf.get("image_text_hidden_size", 256), **overrides)
