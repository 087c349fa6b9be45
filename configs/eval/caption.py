"""Captioning with each family's paper settings, scored by BLEU-1..4, METEOR, ROUGE-L, CIDEr-D
(and SPICE when its Java dependencies are present).

    blip-jax eval --config=configs/eval/caption.py:coco --ckpt=blip-large --workdir=runs/cap \
        --config.data.path=coco/annotations/coco_karpathy_test.json --config.data.image_root=coco/images
"""

from blip_jax.eval import defaults


def get_config(arg: str = "coco"):
    c = defaults.base("caption")
    files = {"coco": "coco_karpathy_test.json", "nocaps": "nocaps_val.json", "flickr30k": "flickr30k_test.json"}
    if arg not in files:
        raise ValueError(f"unknown preset {arg!r}: {', '.join(files)}")
    c.data.path = files[arg]
    return c
