"""Moving BLIP weights to another architecture or resolution: what fine-tuning from a checkpoint needs.

BLIP fine-tunes its pre-trained model for captioning (384 px), retrieval (384 px) and VQA (480 px),
each task keeping the parts it uses: the caption model takes the (tied) decoder, the VQA model an
encoder and a decoder that from then on train apart (LAVIS loads the pre-trained encoder into both
the question encoder and, through the tied weights, the answer decoder), the retrieval model the
encoder and heads. The ViT's position table is bicubic-resized when the grid changes (BLIP's
`interpolate_pos_embed`: the CLS position kept, the patch grid resized with
`interpolate(mode="bicubic", align_corners=False)`). NLVR2's model takes the encoder with its
cross-attention copied into both image branches.
"""

from __future__ import annotations

import re

import numpy as np
from flax import traverse_util

from blip_jax.models import layers

POSITIONS = "vision/embed/pos"


def resize_positions(pos, grid: int) -> np.ndarray:
    """[1, 1 + g*g, D] position table -> [1, 1 + grid*grid, D] (CLS kept, patch grid bicubic-resized)."""
    pos = np.asarray(pos, np.float32)
    old = int(round((pos.shape[1] - 1) ** 0.5))
    if old * old != pos.shape[1] - 1:
        raise ValueError(f"{POSITIONS}: {pos.shape[1] - 1} patch positions are not a square grid")
    patches = np.asarray(layers.resize_grid(pos[0, 1:].reshape(old, old, -1), (grid, grid)))
    return np.concatenate([pos[:, :1], patches.reshape(1, grid * grid, -1)], axis=1)


_TWIN = re.compile(r"/cross_attn/(query|key|value|out)[01]/")


def twin_source(path: str) -> str:
    """The single cross-attention parameter an NLVR2 twin (`cross_attn/query0/kernel`) is initialised
    from (LAVIS BlipNLVR.load_from_pretrained copies each into both); other paths are unchanged.
    The merge layers have no source: they start fresh."""
    return _TWIN.sub(r"/cross_attn/\1/", path)


def transfer(source: dict, target_shapes: dict) -> tuple[dict, list[str]]:
    """Source parameters (a full tree: a tied decoder given whole) -> the target's tree.

    target_shapes: the target's parameters as ShapeDtypeStructs (in its stored form). Returns
    (flat '/'-path -> array of every target parameter the source has, top-level modules of the
    source the target has no use for); the target's other parameters are the caller's to initialise. A parameter present in both with
    another shape is an error, except the ViT positions, which are resized."""
    flat_src = traverse_util.flatten_dict(source, sep="/")
    flat_target = traverse_util.flatten_dict(target_shapes, sep="/")
    out = {}
    for path, want in flat_target.items():
        if path not in flat_src:
            path_src = twin_source(path)  # NLVR2's two cross-attentions start as the one they split
            if path_src not in flat_src:
                continue
            out[path] = np.asarray(flat_src[path_src]).astype(want.dtype)
            continue
        value = flat_src[path]
        if tuple(value.shape) != tuple(want.shape):
            if path != POSITIONS:
                raise ValueError(f"{path}: the checkpoint's shape {tuple(value.shape)} differs from the model's "
                                 f"{tuple(want.shape)}")
            value = resize_positions(value, int(round((want.shape[1] - 1) ** 0.5)))
        out[path] = np.asarray(value).astype(want.dtype)
    unused = sorted({p.split("/")[0] for p in flat_src} - {p.split("/")[0] for p in flat_target})
    return out, unused
