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
        c.batch_size = 256
        c.total_steps = 5 * 566_747 // 256
        c.optim.update(warmup_steps=0, decay_steps=c.total_steps)
        c.data.update(kind="json", path="coco_karpathy_train.json", image_root="coco/images")
        return c
    raise ValueError(f"unknown preset {arg!r}: tiny, coco")
