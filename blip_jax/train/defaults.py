"""The fields every training config has, with the BLIP-2 paper's defaults; `configs/*.py` start from
`base()` and set what their stage and preset change. One place for each default."""

from __future__ import annotations

import ml_collections

from blip_jax.losses import BLIP_LABEL_SMOOTHING
from blip_jax.train.sharding import DEFAULT_RULES

# Parameters that train in BLIP-2 / InstructBLIP: ln_vision, the queries, the Q-Former (and its
# text embeddings), the projection to the LLM and stage 1's heads. Everything else is frozen.
TRAINABLE = (r"^ln_vision/", r"^query_tokens$", r"^qformer", r"^language_projection/", r"^vision_projection/",
             r"^text_projection/", r"^itm_head/", r"^itg_", r"^temp$")


# The papers' frozen LLMs (blip_jax.models.llm field names), for random-init presets and dry runs;
# with `model.init_from` the converted checkpoint's own config is used instead.
PAPER_LLMS = {
    "opt2.7b": dict(vocab_size=50272, hidden_size=2560, num_layers=32, num_heads=32, ffn_dim=10240),
    "opt6.7b": dict(vocab_size=50272, hidden_size=4096, num_layers=32, num_heads=32, ffn_dim=16384),
    # BLIP-2's Flan-T5 runs its gated FFN with exact GELU
    "flant5xl": dict(vocab_size=32128, d_model=2048, d_kv=64, d_ff=5120, num_layers=24, num_decoder_layers=24,
                     num_heads=32,
                     activation="gelu", gated=True, tie_word_embeddings=False, dropout=0.0),
    "flant5xxl": dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_decoder_layers=24,
                      num_heads=64,
                      activation="gelu", gated=True, tie_word_embeddings=False, dropout=0.0),
    "vicuna7b": dict(vocab_size=32001, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
                     max_position_embeddings=2048),
    "vicuna13b": dict(vocab_size=32001, hidden_size=5120, intermediate_size=13824, num_layers=40, num_heads=40,
                      max_position_embeddings=2048),
}


# `model.precision`: the dtypes it stands for. Trainable weights and optimizer state stay fp32
# (master weights) either way; every matmul accumulates in fp32 (`layers.Dense`), and softmax,
# norms, losses and ITC features run in fp32.
PRECISIONS = {
    "fp32": dict(dtype="float32", frozen_dtype="float32", qformer_dtype="float32"),
    # bf16 compute everywhere, frozen ViT and LLM stored in bf16 (LAVIS's fp16 ViT, without fp16's overflow)
    "bf16": dict(dtype="bfloat16", frozen_dtype="bfloat16", qformer_dtype="bfloat16"),
}


def dtypes(model) -> dict[str, str]:
    """The compute dtype (`dtype`: the towers'; `qformer_dtype`: the Q-Former's) and the frozen
    towers' storage dtype (`frozen_dtype`) of a `model` config section: its precision's, unless set."""
    chosen = PRECISIONS[model.get("precision", "fp32")]
    return {field: model.get(field) or default for field, default in chosen.items()}


def source_defaults() -> dict:
    """One source's settings (`blip_jax.data.sources`); also each entry of `data.mixture`."""
    return dict(kind="synthetic", root="", path="", image_root="", layout="auto", split="train", annotations="",
                image_pattern="", tfds_name="", data_dir="", task="", expand_captions="auto",
                instruction_family="",  # InstructBLIP: the template family of this source's records
                num_records=10_000, image_size=64, wrong_fraction=0.0)  # the last three: synthetic data only


def data_defaults() -> ml_collections.ConfigDict:
    """Where records come from and how they become model inputs (`blip_jax.train.inputs`)."""
    return ml_collections.ConfigDict(dict(
        **source_defaults(),
        seed=0,
        mixture={},  # name -> source settings plus `weight`; when set, replaces the source above
        balance="ratio",  # ratio | sqrt (InstructBLIP) | size
        augment="blip2_train",  # blip2_train | blip_train (RandAugment) | eval
        min_scale=0.5,  # random resized crop scale range [min_scale, 1]
        max_words=50,  # captions and questions are cut to this many words
        prompt="",  # prefix of every cleaned caption (BLIP's "a picture of ")
        # instruction_family (a source setting): InstructBLIP's template family; empty: each record's task decides
        max_text_len=32,
        # LM stages (LAVIS's max_txt_len / max_output_txt_len): the prompt (instruction, question) is
        # cut to max_prompt_len tokens on the LLM tokenizer's side (InstructBLIP: left), the target
        # from the right to max_target_len, each keeping its special tokens; 0: no limit but max_text_len
        max_prompt_len=0,
        max_target_len=0,
        max_answers=10,  # BLIP VQA: answers kept per question (each annotator's distinct answer)
        max_answer_len=10,  # BLIP VQA: answer tokens incl. [DEC] and [SEP]
        read_threads=2,  # threads preparing records ahead in each process
        worker_count=0,  # grain worker processes decoding images; 0: in-process
    ))


def base() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.objective = "lm"  # a stage of blip_jax.train.objectives.STAGES
    c.seed = 0
    c.batch_size = 8  # global
    c.grad_accum_steps = 1
    c.total_steps = 100
    c.log_every = 10
    c.checkpoint_every = 50
    c.keep_checkpoints = 3
    c.async_checkpointing = True
    c.nonfinite = "stop"  # stop | skip
    c.report = True  # end with what the model learned on held-out synthetic records (W/report.json)
    c.mesh = dict(data=-1, fsdp=1, tensor=1)
    c.rules = [list(r) for r in DEFAULT_RULES]
    c.trainable = list(TRAINABLE)
    # LoRA adapters (blip_jax.models.lora) on the kernels these regexes match, e.g. the LLM's
    # r"language_model/.*/(q_proj|v_proj)/kernel$"; they train beside `trainable` (which may be [])
    c.lora = dict(targets=(), rank=8, alpha=16.0, dropout=0.0)
    c.optim = dict(lr=1e-4, min_lr=1e-5, warmup_steps=2000, decay_steps=100, b1=0.9, b2=0.98, eps=1e-8,
                   weight_decay=0.05, clip_norm=0.0,
                   schedule="cosine", warmup_lr=0.0, decay_rate=0.9, steps_per_epoch=0)  # the last three: "step"
    c.loss = dict(itc_label_smoothing=0.1, itg_label_smoothing=0.1, lm_label_smoothing=0.0, bos_token_id=-1,
                  # BLIP: momentum encoders, queues, distillation, [ENC] / prompt token counts (set per run)
                  momentum=0.995, alpha=0.4, alpha_ramp_steps=2000, queue_size=57600,
                  blip_lm_label_smoothing=BLIP_LABEL_SMOOTHING, prompt_length=0,
                  # ITM hard negatives from the whole global batch ("global": BLIP's negative_all_rank)
                  # or from each device's rows ("device": BLIP pre-training); batch_shards is set per run
                  itm_negatives="global", batch_shards=1)
    c.data = data_defaults()
    c.model = ml_collections.ConfigDict(dict(
        init_from="",  # a converted blip-jax model directory; empty: random initialisation from the fields
        architecture="generation", instruct=False, qformer_input="prompt", llm_family="opt", num_query_tokens=32, embed_dim=256,
        qformer_vocab_size=30523, qformer_max_positions=512,
        precision="fp32",  # a key of PRECISIONS; a dtype field below set to a dtype wins over it
        dtype="", frozen_dtype="", qformer_dtype="", scan_layers=False, remat_policy="none",
        resolution=0,  # BLIP-2 from init_from: fine-tune at this image size (ViT positions resized); 0: its own
        int8_frozen=False,  # keep the frozen ViT / LLM kernels in int8 with per-channel scales (models.quant)
        vision=dict(hidden_size=1408, intermediate_size=6144, num_layers=39, num_heads=16, image_size=224,
                    patch_size=14, layer_norm_eps=1e-6, final_norm=False),
        qformer=dict(hidden_size=768, intermediate_size=3072, num_layers=12, num_heads=12, encoder_hidden_size=1408,
                     cross_attention_frequency=2, hidden_dropout=0.1, attention_dropout=0.1,
                     use_qformer_text_input=False),
        llm=dict(),
    ))
    return c


def blip_base(objective: str) -> ml_collections.ConfigDict:
    """A BLIP training config (ViT-B/16 and BERT-base MED; everything trains), from `base()`, at the
    stage's learning rate and resolution (`blip_jax.train.objectives`); fine-tuning's crop scales
    (0.5-1) and caption lengths (50 words; pre-training's preset sets its own)."""
    from blip_jax.train.objectives import STAGES

    stage = STAGES[objective]
    c = base()
    c.objective = objective
    c.trainable = [r".*"]
    c.optim.update(lr=stage.lr, min_lr=1e-6, warmup_steps=3000, b2=0.999, weight_decay=0.05)
    c.data.augment = "blip_train"  # RandAugment as BLIP
    c.data.min_scale = 0.5  # BLIP's random resized crop scales
    c.data.max_words = 50
    c.data.max_text_len = 35
    m = c.model
    m.embed_dim = 256
    m.vision = dict(hidden_size=768, intermediate_size=3072, num_layers=12, num_heads=12,
                    image_size=stage.image_size, patch_size=16, layer_norm_eps=1e-6,
                    final_norm=True)
    m.text = dict(vocab_size=30524, hidden_size=768, intermediate_size=3072, num_layers=12, num_heads=12,
                  max_position_embeddings=512, layer_norm_eps=1e-12, encoder_hidden_size=768,
                  hidden_dropout=0.1, attention_dropout=0.1)
    return c


def blip_finetune(c: ml_collections.ConfigDict, epochs: int, records: int) -> ml_collections.ConfigDict:
    """BLIP's fine-tuning schedule (the paper): batch 256, the objective's lr without warmup, cosine to
    0 over `epochs` epochs of `records`; retrieval's distillation ramps over the first epoch."""
    c.batch_size = 256
    epoch = records // c.batch_size
    c.total_steps = epochs * epoch
    c.optim.update(warmup_steps=0, decay_steps=c.total_steps, min_lr=0.0)
    c.loss.alpha_ramp_steps = epoch
    c.model.precision = "bf16"
    return c


def blip_coco_finetune(c: ml_collections.ConfigDict, epochs: int) -> ml_collections.ConfigDict:
    """`blip_finetune` on COCO's Karpathy train split (566,747 captions)."""
    c.data.update(kind="json", path="coco_karpathy_train.json", image_root="coco/images")
    return blip_finetune(c, epochs, 566_747)


def blip_tiny(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Shrink a BLIP config to run on a CPU (tests, demos, the CapFilt experiment)."""
    c.batch_size = 8
    c.total_steps = 20
    c.log_every = 5
    c.checkpoint_every = 10
    c.optim.update(lr=1e-3, min_lr=1e-4, warmup_steps=2, decay_steps=60)
    c.loss.update(queue_size=64, alpha_ramp_steps=50)
    c.data.update(image_size=32, max_text_len=16, augment="eval")
    m = c.model
    m.embed_dim = 16
    m.vision = dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, image_size=32, patch_size=8,
                    layer_norm_eps=1e-6, final_norm=True)
    m.text = dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, max_position_embeddings=64,
                  layer_norm_eps=1e-12, encoder_hidden_size=32, hidden_dropout=0.0, attention_dropout=0.0)
    return c


def tiny(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Shrink a config to run on a CPU in about a second a step (tests and demos)."""
    c.batch_size = 8
    c.total_steps = 20
    c.log_every = 5
    c.checkpoint_every = 10
    c.optim.lr = 1e-3
    c.optim.min_lr = 1e-4
    c.optim.warmup_steps = 2
    c.optim.decay_steps = 60
    c.data.image_size = 32
    c.data.augment = "eval"  # a random crop can cut a shape out of the synthetic image its caption names
    c.data.max_text_len = 16
    m = c.model
    m.num_query_tokens = 4
    m.embed_dim = 16
    m.qformer_max_positions = 64
    m.vision = dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, image_size=32, patch_size=8,
                    layer_norm_eps=1e-6, final_norm=False)
    m.qformer = dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, encoder_hidden_size=32,
                     cross_attention_frequency=2, hidden_dropout=0.0, attention_dropout=0.0,
                     use_qformer_text_input=m.qformer.use_qformer_text_input)
    tiny_llm = {
        "opt": dict(hidden_size=32, num_layers=2, num_heads=4, ffn_dim=64, max_position_embeddings=64, dropout=0.0),
        "t5": dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
                   relative_attention_max_distance=16, activation="gelu", gated=True, tie_word_embeddings=False,
                   dropout=0.0),
        "llama": dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      max_position_embeddings=128),
    }
    m.llm = tiny_llm.get(m.llm_family, {})
    return c
