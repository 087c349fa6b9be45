"""BLIP-2 stage 2 with OPT: the LM loss of the caption after the soft prompt; ViT and OPT frozen.

    blip-jax train --config=configs/blip2_stage2_opt.py:tiny --workdir=/tmp/run
    blip-jax train --config=configs/blip2_stage2_opt.py:vitg_opt2.7b --config.model.init_from=blip2-opt ...
"""

from blip_jax.train import defaults


def get_config(arg: str = "tiny"):
    c = defaults.base()
    c.objective = "lm"
    c.model.llm_family = "opt"
    if arg == "tiny":
        return defaults.tiny(c)
    if arg in ("vitg_opt2.7b", "vitg_opt6.7b"):  # the paper: 80k steps, batch 1920, lr 1e-4 -> 5e-5, fp16 frozen
        c.model.llm = defaults.PAPER_LLMS[arg.removeprefix("vitg_")]
        c.batch_size = 1920
        c.total_steps = 80_000
        c.optim.update(lr=1e-4, min_lr=5e-5, warmup_steps=2000, decay_steps=80_000)
        c.model.update(precision="bf16", scan_layers=True, remat_policy="full")
        c.mesh = dict(data=1, fsdp=-1, tensor=1)
        return c
    raise ValueError(f"unknown preset {arg!r}: tiny, vitg_opt2.7b, vitg_opt6.7b")
