"""Prompts and decoding settings of the papers (BLIP, BLIP-2, InstructBLIP / LAVIS evaluation
configs): the defaults of the task methods `caption` and `vqa`. `generate` does not use them; its
defaults are the checkpoint's generation_config.json (see `blip_jax.model_base`)."""

# BLIP: the reference code's caption and VQA settings.
BLIP_CAPTION = dict(num_beams=3, max_new_tokens=20, min_new_tokens=5)
BLIP_VQA = dict(num_beams=3, max_new_tokens=10, min_new_tokens=1)

# BLIP-2 / InstructBLIP, by model kind ("opt", "t5", "llama" for BLIP-2's LLM family, "instruct").
CAPTION_PROMPTS = {"blip2": "a photo of", "instruct": "A short image description:"}
VQA_TEMPLATES = {"opt": "Question: {} Answer:", "t5": "Question: {} Short answer:",
                 "instruct": "Question: {} Short answer:"}
BLIP2_CAPTION = dict(num_beams=5, max_new_tokens=30, min_new_tokens=8)
BLIP2_VQA = {"opt": dict(num_beams=5, max_new_tokens=10, min_new_tokens=1, length_penalty=0.0),
             "t5": dict(num_beams=5, max_new_tokens=10, min_new_tokens=1, length_penalty=-1.0),
             "instruct": dict(num_beams=5, max_new_tokens=10, min_new_tokens=1, length_penalty=-1.0)}

# InstructBLIP's open-ended generation in LAVIS; pass it explicitly:
# model.generate(images, prompts, **blip_jax.INSTRUCT_PAPER).
INSTRUCT_PAPER = dict(num_beams=5, max_new_tokens=256, min_new_tokens=1, repetition_penalty=1.5,
                      length_penalty=1.0)


def task_options(defaults: dict, options: dict) -> dict:
    """A task's paper defaults under the caller's options. Sampling without a beam count samples
    (num_beams=1): the task's beam width is a beam-search setting, and HF cannot sample beams."""
    if options.get("do_sample") and "num_beams" not in options:
        defaults = {**defaults, "num_beams": 1}
    return {**defaults, **options}
