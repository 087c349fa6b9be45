"""BLIP-2 and InstructBLIP: a frozen ViT, `ln_vision`, the Q-Former over learned queries, and either a
frozen LLM behind `language_projection` (generation) or the stage-1 ITC/ITM heads (retrieval).

`Blip2Config.architecture` and `instruct` mirror the transformers classes:
  generation                Blip2ForConditionalGeneration (OPT, Flan-T5 language models)
  generation, instruct      InstructBlipForConditionalGeneration (Flan-T5, Vicuna/LLaMA): the
                            instruction also enters the Q-Former, after the queries
  retrieval                 Blip2ForImageTextRetrieval: vision_projection, text_projection, itm_head

Parameter tree (HF key prefixes in brackets):
  vision/...                      the ViT without a final norm     [vision_model.*]
  ln_vision/{scale, bias}         trainable in BLIP-2              [vision_model.post_layernorm]
  query_tokens [1, Q, D]                                           [query_tokens]
  qformer/...                     blip_jax.models.qformer          [qformer.*]
  qformer_word, qformer_position  text embeddings of the Q-Former  [embeddings.* | qformer.embeddings.*]
  language_projection             [D, D_llm]                       [language_projection]
  language_model/...              blip_jax.models.llm              [language_model.*]
  vision_projection, text_projection, itm_head                    (retrieval)
  itg_dense, itg_norm, itg_bias   stage 1's ITG head and ITC temperature `temp` (`stage1_heads`;
  temp                            not in transformers checkpoints)

The Q-Former computes in float32 whatever the frozen towers do (a half-precision Q-Former is a
known source of inf losses); `frozen_param_dtype` stores the ViT and the LLM in bfloat16.
Methods are called with `model.apply(variables, ..., method=Blip2.<name>)`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from blip_jax.models import layers, llm
from blip_jax.models.blip import l2_normalize
from blip_jax.models.config import DTYPES, REMAT_POLICIES, VisionConfig
from blip_jax.models.qformer import QFormer, QFormerConfig
from blip_jax.models.vit import VisionTransformer


@dataclasses.dataclass(frozen=True)
class Blip2Config:
    architecture: str = "generation"  # generation | retrieval
    instruct: bool = False  # InstructBLIP: instructions feed the Q-Former
    vision: VisionConfig = VisionConfig(hidden_size=1408, intermediate_size=6144, num_layers=39, num_heads=16,
                                        image_size=224, patch_size=14, layer_norm_eps=1e-6, final_norm=False)
    qformer: QFormerConfig = QFormerConfig()
    llm_family: str = "opt"  # a key of blip_jax.models.llm.FAMILIES ("" for retrieval)
    llm: Any = None  # that family's config
    num_query_tokens: int = 32
    embed_dim: int = 256  # ITC projection width (HF image_text_hidden_size)
    qformer_vocab_size: int = 30523  # BERT + [DEC]
    qformer_max_positions: int = 512
    qformer_pad_token_id: int = 0
    image_token_id: int | None = None  # the `<image>` placeholder of transformers v5 processors
    dtype: str = "float32"  # compute dtype of the frozen ViT and LLM
    param_dtype: str = "float32"  # storage of the trained parts (ln_vision, queries, Q-Former, heads)
    frozen_param_dtype: str = "float32"  # storage of the ViT and the LLM
    qformer_dtype: str = "float32"  # compute dtype of the Q-Former
    stage1_heads: bool = False  # retrieval: stage 1's ITG head and ITC temperature (LAVIS has them, HF not)
    # instruct: what the Q-Former reads beside the queries: "prompt" (InstructBLIP: the LLM's
    # instruction) or "question" (BLIP-2's VQA fine-tune: the bare question; the LLM its VQA prompt)
    qformer_input: str = "prompt"
    # ln_vision's eps; None: the ViT's (transformers' one field). LAVIS: 1e-5 beside its ViT's 1e-6
    ln_vision_eps: float | None = None
    scan_layers: bool = False
    remat_policy: str = "none"

    ARCHITECTURES = ("generation", "retrieval")

    def __post_init__(self):
        if self.architecture not in self.ARCHITECTURES:
            raise ValueError(f"unknown BLIP-2 architecture {self.architecture!r}; expected one of {self.ARCHITECTURES}")
        for field in ("dtype", "param_dtype", "frozen_param_dtype", "qformer_dtype"):
            if getattr(self, field) not in DTYPES:
                raise ValueError(f"{field} must be one of {sorted(DTYPES)}, got {getattr(self, field)!r}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy must be one of {sorted(REMAT_POLICIES)}, got {self.remat_policy!r}")
        if self.qformer.encoder_hidden_size != self.vision.hidden_size:
            raise ValueError(f"qformer encoder_hidden_size {self.qformer.encoder_hidden_size} != vision hidden_size "
                             f"{self.vision.hidden_size}")
        if self.architecture == "generation":
            if self.llm_family not in llm.FAMILIES:
                raise ValueError(f"unknown LLM family {self.llm_family!r}; expected one of {sorted(llm.FAMILIES)}")
            if not isinstance(self.llm, llm.FAMILIES[self.llm_family].config):
                raise ValueError(f"llm must be a {llm.FAMILIES[self.llm_family].config.__name__}, got {type(self.llm)}")
        if self.qformer_input not in ("prompt", "question"):
            raise ValueError(f"qformer_input must be 'prompt' or 'question', got {self.qformer_input!r}")
        if self.qformer_input == "question" and not self.instruct:
            raise ValueError("qformer_input='question' needs instruct=True (the Q-Former reading text)")
        if self.instruct and not self.qformer.use_qformer_text_input:
            raise ValueError("instruct models need the Q-Former's text FFN (use_qformer_text_input=True)")

    @property
    def family(self) -> "llm.Family | None":
        return llm.FAMILIES[self.llm_family] if self.architecture == "generation" else None

    @property
    def has_qformer_text(self) -> bool:
        """Whether the Q-Former reads text (word and position embeddings, its text FFN): retrieval,
        InstructBLIP, and a stage-2 model that keeps stage 1's text parts to be instruction-tuned
        later (`qformer.use_qformer_text_input` without `instruct`: carried, not used)."""
        return self.instruct or self.architecture == "retrieval" or self.qformer.use_qformer_text_input

    def replace(self, **changes) -> "Blip2Config":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["vision"], d["qformer"] = dataclasses.asdict(self.vision), dataclasses.asdict(self.qformer)
        d["llm"] = None if self.llm is None else dataclasses.asdict(self.llm)
        return {"model_type": "blip2", **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Blip2Config":
        d = {k: v for k, v in d.items() if k != "model_type"}
        family = llm.FAMILIES.get(d.get("llm_family"))
        return cls(**{**d, "vision": VisionConfig(**d["vision"]), "qformer": QFormerConfig(**d["qformer"]),
                      "llm": None if d.get("llm") is None else family.config(**d["llm"])})


class Blip2(nn.Module):
    config: Blip2Config

    def setup(self):
        cfg = self.config
        stack = dict(scan_layers=cfg.scan_layers, remat_policy=cfg.remat_policy)
        frozen = dict(dtype=DTYPES[cfg.dtype], param_dtype=DTYPES[cfg.frozen_param_dtype])
        trained = dict(dtype=DTYPES[cfg.qformer_dtype], param_dtype=DTYPES[cfg.param_dtype])
        q = cfg.qformer
        self.vision = VisionTransformer(cfg.vision, **frozen, **stack)
        eps = cfg.vision.layer_norm_eps if cfg.ln_vision_eps is None else cfg.ln_vision_eps
        self.ln_vision = layers.layer_norm(eps, **trained)
        self.query_tokens = self.param("query_tokens", layers.logical(layers.default_kernel_init, (None, None, "embed")),
                                       (1, cfg.num_query_tokens, q.hidden_size), trained["param_dtype"])
        self.qformer = QFormer(q, **trained, **stack)
        if cfg.has_qformer_text:
            self.qformer_word = layers.embed(cfg.qformer_vocab_size, q.hidden_size, ("vocab", "embed"), **trained,
                                             name="qformer_word")
            self.qformer_position = layers.embed(cfg.qformer_max_positions, q.hidden_size, (None, "embed"),
                                                 **trained, name="qformer_position")
        if cfg.architecture == "generation":
            self.language_projection = layers.Dense(cfg.family.embed_dim(cfg.llm), (None, "embed"), **trained)
            self.language_model = cfg.family.module(cfg.llm, **frozen, **stack)
        else:
            self.vision_projection = layers.Dense(cfg.embed_dim, ("embed", None), **trained)
            self.text_projection = layers.Dense(cfg.embed_dim, ("embed", None), **trained)
            self.itm_head = layers.Dense(2, ("embed", None), **trained)
            if cfg.stage1_heads:  # BERT's LM head: transform, then the word embeddings (tied) plus a bias
                self.itg_dense = layers.Dense(q.hidden_size, ("embed", None), **trained)
                self.itg_norm = layers.layer_norm(q.layer_norm_eps, **trained)
                self.itg_bias = self.param("itg_bias", layers.logical(nn.initializers.zeros, ("vocab",)),
                                           (cfg.qformer_vocab_size,), trained["param_dtype"])
                self.temp = self.param("temp", nn.initializers.constant(0.07), (), jnp.float32)  # ITC temperature

    # ----------------------------------------------------------------- pieces
    def encode_image(self, pixel_values, deterministic: bool = True):
        """[B, H, W, 3] -> image features [B, 1 + patches, D_vision] after ln_vision, in float32."""
        tokens = self.vision(pixel_values, deterministic=deterministic)[0]
        return self.ln_vision(tokens.astype(jnp.float32)).astype(DTYPES[self.config.qformer_dtype])

    def _text_embeds(self, ids):
        positions = jnp.arange(ids.shape[1])[None]
        return self.qformer_word(ids) + self.qformer_position(positions)

    def query_outputs(self, image_embeds, text_ids=None, text_mask=None, deterministic: bool = True,
                      causal_text: bool = False):
        """Q-Former over the learned queries (followed by `text_ids` when given: InstructBLIP's
        instruction, or ITM/ITG text) -> hidden states [B, Q (+T), D]."""
        # several text rows may share one image row (`layers.attend` groups them), so the text decides
        batch = image_embeds.shape[0] if text_ids is None else text_ids.shape[0]
        queries = jnp.broadcast_to(self.query_tokens, (batch,) + self.query_tokens.shape[1:])
        text = None if text_ids is None else self._text_embeds(text_ids)
        hidden, _ = self.qformer(queries, image_embeds, text_embeds=text, text_mask=text_mask,
                                 deterministic=deterministic, causal_text=causal_text)
        return hidden

    def language_prefix(self, image_embeds, instruction_ids=None, instruction_mask=None, deterministic: bool = True):
        """The soft prompt: projected query outputs [B, Q, D_llm embeddings], in the LLM's dtype."""
        if not self.config.instruct:
            instruction_ids = instruction_mask = None
        hidden = self.query_outputs(image_embeds, instruction_ids, instruction_mask, deterministic)
        hidden = hidden[:, : self.config.num_query_tokens]
        return self.language_projection(hidden).astype(DTYPES[self.config.dtype])

    def language_model_logits(self, prefix, input_ids, attention_mask, decoder_input_ids=None,
                              decoder_attention_mask=None, deterministic: bool = True, logits_at: slice | None = None):
        """LLM logits (float32) with the soft prompt before `input_ids` ([B, Q + T, V] for decoder
        LLMs, [B, T_dec, V] for encoder-decoder ones; only the positions `logits_at` when given);
        `attention_mask` [B, T] covers the text only."""
        full_mask = jnp.concatenate([jnp.ones(prefix.shape[:2], jnp.int32), jnp.asarray(attention_mask, jnp.int32)], 1)
        if self.config.family.encoder_decoder:
            logits, _ = self.language_model(input_ids, full_mask, decoder_input_ids, decoder_attention_mask,
                                            inputs_embeds=prefix, deterministic=deterministic, logits_at=logits_at)
        else:
            logits, _ = self.language_model(input_ids, full_mask, inputs_embeds=prefix, deterministic=deterministic,
                                            logits_at=logits_at)
        return logits

    def itm_logits(self, image_embeds, input_ids, attention_mask, deterministic: bool = True):
        """ITM: queries + text in one bidirectional pass; the 2-way head averaged over the queries."""
        hidden = self.query_outputs(image_embeds, input_ids, attention_mask, deterministic)
        return self.itm_head(hidden[:, : self.config.num_query_tokens]).astype(jnp.float32).mean(axis=1)

    def itc_temperature(self):
        return self.temp

    def itg_logits(self, image_embeds, input_ids, attention_mask, deterministic: bool = True):
        """ITG: text after the queries under the multimodal-causal mask -> next-token logits [B, T, V]
        (float32) at the text positions; the caller puts [DEC] first and shifts the labels."""
        hidden = self.query_outputs(image_embeds, input_ids, attention_mask, deterministic, causal_text=True)
        h = self.itg_norm(layers.gelu(self.itg_dense(hidden[:, self.config.num_query_tokens:])))
        return (self.qformer_word.attend(h) + self.itg_bias).astype(jnp.float32)

    def image_features(self, image_embeds, deterministic: bool = True):
        """ITC image side: normalised projections of every query output [B, Q, embed_dim]."""
        return l2_normalize(self.vision_projection(self.query_outputs(image_embeds, deterministic=deterministic)))

    def text_features(self, input_ids, attention_mask, deterministic: bool = True):
        """ITC text side: the Q-Former without queries; normalised projection of [CLS] [B, embed_dim]."""
        empty = jnp.zeros((input_ids.shape[0], 0, self.config.qformer.hidden_size), DTYPES[self.config.qformer_dtype])
        hidden, _ = self.qformer(empty, None, text_embeds=self._text_embeds(input_ids), text_mask=attention_mask,
                                 deterministic=deterministic)
        return l2_normalize(self.text_projection(hidden[:, 0]))

    def __call__(self, pixel_values, input_ids, attention_mask, decoder_input_ids=None, instruction_ids=None,
                 instruction_mask=None, deterministic: bool = True):
        """Every parameter's forward pass (used by init): LLM logits, or (ITM logits, image
        features, text features) for retrieval."""
        image_embeds = self.encode_image(pixel_values, deterministic)
        if self.config.architecture == "retrieval":
            out = (self.itm_logits(image_embeds, input_ids, attention_mask), self.image_features(image_embeds),
                   self.text_features(input_ids, attention_mask))
            if self.config.stage1_heads:
                out += (self.itg_logits(image_embeds, input_ids, attention_mask), self.temp)
            return out
        prefix = self.language_prefix(image_embeds, instruction_ids, instruction_mask, deterministic)
        if self.is_initializing() and self.config.has_qformer_text and not self.config.instruct:
            self.query_outputs(image_embeds, input_ids, attention_mask)  # create the carried text parts
        return self.language_model_logits(prefix, input_ids, attention_mask, decoder_input_ids,
                                          deterministic=deterministic)


def _init_inputs(config: Blip2Config):
    size = config.vision.image_size
    ids = jnp.ones((1, 2), jnp.int32)
    kwargs = {}
    if config.architecture == "generation" and config.family.encoder_decoder:
        kwargs["decoder_input_ids"] = ids
    if config.instruct:
        kwargs.update(instruction_ids=ids, instruction_mask=jnp.ones_like(ids))
    return (jnp.zeros((1, size, size, 3)), ids, jnp.ones_like(ids)), kwargs


def param_shapes(config: Blip2Config, boxed: bool = False):
    """The parameter tree as ShapeDtypeStructs (no allocation); `boxed` keeps the logical axis names."""
    args, kwargs = _init_inputs(config)
    shapes = jax.eval_shape(lambda: Blip2(config).init(jax.random.PRNGKey(0), *args, **kwargs))["params"]
    return shapes if boxed else nn.unbox(shapes)


def init_params(config: Blip2Config, rng):
    args, kwargs = _init_inputs(config)
    return nn.unbox(Blip2(config).init(rng, *args, **kwargs)["params"])
