"""W/model: a trained BLIP as a blip-jax model directory (what `blip_jax.load`, `blip-jax eval` and
`blip-jax capfilt` read, and `model.init_from` fine-tunes): config, parameters (the tied decoder
stored once, as trained; `checkpoint.load` ties it), tokenizer and evaluation image preprocessing."""

from __future__ import annotations

from pathlib import Path

import jax
from jax.experimental import multihost_utils

from blip_jax import checkpoint
from blip_jax.images import ImageProcessor
from blip_jax.train import partition

MODEL_DIR = "model"


def export_model(workdir: str | Path, st, task) -> Path:
    """Write W/model atomically: the parameters are gathered to every host (BLIP is small) and
    process 0 writes; every process returns once it is there."""
    params = partition.merge(st.train["params"], st.frozen)
    if jax.process_count() > 1:
        params = multihost_utils.process_allgather(params, tiled=True)
    params = jax.device_get(params)
    size = st.config.vision.image_size
    dst = Path(workdir) / MODEL_DIR
    if jax.process_index() == 0:
        with checkpoint.atomic_directory(dst, overwrite=True) as tmp:
            checkpoint.write_config(tmp, st.config)
            checkpoint.save_params(tmp, params)
            task.qformer_tokenizer.save(tmp)
            ImageProcessor(size={"height": size, "width": size}).save(tmp)
    multihost_utils.sync_global_devices("blip_jax export_model")
    return dst
