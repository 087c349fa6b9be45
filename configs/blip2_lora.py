"""LoRA fine-tuning of BLIP-2 / InstructBLIP: low-rank adapters on the frozen LLM's attention
(and, by regex, any other kernels), the base weights frozen and sharded as in stage 2
(`blip_jax.models.lora`). The run writes W/adapter (the adapter alone) beside W/model (the base
with it folded in); `blip_jax.load(BASE, adapter=W)` applies it onto a converted base.

    blip-jax train --config=configs/blip2_lora.py:tiny --workdir=/tmp/lora \\
        [--config.model.init_from=blip2-opt-2.7b]

Presets: `tiny` (OPT), `tiny_vicuna` (CPU), `opt2.7b`, `flant5xl` (LoRA on the LLM's q / v
projections, rank 8 as PEFT's default, the Q-Former frozen as well). All but `tiny` drop out 5% of
the adapter's input in training (PEFT's usual lora_dropout).
"""

from pathlib import Path

from blip_jax.config_files import load_config

HERE = Path(__file__).parent
# the attention projections PEFT adapts by default, per LLM family (blip_jax.models.llm names)
LLM_QV = {"opt": r"^language_model/.*self_attn/(q_proj|v_proj)/kernel$",
          "llama": r"^language_model/.*self_attn/(q_proj|v_proj)/kernel$",
          "t5": r"^language_model/.*(self_attn|cross_attn)/(q|v)/kernel$"}
BASES = {"tiny": ("blip2_stage2_opt.py", "tiny"), "tiny_vicuna": ("instructblip_vicuna.py", "tiny"),
         "opt2.7b": ("blip2_stage2_opt.py", "vitg_opt2.7b"), "flant5xl": ("blip2_stage2_t5.py", "vitg_flant5xl")}


def get_config(arg: str = "tiny"):
    if arg not in BASES:
        raise ValueError(f"unknown preset {arg!r}: {', '.join(BASES)}")
    file, preset = BASES[arg]
    c = load_config(HERE / file, preset)
    c.trainable = []  # the adapter alone trains
    c.lora.update(targets=(LLM_QV[c.model.llm_family],), rank=8, alpha=16.0, dropout=0.0 if arg == "tiny" else 0.05)
    if arg.startswith("tiny"):
        c.total_steps = 40
        c.optim.update(lr=5e-3, decay_steps=40)
        c.log_every = 5
        c.checkpoint_every = 20
    else:  # one GPU: batch for a 24 GB card, the frozen towers in bf16
        c.batch_size = 16
        c.mesh = dict(data=-1, fsdp=1, tensor=1)
    return c
