"""Every evaluation config field with its default; `configs/eval/*.py` set their task and presets."""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from blip_jax.train.defaults import source_defaults

TASKS = ("retrieval", "caption", "vqa", "choice", "classification", "nlvr")


def base(task: str) -> ml_collections.ConfigDict:
    if task not in TASKS:
        raise ValueError(f"unknown eval task {task!r}; use one of {', '.join(TASKS)}")
    c = ml_collections.ConfigDict()
    c.task = task
    c.data = dict(source_defaults(), kind="json", split="test")  # the split's records (blip_jax.data.sources)
    c.batch_size = 32  # rows per device batch group (split over the local devices)
    c.shard_size = 256  # examples per resumable shard (W/shards)
    c.gallery = 24  # examples shown in W/gallery.html
    c.max_words = 50  # captions are cleaned and cut as LAVIS does
    # retrieval
    c.dataset = "coco"  # coco | flickr30k: picks the papers' k when k = -1
    c.k = -1
    c.itm_shard_pairs = 8192  # ITM re-ranking pairs per resumable shard
    # generation (caption, vqa): empty means the family's paper settings
    c.prompt = config_dict.placeholder(str)
    c.generation = {}
    # vqa
    c.mode = "generate"  # generate | rank (BLIP: score an answer list)
    c.metric = "vqa"  # vqa | exact_match (GQA) ; choice: accuracy | auc
    c.answer_list = ""  # rank mode: JSON list of candidate answers
    c.rank_k = 128  # rank mode: answers kept after the first-token pass
    # choice
    c.template = "Question: {question} Options: {options}. Short answer:"
    # classification
    c.templates = []  # empty: blip_jax.eval.classification.DEFAULT_TEMPLATES
    return c
