"""Convert a transformers BLIP model directory into a blip-jax model directory.

Every parameter the blip-jax model expects is looked up in the source, reshaped to the Flax layout
and checked against the expected shape; missing keys, unexpected keys and shape mismatches are
gathered and reported together in one error, and nothing is written then.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
from flax import traverse_util

from blip_jax import checkpoint
from blip_jax.convert import blip_keys
from blip_jax.convert.hf_config import blip_config_from_hf, read_hf_config
from blip_jax.convert.mapping import ConversionError, expected_params, map_weights
from blip_jax.convert.reader import CheckpointReader
from blip_jax.models.blip import param_shapes
from blip_jax.models.layout import stack_layers

# Files a model directory needs beside the weights: tokenizer and image preprocessing.
SIDE_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json",
              "added_tokens.json", "preprocessor_config.json", "processor_config.json", "generation_config.json")


def convert(src: str | Path, dst: str | Path, *, scan_layers: bool = False, param_dtype: str = "float32",
            overwrite: bool = False, progress: bool = True) -> dict:
    """Convert `src` (a transformers model directory) into `dst`. Returns a report dict."""
    src, dst = Path(src), Path(dst)
    start = time.time()
    hf = read_hf_config(src)
    config = blip_config_from_hf(hf, scan_layers=scan_layers, param_dtype=param_dtype)
    reader = CheckpointReader(src)
    flat, ignored = map_weights(
        reader, expected_params(param_shapes(config.replace(scan_layers=False))), blip_keys.hf_key,
        what=f"{src} does not match the {config.architecture} model its config.json describes",
        ignore=blip_keys.IGNORED, progress=progress)

    tensors, parameters = len(flat), int(sum(np.size(x) for x in flat.values()))
    params = traverse_util.unflatten_dict(flat, sep="/")
    del flat
    if scan_layers:
        params = stack_layers(params)
    report = {
        "source": str(src.absolute()),
        "architecture": config.architecture,
        "hf_architectures": hf.get("architectures"),
        "tensors": tensors,
        "parameters": parameters,
        "ignored_keys": ignored,
        "scan_layers": scan_layers,
        "param_dtype": param_dtype,
    }
    copied = []
    with checkpoint.atomic_directory(dst, overwrite=overwrite) as tmp:
        checkpoint.save_params(tmp, params)
        checkpoint.write_config(tmp, config)
        for name in SIDE_FILES:
            if (src / name).exists():
                shutil.copy2(src / name, tmp / name)
                copied.append(name)
        shutil.copy2(src / "config.json", tmp / "hf_config.json")
        report["files"] = copied
        report["seconds"] = round(time.time() - start, 2)
        (tmp / "conversion.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
