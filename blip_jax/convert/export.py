"""`blip-jax export SRC OUT --to transformers`: a blip-jax model as a transformers directory.

The weight maps (`blip_keys`, `blip2_keys` and the LLM families') run backwards: every blip-jax
parameter goes to the transformers tensor it came from (or would come from), in the shape and
storage dtype transformers' class gives it; the config is the one the model was converted from
(`hf_config.json`) or, for models converted from LAVIS or trained here, one written from the
blip-jax config. The transformers model is built on the meta device and takes the exported tensors
as they are, so exporting holds one copy of the weights. Tokenizer(s), image processor and
generation files travel with it. A model converted from transformers exports back to the same
tensors, bit for bit.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
from flax import traverse_util

from blip_jax import atomic, checkpoint
from blip_jax.convert import blip2_keys, blip_keys
from blip_jax.convert.converter import SIDE_FILES
from blip_jax.models.blip2 import Blip2Config
from blip_jax.models.config import BlipConfig
from blip_jax.models.weights import to_torch
from blip_jax.text import QFORMER_TOKENIZER

# blip-jax BLIP architecture -> transformers class
TRANSFORMERS_CLASSES = {"caption": "BlipForConditionalGeneration", "retrieval": "BlipForImageTextRetrieval",
                        "vqa": "BlipForQuestionAnswering"}


def transformers_config(config: BlipConfig) -> dict:
    """A transformers BLIP config.json for `config`."""
    v, t = config.vision, config.text
    return {
        "architectures": [TRANSFORMERS_CLASSES[config.architecture]], "model_type": "blip",
        "image_text_hidden_size": config.embed_dim, "projection_dim": config.embed_dim,
        "vision_config": {"hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
                          "num_hidden_layers": v.num_layers, "num_attention_heads": v.num_heads,
                          "image_size": v.image_size, "patch_size": v.patch_size, "layer_norm_eps": v.layer_norm_eps,
                          "hidden_act": "gelu"},
        "text_config": {"vocab_size": t.vocab_size, "hidden_size": t.hidden_size, "encoder_hidden_size": v.hidden_size,
                        "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_layers,
                        "num_attention_heads": t.num_heads, "max_position_embeddings": t.max_position_embeddings,
                        "layer_norm_eps": t.layer_norm_eps, "bos_token_id": t.bos_token_id,
                        "pad_token_id": t.pad_token_id, "sep_token_id": t.sep_token_id, "is_decoder": True,
                        "hidden_act": "gelu"},
    }


def _plan(src: Path, config, use_saved: bool) -> tuple[dict, callable, re.Pattern | None, list[str]]:
    """(transformers config dict, blip-jax path -> (key, kind), paths to drop, what is approximated)."""
    saved = src / "hf_config.json"
    saved = json.loads(saved.read_text()) if use_saved and saved.is_file() else None
    if isinstance(config, Blip2Config):
        approximated = []
        if config.ln_vision_eps is not None and config.ln_vision_eps != config.vision.layer_norm_eps:
            approximated.append(f"ln_vision eps {config.ln_vision_eps:g} becomes the ViT's "
                                f"{config.vision.layer_norm_eps:g} (transformers has one vision eps)")
        return (saved or blip2_keys.blip2_transformers_config(config), lambda p: blip2_keys.hf_key(p, config),
                blip2_keys.STAGE1_ONLY, approximated)
    if config.architecture not in TRANSFORMERS_CLASSES:
        raise ValueError(f"{src} is a BLIP {config.architecture} model, which transformers has no class for; "
                         f"export serves: {', '.join(TRANSFORMERS_CLASSES)}")
    return saved or transformers_config(config), blip_keys.hf_key, None, []


def _torch(array: np.ndarray):
    """A numpy array (bfloat16 included) as a torch tensor of the same dtype and bits."""
    import torch

    if not array.flags.writeable:  # torch tensors are writable; a loaded checkpoint's arrays are not
        array = array.copy()
    if array.dtype.name == "bfloat16":
        return torch.from_numpy(array.view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(array)


IMAGE_TOKEN = "<image>"


def _add_image_token(src: Path, config: Blip2Config, flat: dict):
    """transformers' BLIP-2 / InstructBLIP put the query outputs where `<image>` stands in the prompt;
    a model converted from LAVIS (or trained from one) has no such token. It is added to the LLM's
    tokenizer; a vocabulary without a spare row grows by one (the mean row, never generated: the
    exported generation config suppresses it). Returns (config, tokenizer, image token id)."""
    import dataclasses

    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(src))
    tokenizer.add_tokens([transformers.AddedToken(IMAGE_TOKEN, normalized=False, special=True)],
                         special_tokens=True)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    vocab = max(config.llm.vocab_size, image_id + 1)
    if vocab > config.llm.vocab_size:
        for path, value in list(flat.items()):
            if path.startswith("language_model/"):
                value = np.asarray(value)
                for axis, size in enumerate(value.shape):
                    if size == config.llm.vocab_size:  # an embedding [V, D] or a head [D, V]
                        mean = value.astype(np.float32).mean(axis=axis, keepdims=True).astype(value.dtype)
                        flat[path] = np.concatenate([value, mean], axis=axis)
                        break
    llm = dataclasses.replace(config.llm, vocab_size=vocab)
    return config.replace(llm=llm, image_token_id=image_id), tokenizer, image_id


def _processor(src: Path, config: Blip2Config, tokenizer, out: Path):
    """The transformers processor (image processor, LLM tokenizer with `<image>`, and for
    InstructBLIP the Q-Former tokenizer) of a model exported with an added image token."""
    import transformers

    images = transformers.BlipImageProcessor.from_pretrained(str(src))
    if config.instruct:
        qformer = transformers.AutoTokenizer.from_pretrained(str(src / QFORMER_TOKENIZER))
        processor = transformers.InstructBlipProcessor(images, tokenizer, qformer,
                                                       num_query_tokens=config.num_query_tokens)
    else:
        processor = transformers.Blip2Processor(images, tokenizer, num_query_tokens=config.num_query_tokens)
    processor.save_pretrained(str(out))
    path = out / "generation_config.json"
    generation = json.loads(path.read_text()) if path.is_file() else {}
    suppressed = sorted(set(generation.get("suppress_tokens") or []) | {config.image_token_id})
    path.write_text(json.dumps({**generation, "suppress_tokens": suppressed}, indent=2) + "\n")


def _transformers_tensors(src: Path, config, flat: dict, *, use_saved: bool = True):
    """(transformers config dict, approximations, its model on the meta device, {key: tensor} of
    every blip-jax parameter under its transformers name and shape, dropped paths). Consumes `flat`."""
    import torch
    import transformers

    hf, hf_key, drop, approximated = _plan(src, config, use_saved=use_saved)
    name = hf["architectures"][0]
    with torch.device("meta"):  # shapes and names only: the tensors come from the blip-jax model
        model = getattr(transformers, name)(transformers.AutoConfig.for_model(**hf))
    expected = model.state_dict()
    dropped = sorted(p for p in flat if drop is not None and drop.search(p))
    tensors = {}
    for path in [p for p in flat if p not in dropped]:
        key, kind = hf_key(path)
        if key not in expected:
            raise ValueError(f"{src}: {path} has no place in transformers' {name} (as {key})")
        tensors[key] = _torch(to_torch(np.asarray(flat.pop(path)), kind, tuple(expected[key].shape)))
    return hf, approximated, model, tensors, dropped


def export_transformers(src: str | Path, out: str | Path, *, overwrite: bool = False) -> dict:
    """Write the blip-jax model `src` as a transformers model directory `out`; returns a report."""
    import torch
    import transformers

    src = checkpoint.model_dir(src)
    config = checkpoint.read_config(src)
    _, params = checkpoint.load(src, scan_layers=False)
    flat = traverse_util.flatten_dict(params, sep="/")
    tokenizer = None
    if isinstance(config, Blip2Config) and config.architecture == "generation" and config.image_token_id is None:
        config, tokenizer, _ = _add_image_token(src, config, flat)
    hf, approximated, model, tensors, dropped = _transformers_tensors(src, config, flat, use_saved=tokenizer is None)
    name = hf["architectures"][0]
    del params, flat
    model.load_state_dict(tensors, strict=False, assign=True)
    model.tie_weights()  # the tied copies (e.g. an LM head that is the word embeddings) point at what was written
    state = model.state_dict()
    left = sorted(k for k, v in state.items() if v.is_meta and not blip_keys.IGNORED.search(k))
    if left:
        raise ValueError(f"{src}: transformers' {name} has tensors this model does not fill: {left[:5]}")
    changed = [k for k, v in tensors.items() if not torch.equal(state[k], v)]
    if changed:  # e.g. transformers 5 ties T5's lm_head to `shared` whatever the config says
        raise ValueError(f"{src}: transformers {transformers.__version__}'s {name} ties {', '.join(changed[:3])} to "
                         "another tensor, and in this model they differ (a Flan-T5 with its own lm_head): this "
                         "transformers version cannot hold the model")
    with atomic.directory(out, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        (tmp / "config.json").write_text(json.dumps({**json.loads((tmp / "config.json").read_text()),
                                                     "architectures": [name]}, indent=2) + "\n")
        copied = []
        for file in SIDE_FILES:  # tokenizer, image processor, generation settings
            if (src / file).is_file():
                shutil.copy2(src / file, tmp / file)
                copied.append(file)
        if (src / QFORMER_TOKENIZER).is_dir():  # InstructBLIP's Q-Former tokenizer, where its processor looks
            shutil.copytree(src / QFORMER_TOKENIZER, tmp / QFORMER_TOKENIZER)
            copied.append(QFORMER_TOKENIZER + "/")
        if tokenizer is not None:
            _processor(src, config, tokenizer, tmp)
            copied.append("processor_config.json")
    report = {"source": str(src), "out": str(out), "class": name, "tensors": len(tensors), "files": copied}
    if dropped:
        report["dropped"] = dropped  # e.g. stage 1's ITG head: transformers' retrieval class has none
    if approximated:
        report["approximated"] = approximated
    if tokenizer is not None:
        report["image_token_added"] = {"token": IMAGE_TOKEN, "id": config.image_token_id,
                                       "llm_vocab_size": config.llm.vocab_size}
    return report


# blip-jax BLIP architecture -> the LAVIS class whose state dict `export_lavis` writes
LAVIS_CLASSES = {"caption": "blip_caption", "retrieval": "blip_retrieval", "vqa": "blip_vqa", "nlvr": "blip_nlvr"}
def _lavis_blip2_class(config: Blip2Config) -> str:
    """The LAVIS class a blip-jax BLIP-2 model is (stage 1: `blip2`)."""
    from blip_jax.convert import lavis

    if config.architecture == "retrieval":
        return "blip2"
    classes = {(family, arch in lavis.INSTRUCT_CLASSES): arch for arch, (_, _, family) in lavis.LLM_PARTS.items()}
    arch = classes.get((config.llm_family, config.instruct))
    if arch is None:
        kind = "InstructBLIP" if config.instruct else "BLIP-2"
        raise ValueError(f"LAVIS has no {kind} class with a {config.llm_family} language model; --to lavis writes "
                         f"{', '.join(['blip2', *sorted(lavis.LLM_PARTS)])}")
    return arch


def _lavis_blip2_state(src: Path, config: Blip2Config, flat: dict, trimmed: bool) -> tuple[str, dict]:
    """(LAVIS class, state dict) of a BLIP-2 / InstructBLIP model, under the names, layouts and
    tied copies LAVIS saves; `trimmed` leaves out the frozen ViT and LLM, as LAVIS's runner does."""
    import torch

    from blip_jax.convert import lavis

    arch = _lavis_blip2_class(config)
    llm_prefix, proj_prefix, _ = lavis.LLM_PARTS.get(arch, ("", "", ""))
    stage1 = {p: flat.pop(p) for p in [p for p in flat if blip2_keys.STAGE1_ONLY.search(p)]}
    _, _, _, tensors, _ = _transformers_tensors(src, config, flat, use_saved=False)
    for path, value in stage1.items():  # no transformers class holds them: LAVIS's shapes, from blip-jax's
        key, kind = blip2_keys.hf_key(path, config)
        value = np.asarray(value)
        tensors[key] = _torch(to_torch(value, kind, value.shape[::-1] if kind == "linear" else value.shape))
    state = {}
    for key, value in tensors.items():
        if key.startswith("language_model."):
            state[llm_prefix + key[len("language_model."):]] = value
        elif key.startswith("language_projection."):
            state[proj_prefix + key[len("language_projection."):]] = value
        else:
            state[lavis.rename(key, lavis.INSTRUCT_BLIP2_NAMES.to_lavis)] = value  # both Q-Former forms
    for key in [k for k in state if k.endswith(".attn.qkv.bias")]:  # EVA: q and v biases, no key bias
        q, k, v = state.pop(key).chunk(3)
        if torch.count_nonzero(k):
            raise ValueError(f"{src}: {key} has a non-zero key bias, which LAVIS's EVA ViT cannot hold")
        state[key.replace("qkv.bias", "q_bias")], state[key.replace("qkv.bias", "v_bias")] = q.clone(), v.clone()
    if "Qformer.cls.predictions.bias" in state:  # the ITG head's decoder is tied to the word embeddings
        state["Qformer.cls.predictions.decoder.weight"] = state["Qformer.bert.embeddings.word_embeddings.weight"]
        state["Qformer.cls.predictions.decoder.bias"] = state["Qformer.cls.predictions.bias"]
    for copy, original in LAVIS_LLM_TIED.get(arch, {}).items():  # tied copies the LLM's state dict lists
        if llm_prefix + original in state:
            state.setdefault(llm_prefix + copy, state[llm_prefix + original])
    if trimmed:  # LAVIS's runner drops the frozen ViT and LLM but keeps the LLM's tied copies (torch
        # lists a tied parameter once, under its first name, so the copy's key escapes the trim)
        kept = {llm_prefix + copy for copy in LAVIS_LLM_TIED.get(arch, {})}
        frozen = ("visual_encoder.", llm_prefix) if llm_prefix else ("visual_encoder.",)
        state = {k: v for k, v in state.items() if k in kept or not k.startswith(frozen)}
    # buffers, which the runner never trims
    state["Qformer.bert.embeddings.position_ids"] = torch.arange(config.qformer_max_positions).unsqueeze(0)
    if config.llm_family == "llama":  # transformers 4.33 (LAVIS's) saved RoPE's frequencies
        half = torch.arange(0, config.llm.head_dim, 2).float() / config.llm.head_dim
        for i in range(config.llm.num_layers):
            state[f"{llm_prefix}model.layers.{i}.self_attn.rotary_emb.inv_freq"] = 1.0 / config.llm.rope_theta ** half
    return arch, state


# LAVIS class -> {LLM state-dict key: the key whose tensor it is} for the copies torch saves twice
LAVIS_LLM_TIED = {
    "blip2_opt": {"lm_head.weight": "model.decoder.embed_tokens.weight"},
    **{arch: {"encoder.embed_tokens.weight": "shared.weight", "decoder.embed_tokens.weight": "shared.weight"}
       for arch in ("blip2_t5", "blip2_t5_instruct")},
}


def export_lavis(src: str | Path, out: str | Path, *, trimmed: bool = False, overwrite: bool = False) -> dict:
    """Write the blip-jax model `src` as a LAVIS `.pth` (`{"model": state_dict}`) that LAVIS's
    `load_checkpoint` / `load_from_pretrained` reads into the class of its architecture: the same
    names, layouts and dtypes LAVIS saves, tied copies (decoder heads, the pre-training decoder's
    shared layers, LLM embeddings) and buffers (`position_ids`, RoPE's `inv_freq`) included. BLIP:
    caption, retrieval, VQA and pre-training (with the momentum encoders and queues a model
    converted from a LAVIS pre-training file keeps); BLIP-2: stage 1 (`blip2`), `blip2_opt`,
    `blip2_t5`; InstructBLIP: `blip2_vicuna_instruct`, `blip2_t5_instruct`. `trimmed` (BLIP-2 /
    InstructBLIP) leaves out the frozen ViT and LLM as LAVIS's runner does. Other classes' momentum
    encoders and queues, and a BLIP retrieval model's ITC temperature, are not written (LAVIS loads
    with strict=False and builds them; blip-jax's BLIP retrieval models hold no temperature)."""
    import torch

    src, out = checkpoint.model_dir(src), Path(out)
    config = checkpoint.read_config(src)
    blip2 = isinstance(config, Blip2Config)
    if not blip2 and config.architecture not in {*LAVIS_CLASSES, "pretrain"}:
        raise ValueError(f"{src} is a BLIP {config.architecture} model; --to lavis writes BLIP "
                         f"{', '.join(LAVIS_CLASSES)}, BLIP-2 and InstructBLIP models so far")
    if trimmed and not blip2:
        raise ValueError("--trimmed applies to BLIP-2 / InstructBLIP models (LAVIS trims their frozen ViT and LLM)")
    if blip2:
        _lavis_blip2_class(config)  # refused before anything is read
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    _, params = checkpoint.load(src, scan_layers=False)
    flat = traverse_util.flatten_dict(params, sep="/")
    del params
    report = {"source": str(src), "out": str(out)}
    if blip2:
        lavis_class, state = _lavis_blip2_state(src, config, flat, trimmed)
        report["trimmed"] = trimmed
    elif config.architecture == "pretrain":
        lavis_class = "blip_pretrain"
        state, report["momentum_and_queues"] = _lavis_pretrain_state(src, config, flat)
    elif config.architecture == "nlvr":
        lavis_class, state = "blip_nlvr", _lavis_nlvr_state(config, flat)
    else:
        lavis_class, state = LAVIS_CLASSES[config.architecture], _lavis_blip_state(src, config, flat)
    atomic.write_file(out, lambda f: torch.save({"model": state}, f))
    return {**report, "lavis_class": lavis_class, "tensors": len(state)}


def _lavis_blip_state(src: Path, config: BlipConfig, flat: dict) -> dict:
    """A BLIP caption / retrieval / VQA model's LAVIS state dict: transformers' names but for the
    ViT's timm ones, plus the tied decoder head and position_ids LAVIS saves."""
    # LAVIS's BLIP names are transformers' but for the ViT's: the same map, then the timm names
    _, _, _, tensors, _ = _transformers_tensors(src, config, flat)
    from blip_jax.convert.lavis import VIT, rename

    return _with_text_buffers({rename(k, VIT.to_lavis): v for k, v in tensors.items()})


_TWIN_KEY = re.compile(r"crossattention\.(self|output\.dense)[01]\.")


def _lavis_nlvr_state(config: BlipConfig, flat: dict) -> dict:
    """BlipNLVR's state dict (transformers has no NLVR class): each tensor in the shape of its
    retrieval-model counterpart (a twin takes its single cross-attention's), the merge layers
    [D, 2D], the head's two layers; the ViT's timm names."""
    import dataclasses

    from blip_jax.convert.lavis import VIT, rename

    text = config.text
    shapes = _torch_shapes(config.replace(architecture="retrieval",
                                          text=dataclasses.replace(text, twin_cross_attention=False)))
    special = {"merge_layer.weight": (text.hidden_size, 2 * text.hidden_size), "cls_head.0.weight":
               (text.hidden_size, text.hidden_size), "cls_head.2.weight": (config.num_classes, text.hidden_size)}
    state = {}
    for path in list(flat):
        key, kind = blip_keys.hf_key(path)
        shape = next((v for k, v in special.items() if key.endswith(k)), None)
        if shape is None:
            single = _TWIN_KEY.sub(lambda m: f"crossattention.{m.group(1)}.", key)
            shape = shapes.get(single, tuple(np.shape(flat[path])) if kind == "plain" else None)
        if shape is None:
            raise ValueError(f"{path} ({key}) has no place in LAVIS's BlipNLVR")
        state[rename(key, VIT.to_lavis)] = _torch(to_torch(np.asarray(flat.pop(path)), kind, tuple(shape)))
    return _with_text_buffers(state)


def _with_text_buffers(state: dict) -> dict:
    """The tied decoder heads and the position_ids buffers of LAVIS's BERT text models."""
    import torch

    for key in [k for k in state if k.endswith("cls.predictions.bias")]:  # the tied decoder head
        head = key[: -len("bias")]
        word = key.replace("cls.predictions.bias", "bert.embeddings.word_embeddings.weight")
        state[head + "decoder.weight"], state[head + "decoder.bias"] = state[word], state[key]
    for key in [k for k in state if k.endswith("embeddings.position_embeddings.weight")]:
        state[key.replace("position_embeddings.weight", "position_ids")] = torch.arange(
            state[key].shape[0]).unsqueeze(0)
    return state


def _torch_shapes(config: BlipConfig) -> dict[str, tuple[int, ...]]:
    """transformers' BLIP tensor shapes for the model's modules: pre-training, which transformers
    has no class for, is its retrieval model's plus its captioning model's text decoder."""
    import torch
    import transformers

    shapes = {}
    for architecture in ("retrieval", "caption") if config.architecture == "pretrain" else (config.architecture,):
        hf = transformers_config(config.replace(architecture=architecture))
        with torch.device("meta"):
            model = getattr(transformers, hf["architectures"][0])(transformers.AutoConfig.for_model(**hf))
        shapes.update({k: tuple(v.shape) for k, v in model.state_dict().items()})
    return shapes


def _lavis_pretrain_state(src: Path, config: BlipConfig, flat: dict) -> tuple[dict, bool]:
    """(state dict, whether it has the momentum encoders and queues) of a BLIP pre-training model:
    the tied decoder written out under both names, as LAVIS saves it, and the train state kept
    beside the parameters (`train_extra/`, a LAVIS pre-training file's, trained on here or not)."""
    import torch

    from blip_jax.convert.lavis import MOMENTUM_PREFIXES, VIT, rename
    from blip_jax.models import tying
    from blip_jax.models.layout import unstack_layers

    shapes = _torch_shapes(config)

    def lavis_tensors(flat_params: dict, prefixes: dict | None = None) -> dict:
        out = {}
        for path in list(flat_params):
            key, kind = blip_keys.hf_key(path)
            value = np.asarray(flat_params.pop(path))
            name = rename(key, VIT.to_lavis)
            for momentum, online in (prefixes or {}).items():
                if name.startswith(online):
                    name = momentum + name[len(online):]
                    break
            out[name] = _torch(to_torch(value, kind, shapes.get(key, value.shape)))  # temp: no HF tensor
        return out

    full = tying.applied_form(config, traverse_util.unflatten_dict(flat, sep="/"))
    flat.clear()
    state = lavis_tensors(traverse_util.flatten_dict(full, sep="/"))
    extra_dir = src / checkpoint.TRAIN_EXTRA
    if extra_dir.is_dir():
        extra = checkpoint.restore_params(extra_dir)
        momentum = unstack_layers(extra["momentum"]) if config.scan_layers else extra["momentum"]
        state.update(lavis_tensors(traverse_util.flatten_dict(momentum, sep="/"), MOMENTUM_PREFIXES))
        state["image_queue"] = torch.from_numpy(np.array(extra["image_queue"], np.float32))
        state["text_queue"] = torch.from_numpy(np.array(extra["text_queue"], np.float32))
        state["queue_ptr"] = torch.tensor([int(extra["ptr"])], dtype=torch.long)
    return _with_text_buffers(state), extra_dir.is_dir()
