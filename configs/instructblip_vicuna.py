"""InstructBLIP with Vicuna (LLaMA): instruction tuning; the instruction enters the Q-Former and the
LLM, the loss covers the output tokens only. Only the Q-Former (+ queries, projection) trains.

    blip-jax train --config=configs/instructblip_vicuna.py:tiny --workdir=/tmp/ib
    blip-jax train --config=configs/instructblip_vicuna.py:vitg_vicuna13b --config.model.init_from=ib-vicuna13b ...
"""

from blip_jax.train import defaults


def get_config(arg: str = "tiny"):
    c = defaults.base()
    c.objective = "lm"
    c.model.llm_family = "llama"
    c.model.instruct = True
    c.model.qformer.use_qformer_text_input = True
    if arg == "tiny":
        return defaults.tiny(c)
    if arg in ("vitg_vicuna7b", "vitg_vicuna13b"):  # the paper: up to 60k steps, batch 128 (7B) / 64 (13B)
        c.model.llm = defaults.PAPER_LLMS[arg.removeprefix("vitg_")]
        c.batch_size = 128 if arg == "vitg_vicuna7b" else 64
        c.total_steps = 60_000
        c.optim.update(lr=1e-5, min_lr=0.0, warmup_steps=1000, decay_steps=60_000)
        c.model.update(precision="bf16", scan_layers=True, remat_policy="full")
        c.data.update(max_text_len=256, max_prompt_len=128)  # LAVIS: max_txt_len 128 (instruction)
        c.mesh = dict(data=1, fsdp=-1, tensor=1)
        return c
    raise ValueError(f"unknown preset {arg!r}: tiny, vitg_vicuna7b, vitg_vicuna13b")
