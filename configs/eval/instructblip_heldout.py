"""InstructBLIP's zero-shot held-out evaluation (the paper's Table 1) as one suite: every image
dataset's eval job in turn on one model, one table against the paper.

    blip-jax eval-suite --suite=configs/eval/instructblip_heldout.py --ckpt=instructblip-vicuna-7b \\
        --data_root=data/heldout --workdir=runs/heldout [--only=gqa,textvqa]

Files are LAVIS-style annotation JSON under --data_root, at the paths below (a missing one: that
job is skipped and counted). Metrics as the paper prints them: CIDEr and AUC x100, accuracies in
%. Paper numbers are given where BLIP_FAMILY.md quotes them (FlanT5-XL / Vicuna-7B); the others
are left blank rather than copied from memory. Visual Dialog (MRR over 100 candidate answers per
round) and the three video QA sets are listed as not supported.
"""

import ml_collections


def _job(name, config, path, image_root, metric, paper=None, annotations=""):
    return ml_collections.ConfigDict(dict(name=name, config=config, metric=metric, paper=paper or {},
                                          data=dict(path=path, image_root=image_root, annotations=annotations)))


def get_config():
    c = ml_collections.ConfigDict()
    c.name = "instructblip_heldout"
    c.paper_models = ["flant5xl", "vicuna7b"]
    c.jobs = [
        _job("nocaps", "caption.py:nocaps", "nocaps/nocaps_val.json", "nocaps/images", "cider",
             {"flant5xl": 119.9, "vicuna7b": 123.1}),
        _job("flickr30k", "caption.py:flickr30k", "flickr30k/flickr30k_test.json", "flickr30k/images", "cider"),
        _job("gqa", "vqa.py:gqa", "gqa/testdev_balanced_questions.json", "gqa/images", "accuracy",
             {"flant5xl": 48.4, "vicuna7b": 49.2}),
        _job("vsr", "choice.py:vsr", "vsr/vsr_zeroshot_test.json", "vsr/images", "accuracy"),
        _job("iconqa", "choice.py:iconqa", "iconqa/iconqa_test.json", "iconqa/images", "accuracy"),
        _job("textvqa", "vqa.py:textvqa", "textvqa/textvqa_val.json", "textvqa/images", "accuracy",
             {"flant5xl": 46.6, "vicuna7b": 50.1}),
        _job("vizwiz", "vqa.py:vizwiz", "vizwiz/vizwiz_val.json", "vizwiz/images", "accuracy",
             {"flant5xl": 32.7, "vicuna7b": 34.5}),
        _job("scienceqa_img", "choice.py:scienceqa", "scienceqa/scienceqa_img_test.json", "scienceqa/images",
             "accuracy", {"flant5xl": 70.4, "vicuna7b": 60.5}),
        _job("hateful_memes", "choice.py:hateful_memes", "hateful_memes/dev_seen.json", "hateful_memes/images",
             "auc"),
    ]
    c.unsupported = {
        "visdial": "Visual Dialog's MRR over 100 candidate answers per round is not implemented",
        "msvd_qa": "video QA (4 frames per clip through the Q-Former) is not implemented",
        "msrvtt_qa": "video QA (4 frames per clip through the Q-Former) is not implemented",
        "ivqa": "video QA (4 frames per clip through the Q-Former) is not implemented",
    }
    return c
