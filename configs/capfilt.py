"""CapFilt (BLIP's dataset bootstrapping): caption web images, filter web and synthetic texts.

    blip-jax capfilt --config=configs/capfilt.py:web --workdir=runs/capfilt_cc3m \
        --config.data.path=cc3m/shards --config.captioner=blip-caption-large --config.filter=blip-itm-large-coco

Presets:
    web    img2dataset WebDataset shards (CC3M/CC12M/LAION), BLIP's settings: one synthetic caption
           per image (nucleus p=0.9 after "a picture of "), keep texts with ITM probability >= 0.5
    coco   the same over a LAVIS-layout annotation file (e.g. coco_karpathy_train.json + image_root)
    blip2  the BLIP-2 variant: ten synthetic captions per image, the web text and the captions ranked
           by ITC similarity of a BLIP-2 retrieval filter, the top two kept
    tiny   synthetic shapes and tiny random models built under W/tiny_models (tests and demos)

Captioner: a converted BLIP caption model (e.g. Salesforce/blip-image-captioning-large, fine-tuned on
COCO as the paper's captioner); filter: a converted BLIP retrieval model (Salesforce/blip-itm-large-coco),
or a BLIP-2 one (Salesforce/blip2-itm-vit-g) for the blip2 preset. See blip_jax/capfilt.py for outputs.
"""

from blip_jax.capfilt import base_config

PRESETS = ("web", "coco", "blip2", "tiny")


def get_config(arg: str = "web"):
    if arg not in PRESETS:
        raise ValueError(f"unknown preset {arg!r}: {', '.join(PRESETS)}")
    c = base_config()
    if arg == "coco":
        c.data.kind = "json"
        c.data.path = "coco_karpathy_train.json"
        c.data.split = "train"
    elif arg == "blip2":
        c.num_captions = 10
        c.mode = "itc_topk"
        c.top_k = 2
        c.batch_size = 16
    elif arg == "tiny":
        c.data.kind = "synthetic"
        c.data.num_records = 12
        c.data.image_size = 32
        c.captioner = c.filter = "tiny"
        c.num_captions = 2
        c.max_new_tokens = 8
        c.min_new_tokens = 3
        c.shard_size = 4
        c.batch_size = 4
        c.gallery = 8
    return c
