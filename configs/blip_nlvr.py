"""BLIP NLVR2 fine-tuning (LAVIS `BlipNLVR`): is a statement true of a pair of images? The statement
([ENC] text) is encoded over both images, each text layer's cross-attention split in two (averaged,
merged by a linear layer from layer 6 on); a two-layer head classifies the first token. From a
pre-trained BLIP the cross-attention is copied into both halves and the merge layers start fresh.

    blip-jax train --config=configs/blip_nlvr.py:tiny --workdir=/tmp/nlvr
    blip-jax train --config=configs/blip_nlvr.py:nlvr2 --config.model.init_from=CONVERTED_BLIP_PRETRAIN \\
        --config.data.root=nlvr2 --workdir=W
    blip-jax eval --config=configs/eval/nlvr.py:test_p --ckpt=W --workdir=W/eval ...

Presets: `tiny` (synthetic image pairs, 2 text layers of which the second merges, CPU) and `nlvr2` (LAVIS's
nlvr_ft.yaml: lr 2.5e-5 cosine to 0, weight decay 0.05, 15 epochs, 384 px, RandAugment; batch 16 per
GPU on 8 GPUs). The paper's NLVR2 test-P: 83.09 (BLIP ViT-B 129M).
"""

from blip_jax.train import defaults

NLVR2_TRAIN = 86_373  # LAVIS's nlvr_train.json


def get_config(arg: str = "tiny"):
    c = defaults.blip_base("blip_nlvr")
    c.model.scan_layers = False  # the text layers differ (merge layers from 6): never scanned
    c.model.text.merge_from_layer = 6  # LAVIS: layer_num >= 6
    if arg == "tiny":
        c = defaults.blip_tiny(c)
        c.data.update(kind="synthetic_pairs", num_records=128)  # a small set, seen ~40 times: the loss falls
        c.model.text.merge_from_layer = 1  # of 2 layers: one averages, one merges
        c.batch_size = 16
        c.total_steps = 300
        c.log_every = 25
        c.checkpoint_every = 300
        c.optim.update(lr=1e-3, decay_steps=300)
        return c
    if arg == "nlvr2":
        defaults.blip_finetune(c, epochs=15, records=NLVR2_TRAIN)
        c.batch_size = 128
        c.total_steps = 15 * NLVR2_TRAIN // c.batch_size
        c.optim.update(decay_steps=c.total_steps)
        c.data.update(kind="json", path="nlvr_train.json", image_root="images")
        return c
    raise ValueError(f"unknown preset {arg!r}: tiny, nlvr2")
