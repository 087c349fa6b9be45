"""BLIP: the ViT, the MED text transformer(s) and the task heads, in one module.

`BlipConfig.architecture` says which parts exist, mirroring the transformers classes:
  caption    vision + text_decoder (LM head tied to its word embeddings)   BlipForConditionalGeneration
  retrieval  vision + text_encoder + vision_proj, text_proj, itm_head      BlipForImageTextRetrieval
  vqa        vision + text_encoder (question) + text_decoder (answer)      BlipForQuestionAnswering
  pretrain   all of them plus the learnable ITC temperature `temp`: what BLIP pre-trains (ITC, ITM,
             LM) and fine-tunes for retrieval; its decoder shares every parameter but the
             self-attention with the encoder (see `blip_jax.models.tying`)
  nlvr       vision + text_encoder whose cross-attention is split over two images (BLIP's NLVR2
             model, LAVIS `BlipNLVR`; transformers has none) + cls_head on the first token
Methods are called with `model.apply(variables, ..., method=Blip.<name>)`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from blip_jax.models import layers
from blip_jax.models.config import BlipConfig
from blip_jax.models.med import TextTransformer
from blip_jax.models.vit import VisionTransformer


def l2_normalize(x, eps=1e-12):
    """torch.nn.functional.normalize: x / max(||x||, eps)."""
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


class Blip(nn.Module):
    config: BlipConfig

    def setup(self):
        cfg = self.config
        kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype)
        stack = dict(scan_layers=cfg.scan_layers, remat_policy=cfg.remat_policy)
        arch = cfg.architecture
        self.vision = VisionTransformer(cfg.vision, **kw, **stack)
        if arch in ("retrieval", "vqa", "pretrain", "nlvr"):
            self.text_encoder = TextTransformer(cfg.text, **kw, **stack)
        if arch in ("caption", "vqa", "pretrain"):
            self.text_decoder = TextTransformer(cfg.text, lm_head=True, **kw, **stack)
        if arch in ("retrieval", "pretrain"):
            self.vision_proj = layers.Dense(cfg.embed_dim, ("embed", None), **kw)
            self.text_proj = layers.Dense(cfg.embed_dim, ("embed", None), **kw)
            self.itm_head = layers.Dense(2, ("embed", None), **kw)
        if arch == "nlvr":  # LAVIS: Linear(D, D) -> ReLU -> Linear(D, classes)
            self.cls_head_0 = layers.Dense(cfg.text.hidden_size, ("embed", "mlp"), **kw)
            self.cls_head_1 = layers.Dense(cfg.num_classes, ("mlp", None), **kw)
        if arch == "pretrain":  # ITC temperature, 0.07 at the start (BLIP)
            self.temp = self.param("temp", nn.initializers.constant(0.07), (), jnp.float32)

    # ----------------------------------------------------------------- shared pieces
    def encode_image(self, pixel_values, deterministic: bool = True):
        """[B, H, W, 3] -> image tokens [B, 1 + patches, D_vision] (after the ViT's final norm)."""
        return self.vision(pixel_values, deterministic=deterministic)[0]

    def decode(self, input_ids, attention_mask, encoder_states=None, encoder_mask=None, *, positions=None,
               cache=None, cache_index=None, deterministic: bool = True):
        """The causal LM over `encoder_states` (image tokens, or question states for VQA) -> (logits, aux)."""
        return self.text_decoder(input_ids, attention_mask, encoder_states=encoder_states, encoder_mask=encoder_mask,
                                 causal=True, positions=positions, cache=cache, cache_index=cache_index,
                                 deterministic=deterministic)

    def init_decode_cache(self, encoder_states, encoder_mask, max_len: int):
        return self.text_decoder.init_cache(encoder_states, encoder_mask, encoder_states.shape[0], max_len,
                                            dtype=self.config.compute_dtype)

    # ----------------------------------------------------------------- retrieval heads
    def image_features(self, image_embeds):
        """Unit-norm ITC image features [B, embed_dim] from the CLS token."""
        return l2_normalize(self.vision_proj(image_embeds[:, 0]))

    def text_features(self, input_ids, attention_mask, deterministic: bool = True):
        """Unit-norm ITC text features [B, embed_dim] from the unimodal encoder's [CLS]."""
        hidden, _ = self.text_encoder(input_ids, attention_mask, deterministic=deterministic)
        return l2_normalize(self.text_proj(hidden[:, 0]))

    def encode_grounded(self, image_embeds, input_ids, attention_mask, deterministic: bool = True):
        """The image-grounded encoder's states [B, T, D] of [CLS] text [SEP] (first token -> [ENC]
        when the config names it)."""
        enc = self.config.text.enc_token_id
        if enc >= 0:
            input_ids = input_ids.at[:, 0].set(enc)
        hidden, _ = self.text_encoder(input_ids, attention_mask, encoder_states=image_embeds,
                                      deterministic=deterministic)
        return hidden

    def itm_logits(self, image_embeds, input_ids, attention_mask, deterministic: bool = True):
        """2-way match logits [B, 2] from the image-grounded encoder's first token."""
        hidden = self.encode_grounded(image_embeds, input_ids, attention_mask, deterministic)
        return self.itm_head(hidden[:, 0]).astype(jnp.float32)

    # ----------------------------------------------------------------- VQA
    def encode_question(self, image_embeds, input_ids, attention_mask, deterministic: bool = True):
        """Question states for the answer decoder: the image-grounded encoding of the question."""
        return self.encode_grounded(image_embeds, input_ids, attention_mask, deterministic)

    # ----------------------------------------------------------------- NLVR2
    def nlvr_logits(self, image_embeds0, image_embeds1, input_ids, attention_mask, deterministic: bool = True):
        """Class logits [B, num_classes] (NLVR2: false, true) of a statement about two images: the
        image-grounded encoder's first token over both images' tokens."""
        hidden = self.encode_grounded((image_embeds0, image_embeds1), input_ids, attention_mask, deterministic)
        return self.cls_head_1(jax.nn.relu(self.cls_head_0(hidden[:, 0]))).astype(jnp.float32)

    # ----------------------------------------------------------------- full forward
    def __call__(self, pixel_values, input_ids, attention_mask, decoder_input_ids=None, decoder_attention_mask=None,
                 deterministic: bool = True):
        """Every head on one batch, returned as a dict of named outputs (what init and tests use)."""
        image_embeds = self.encode_image(pixel_values, deterministic)
        out = {"image_embeds": image_embeds}
        arch = self.config.architecture
        if arch == "caption":
            out["logits"], _ = self.decode(input_ids, attention_mask, image_embeds, deterministic=deterministic)
        elif arch == "nlvr":  # the same images twice at init; callers pass two sets to nlvr_logits
            out["nlvr_logits"] = self.nlvr_logits(image_embeds, image_embeds, input_ids, attention_mask, deterministic)
        elif arch in ("retrieval", "pretrain"):
            out["itm_logits"] = self.itm_logits(image_embeds, input_ids, attention_mask, deterministic)
            image_feat = self.image_features(image_embeds)
            text_feat = self.text_features(input_ids, attention_mask)
            out["itc_similarity"] = image_feat @ text_feat.T
            if arch == "pretrain":
                out["logits"], _ = self.decode(input_ids, attention_mask, image_embeds, deterministic=deterministic)
        else:
            question = self.encode_question(image_embeds, input_ids, attention_mask, deterministic)
            out["question_states"] = question
            if decoder_input_ids is None:
                decoder_input_ids = input_ids[:, :1]
                decoder_attention_mask = jnp.ones_like(decoder_input_ids)
            out["logits"], _ = self.decode(decoder_input_ids, decoder_attention_mask, question, attention_mask,
                                           deterministic=deterministic)
        return out


def init_params(model: Blip, rng, batch: int = 1):
    """Initialise every parameter (shapes from the config); use under jax.eval_shape for shapes only."""
    cfg = model.config
    size = cfg.vision.image_size
    pixels = jnp.zeros((batch, size, size, 3), jnp.float32)
    ids = jnp.zeros((batch, 4), jnp.int32)
    return model.init(rng, pixels, ids, jnp.ones_like(ids))["params"]


def param_shapes(config: BlipConfig):
    """The abstract parameter tree (ShapeDtypeStructs, logical-axis metadata removed)."""
    shapes = jax.eval_shape(lambda: init_params(Blip(config), jax.random.PRNGKey(0)))
    return nn.unbox(shapes)
