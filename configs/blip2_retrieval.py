"""BLIP-2 retrieval fine-tune (the paper's COCO fine-tune): stage 1's ITC + ITM + ITG with every
caption of an image a positive of it (ITC targets spread over them, ITM negatives never from the
same image: LAVIS Blip2Qformer given image ids), the ViT unfrozen at 364 px (positions resized).

    blip-jax train --config=configs/blip2_retrieval.py:coco --workdir=runs/ret \\
        --config.model.init_from=runs/stage1 --config.data.path=coco_karpathy_train.json \\
        --config.data.image_root=coco/images
    blip-jax eval --config=configs/eval/retrieval.py:coco --ckpt=runs/ret --workdir=runs/ret_eval

Presets: `tiny` (CPU; 48 px), `coco`. The paper's COCO 5k test (ViT-g): TR@1 85.4, IR@1 68.3.
"""

from pathlib import Path

from blip_jax.config_files import load_config

HERE = Path(__file__).parent
COCO_CAPTIONS = 566_747


def get_config(arg: str = "tiny"):
    if arg not in ("tiny", "coco"):
        raise ValueError(f"unknown preset {arg!r}: tiny, coco")
    c = load_config(HERE / "blip2_stage1.py", "tiny" if arg == "tiny" else "vitg")
    c.objective = "stage1_retrieval"
    c.trainable = list(c.trainable) + [r"^vision/"]
    if arg == "tiny":
        c.total_steps = 60
        c.optim.update(lr=1e-3, decay_steps=60)
        c.log_every = 10
        c.checkpoint_every = 30
        c.model.resolution = 48
        c.model.vision.image_size = 48
        return c
    # LAVIS retrieval_coco_ft: lr 1e-5 cosine to 0 after 1000 warm-up steps, weight decay 0.05, 5 epochs
    c.batch_size = 1024
    c.total_steps = 5 * COCO_CAPTIONS // c.batch_size
    c.optim.update(lr=1e-5, min_lr=0.0, warmup_steps=1000, decay_steps=c.total_steps,
                   weight_decay=0.05)
    c.model.resolution = 364
    c.model.vision.image_size = 364
    c.data.update(kind="json", path="coco_karpathy_train.json", image_root="coco/images")
    return c
