"""InstructBLIP's 13 held-in training datasets as one `data.mixture` (the paper's section 2.4).

The paper trains on the training splits of 13 datasets (its Figure 2, yellow), each turned into
instructions by its task's templates, drawn with probability proportional to sqrt(size) and then
adjusted by hand: "we lower the weight of A-OKVQA, which features multiple-choice questions, and
increase the weight of OKVQA, which requires open-ended text generation". The paper gives no values
for those two adjustments; 0.5 and 2.0 here are this library's choice, in the paper's direction.
LLaVA-Instruct-150K's three parts are already instructions (no templates).

Files are LAVIS-style annotation JSON (`blip_jax.data.annotations`; LLaVA's own files as they
ship), relative to `data.root`:

    held_in_mixture()  ->  {"coco_caption": {kind: json, path: "coco/coco_karpathy_train.json", ...}, ...}
"""

from __future__ import annotations

from blip_jax.train.defaults import source_defaults

# name: (template family, annotation file, image folder, manual weight on top of sqrt(size))
HELD_IN: dict[str, tuple[str, str, str, float]] = {
    "coco_caption": ("caption", "coco/coco_karpathy_train.json", "coco/images", 1.0),
    "web_capfilt": ("caption", "capfilt/ccs_synthetic_filtered_large.json", "capfilt/images", 1.0),
    "textcaps": ("caption", "textcaps/textcaps_train.json", "textcaps/images", 1.0),
    "vqav2": ("vqa_short", "vqav2/vqa_train.json", "coco/images", 1.0),
    "okvqa": ("knowledge_vqa", "okvqa/okvqa_train.json", "coco/images", 2.0),
    "aokvqa": ("knowledge_vqa", "aokvqa/aokvqa_v1p0_train.json", "coco/images", 0.5),
    "ocrvqa": ("ocr_vqa", "ocrvqa/ocrvqa_train.json", "ocrvqa/images", 1.0),
    "vqg_vqav2": ("vqg", "vqav2/vqa_train.json", "coco/images", 1.0),
    "vqg_okvqa": ("vqg", "okvqa/okvqa_train.json", "coco/images", 1.0),
    "vqg_aokvqa": ("vqg", "aokvqa/aokvqa_v1p0_train.json", "coco/images", 1.0),
    "llava_conversation": ("", "llava/conversation_58k.json", "coco/train2017", 1.0),
    "llava_detail": ("", "llava/detail_23k.json", "coco/train2017", 1.0),
    "llava_reasoning": ("", "llava/complex_reasoning_77k.json", "coco/train2017", 1.0),
}


def held_in_mixture() -> dict[str, dict]:
    """The 13 held-in datasets as `data.mixture` entries (use with `data.balance = "sqrt"`)."""
    return {name: dict(source_defaults(), kind="json", path=path, image_root=images, instruction_family=family,
                       weight=weight)
            for name, (family, path, images, weight) in HELD_IN.items()}


def tiny_mixture(num_records: int = 64, image_size: int = 32) -> dict[str, dict]:
    """The same 13 entries, families and weights on the built-in synthetic shapes data (sizes
    differing so the sqrt balance matters), for runs on a CPU; the LLaVA parts keep the synthetic
    records' own instruction / output pairs."""
    return {name: dict(source_defaults(), kind="synthetic", num_records=num_records * (1 + i % 4), seed=i,
                       image_size=image_size, instruction_family=family, weight=weight)
            for i, (name, (family, _, _, weight)) in enumerate(HELD_IN.items())}
