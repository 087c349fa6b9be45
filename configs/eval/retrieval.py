"""Image-text retrieval with ITM re-ranking (R@1/5/10 both ways).

    blip-jax eval --config=configs/eval/retrieval.py:coco --ckpt=blip-itm --workdir=runs/eval_coco \
        --config.data.path=coco/annotations/coco_karpathy_test.json --config.data.image_root=coco/images
"""

from blip_jax.eval import defaults


def get_config(arg: str = "coco"):
    c = defaults.base("retrieval")
    if arg not in ("coco", "flickr30k"):
        raise ValueError(f"unknown preset {arg!r}: coco, flickr30k")
    c.dataset = arg  # k: 256 COCO / 128 Flickr30k (BLIP), 128 (BLIP-2)
    c.data.path = {"coco": "coco_karpathy_test.json", "flickr30k": "flickr30k_test.json"}[arg]
    return c
