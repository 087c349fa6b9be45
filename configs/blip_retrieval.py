"""BLIP retrieval fine-tuning (COCO / Flickr30k): ITC with image-id positives (in-batch and queued)
+ ITM with negatives that are never the same image, from a pre-trained BLIP.

    blip-jax train --config=configs/blip_retrieval.py:tiny --workdir=/tmp/blip_retrieval
"""

from blip_jax.train import defaults


def get_config(arg: str = "tiny"):
    c = defaults.blip_base("blip_retrieval")
    if arg == "tiny":
        return defaults.blip_tiny(c)
    if arg == "coco":  # the paper: 6 epochs, batch 256, lr 1e-5, 384 px, negatives over all devices
        return defaults.blip_coco_finetune(c, epochs=6)
    raise ValueError(f"unknown preset {arg!r}: tiny, coco")
