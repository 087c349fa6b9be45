"""Zero-shot image classification by ITC over class-name prompts, for any folder of class-named
image directories.

    blip-jax eval --config=configs/eval/classification.py --ckpt=blip-itm --workdir=runs/cls \
        --config.data.path=imagenet/val
"""

from blip_jax.eval import defaults


def get_config(arg: str = ""):
    del arg
    return defaults.base("classification")
