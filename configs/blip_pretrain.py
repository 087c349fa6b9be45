"""BLIP pre-training: ITC (momentum distillation, queues) + ITM (hard negatives) + LM, the decoder
tied to the encoder but for its self-attention.

    blip-jax train --config=configs/blip_pretrain.py:tiny --workdir=/tmp/blip_pretrain
"""

from blip_jax.train import defaults


def get_config(arg: str = "tiny"):
    c = defaults.blip_base("blip_pretrain")
    c.data.update(min_scale=0.2, max_words=30)  # pre-training's crops and caption lengths
    if arg == "tiny":
        return defaults.blip_tiny(c)
    if arg == "base":  # the paper (ViT-B): 20 epochs of 14M images, batch 2880, 224 px
        c.batch_size = 2880
        epoch = 14_000_000 // c.batch_size
        c.total_steps = 20 * epoch
        # lr 1e-6 -> 3e-4 over 3000 steps, then x0.9 each epoch (floor 1e-6); alpha ramps over 2 epochs
        c.optim.update(schedule="step", warmup_lr=1e-6, steps_per_epoch=epoch, decay_steps=c.total_steps)
        c.loss.alpha_ramp_steps = 2 * epoch
        c.mesh = dict(data=-1, fsdp=1, tensor=1)
        c.model.precision = "bf16"
        c.loss.itm_negatives = "device"  # BLIP pre-training mines ITM negatives on each GPU's batch
        return c
    raise ValueError(f"unknown preset {arg!r}: tiny, base")
