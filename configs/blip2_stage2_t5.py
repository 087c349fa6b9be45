"""BLIP-2 stage 2 with Flan-T5: a prefix LM (the caption split at a random point; the prefix after the
soft prompt into the encoder, the rest the decoder's target). ViT and T5 frozen, T5 in bf16 at scale.

    blip-jax train --config=configs/blip2_stage2_t5.py:tiny --workdir=/tmp/t5
    blip-jax train --config=configs/blip2_stage2_t5.py:vitg_flant5xxl --config.model.init_from=blip2-flan-t5-xxl ...
"""

from blip_jax.train import defaults


def get_config(arg: str = "tiny"):
    c = defaults.base()
    c.objective = "lm"
    c.model.llm_family = "t5"
    if arg == "tiny":
        return defaults.tiny(c)
    if arg in ("vitg_flant5xl", "vitg_flant5xxl"):  # the paper: 80k steps, batch 1520, bf16 T5
        c.model.llm = defaults.PAPER_LLMS[arg.removeprefix("vitg_")]
        c.batch_size = 1520
        c.total_steps = 80_000
        c.optim.update(lr=1e-4, min_lr=5e-5, warmup_steps=2000, decay_steps=80_000)
        c.model.update(precision="bf16", scan_layers=True, remat_policy="full")
        c.mesh = dict(data=1, fsdp=-1, tensor=1)
        return c
    raise ValueError(f"unknown preset {arg!r}: tiny, vitg_flant5xl, vitg_flant5xxl")
