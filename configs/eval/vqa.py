"""Visual question answering: generate mode with each family's prompt, or BLIP's rank mode over an
answer list; official VQA accuracy (GQA: exact match).

    blip-jax eval --config=configs/eval/vqa.py:vqav2 --ckpt=blip2-flan-t5-xl --workdir=runs/vqa \
        --config.data.path=vqav2/v2_OpenEnded_mscoco_val2014_questions.json \
        --config.data.annotations=vqav2/v2_mscoco_val2014_annotations.json --config.data.image_root=coco/val2014
"""

from blip_jax.eval import defaults


def get_config(arg: str = "vqav2"):
    c = defaults.base("vqa")
    presets = {"vqav2": ("vqa", "val"), "okvqa": ("vqa", "val"), "gqa": ("exact_match", "testdev"),
               "vizwiz": ("vqa", "val"), "textvqa": ("vqa", "val")}
    if arg not in presets:
        raise ValueError(f"unknown preset {arg!r}: {', '.join(presets)}")
    c.metric, c.data.split = presets[arg]
    if arg == "vizwiz":  # VizWiz's unanswerable questions: the paper prompt asks for a short answer
        c.generation = dict(max_new_tokens=10)
    return c
