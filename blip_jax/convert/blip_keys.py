"""Where each blip-jax BLIP parameter comes from in a transformers checkpoint, and how it is reshaped.

Names are mapped for the unrolled layout (`layers_N`); scanned checkpoints are stacked afterwards.
"""

from __future__ import annotations

import re

from blip_jax.models.weights import rename

# (pattern on the blip-jax path, replacement giving the transformers module path)
# The ViT: the same names in BLIP, BLIP-2 and InstructBLIP checkpoints.
VISION = [
    (r"^vision/embed/cls$", "vision_model.embeddings.class_embedding"),
    (r"^vision/embed/pos$", "vision_model.embeddings.position_embedding"),
    (r"^vision/embed/patch/", "vision_model.embeddings.patch_embedding/"),
    (r"^vision/ln_post/", "vision_model.post_layernorm/"),
    (r"^vision/encoder/layers_(\d+)/ln1/", r"vision_model.encoder.layers.\1.layer_norm1/"),
    (r"^vision/encoder/layers_(\d+)/ln2/", r"vision_model.encoder.layers.\1.layer_norm2/"),
    (r"^vision/encoder/layers_(\d+)/qkv/", r"vision_model.encoder.layers.\1.self_attn.qkv/"),
    (r"^vision/encoder/layers_(\d+)/proj/", r"vision_model.encoder.layers.\1.self_attn.projection/"),
    (r"^vision/encoder/layers_(\d+)/(fc\d)/", r"vision_model.encoder.layers.\1.mlp.\2/"),
]
_MODULES = VISION + [
    # MED text transformers: the decoder's BERT lives under `.bert`, its head under `.cls.predictions`
    (r"^text_decoder/head_dense/", "text_decoder.cls.predictions.transform.dense/"),
    (r"^text_decoder/head_norm/", "text_decoder.cls.predictions.transform.LayerNorm/"),
    (r"^text_decoder/head_bias$", "text_decoder.cls.predictions.bias"),
    (r"^text_decoder/head_out/", "text_decoder.cls.predictions.decoder/"),
    (r"^text_decoder/", "text_decoder.bert/"),
    (r"/word/", ".embeddings.word_embeddings/"),
    (r"/position/", ".embeddings.position_embeddings/"),
    (r"/embed_norm/", ".embeddings.LayerNorm/"),
    (r"/encoder/layers_(\d+)/self_attn/(query|key|value)/", r".encoder.layer.\1.attention.self.\2/"),
    (r"/encoder/layers_(\d+)/self_attn/out/", r".encoder.layer.\1.attention.output.dense/"),
    (r"/encoder/layers_(\d+)/self_attn/norm/", r".encoder.layer.\1.attention.output.LayerNorm/"),
    # NLVR2's twin cross-attention (LAVIS BlipNLVR's names: transformers has no such class)
    (r"/encoder/layers_(\d+)/cross_attn/(query|key|value)([01])/", r".encoder.layer.\1.crossattention.self\3.\2/"),
    (r"/encoder/layers_(\d+)/cross_attn/out([01])/", r".encoder.layer.\1.crossattention.output.dense\2/"),
    (r"/encoder/layers_(\d+)/cross_attn/merge/", r".encoder.layer.\1.crossattention.output.merge_layer/"),
    (r"^cls_head_0/", "cls_head.0/"),
    (r"^cls_head_1/", "cls_head.2/"),
    (r"/encoder/layers_(\d+)/cross_attn/(query|key|value)/", r".encoder.layer.\1.crossattention.self.\2/"),
    (r"/encoder/layers_(\d+)/cross_attn/out/", r".encoder.layer.\1.crossattention.output.dense/"),
    (r"/encoder/layers_(\d+)/cross_attn/norm/", r".encoder.layer.\1.crossattention.output.LayerNorm/"),
    (r"/encoder/layers_(\d+)/fc1/", r".encoder.layer.\1.intermediate.dense/"),
    (r"/encoder/layers_(\d+)/fc2/", r".encoder.layer.\1.output.dense/"),
    (r"/encoder/layers_(\d+)/ln/", r".encoder.layer.\1.output.LayerNorm/"),
    (r"^text_encoder/", "text_encoder/"),
]
# Keys a checkpoint may hold that carry nothing new: buffers and the tied copies of the LM head.
IGNORED = re.compile(r"(position_ids$|\.cls\.predictions\.decoder\.(weight|bias)$|\.pooler\.)")


def hf_key(path: str) -> tuple[str, str]:
    """blip-jax path 'a/b/kernel' -> (transformers key, kind)."""
    return rename(path, _MODULES)
