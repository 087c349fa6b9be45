"""Model configurations: frozen dataclasses, hashable so modules can hold them as attributes.

They are saved as `config.json` in every converted checkpoint (`to_dict` / `from_dict`); the
translation from HuggingFace `config.json` files lives in `blip_jax.convert.hf_config`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp


def hf_get(hf: dict, key: str, default: Any) -> Any:
    """`hf[key]`, or `default` when it is missing or null (config.json files write null for unset fields)."""
    value = hf.get(key)
    return default if value is None else value

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
REMAT_POLICIES = ("none", "full", "dots")


def _check_heads(width: int, heads: int, what: str):
    if width % heads:
        raise ValueError(f"{what}: hidden_size {width} is not divisible by num_heads {heads}")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """A ViT: BLIP's (and, by config, BLIP-2's EVA / CLIP towers)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    image_size: int = 384
    patch_size: int = 16
    layer_norm_eps: float = 1e-5  # HF BLIP; the original BLIP used 1e-6, BLIP-2 uses 1e-6
    drop_path_rate: float = 0.0
    attention_dropout: float = 0.0
    activation: str = "gelu"  # gelu (BLIP, EVA) | quick_gelu (CLIP)
    pre_norm: bool = False  # CLIP's ln_pre on the embeddings
    final_norm: bool = True  # BLIP's ln_post; BLIP-2's towers end without one (ln_vision follows)

    ACTIVATIONS = ("gelu", "quick_gelu")

    def __post_init__(self):
        _check_heads(self.hidden_size, self.num_heads, "vision")
        if self.activation not in self.ACTIVATIONS:
            raise ValueError(f"vision: activation {self.activation!r} is not one of {self.ACTIVATIONS}")
        if self.image_size % self.patch_size:
            raise ValueError(f"vision: image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """The BERT-style MED text transformer (post-LN, cross-attention in every layer)."""

    vocab_size: int = 30524
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12  # HF's class default of 8 is a known trap; checkpoints say 12
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    encoder_hidden_size: int = 768
    cross_attention: bool = True
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    pad_token_id: int = 0
    bos_token_id: int = 30522  # [DEC]
    sep_token_id: int = 102  # [SEP], the end of a caption
    # the first token of image-grounded encoding (ITM, VQA questions): [ENC]'s id as LAVIS trains and
    # evaluates (models trained here store it); -1 keeps [CLS], as transformers' BLIP runs
    enc_token_id: int = -1
    tie_word_embeddings: bool = True
    # BLIP NLVR2: each layer's cross-attention split over two images (two query/key/value/out sets,
    # one norm), their outputs averaged, or concatenated and merged by a linear layer from layer
    # `merge_from_layer` on (LAVIS's BertSelfOutput: layer_num >= 6)
    twin_cross_attention: bool = False
    merge_from_layer: int = 6

    def __post_init__(self):
        _check_heads(self.hidden_size, self.num_heads, "text")


@dataclasses.dataclass(frozen=True)
class BlipConfig:
    """A BLIP model: which task heads it has (`architecture`) and how it computes."""

    architecture: str = "caption"  # caption | retrieval | vqa | pretrain (every head, for training) | nlvr
    vision: VisionConfig = VisionConfig()
    text: TextConfig = TextConfig()
    embed_dim: int = 256  # ITC projection width (HF image_text_hidden_size)
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    scan_layers: bool = False  # run each layer stack as one nn.scan (and store it stacked)
    remat_policy: str = "none"  # none | full | dots (nn.remat around each layer when training)
    num_classes: int = 2  # nlvr: the classifier's classes (NLVR2: false, true)

    ARCHITECTURES = ("caption", "retrieval", "vqa", "pretrain", "nlvr")

    def __post_init__(self):
        if self.architecture not in self.ARCHITECTURES:
            raise ValueError(f"unknown BLIP architecture {self.architecture!r}; expected one of {self.ARCHITECTURES}")
        for field in ("dtype", "param_dtype"):
            if getattr(self, field) not in DTYPES:
                raise ValueError(f"{field} must be one of {sorted(DTYPES)}, got {getattr(self, field)!r}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy must be one of {sorted(REMAT_POLICIES)}, got {self.remat_policy!r}")
        if (self.architecture == "nlvr") != self.text.twin_cross_attention:
            raise ValueError("nlvr: the text encoder's cross-attention is split over two images "
                             "(text.twin_cross_attention) exactly when the architecture is nlvr")
        if self.architecture == "vqa" and self.text.encoder_hidden_size != self.text.hidden_size:
            raise ValueError("vqa: the answer decoder cross-attends to question states, so the text "
                             "encoder_hidden_size must equal its hidden_size")

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    @property
    def weight_dtype(self):
        return DTYPES[self.param_dtype]

    def replace(self, **changes) -> "BlipConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {"model_type": "blip", **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BlipConfig":
        d = {k: v for k, v in d.items() if k != "model_type"}
        return cls(**{**d, "vision": VisionConfig(**d["vision"]), "text": TextConfig(**d["text"])})

