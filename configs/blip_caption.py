"""BLIP caption fine-tuning: the LM loss after the prompt "a picture of ".

    blip-jax train --config=configs/blip_caption.py:tiny --workdir=/tmp/blip_caption
"""

from blip_jax.train import defaults


def get_config(arg: str = "tiny"):
    c = defaults.blip_base("blip_caption")
    c.data.prompt = "a picture of "
    if arg == "tiny":
        return defaults.blip_tiny(c)
    if arg == "coco":  # the paper: 5 epochs, batch 256, lr 1e-5, 384 px
        return defaults.blip_coco_finetune(c, epochs=5)
    raise ValueError(f"unknown preset {arg!r}: tiny, coco")
