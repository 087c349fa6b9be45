"""BLIP-2 stage 2 onto a new LLM (LLaMA, Vicuna, Mistral, Qwen2, or any OPT / Flan-T5): the LM loss
on the caption after the soft prompt, from a stage-1 Q-Former put in front of the LLM first:

    blip-jax convert runs/stage1 blip2-qwen2 --llm Qwen2-7B        # blip_jax/convert/compose.py
    blip-jax train --config=configs/blip2_stage2_llm.py:paper --workdir=runs/qwen2 \\
        --config.model.init_from=blip2-qwen2

The model (its LLM family and sizes) is the `init_from` directory's; `tiny` also runs without one
(a random LLaMA-architecture LLM). Add `--config.model.instruct=True` (and convert with
`--instruct`) to go straight on to instruction tuning.
"""

from blip_jax.train import defaults


def get_config(arg: str = "tiny"):
    c = defaults.base()
    c.objective = "lm"
    c.model.llm_family = "llama"
    c.model.qformer.use_qformer_text_input = True  # stage 1's text parts stay (InstructBLIP-ready)
    # ... carried, not trained: stage 2 reads no text in the Q-Former (weight decay would wear them)
    c.trainable = [r"^ln_vision/", r"^query_tokens$", r"^qformer/(?!.*/(fc1|fc2|ln)/)", r"^language_projection/"]
    if arg == "tiny":
        return defaults.tiny(c)
    if arg == "paper":  # BLIP-2's stage 2: 80k steps, batch 1920, lr 1e-4 -> 5e-5, frozen towers in bf16
        c.batch_size = 1920
        c.total_steps = 80_000
        c.optim.update(lr=1e-4, min_lr=5e-5, warmup_steps=2000, decay_steps=80_000)
        c.model.update(precision="bf16", scan_layers=True, remat_policy="full")
        c.model.llm = defaults.PAPER_LLMS["vicuna7b"]  # the sizes of a 7B LLaMA when no init_from is given
        c.mesh = dict(data=1, fsdp=-1, tensor=1)
        return c
    raise ValueError(f"unknown preset {arg!r}: tiny, paper")
