"""BLIP-2 captioning fine-tune (the paper's COCO fine-tune, which LAVIS ships as a config only): the
LM loss on "a photo of <caption>" after the soft prompt, with the ViT unfrozen (fp32 master weights)
at 364 px (positions resized from the 224 px checkpoint), the LLM frozen.

    blip-jax train --config=configs/blip2_caption.py:coco_opt2.7b --workdir=runs/cap \\
        --config.model.init_from=blip2-opt-2.7b --config.data.path=coco_karpathy_train.json \\
        --config.data.image_root=coco/images
    blip-jax eval --config=configs/eval/caption.py:coco --ckpt=runs/cap --workdir=runs/cap_eval

Presets: `tiny` (OPT, CPU; 48 px), `coco_opt2.7b`, `coco_opt6.7b`, `coco_flant5xl`. The paper's
COCO Karpathy-test numbers for these: CIDEr 145.8 (OPT-2.7B), 145.2 (OPT-6.7B), 144.5 (Flan-T5-XL).
"""

from pathlib import Path

from blip_jax.config_files import load_config

HERE = Path(__file__).parent
BASES = {"tiny": ("blip2_stage2_opt.py", "tiny"), "coco_opt2.7b": ("blip2_stage2_opt.py", "vitg_opt2.7b"),
         "coco_opt6.7b": ("blip2_stage2_opt.py", "vitg_opt6.7b"), "coco_flant5xl": ("blip2_stage2_t5.py", "vitg_flant5xl")}
COCO_CAPTIONS = 566_747  # Karpathy train


def get_config(arg: str = "tiny"):
    if arg not in BASES:
        raise ValueError(f"unknown preset {arg!r}: {', '.join(BASES)}")
    c = load_config(HERE / BASES[arg][0], BASES[arg][1])
    c.trainable = list(c.trainable) + [r"^vision/"]  # the ViT fine-tunes too
    c.data.update(prompt="a photo of ", augment="blip2_train")  # LAVIS: prompt tokens carry no loss
    if arg == "tiny":
        c.model.resolution = 48  # from the 32 px tiny checkpoint, as 364 from 224
        c.model.vision.image_size = 48  # without init_from
        c.data.augment = "eval"
        return c
    # LAVIS caption_coco_ft: lr 1e-5 cosine to 0 after 1000 warm-up steps, weight decay 0.05, 5 epochs
    c.batch_size = 1024
    c.total_steps = 5 * COCO_CAPTIONS // c.batch_size
    c.optim.update(lr=1e-5, min_lr=0.0, warmup_steps=1000, decay_steps=c.total_steps,
                   weight_decay=0.05)
    c.model.resolution = 364
    c.model.vision.image_size = 364
    c.data.update(kind="json", path="coco_karpathy_train.json", image_root="coco/images")
    return c
