"""The authors' LAVIS `.pth` checkpoints (BLIP, BLIP-2 and InstructBLIP classes) read as blip-jax models.

    blip-jax convert model_base_caption_capfilt_large.pth DST --lavis blip_caption/large_coco --tokenizer BERT_DIR

A LAVIS checkpoint is `{"model": state_dict}` (or the bare state dict) with no config: every size is
read from the tensors (widths, depths, MLP widths, image size, patch, vocabulary, ITC width); head
counts, which tensors cannot show, come from the model type (64-wide heads, as every released BLIP)
unless `heads` says otherwise. LAVIS's own numerics are config facts: the timm ViT's layer norms
at eps 1e-6, [ENC] opening image-grounded text (ITM, VQA questions), [DEC] the decoder's first
token. The ViT's timm names are renamed to the transformers ones the BLIP weight map reads, so one
mapping (`blip_keys`) serves both sources. Momentum encoders and queues are left out (reported).
"""

from __future__ import annotations

import re
from pathlib import Path

from blip_jax.convert.reader import release
from blip_jax.models.config import BlipConfig, TextConfig, VisionConfig

# LAVIS arch (the part of MODEL_TYPE before "/") -> blip-jax BLIP architecture
BLIP_CLASSES = {"blip_caption": "caption", "blip_retrieval": "retrieval", "blip_vqa": "vqa",
                "blip_pretrain": "pretrain", "blip_feature_extractor": "retrieval", "blip_nlvr": "nlvr"}
# BLIP-2 classes read so far -> blip-jax BLIP-2 architecture (stage 1: the Q-Former with its heads)
BLIP2_CLASSES = {"blip2": "retrieval", "blip2_feature_extractor": "retrieval", "blip2_opt": "generation",
                 "blip2_t5": "generation", "blip2_vicuna_instruct": "generation", "blip2_t5_instruct": "generation"}
# InstructBLIP (LAVIS main): the instruction also enters the Q-Former, after the queries
INSTRUCT_CLASSES = {"blip2_vicuna_instruct", "blip2_t5_instruct"}
# LAVIS BLIP-2 class -> (its LLM's state-dict prefix, its projection's, blip-jax LLM family)
LLM_PARTS = {"blip2_opt": ("opt_model.", "opt_proj.", "opt"), "blip2_t5": ("t5_model.", "t5_proj.", "t5"),
             "blip2_vicuna_instruct": ("llm_model.", "llm_proj.", "llama"),
             "blip2_t5_instruct": ("t5_model.", "t5_proj.", "t5")}
# What a LAVIS class changes in its LLM's config: Blip2T5 / Blip2T5Instruct force T5's FFN to exact
# (erf) GELU
LLM_OVERRIDES = {"blip2_t5": {"activation": "gelu"}, "blip2_t5_instruct": {"activation": "gelu"}}
# ...and in its weights: they cast T5 to bfloat16 when they load it, so the LLM LAVIS ran (and the
# full .pth it saves) holds bfloat16 values; an LLM read from its own directory is rounded the same way
LLM_WEIGHT_DTYPES = {"blip2_t5": "bfloat16", "blip2_t5_instruct": "bfloat16"}
# ...and in its tokenizer: Blip2VicunaInstruct adds [PAD] (a new last row of the LLM's embeddings and
# lm_head) and makes </s> its bos, eos and unk, so every prompt starts with </s>
LLM_SPECIAL_TOKENS = {"blip2_vicuna_instruct": {"pad_token": "[PAD]", "bos_token": "</s>", "eos_token": "</s>",
                                                "unk_token": "</s>"}}
# InstructBLIP's generate() defaults in LAVIS (beam 5, max_length 256, repetition penalty 1.5), and how
# transformers 4.33 ran it: from inputs_embeds, after LLaMA's bos <s> (which max_length counts) or
# T5's decoder start (blip_jax.generation: inputs_embeds_start_id)
INSTRUCT_GENERATION = {
    "blip2_vicuna_instruct": {"num_beams": 5, "max_new_tokens": 255, "repetition_penalty": 1.5,
                              "inputs_embeds_start_id": 1},
    "blip2_t5_instruct": {"num_beams": 5, "max_new_tokens": 256, "repetition_penalty": 1.5,
                          "inputs_embeds_start_id": 0},
}
# InstructBLIP's tokenizers, the Q-Former's and the LLM's, cut long instructions from the left (LAVIS's
# init_tokenizer(truncation_side="left") and LLM tokenizers; the Q-Former's length, 128, is
# blip2_api.QFORMER_MAX_INSTRUCTION). BLIP-2's LLM tokenizers keep transformers' right.
INSTRUCTION_TRUNCATION_SIDE = "left"
# The LLM tensors with a row per token (input embeddings, untied output head)
LLM_VOCAB_MATRIX = re.compile(r"(^|\.)(embed_tokens|shared|lm_head)\.weight$")
LAVIS_LN_VISION_EPS = 1e-5  # LAVIS's ln_vision is torch's LayerNorm default, beside EVA's 1e-6 blocks
EVA_HEADS = 16  # EVA ViT-g (width 1408) and CLIP ViT-L (1024): 16 heads
LAVIS_VIT_EPS = 1e-6  # timm's ViT in LAVIS (transformers' BLIP config says 1e-5)
HEAD_WIDTH = 64  # every released BLIP: ViT-B 768/12, ViT-L 1024/16, BERT-base 768/12

class Names:
    """A LAVIS <-> transformers rename table, written once and read both ways. Each row pairs a
    LAVIS name with the transformers one; `{n}` / `{m}` stand for layer numbers, a name ending in
    "." is a prefix (anything may follow) and any other is a whole key. Rows are tried in order,
    the first match wins, in either direction."""

    def __init__(self, *rows: tuple[str, str]):
        self.rows = rows
        self.from_lavis = [_rule(lavis, hf) for lavis, hf in rows]
        self.to_lavis = [_rule(hf, lavis) for lavis, hf in rows]

    def __add__(self, other: "Names") -> "Names":
        return Names(*self.rows, *other.rows)


def _rule(source: str, target: str) -> tuple[re.Pattern, str]:
    pieces = re.split(r"\{(\w)\}", source)  # literal, name, literal, ...
    pattern = "".join(re.escape(x) if k % 2 == 0 else rf"(?P<{x}>\d+)" for k, x in enumerate(pieces))
    return re.compile("^" + pattern + ("" if source.endswith(".") else "$")), re.sub(r"\{(\w)\}", r"\\g<\1>", target)


def rename(key: str, rules: list[tuple[re.Pattern, str]]) -> str:
    """`key` under the first of `rules` (a `Names` direction) that matches it, else unchanged."""
    for pattern, replacement in rules:
        if pattern.search(key):
            return pattern.sub(replacement, key, count=1)
    return key


# timm ViT names (LAVIS) <-> transformers' BLIP vision names
VIT = Names(
    ("visual_encoder.cls_token", "vision_model.embeddings.class_embedding"),
    ("visual_encoder.pos_embed", "vision_model.embeddings.position_embedding"),
    ("visual_encoder.patch_embed.proj.", "vision_model.embeddings.patch_embedding."),
    ("visual_encoder.norm.", "vision_model.post_layernorm."),
    ("visual_encoder.blocks.{n}.norm{m}.", "vision_model.encoder.layers.{n}.layer_norm{m}."),
    ("visual_encoder.blocks.{n}.attn.qkv.", "vision_model.encoder.layers.{n}.self_attn.qkv."),
    ("visual_encoder.blocks.{n}.attn.proj.", "vision_model.encoder.layers.{n}.self_attn.projection."),
    ("visual_encoder.blocks.{n}.mlp.", "vision_model.encoder.layers.{n}.mlp."),
)
# What a LAVIS checkpoint holds that no blip-jax BLIP parameter is: momentum copies, queues, buffers.
MOMENTUM_AND_QUEUES = re.compile(r"(_m\.|_m$|^(image|text|idx)_queue$|^queue_ptr$)")


def parse_model_type(model_type: str) -> tuple[str, str]:
    """"blip_caption/large_coco" -> ("blip_caption", "caption"); other classes are refused by name."""
    arch = model_type.split("/")[0]
    known = {**BLIP_CLASSES, **BLIP2_CLASSES}
    if arch not in known:
        raise ValueError(f"--lavis {model_type!r}: unknown or not yet supported LAVIS class {arch!r}; supported: "
                         f"{', '.join(sorted(known))} (as arch/type, e.g. blip_caption/base_coco)")
    return arch, known[arch]


def load_state_dict(path: str | Path) -> dict:
    """The state dict of a LAVIS `.pth` (`{"model": state_dict}` or the bare state dict)."""
    from blip_jax.convert.reader import torch_load

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LAVIS checkpoint not found: {path}")
    obj = torch_load(path)
    state = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(hasattr(v, "shape") for v in state.values()):
        raise ValueError(f"{path} is not a LAVIS checkpoint: expected {{'model': state_dict}} or a state dict")
    return state


class RenamedTensors:
    """A LAVIS state dict seen under transformers' BLIP names (the mapping `map_weights` reads)."""

    def __init__(self, state: dict):
        self.state = state
        self.names = {self._rename(k): k for k in state}

    @staticmethod
    def _rename(key: str) -> str:
        return rename(key, VIT.from_lavis)

    def keys(self):
        return list(self.names)

    release = staticmethod(release)  # a tensor read and copied out: its pages of the mapped .pth can go

    def __contains__(self, key: str) -> bool:
        return key in self.names

    def __getitem__(self, key: str):
        return self.state[self.names[key]]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.state[self.names[key]].shape)


def _layers(state: dict, prefix: str) -> int:
    found = {int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(found) + 1 if found else 0


def _heads(width: int, given: int | None, what: str) -> int:
    heads = given or width // HEAD_WIDTH
    if not heads or width % heads:
        raise ValueError(f"{what}: width {width} does not split into heads; give --heads {what}=N")
    return heads


def blip_config(state: dict, architecture: str, tokenizer, heads: dict | None = None) -> BlipConfig:
    """The blip-jax config the tensors describe (module docstring)."""
    heads = heads or {}
    need = ["visual_encoder.cls_token", "visual_encoder.pos_embed", "visual_encoder.patch_embed.proj.weight",
            "visual_encoder.blocks.0.mlp.fc1.weight"]
    missing = [k for k in need if k not in state]
    if missing:
        raise ValueError(f"not a LAVIS BLIP checkpoint: no {', '.join(missing)}")
    width = state["visual_encoder.cls_token"].shape[-1]
    patch = state["visual_encoder.patch_embed.proj.weight"].shape[-1]
    grid = round((state["visual_encoder.pos_embed"].shape[1] - 1) ** 0.5)
    vision = VisionConfig(hidden_size=width, intermediate_size=state["visual_encoder.blocks.0.mlp.fc1.weight"].shape[0],
                          num_layers=_layers(state, "visual_encoder.blocks."),
                          num_heads=_heads(width, heads.get("vision"), "vision"), image_size=grid * patch,
                          patch_size=patch, layer_norm_eps=LAVIS_VIT_EPS)
    text = "text_encoder." if "text_encoder.embeddings.word_embeddings.weight" in state else "text_decoder.bert."
    if text + "embeddings.word_embeddings.weight" not in state:
        raise ValueError("not a LAVIS BLIP checkpoint: no text_encoder.* or text_decoder.bert.* embeddings")
    vocab, hidden = state[text + "embeddings.word_embeddings.weight"].shape
    if vocab != len(tokenizer):
        raise ValueError(f"the checkpoint's text vocabulary has {vocab} tokens, the tokenizer {len(tokenizer)} "
                         "(LAVIS's is bert-base-uncased plus [DEC] and [ENC]): give its --tokenizer")
    layers = _layers(state, text + "encoder.layer.")
    twin = {}
    if architecture == "nlvr":  # BlipNLVR: twin cross-attention, merge layers where the tensors have them
        if text + "encoder.layer.0.crossattention.self0.query.weight" not in state:
            raise ValueError("not a LAVIS BlipNLVR checkpoint: no crossattention.self0 / self1 (two-image) layers")
        merged = [n for n in range(layers) if f"{text}encoder.layer.{n}.crossattention.output.merge_layer.weight" in state]
        if merged != list(range(merged[0] if merged else layers, layers)):
            raise ValueError(f"BlipNLVR checkpoint: merge layers in text layers {merged}, not a run to the last layer")
        twin = dict(twin_cross_attention=True, merge_from_layer=merged[0] if merged else layers)
    text_config = TextConfig(
        **twin, vocab_size=vocab, hidden_size=hidden,
        intermediate_size=state[text + "encoder.layer.0.intermediate.dense.weight"].shape[0],
        num_layers=layers, num_heads=_heads(hidden, heads.get("text"), "text"),
        max_position_embeddings=state[text + "embeddings.position_embeddings.weight"].shape[0],
        encoder_hidden_size=width, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        sep_token_id=tokenizer.sep_token_id, enc_token_id=tokenizer.enc_token_id)
    embed_dim = state["vision_proj.weight"].shape[0] if "vision_proj.weight" in state else 256
    classes = state["cls_head.2.weight"].shape[0] if "cls_head.2.weight" in state else 2
    return BlipConfig(architecture=architecture, vision=vision, text=text_config, embed_dim=embed_dim,
                      num_classes=classes)


def parse_heads(text: str | None) -> dict:
    """"vision=16,text=12" -> {"vision": 16, "text": 12}."""
    out = {}
    for part in filter(None, (text or "").split(",")):
        name, _, value = part.partition("=")
        if name.strip() not in ("vision", "text") or not value.strip().isdigit():
            raise ValueError(f"--heads {text!r}: expected vision=N,text=N")
        out[name.strip()] = int(value)
    return out


# LAVIS's momentum twins -> the blip-jax parameter trees they mirror (blip_jax.train.objectives.blip)
MOMENTUM_PREFIXES = {"visual_encoder_m.": "visual_encoder.", "text_encoder_m.": "text_encoder.",
                     "vision_proj_m.": "vision_proj.", "text_proj_m.": "text_proj."}


def momentum_state(state: dict, config: BlipConfig) -> dict:
    """A LAVIS pre-training / retrieval checkpoint's momentum encoders and queues as the extra state
    of blip-jax's BLIP pre-training and retrieval stages ({"momentum", "image_queue", "text_queue",
    "idx_queue", "ptr", "updates"}); ValueError when the checkpoint has none."""
    import numpy as np
    from flax import traverse_util

    from blip_jax.convert import blip_keys
    from blip_jax.models.blip import param_shapes
    from blip_jax.models.weights import expected_params, map_weights
    from blip_jax.train.objectives.blip import MOMENTUM_KEYS

    if "image_queue" not in state or "visual_encoder_m.cls_token" not in state:
        raise ValueError("the checkpoint holds no momentum encoders and queues (a LAVIS pre-training or "
                         "retrieval checkpoint does)")
    twins = {}
    for key, value in state.items():
        for prefix, online in MOMENTUM_PREFIXES.items():
            if key.startswith(prefix):
                twins[online + key[len(prefix):]] = value
    shapes = param_shapes(config.replace(architecture="pretrain", scan_layers=False))
    expected = expected_params({k: shapes[k] for k in MOMENTUM_KEYS})
    flat, _ = map_weights(RenamedTensors(twins), expected, blip_keys.hf_key, what="the momentum encoders",
                          ignore=blip_keys.IGNORED)
    as_numpy = lambda t: np.asarray(t.detach().cpu().numpy() if hasattr(t, "detach") else t)  # noqa: E731
    size = state["image_queue"].shape[1]
    idx = as_numpy(state["idx_queue"]).reshape(-1) if "idx_queue" in state else np.full(size, -1)
    return {"momentum": traverse_util.unflatten_dict({k: np.asarray(v) for k, v in flat.items()}, sep="/"),
            "image_queue": as_numpy(state["image_queue"]).astype(np.float32),
            "text_queue": as_numpy(state["text_queue"]).astype(np.float32),
            "idx_queue": idx.astype(np.int32), "ptr": np.int32(int(as_numpy(state["queue_ptr"]).reshape(-1)[0])),
            "updates": np.int32(0)}


# ------------------------------------------------------------------------------------- BLIP-2
# LAVIS's EVA ViT and Q-Former names <-> transformers' BLIP-2 names (what blip2_keys reads); BLIP-2's
# ViT has no final norm, so post_layernorm is LAVIS's ln_vision
QFORMER = Names(
    ("ln_vision.", "vision_model.post_layernorm."),
    ("Qformer.bert.embeddings.LayerNorm.", "qformer.layernorm."),
    ("Qformer.bert.embeddings.word_embeddings.", "embeddings.word_embeddings."),
    ("Qformer.bert.embeddings.position_embeddings.", "embeddings.position_embeddings."),
    ("Qformer.bert.encoder.layer.{n}.attention.self.", "qformer.encoder.layer.{n}.attention.attention."),
    ("Qformer.bert.encoder.layer.{n}.crossattention.self.", "qformer.encoder.layer.{n}.crossattention.attention."),
    ("Qformer.bert.encoder.", "qformer.encoder."),
    ("Qformer.cls.predictions.transform.dense.", "itg_dense."),
    ("Qformer.cls.predictions.transform.LayerNorm.", "itg_norm."),
    ("Qformer.cls.predictions.bias", "itg_bias"),
    ("vision_proj.", "vision_projection."),
    ("text_proj.", "text_projection."),
)
# InstructBLIP's Q-Former holds its own embeddings, under transformers' InstructBLIP names
INSTRUCT_QFORMER = Names(
    ("Qformer.bert.embeddings.LayerNorm.", "qformer.embeddings.layernorm."),
    ("Qformer.bert.embeddings.word_embeddings.", "qformer.embeddings.word_embeddings."),
    ("Qformer.bert.embeddings.position_embeddings.", "qformer.embeddings.position_embeddings."),
)
BLIP2_NAMES = QFORMER + VIT  # QFORMER first: its ln_vision, not the timm ViT's norm
INSTRUCT_BLIP2_NAMES = INSTRUCT_QFORMER + BLIP2_NAMES


def with_vision(state: dict, vision: dict, path) -> dict:
    """A trimmed checkpoint (its frozen ViT left out, as LAVIS's runner saves) completed by the ViT's
    own file (e.g. `eva_vit_g.pth`: a bare state dict, or one under `visual_encoder.`)."""
    if any(k.startswith("visual_encoder.") for k in state):
        raise ValueError(f"--vision {path}: the checkpoint already holds a ViT (visual_encoder.*); give --vision "
                         "only for a trimmed file")
    prefixed = {k if k.startswith("visual_encoder.") else f"visual_encoder.{k}": v for k, v in vision.items()}
    if "visual_encoder.cls_token" not in prefixed:
        raise ValueError(f"--vision {path} is not a ViT state dict (no cls_token)")
    return {**state, **prefixed}


class Blip2Tensors(RenamedTensors):
    """A LAVIS BLIP-2 state dict under transformers' BLIP-2 names; EVA's q / v biases become the
    fused qkv bias transformers holds (the key bias is zero: EVA has none)."""

    def __init__(self, state: dict, llm_prefix: str = "", proj_prefix: str = "", llm_reader=None,
                 llm_rounding: str | None = None, instruct: bool = False, llm_vocab_size: int | None = None):
        import torch

        self.llm_prefix, self.proj_prefix, self.llm_reader = llm_prefix, proj_prefix, llm_reader
        self.llm_rounding, self.instruct, self.llm_vocab_size = llm_rounding, instruct, llm_vocab_size
        # the ITG head's output weights are the Q-Former's word embeddings (tied): stored once
        state = {k: v for k, v in state.items() if not k.startswith("Qformer.cls.predictions.decoder.")}
        for key in [k for k in state if k.endswith(".attn.q_bias")]:
            q, v = state.pop(key), state.pop(key.replace("q_bias", "v_bias"))
            state[key.replace("q_bias", "qkv.bias")] = torch.cat([q, torch.zeros_like(q), v])
        super().__init__(state)

        if llm_reader is not None:  # a trimmed file's LLM, from its own transformers directory
            self.names.update({f"language_model.{k}": None for k in llm_reader.keys()})

    def _rename(self, key: str) -> str:
        if self.llm_prefix and key.startswith(self.llm_prefix):
            return "language_model." + key[len(self.llm_prefix):]
        if self.proj_prefix and key.startswith(self.proj_prefix):
            return "language_projection." + key[len(self.proj_prefix):]
        return rename(key, (INSTRUCT_BLIP2_NAMES if self.instruct else BLIP2_NAMES).from_lavis)

    def _short_rows(self, name: str, shape) -> int:
        """Rows the LLM directory's embedding / output matrix lacks for the tokens LAVIS added."""
        if self.llm_vocab_size is None or not LLM_VOCAB_MATRIX.search(name) or len(shape) != 2:
            return 0
        return max(0, self.llm_vocab_size - shape[0])

    def __getitem__(self, key: str):
        import numpy as np

        source = self.names[key]
        if source is not None:
            return self.state[source]
        name = key[len("language_model."):]
        value = self.llm_reader[name]
        if self.llm_rounding:
            import ml_dtypes

            value = np.asarray(value)
            value = value.astype(getattr(ml_dtypes, self.llm_rounding)).astype(value.dtype)
        short = self._short_rows(name, value.shape)
        if short:  # LAVIS draws the new rows at random; the mean row is the neutral choice
            value = np.asarray(value)
            value = np.concatenate([value, np.repeat(value.mean(0, keepdims=True), short, 0)])
        return value

    def added_rows(self) -> dict[str, int]:
        """LLM tensor -> the rows appended to it for the tokens LAVIS added (reported)."""
        if self.llm_reader is None:
            return {}
        rows = {k: self._short_rows(k, tuple(self.llm_reader.shape(k))) for k in self.llm_reader.keys()}
        return {k: n for k, n in rows.items() if n}

    def shape(self, key: str) -> tuple[int, ...]:
        source = self.names[key]
        if source is not None:
            return tuple(self.state[source].shape)
        name = key[len("language_model."):]
        shape = tuple(self.llm_reader.shape(name))
        return (shape[0] + self._short_rows(name, shape),) + shape[1:]


def blip2_config(state: dict, architecture: str, heads: dict | None = None, llm_family: str = "", llm=None,
                 instruct: bool = False):
    """The blip-jax BLIP-2 config the tensors describe (EVA blocks at eps 1e-6, ln_vision at 1e-5,
    the Q-Former's sizes, queries and cross-attention frequency); `llm` the LLM's config (stage 2)."""
    from blip_jax.models.blip2 import Blip2Config
    from blip_jax.models.qformer import QFormerConfig

    heads = heads or {}
    for key in ("query_tokens", "visual_encoder.cls_token"):
        if key not in state:
            raise ValueError(f"not a LAVIS BLIP-2 checkpoint with its ViT: no {key} (for a trimmed file give --vision)")
    words = "Qformer.bert.embeddings.word_embeddings.weight"  # the Q-Former's text input
    if (architecture == "retrieval" or instruct) and words not in state:
        kind = "InstructBLIP" if instruct else "BLIP-2 stage-1"
        raise ValueError(f"not a LAVIS {kind} checkpoint: no {words} (its Q-Former reads no text)")
    width = state["visual_encoder.cls_token"].shape[-1]
    patch = state["visual_encoder.patch_embed.proj.weight"].shape[-1]
    grid = round((state["visual_encoder.pos_embed"].shape[1] - 1) ** 0.5)
    vision = VisionConfig(hidden_size=width, intermediate_size=state["visual_encoder.blocks.0.mlp.fc1.weight"].shape[0],
                          num_layers=_layers(state, "visual_encoder.blocks."), num_heads=heads.get("vision", EVA_HEADS),
                          image_size=grid * patch, patch_size=patch, layer_norm_eps=LAVIS_VIT_EPS, final_norm=False)
    # stage 2 (LAVIS 1.0.2) deletes the Q-Former's word and position embeddings and its text FFNs
    words = state.get("Qformer.bert.embeddings.word_embeddings.weight")
    vocab = words.shape[0] if words is not None else 30523
    hidden = state["query_tokens"].shape[-1]
    positions = state.get("Qformer.bert.embeddings.position_embeddings.weight")
    if positions is None:  # stage 2 keeps the buffer of the embeddings it deleted
        positions = state.get("Qformer.bert.embeddings.position_ids")
        positions = None if positions is None else positions.reshape(-1)
    layers = _layers(state, "Qformer.bert.encoder.layer.")
    crossing = sorted({int(m.group(1)) for k in state
                       if (m := re.match(r"Qformer\.bert\.encoder\.layer\.(\d+)\.crossattention\.", k))})
    frequency = crossing[1] - crossing[0] if len(crossing) > 1 else layers
    qformer = QFormerConfig(hidden_size=hidden, num_heads=_heads(hidden, heads.get("text"), "text"), num_layers=layers,
                            intermediate_size=state["Qformer.bert.encoder.layer.0.intermediate_query.dense.weight"].shape[0],
                            encoder_hidden_size=width, cross_attention_frequency=frequency,
                            use_qformer_text_input="Qformer.bert.encoder.layer.0.intermediate.dense.weight" in state)
    return Blip2Config(architecture=architecture, instruct=instruct, vision=vision, qformer=qformer,
                       llm_family=llm_family, llm=llm,
                       num_query_tokens=state["query_tokens"].shape[1],
                       embed_dim=state["vision_proj.weight"].shape[0] if "vision_proj.weight" in state else 256,
                       qformer_vocab_size=vocab, qformer_max_positions=positions.shape[0] if positions is not None else 512,
                       stage1_heads="Qformer.cls.predictions.bias" in state, ln_vision_eps=LAVIS_LN_VISION_EPS)


def llm_is_trimmed(state: dict, prefix: str) -> bool:
    """Whether a checkpoint lacks its LLM's layers (LAVIS's trimmed files keep only tied embeddings /
    lm_head of it)."""
    # weights only: LAVIS's trimmed Vicuna file keeps LLaMA's rotary inv_freq buffers
    return not any(k.startswith(prefix) and re.search(r"\.(layers|block)\.\d+\..*\.weight$", k) for k in state)


def generation_config(arch: str, llm_tokenizer) -> dict:
    """The decoding facts a LAVIS class fixes, as generation_config.json: Blip2OPT ends a text at
    "\\n" (its eos), not at </s>."""
    if arch == "blip2_opt":  # (LAVIS keeps the tied lm_head in trimmed files: not the LLM)
        newline = llm_tokenizer("\n", add_special_tokens=False)["input_ids"]
        if len(newline) != 1:
            raise ValueError(f"the OPT tokenizer encodes a newline as {newline}, not one token")
        return {"eos_token_id": newline[0], "pad_token_id": llm_tokenizer.pad_token_id,
                "bos_token_id": llm_tokenizer.bos_token_id}
    if arch in INSTRUCT_CLASSES:
        ids = {"eos_token_id": llm_tokenizer.eos_token_id, "pad_token_id": llm_tokenizer.pad_token_id,
               "bos_token_id": llm_tokenizer.bos_token_id}
        return {**INSTRUCT_GENERATION[arch], **{k: v for k, v in ids.items() if v is not None}}
    return {}


def lavis_llm_tokenizer(arch: str, llm_tokenizer):
    """The LLM tokenizer as the LAVIS class sets it up (Blip2VicunaInstruct's [PAD] and </s> bos,
    InstructBLIP's prompts cut from the left)."""
    if arch in INSTRUCT_CLASSES:
        llm_tokenizer.truncation_side = INSTRUCTION_TRUNCATION_SIDE
        llm_tokenizer.init_kwargs["truncation_side"] = INSTRUCTION_TRUNCATION_SIDE  # what save_pretrained writes
    special = LLM_SPECIAL_TOKENS.get(arch)
    if special:
        llm_tokenizer.add_special_tokens(special)
        llm_tokenizer.update_post_processor()  # transformers re-reads bos / eos for the template
    return llm_tokenizer
