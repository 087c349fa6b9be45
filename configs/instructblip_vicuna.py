"""InstructBLIP with Vicuna (LLaMA): instruction tuning; the instruction enters the Q-Former and the
LLM, the loss covers the output tokens only. Only the Q-Former (+ queries, projection) trains.

    blip-jax train --config=configs/instructblip_vicuna.py:tiny --workdir=/tmp/ib
    blip-jax train --config=configs/instructblip_vicuna.py:vitg_vicuna13b --config.model.init_from=ib-vicuna13b ...
"""

from blip_jax.data.held_in import held_in_mixture, tiny_mixture
from blip_jax.train import defaults


def get_config(arg: str = "tiny"):
    c = defaults.base()
    c.objective = "lm"
    c.model.llm_family = "llama"
    c.model.instruct = True
    c.model.qformer.use_qformer_text_input = True
    if arg in ("tiny", "tiny_mixture"):
        c = defaults.tiny(c)
        if arg == "tiny_mixture":  # the 13 held-in entries on synthetic data
            c.data.update(mixture=tiny_mixture(image_size=c.data.image_size), balance="sqrt")
            c.total_steps = 60  # a random frozen tiny LLM moves little: a higher lr, more steps
            c.optim.update(lr=2e-2, decay_steps=60)
        return c
    if arg in ("vitg_vicuna7b", "vitg_vicuna13b"):  # the paper: up to 60k steps, batch 128 (7B) / 64 (13B)
        c.model.llm = defaults.PAPER_LLMS[arg.removeprefix("vitg_")]
        c.batch_size = 128 if arg == "vitg_vicuna7b" else 64
        c.total_steps = 60_000
        c.optim.update(lr=1e-5, min_lr=0.0, warmup_steps=1000, decay_steps=60_000)
        c.model.update(precision="bf16", scan_layers=True, remat_policy="full")
        c.data.update(max_text_len=256, max_prompt_len=128)  # LAVIS: max_txt_len 128 (instruction)
        c.mesh = dict(data=1, fsdp=-1, tensor=1)
        # the paper's 13 held-in datasets, sqrt-balanced (blip_jax.data.held_in), under --config.data.root
        c.data.update(mixture=held_in_mixture(), balance="sqrt", augment="blip2_train")
        return c
    raise ValueError(f"unknown preset {arg!r}: tiny, tiny_mixture, vitg_vicuna7b, vitg_vicuna13b")
