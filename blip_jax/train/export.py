"""W/model: a trained BLIP as a blip-jax model directory (what `blip_jax.load`, `blip-jax eval` and
`blip-jax capfilt` read, and `model.init_from` fine-tunes): config, parameters (the tied decoder
stored once, as trained; `checkpoint.load` ties it), tokenizer and evaluation image preprocessing."""

from __future__ import annotations

from pathlib import Path

import jax

from blip_jax import checkpoint
from blip_jax.images import ImageProcessor
from blip_jax.train import partition

MODEL_DIR = "model"


def export_model(workdir: str | Path, st, task) -> Path:
    """Write W/model atomically (single-process runs: the parameters are gathered on this host)."""
    params = jax.device_get(partition.merge(st.train["params"], st.frozen))
    size = st.config.vision.image_size
    dst = Path(workdir) / MODEL_DIR
    with checkpoint.atomic_directory(dst, overwrite=True) as tmp:
        checkpoint.write_config(tmp, st.config)
        checkpoint.save_params(tmp, params)
        task.qformer_tokenizer.save(tmp)
        ImageProcessor(size={"height": size, "width": size}).save(tmp)
    return dst
