"""Multiple choice / binary classification by LM log-likelihood ranking (InstructBLIP's protocol).

    blip-jax eval --config=configs/eval/choice.py:scienceqa --ckpt=instructblip-vicuna --workdir=runs/sqa \
        --config.data.path=scienceqa_img_test.jsonl --config.data.image_root=scienceqa/images
"""

from blip_jax.eval import defaults

TEMPLATES = {
    "scienceqa": "Context: {context} Question: {question} Options: {options}. Answer:",
    "iconqa": "Question: {question} Options: {options}. Short answer:",
    "aokvqa": "Question: {question} Options: {options}. Short answer:",
    "vsr": "Based on the image, is this statement true or false? {question}",
    "hateful_memes": "This is an image with: \"{question}\" written on it. Is it hateful? Answer:",
}


def get_config(arg: str = "scienceqa"):
    c = defaults.base("choice")
    if arg not in TEMPLATES:
        raise ValueError(f"unknown preset {arg!r}: {', '.join(TEMPLATES)}")
    c.template = TEMPLATES[arg]
    c.metric = "auc" if arg == "hateful_memes" else "accuracy"  # Hateful Memes: choices ["yes", "no"]
    return c
