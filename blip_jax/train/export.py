"""W/model: what any stage trained, as a blip-jax model directory (what `blip_jax.load`, `blip-jax
eval`, `blip-jax capfilt` and export read, and `model.init_from` fine-tunes): config, parameters
(BLIP's tied decoder stored once, as trained; `checkpoint.load` ties it), tokenizers and evaluation
image preprocessing. A run started from a model directory (`model.init_from`) carries its tokenizer,
generation and processor files over; a randomly initialised one writes the tokenizers it trained with."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import jax
from flax import traverse_util
from jax.experimental import multihost_utils

from blip_jax import atomic, checkpoint, paths
from blip_jax.images import ImageProcessor
from blip_jax.models import lora, quant
from blip_jax.models.config import BlipConfig
from blip_jax.text import QFORMER_TOKENIZER
from blip_jax.train import partition

MODEL_DIR = checkpoint.TRAINED_MODEL
ADAPTER_DIR = "adapter"  # a LoRA run's adapter alone (blip_jax.models.lora)
# an LLM's own tokenizer and generation files, carried over from `model.init_from` as they are
LLM_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
             "vocab.json", "merges.txt", "spiece.model", "tokenizer.model", "generation_config.json")


def _write_side_files(dst: Path, st, task) -> None:
    """Tokenizers and image preprocessing beside the parameters, where `blip_jax.load` looks: BLIP
    and BLIP-2 retrieval models keep the BERT tokenizer at the top, LLM models their LLM's (from
    `model.init_from` as it was, else the word-level one trained with), InstructBLIP the Q-Former's
    under QFORMER_TOKENIZER. The processor is the source's at the run's resolution."""
    init_from = task.cfg.model.init_from
    llm = not isinstance(st.config, BlipConfig) and st.config.architecture == "generation"
    if not llm:
        task.qformer_tokenizer.save(dst)
    elif init_from:
        for name in LLM_FILES:
            if (Path(init_from) / name).is_file():
                shutil.copy2(Path(init_from) / name, dst / name)
    else:
        task.llm_tokenizer.save(dst)
    if llm and st.config.instruct:
        task.qformer_tokenizer.save(dst / QFORMER_TOKENIZER)
    size = st.config.vision.image_size
    processor = ImageProcessor.from_dir(init_from) if init_from else ImageProcessor()
    dataclasses.replace(processor, size={"height": size, "width": size}).save(dst)


def _dequantized(params: dict, config) -> dict:
    """An int8-frozen run's parameters with its kernels dequantised (what it trained against), in the
    frozen towers' storage dtype."""
    import numpy as np

    from blip_jax.models.config import DTYPES

    flat = traverse_util.flatten_dict(params, sep="/")
    int8 = {p for p, v in flat.items() if p.endswith("/kernel") and np.asarray(v).dtype == np.int8}
    dtype = DTYPES.get(getattr(config, "frozen_param_dtype", "float32"), np.float32)
    out = traverse_util.flatten_dict(quant.dequantized(params), sep="/")
    return traverse_util.unflatten_dict({p: (np.asarray(v).astype(dtype) if p in int8 else v) for p, v in out.items()},
                                        sep="/")


def export_model(workdir: str | Path, st, task) -> Path:
    """Write W/model atomically: the parameters are gathered to every host and process 0 writes;
    every process returns once it is there."""
    params = partition.merge(st.train["params"], st.frozen)
    if jax.process_count() > 1:
        params = multihost_utils.process_allgather(params, tiled=True)
    params = jax.device_get(params)
    if any(p.endswith(quant.SCALE) for p in traverse_util.flatten_dict(params, sep="/")):  # model.int8_frozen
        params = _dequantized(params, st.config)
    dst = paths.path(workdir) / MODEL_DIR
    adapter = lora.adapter_of(params)
    if jax.process_index() == 0:
        if adapter:  # W/adapter: what trained, alone; W/model: the base with it folded in
            trained = {**traverse_util.flatten_dict(jax.device_get(st.train["params"]), sep="/"),
                       **traverse_util.flatten_dict(adapter, sep="/")}
            with atomic.directory(paths.path(workdir) / ADAPTER_DIR, overwrite=True) as tmp:
                lora.save_adapter(tmp, traverse_util.unflatten_dict(trained, sep="/"), task.cfg, st.config)
            params = lora.merged(params)
        with atomic.directory(dst, overwrite=True) as tmp:
            checkpoint.write_config(tmp, st.config)
            checkpoint.save_params(tmp, params)
            _write_side_files(tmp, st, task)
    multihost_utils.sync_global_devices("blip_jax export_model")
    return dst
