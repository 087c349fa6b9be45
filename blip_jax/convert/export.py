"""`blip-jax export SRC OUT --to transformers`: a blip-jax BLIP model as a transformers directory.

The weight map of `blip_keys` is run backwards: every blip-jax parameter goes to the transformers
tensor it came from (or would come from), in the shape transformers' class gives it; the config is
the one the model was converted from (`hf_config.json`) or, for models converted from LAVIS or
trained here, one written from the blip-jax config. Tokenizer, image processor and generation files
travel with it. A model converted from transformers exports back to the same tensors, bit for bit.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from flax import traverse_util

from blip_jax import atomic, checkpoint
from blip_jax.convert import blip_keys
from blip_jax.convert.converter import SIDE_FILES
from blip_jax.models.config import BlipConfig
from blip_jax.models.weights import to_torch

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


def export_transformers(src: str | Path, out: str | Path, *, overwrite: bool = False) -> dict:
    """Write the blip-jax model `src` as a transformers model directory `out`; returns a report."""
    import torch
    import transformers

    src = checkpoint.model_dir(src)
    config = checkpoint.read_config(src)
    if not isinstance(config, BlipConfig):
        raise ValueError(f"{src} is a BLIP-2 / InstructBLIP model: export to transformers serves BLIP models so far")
    if config.architecture not in TRANSFORMERS_CLASSES:
        raise ValueError(f"{src} is a BLIP {config.architecture} model, which transformers has no class for; "
                         f"export serves: {', '.join(TRANSFORMERS_CLASSES)}")
    saved = src / "hf_config.json"
    hf = json.loads(saved.read_text()) if saved.is_file() else transformers_config(config)
    _, params = checkpoint.load(src, scan_layers=False)
    flat = traverse_util.flatten_dict(params, sep="/")
    hf_config = transformers.AutoConfig.for_model(**hf)
    model = getattr(transformers, hf["architectures"][0])(hf_config)
    state = model.state_dict()
    written = set()
    for path, value in flat.items():
        key, kind = blip_keys.hf_key(path)
        if key not in state:
            raise ValueError(f"{src}: {path} has no place in transformers' {hf['architectures'][0]} (as {key})")
        tensor = to_torch(np.asarray(value, np.float32), kind, tuple(state[key].shape))
        state[key] = torch.from_numpy(tensor).to(state[key].dtype)
        written.add(key)
    model.load_state_dict(state)
    model.tie_weights()
    left = sorted(k for k in state if k not in written and not blip_keys.IGNORED.search(k))
    if left:
        raise ValueError(f"{src}: transformers' {hf['architectures'][0]} has tensors this model does not fill: "
                         f"{left[:5]}")
    with atomic.directory(out, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        (tmp / "config.json").write_text(json.dumps({**json.loads((tmp / "config.json").read_text()), **{
            k: hf[k] for k in ("architectures",)}}, indent=2) + "\n")
        copied = []
        for name in SIDE_FILES:  # tokenizer, image processor, generation settings
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
                copied.append(name)
    return {"source": str(src), "out": str(out), "class": hf["architectures"][0], "tensors": len(written),
            "files": copied}
