"""BLIP-2 stage 1: ITC + ITM + ITG on the Q-Former over a frozen ViT (no LLM).

    blip-jax train --config=configs/blip2_stage1.py:tiny --workdir=/tmp/stage1
"""

from blip_jax.train import defaults


def get_config(arg: str = "tiny"):
    c = defaults.base()
    c.objective = "stage1"
    c.model.architecture = "retrieval"
    c.model.llm_family = ""
    c.model.qformer.use_qformer_text_input = True
    if arg == "tiny":  # ~40 s on 2 CPU cores; ends with held-out ITC R@1 about 4x chance
        c = defaults.tiny(c)
        c.total_steps = 1000
        c.optim.update(lr=2e-3, decay_steps=1000)
        c.log_every = 100
        c.checkpoint_every = 500
        return c
    if arg in ("vitg", "vitl"):  # the paper: 250k steps, batch 1680 (ViT-g) / 2320 (ViT-L), fp16 ViT
        c.batch_size = 1680 if arg == "vitg" else 2320
        c.total_steps = 250_000
        c.optim.update(lr=1e-4, min_lr=1e-5, warmup_steps=2000, decay_steps=250_000)
        c.model.update(precision="bf16", scan_layers=True)
        c.mesh = dict(data=-1, fsdp=1, tensor=1)
        return c
    raise ValueError(f"unknown preset {arg!r}: tiny, vitg, vitl")
