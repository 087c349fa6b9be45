"""Convert a transformers BLIP / BLIP-2 / InstructBLIP model directory into a blip-jax model directory.

Every parameter the blip-jax model expects is looked up in the source, reshaped to the Flax layout
and checked against the expected shape; missing keys, unexpected keys and shape mismatches are
gathered and reported together in one error, and nothing is written then.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import jax
import numpy as np
from flax import traverse_util

from blip_jax import atomic, checkpoint
from blip_jax.convert import blip2_keys, blip_keys
from blip_jax.convert.blip2_keys import blip2_config_from_hf
from blip_jax.convert.hf_config import blip_config_from_hf, read_hf_config
from blip_jax.models.weights import expected_params, map_weights
from blip_jax.convert.reader import CheckpointReader
from blip_jax.models.blip import param_shapes
from blip_jax.models.layout import stack_layers
from blip_jax.text import QFORMER_TOKENIZER

# Files a model directory needs beside the weights: tokenizer and image preprocessing.
SIDE_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json",
              "added_tokens.json", "preprocessor_config.json", "processor_config.json", "generation_config.json")


def convert(src: str | Path, dst: str | Path, *, scan_layers: bool = False, param_dtype: str = "float32",
            frozen_dtype: str | None = None, overwrite: bool = False, progress: bool = True) -> dict:
    """Convert `src` (a transformers model directory) into `dst`. Returns a report dict.

    `param_dtype` stores every parameter; for BLIP-2 / InstructBLIP `frozen_dtype` (default:
    `param_dtype`) stores the frozen ViT and LLM instead, e.g. bfloat16 beside a float32 Q-Former."""
    src, dst = Path(src), Path(dst)
    start = time.time()
    hf = read_hf_config(src)
    reader = CheckpointReader(src)
    what = f"{src} does not match the model its config.json describes"
    if any(name in blip2_keys.ARCHITECTURES for name in hf.get("architectures") or []):
        config = blip2_config_from_hf(hf, scan_layers=scan_layers, param_dtype=param_dtype,
                                      frozen_param_dtype=frozen_dtype or param_dtype)
        params, ignored = blip2_keys.load_params(reader, config, progress=progress, what=what)
    else:
        if frozen_dtype not in (None, param_dtype):
            raise ValueError("frozen_dtype applies to BLIP-2 / InstructBLIP models; BLIP stores every parameter "
                             "in param_dtype")
        config = blip_config_from_hf(hf, scan_layers=scan_layers, param_dtype=param_dtype)
        flat, ignored = map_weights(reader, expected_params(param_shapes(config.replace(scan_layers=False))),
                                    blip_keys.hf_key, what=what, ignore=blip_keys.IGNORED, progress=progress)
        params = traverse_util.unflatten_dict(flat, sep="/")
        del flat
        if scan_layers:
            params = stack_layers(params)

    leaves = jax.tree.leaves(params)
    tensors, parameters = len(leaves), int(sum(np.size(x) for x in leaves))
    del leaves
    report = {
        "source": str(src.absolute()),
        "model_type": config.to_dict()["model_type"],
        "architecture": config.architecture,
        "hf_architectures": hf.get("architectures"),
        "tensors": tensors,
        "parameters": parameters,
        "ignored_keys": ignored,
        "scan_layers": scan_layers,
        "param_dtype": param_dtype,
        "frozen_dtype": frozen_dtype or param_dtype,
    }
    copied = []
    with atomic.directory(dst, overwrite=overwrite) as tmp:
        checkpoint.save_params(tmp, params, progress=progress)
        checkpoint.write_config(tmp, config)
        for name in SIDE_FILES:
            if (src / name).exists():
                shutil.copy2(src / name, tmp / name)
                copied.append(name)
        if (src / QFORMER_TOKENIZER).is_dir():  # InstructBLIP's second (BERT) tokenizer
            shutil.copytree(src / QFORMER_TOKENIZER, tmp / QFORMER_TOKENIZER)
            copied.append(QFORMER_TOKENIZER + "/")
        shutil.copy2(src / "config.json", tmp / "hf_config.json")
        report["files"] = copied
        report["seconds"] = round(time.time() - start, 2)
        (tmp / "conversion.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
