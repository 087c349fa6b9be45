"""BLIP-2 VQA fine-tune (the paper's section 4.3, never released in LAVIS: LAVIS#256, #281): the
question also enters the Q-Former, beside the queries, and the frozen LLM generates the answer
after the paper's prompt ("Question: {} Answer:" for OPT, "Question: {} Short answer:" for
Flan-T5); the Q-Former trains, the ViT too unless `trainable` leaves it out.

Start from a model whose Q-Former has its text parts (stage 1's: `blip-jax convert STAGE1 DST --llm
LLM --instruct`, or a stage-2 run of configs/blip2_stage2_llm.py); the HF BLIP-2 checkpoints lack
them, which are then initialised at random. `blip-jax eval --config=configs/eval/vqa.py:vqav2`
scores the result (its Q-Former reads the bare questions there too: `qformer_input`).

    blip-jax train --config=configs/blip2_vqa.py:vqav2_opt2.7b --workdir=runs/vqa \\
        --config.model.init_from=blip2-opt-2.7b-qformer-text

Presets: `tiny` (OPT, CPU), `vqav2_opt2.7b`, `vqav2_flant5xl`: VQAv2 train + val (and Visual
Genome QA as a third mixture entry, as BLIP's vqa preset shows). The paper's VQAv2 test-dev:
81.6 (ViT-g + Flan-T5-XL fine-tuned; LAVIS users without this recipe reached 76.6).
"""

from pathlib import Path

from blip_jax.config_files import load_config
from blip_jax.train import defaults

HERE = Path(__file__).parent
BASES = {"tiny": ("blip2_stage2_opt.py", "tiny"), "vqav2_opt2.7b": ("blip2_stage2_opt.py", "vitg_opt2.7b"),
         "vqav2_flant5xl": ("blip2_stage2_t5.py", "vitg_flant5xl")}
VQAV2_QUESTIONS = 443_757 + 214_354  # train + val


def get_config(arg: str = "tiny"):
    if arg not in BASES:
        raise ValueError(f"unknown preset {arg!r}: {', '.join(BASES)}")
    c = load_config(HERE / BASES[arg][0], BASES[arg][1])
    c.model.update(instruct=True, qformer_input="question")
    c.model.qformer.use_qformer_text_input = True
    c.trainable = list(c.trainable) + [r"^vision/"]  # the paper fine-tunes the ViT with the Q-Former
    if arg == "tiny":
        c.total_steps = 40
        c.optim.update(lr=2e-3, decay_steps=40)
        return c
    c.batch_size = 128
    c.total_steps = 5 * VQAV2_QUESTIONS // c.batch_size
    c.optim.update(lr=1e-5, min_lr=0.0, warmup_steps=1000, decay_steps=c.total_steps, weight_decay=0.05)
    c.data.update(mixture={
        "vqa_train": dict(defaults.source_defaults(), kind="json", path="vqa_train.json", image_root="coco/images"),
        "vqa_val": dict(defaults.source_defaults(), kind="json", path="vqa_val.json", image_root="coco/images"),
    }, balance="size", max_text_len=64, max_prompt_len=48)
    return c
