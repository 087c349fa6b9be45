"""Convert a transformers BLIP model directory into a blip-jax model directory.

Every parameter the blip-jax model expects is looked up in the source, reshaped to the Flax layout
and checked against the expected shape; missing keys, unexpected keys and shape mismatches are
gathered and reported together in one error, and nothing is written then.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
from flax import traverse_util
from tqdm import tqdm

from blip_jax import checkpoint
from blip_jax.convert import blip_keys
from blip_jax.convert.hf_config import blip_config_from_hf, read_hf_config
from blip_jax.convert.reader import CheckpointReader
from blip_jax.models.blip import param_shapes
from blip_jax.models.layout import stack_layers

# Files a model directory needs beside the weights: tokenizer and image preprocessing.
SIDE_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json",
              "added_tokens.json", "preprocessor_config.json", "processor_config.json", "generation_config.json")


class ConversionError(ValueError):
    """The source checkpoint does not fit the model its config describes."""


def to_flax(tensor: np.ndarray, kind: str, shape: tuple[int, ...]) -> np.ndarray | None:
    """Reshape a PyTorch tensor to the Flax parameter `shape`, or None when it cannot fit."""
    if kind == "conv":  # [out, in, kh, kw] -> [kh, kw, in, out]
        out = tensor.transpose(2, 3, 1, 0)
        return out if out.shape == shape else None
    if kind == "linear":  # [out, in] -> [in..., out...], split anywhere the sizes allow
        if tensor.ndim != 2:
            return None
        fits = any(math.prod(shape[:k]) == tensor.shape[1] and math.prod(shape[k:]) == tensor.shape[0]
                   for k in range(1, len(shape)))
        return tensor.T.reshape(shape) if fits else None
    if tensor.ndim == len(shape):
        return tensor if tensor.shape == shape else None
    return tensor.reshape(shape) if tensor.size == math.prod(shape) and tensor.ndim < len(shape) + 2 else None


def convert(src: str | Path, dst: str | Path, *, scan_layers: bool = False, param_dtype: str = "float32",
            overwrite: bool = False, progress: bool = True) -> dict:
    """Convert `src` (a transformers model directory) into `dst`. Returns a report dict."""
    src, dst = Path(src), Path(dst)
    start = time.time()
    hf = read_hf_config(src)
    config = blip_config_from_hf(hf, scan_layers=scan_layers, param_dtype=param_dtype)
    reader = CheckpointReader(src)
    expected = traverse_util.flatten_dict(param_shapes(config.replace(scan_layers=False)), sep="/")

    missing, mismatched, consumed, flat = [], [], set(), {}
    for path, spec in tqdm(expected.items(), desc="convert", unit="tensor", disable=not progress):
        key, kind = blip_keys.hf_key(path)
        if key not in reader:
            missing.append(key)
            continue
        tensor = reader[key]
        consumed.add(key)
        value = to_flax(tensor, kind, tuple(spec.shape))
        if value is None:
            mismatched.append(f"{key}: checkpoint {tuple(tensor.shape)}, model expects {tuple(spec.shape)} ({path})")
            continue
        flat[path] = np.asarray(value, dtype=spec.dtype)
    leftover = [k for k in reader.keys() if k not in consumed]
    unexpected = [k for k in leftover if not blip_keys.IGNORED.search(k)]
    if missing or unexpected or mismatched:
        lines = [f"{src} does not match the {config.architecture} model its config.json describes:"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                             ("shape mismatches", mismatched)):
            if items:
                lines.append(f"  {title} ({len(items)}):")
                lines += [f"    {item}" for item in items]
        raise ConversionError("\n".join(lines))

    params = traverse_util.unflatten_dict(flat, sep="/")
    del flat
    if scan_layers:
        params = stack_layers(params)
    report = {
        "source": str(src.absolute()),
        "architecture": config.architecture,
        "hf_architectures": hf.get("architectures"),
        "tensors": len(consumed),
        "parameters": int(sum(np.size(x) for x in traverse_util.flatten_dict(params).values())),
        "ignored_keys": sorted(set(leftover) - set(unexpected)),
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
