"""NLVR2 with BLIP's NLVR model: accuracy on the dev or test-P split (LAVIS's nlvr_dev.json /
nlvr_test.json: "images" [left, right], "sentence", "label").

    blip-jax eval --config=configs/eval/nlvr.py:test_p --ckpt=blip-nlvr --workdir=runs/nlvr \
        --config.data.root=nlvr2 --config.data.image_root=images

The number the released BLIP reaches (BLIP_FAMILY.md): NLVR2 test-P 83.09.
"""

from blip_jax.eval import defaults


def get_config(arg: str = "test_p"):
    c = defaults.base("nlvr")
    files = {"dev": "nlvr_dev.json", "test_p": "nlvr_test.json"}
    if arg not in files:
        raise ValueError(f"unknown preset {arg!r}: {', '.join(files)}")
    c.data.path = files[arg]
    return c
