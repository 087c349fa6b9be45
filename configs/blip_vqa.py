"""BLIP VQA fine-tuning: the question encoded over the image ([ENC]), every answer decoded over the
question states, per-answer losses weighted by the answers' shares; 480 px (positions resized from
the pre-trained checkpoint's grid on load).

    blip-jax train --config=configs/blip_vqa.py:tiny --workdir=/tmp/blip_vqa
    blip-jax train --config=configs/blip_vqa.py:vqav2 --config.model.init_from=CONVERTED_BLIP --workdir=W
"""

from blip_jax.train import defaults

VQAV2_QUESTIONS = 443_757 + 214_354  # LAVIS's vqa_train.json + vqa_val.json


def get_config(arg: str = "tiny"):
    c = defaults.blip_base("blip_vqa")
    if arg == "tiny":
        c = defaults.blip_tiny(c)
        c.data.update(max_answers=2, max_answer_len=6)
        return c
    if arg == "vqav2":  # the reference: 10 epochs, lr 2e-5 cosine without warmup, 480 px, VQAv2 train + val
        defaults.blip_finetune(c, epochs=10, records=VQAV2_QUESTIONS)
        c.data.update(mixture={
            "vqa_train": dict(defaults.source_defaults(), kind="json", path="vqa_train.json", image_root="coco/images"),
            "vqa_val": dict(defaults.source_defaults(), kind="json", path="vqa_val.json", image_root="coco/images"),
        }, balance="size")  # + BLIP's vg_qa.json as a third entry: its "dataset": "vg" answers weigh 0.2
        return c
    raise ValueError(f"unknown preset {arg!r}: tiny, vqav2")
