"""LAVIS `.pth` checkpoints of the BLIP classes, converted with `blip-jax convert --lavis`, compute
what LAVIS computes on them.

The fixtures in tests/fixtures/lavis were written by LAVIS 1.0.2 itself (../shared/lavis,
`make_fixtures.py OUT --only blip,blip2 --variant blipjax --seed 3`): tiny random models of each
class, their `.pth` files (BLIP-2: full and trimmed, with the EVA ViT's own file) and LAVIS's outputs
(reference.npz / reference.json). No LAVIS is needed here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import torch

import blip_jax
from blip_jax import generation
from blip_jax.api import encode_image, generate_text
from blip_jax.models.blip import Blip

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "lavis"
TOKENIZER = FIXTURES / "bert_tokenizer"
MODEL_TYPES = {"blip_caption": "blip_caption/base_coco", "blip_retrieval": "blip_retrieval/coco",
               "blip_vqa": "blip_vqa/vqav2", "blip_pretrain": "blip_pretrain/base",
               "blip_feature_extractor": "blip_feature_extractor/base"}
CHECKPOINT = {name: FIXTURES / ("blip_pretrain" if name == "blip_feature_extractor" else name) / "model.pth"
              for name in MODEL_TYPES}
ATOL = 1e-4


def convert(name: str, dst: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "blip_jax.cli", "convert", str(CHECKPOINT[name]), str(dst),
                           "--lavis", MODEL_TYPES[name], "--tokenizer", str(TOKENIZER), *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def lavis(tmp_path_factory):
    """name -> (converted model, LAVIS's reference.json, reference.npz, NHWC pixels)."""
    root = tmp_path_factory.mktemp("lavis")
    out = {}
    for name in MODEL_TYPES:
        done = convert(name, root / name, "--heads", "vision=4,text=3")
        assert done.returncode == 0, done.stderr[-3000:]
        ref = json.loads((FIXTURES / name / "reference.json").read_text())
        arrays = np.load(FIXTURES / name / "reference.npz")
        out[name] = (blip_jax.load(root / name), ref, arrays, arrays["pixel_values"].transpose(0, 2, 3, 1))
    return out


def _close(ours, theirs, what: str):
    diff = float(np.abs(np.asarray(ours, np.float64) - np.asarray(theirs, np.float64)).max())
    print(f"{what}: max |blip-jax - LAVIS| = {diff:.2e}")
    assert diff < ATOL, (what, diff)


def _decoder_logits(model, image_embeds, texts, first_token):
    """Teacher-forced decoder logits of `texts` ([CLS] -> `first_token`, padded to the longest)."""
    enc = model.tokenizer(texts, padding="longest", truncation=True, max_length=20)
    ids = np.asarray(enc["input_ids"], np.int32)
    ids[:, 0] = first_token
    mask = np.asarray(enc["attention_mask"], np.int32)
    from blip_jax.models import tying

    params = tying.applied_form(model.config, model.params)
    logits, _ = Blip(model.config).apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask),
                                         jnp.asarray(image_embeds), method=Blip.decode)
    return np.asarray(logits)


def test_caption_equals_lavis(lavis):
    _check_caption(*lavis["blip_caption"])


def _check_caption(model, ref, arrays, pixels):
    """A caption model's image embeddings, decoder logits and greedy / beam-3 ids against LAVIS's."""
    embeds = model.image_embeddings(pixels)
    _close(embeds, arrays["image_embeds"], "caption image embeds")
    logits = _decoder_logits(model, embeds, ref["train_texts"], model.config.text.bos_token_id)
    _close(logits, arrays["decoder_logits"], "caption decoder logits")
    prompt = ref["prompt"]
    prompt_ids = model.tokenizer([prompt])["input_ids"][0][:-1].copy()
    prompt_ids[0] = model.config.text.bos_token_id
    kwargs = ref["generate_kwargs"]
    for beams in (1, 3):
        theirs = np.asarray(ref["generate"][f"beam{beams}"]["ids"])
        config = generation.GenerationConfig.from_kwargs(
            num_beams=beams, max_new_tokens=kwargs["max_length"] - len(prompt_ids),
            min_new_tokens=max(0, kwargs["min_length"] - len(prompt_ids)), repetition_penalty=1.0,
            eos_token_id=model.config.text.sep_token_id, pad_token_id=model.config.text.pad_token_id)
        ids = np.broadcast_to(prompt_ids.astype(np.int32), (len(pixels), len(prompt_ids)))
        ours = generate_text(model.config, model.params, encode_image(model.config, model.params, pixels), None,
                             ids, config)
        np.testing.assert_array_equal(np.asarray(ours)[:, : theirs.shape[1]], theirs)
        texts = model.caption(pixels, prompt=prompt, num_beams=beams, max_new_tokens=config.max_new_tokens,
                              min_new_tokens=0, repetition_penalty=1.0, length_penalty=1.0)
        assert [t[len(prompt):] for t in texts] == ref["generate"][f"beam{beams}"]["text"]  # LAVIS cuts by characters


def test_retrieval_equals_lavis(lavis):
    model, ref, arrays, pixels = lavis["blip_retrieval"]
    _close(model.image_embeddings(pixels), arrays["image_embeds"], "retrieval image embeds")
    _close(model.itc(pixels, ref["texts"]), arrays["itc_sim"], "retrieval ITC similarity")
    probs = np.stack([model.itm([image], ref["texts"]) for image in pixels])
    _close(probs, arrays["itm_prob_all_pairs"], "retrieval ITM probability ([ENC])")
    embeds = model.image_embeddings(pixels)
    pairs = np.array([(i, t) for i in range(4) for t in range(4)])
    logits = model.match_logits(embeds, pairs[:, 0], [ref["texts"][t] for t in pairs[:, 1]])
    _close(logits, arrays["itm_logits_all_pairs"][..., 1].reshape(-1), "retrieval ITM match logits")


def test_feature_extractor_from_the_pretraining_checkpoint_equals_lavis(lavis):
    model, ref, arrays, pixels = lavis["blip_feature_extractor"]
    _close(model.image_embeddings(pixels), arrays["image_embeds"], "feature extractor image embeds")
    _close(model.image_features(pixels), arrays["image_embeds_proj"][:, 0], "feature extractor image features")
    _close(model.text_features(ref["texts"]), arrays["text_embeds_proj"][:, 0], "feature extractor text features")
    _close(model.itc(pixels, ref["texts"]), arrays["itc_sim"], "feature extractor ITC")


def test_vqa_equals_lavis(lavis):
    model, ref, arrays, pixels = lavis["blip_vqa"]
    _close(model.image_embeddings(pixels), arrays["image_embeds"], "vqa image embeds")
    for beams in (1, 3):
        answers = model.vqa(pixels, ref["questions"], num_beams=beams, max_new_tokens=9, min_new_tokens=0)
        assert answers == ref[f"generate_beam{beams}"]["answers"]
    rank = ref["rank"]
    assert model.vqa_rank(pixels, ref["questions"], rank["answer_list"], k=rank["num_ans_candidates"]) == rank["answers"]


def test_pretraining_checkpoint_equals_lavis(lavis):
    model, ref, arrays, pixels = lavis["blip_pretrain"]
    embeds = model.image_embeddings(pixels)
    _close(embeds, arrays["image_embeds"], "pretrain image embeds")
    _close(model.image_features(pixels), arrays["image_feat"], "pretrain image features")
    _close(model.text_features(ref["texts"]), arrays["text_feat"], "pretrain text features")
    logits = _decoder_logits(model, embeds, ref["texts"], model.config.text.bos_token_id)
    width = logits.shape[1]
    _close(logits, arrays["decoder_logits"][:, :width], "pretrain decoder logits (tied decoder)")
    assert model.config.text.enc_token_id == model.tokenizer.enc_token_id


def test_a_checkpoint_of_another_class_or_unreadable_is_one_line(tmp_path):
    from blip_jax.testing import sample_images  # noqa: F401 (the package is importable without LAVIS)

    wrong = subprocess.run([sys.executable, "-m", "blip_jax.cli", "convert", str(CHECKPOINT["blip_retrieval"]),
                            str(tmp_path / "o"), "--lavis", "blip_caption/base_coco", "--tokenizer", str(TOKENIZER),
                            "--heads", "vision=4,text=3"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert wrong.returncode == 2 and "does not match LAVIS blip_caption/base_coco" in wrong.stderr
    assert "Traceback" not in wrong.stderr and not (tmp_path / "o").exists()
    unknown = convert("blip_caption", tmp_path / "o2")
    assert unknown.returncode == 2 and "heads" in unknown.stderr  # width 48: no 64-wide heads
    import torch

    torch.save({"model": {"x": torch.zeros(1)}, "hook": np.random.default_rng(0)}, tmp_path / "evil.pth")
    evil = subprocess.run([sys.executable, "-m", "blip_jax.cli", "convert", str(tmp_path / "evil.pth"),
                           str(tmp_path / "o3"), "--lavis", "blip_caption/base_coco", "--tokenizer", str(TOKENIZER)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert evil.returncode == 2 and "pickled objects" in evil.stderr and "Traceback" not in evil.stderr
    other = subprocess.run([sys.executable, "-m", "blip_jax.cli", "convert", str(CHECKPOINT["blip_caption"]),
                            str(tmp_path / "o4"), "--lavis", "img2prompt_vqa/base", "--tokenizer",
                            str(TOKENIZER)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert other.returncode == 2 and "not yet supported" in other.stderr
    # a BLIP-2 OPT file named as InstructBLIP: its Q-Former has no text FFN for the instruction
    named = subprocess.run([sys.executable, "-m", "blip_jax.cli", "convert", str(FIXTURES / "blip2_opt" / "model.pth"),
                            str(tmp_path / "o5"), "--lavis", "blip2_vicuna_instruct/vicuna7b", "--tokenizer",
                            str(TOKENIZER), "--llm", str(FIXTURES / "vicuna-tiny"), "--heads", "vision=4,text=3"],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert named.returncode == 2 and "InstructBLIP" in named.stderr and "Traceback" not in named.stderr
    assert not (tmp_path / "o5").exists()


# ------------------------------------------------------------------ the training objectives' losses
def _loss_config(model, **more):
    from ml_collections import ConfigDict

    from blip_jax.losses import BLIP_LABEL_SMOOTHING

    return ConfigDict({"bos_token_id": model.config.text.bos_token_id,
                       "blip_lm_label_smoothing": BLIP_LABEL_SMOOTHING, "prompt_length": 0, **more})


def _tokens(model, texts, length: int = 20):
    enc = model.tokenizer(texts, padding="max_length", truncation=True, max_length=length)
    return jnp.asarray(np.asarray(enc["input_ids"], np.int32)), jnp.asarray(np.asarray(enc["attention_mask"], np.int32))


def _relative(ours, theirs, what):
    rel = abs(float(ours) - float(theirs)) / abs(float(theirs))
    print(f"{what}: blip-jax {float(ours):.6f}, LAVIS {float(theirs):.6f}, relative difference {rel:.1e}")
    assert rel < 1e-5, (what, float(ours), float(theirs))


def test_caption_loss_equals_lavis(lavis):
    from blip_jax.train.objectives import blip as objectives

    model, ref, arrays, pixels = lavis["blip_caption"]
    ids, mask = _tokens(model, ref["train_texts"])
    cfg = _loss_config(model, prompt_length=ref["prompt_length"])
    assert len(model.tokenizer.encode(ref["prompt"])) - 1 == ref["prompt_length"]  # how training sets it
    loss, _, _ = objectives.caption(Blip(model.config), model.params, {"pixels": jnp.asarray(pixels), "text_ids": ids,
                                                                       "text_mask": mask}, jax_key(), cfg, {})
    _relative(loss, arrays["loss_lm"][0], "caption LM loss")


def test_vqa_loss_equals_lavis(lavis):
    from blip_jax.train.objectives import blip as objectives

    model, ref, arrays, pixels = lavis["blip_vqa"]
    samples = ref["train_samples"]
    q_ids, q_mask = _tokens(model, ref["questions"])
    k = max(samples["n_answers"])
    answer_ids = np.zeros((4, k, 10), np.int32)
    answer_mask = np.zeros((4, k, 10), np.int32)
    weights = np.zeros((4, k), np.float32)
    start = 0
    for q, n in enumerate(samples["n_answers"]):
        for j in range(n):
            ids, mask = _tokens(model, [samples["answer"][start + j]], 10)
            answer_ids[q, j], answer_mask[q, j], weights[q, j] = ids[0], mask[0], samples["weight"][start + j]
        start += n
    batch = {"pixels": jnp.asarray(pixels), "question_ids": q_ids, "question_mask": q_mask,
             "answer_ids": jnp.asarray(answer_ids), "answer_mask": jnp.asarray(answer_mask),
             "answer_weights": jnp.asarray(weights)}
    loss, _, _ = objectives.vqa(Blip(model.config), model.params, batch, jax_key(), _loss_config(model), {})
    _relative(loss, arrays["loss"][0], "VQA loss")


def jax_key():
    import jax

    return jax.random.PRNGKey(0)


def _contrastive_case(lavis, name: str):
    """(objective, model, params, batch, loss config, extra state from the .pth, reference arrays)."""
    import jax

    from blip_jax.convert import lavis as lavis_checkpoints
    from blip_jax.train.objectives import blip as objectives

    model, ref, arrays, pixels = lavis[name]
    state = lavis_checkpoints.load_state_dict(CHECKPOINT[name])
    extra = jax.tree.map(jnp.asarray, lavis_checkpoints.momentum_state(state, model.config))
    config, params = model.config, dict(model.params)
    if name == "blip_retrieval":  # blip-jax fine-tunes retrieval with the pre-training heads (its temp)
        config, params["temp"] = config.replace(architecture="pretrain"), jnp.asarray(float(state["temp"]))
        ids, mask = _tokens(model, ref["texts"])
    else:  # LAVIS's own tokens (max_length padding)
        ids, mask = jnp.asarray(arrays["input_ids"], jnp.int32), jnp.asarray(arrays["attention_mask"], jnp.int32)
    negatives = ref["itm_negatives"]  # LAVIS's draw, fixed by the harness (argmax of its weights)
    batch = {"pixels": jnp.asarray(pixels), "text_ids": ids, "text_mask": mask,
             "itm_negative_image": jnp.asarray(negatives["image_for_text"]),
             "itm_negative_text": jnp.asarray(negatives["text_for_image"])}
    if name == "blip_retrieval":
        batch["image_index"] = jnp.asarray(ref["image_id"], jnp.int32)
    # LAVIS's alpha 0.4 ramps over 2 epochs of 10 iterations; its forward is at epoch 1, iteration 0: 0.2
    samples = ref["forward_samples"]
    ramp = 2 * samples["num_iters_per_epoch"]
    extra["updates"] = jnp.int32(samples["epoch"] * samples["num_iters_per_epoch"] + samples["iters"])
    cfg = _loss_config(model, momentum=0.995, alpha=0.4, alpha_ramp_steps=ramp, itm_negatives="global", batch_shards=1)
    objective = objectives.pretrain if name == "blip_pretrain" else objectives.retrieval
    return objective, Blip(config), params, batch, cfg, extra, arrays


@pytest.mark.parametrize("name", ["blip_pretrain", "blip_retrieval"])
def test_contrastive_losses_equal_lavis_with_its_momentum_encoders_and_queues(lavis, name):
    """ITC with momentum distillation over the queues (retrieval: idx_queue positives), ITM on LAVIS's
    negatives, LM (pre-training), after one momentum update, as LAVIS's forward does."""
    objective, module, params, batch, cfg, extra, arrays = _contrastive_case(lavis, name)
    loss, metrics, new_extra = objective(module, params, batch, jax_key(), cfg, extra)
    assert float(metrics["alpha"]) == pytest.approx(0.2)
    for ours, theirs in (("itc", "loss_itc"), ("itm", "loss_itm"), ("lm", "loss_lm")):
        if theirs in arrays.files:
            _relative(metrics[ours], arrays[theirs][0], f"{name} {ours}")
    _relative(loss, arrays["loss"][0], f"{name} total")
    if "image_queue_after" in arrays.files:
        _close(new_extra["image_queue"], arrays["image_queue_after"], f"{name} image queue after the step")
        _close(new_extra["text_queue"], arrays["text_queue_after"], f"{name} text queue after the step")


def test_a_pretraining_run_continues_a_lavis_pretraining_checkpoint(lavis, tmp_path):
    """`--lavis blip_pretrain/...` keeps the momentum encoders and queues (DST/train_extra); a
    `blip_pretrain` run started from it takes a first step whose loss is LAVIS's forward loss on the
    same batch (ITM negatives handed in; the iteration count, which the .pth does not hold, set to
    LAVIS's epoch 1 iteration 0)."""
    import jax

    from blip_jax.checkpoint import TRAIN_EXTRA
    from blip_jax.config_files import load_config
    from blip_jax.train import sharding, trainer

    name = "blip_pretrain"
    done = convert(name, tmp_path / "pt", "--heads", "vision=4,text=3")
    assert done.returncode == 0 and (tmp_path / "pt" / TRAIN_EXTRA).is_dir(), done.stderr[-2000:]
    _, _, _, batch, loss_cfg, extra, arrays = _contrastive_case(lavis, name)
    cfg = load_config(ROOT / "configs" / "blip_pretrain.py", "tiny")
    cfg.model.init_from = str(tmp_path / "pt")
    cfg.model.vision.image_size = 48
    cfg.batch_size = 4
    cfg.loss.update(queue_size=16, alpha=0.4, alpha_ramp_steps=loss_cfg.alpha_ramp_steps, momentum=0.995,
                    itm_negatives="global")
    mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
    st, task, step_fn, _ = trainer.setup(cfg, mesh)
    for key in ("image_queue", "text_queue", "idx_queue", "ptr"):  # continued, not drawn at random
        np.testing.assert_array_equal(np.asarray(st.train["extra"][key]), np.asarray(extra[key]))
    st.train["extra"]["updates"] = jax.device_put(extra["updates"], st.train["extra"]["updates"].sharding)
    _, metrics = step_fn(st.train, st.frozen, task.global_batch({k: np.asarray(v) for k, v in batch.items()}, mesh))
    _relative(metrics["loss"], arrays["loss"][0], "first step of a run from the LAVIS .pth")


# ------------------------------------------------------------------ BLIP-2 stage 1 (Blip2Qformer)
def _blip2(root: Path, folder: str, model_type: str, llm: str | None = None) -> dict:
    """"full" / "trimmed" -> a LAVIS BLIP-2 model converted from model.pth / model_trimmed.pth
    (+ the EVA ViT's own file, and the LLM's directory)."""
    out = {}
    for kind in ("full", "trimmed"):
        src = FIXTURES / folder / ("model_trimmed.pth" if kind == "trimmed" else "model.pth")
        extra = ["--vision", str(FIXTURES / "eva_vit_tiny.pth")] if kind == "trimmed" else []
        extra += ["--llm", str(FIXTURES / llm)] if llm else []
        done = subprocess.run([sys.executable, "-m", "blip_jax.cli", "convert", str(src), str(root / kind), "--lavis",
                               model_type, "--tokenizer", str(TOKENIZER), "--heads", "vision=4,text=3", *extra],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        out[kind] = blip_jax.load(root / kind)
    return out


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    return _blip2(tmp_path_factory.mktemp("stage1"), "blip2_qformer", "blip2/pretrain")


@pytest.mark.parametrize("kind", ["full", "trimmed"])
def test_blip2_stage1_equals_lavis(stage1, kind):
    folder = FIXTURES / "blip2_qformer"
    _check_stage1(stage1[kind], json.loads((folder / "reference.json").read_text()), np.load(folder / "reference.npz"))


def _check_stage1(model, ref, arrays):
    """A stage-1 model's image embeddings, query and text features, ITC and ITM against LAVIS's."""
    pixels = arrays["pixel_values"].transpose(0, 2, 3, 1)
    assert model.config.ln_vision_eps == 1e-5 and model.config.vision.layer_norm_eps == 1e-6
    _close(model.image_embeddings(pixels), arrays["image_embeds_ln"], "stage 1 ViT + ln_vision")
    _close(model.image_features(pixels), arrays["image_feats"], "stage 1 query features")
    _close(model.text_features(ref["texts"]), arrays["text_feat"], "stage 1 text features")
    _close(model.itc(pixels, ref["texts"]), arrays["itc_sim_max_over_queries"], "stage 1 ITC (max over queries)")
    probs = np.stack([model.itm([image], ref["texts"]) for image in pixels])
    _close(probs, arrays["itm_prob_all_pairs"], "stage 1 ITM probability")


def test_a_trimmed_blip2_file_without_its_vit_is_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "blip_jax.cli", "convert",
                           str(FIXTURES / "blip2_qformer" / "model_trimmed.pth"), str(tmp_path / "q"), "--lavis",
                           "blip2/pretrain", "--tokenizer", str(TOKENIZER)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2 and "--vision" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "q").exists()


def test_blip2_stage1_losses_equal_lavis(stage1):
    """ITC (max over queries, label smoothing 0.1), ITM on LAVIS's negatives, ITG ([DEC], label
    smoothing 0.1) of blip-jax's stage-1 objective on the converted weights and LAVIS's batch."""
    import jax

    from blip_jax.models.blip2 import Blip2
    from blip_jax.train.objectives import blip2 as objectives

    folder = FIXTURES / "blip2_qformer"
    model = stage1["full"]
    ref, arrays = json.loads((folder / "reference.json").read_text()), np.load(folder / "reference.npz")
    ids, mask = _tokens(model, ref["texts"], ref["config"]["max_txt_len"])
    negatives = ref["itm_negatives"]
    batch = {"pixels": jnp.asarray(arrays["pixel_values"].transpose(0, 2, 3, 1)), "text_ids": ids, "text_mask": mask,
             "itm_negative_image": jnp.asarray(negatives["image_for_text"]),
             "itm_negative_text": jnp.asarray(negatives["text_for_image"])}
    from ml_collections import ConfigDict

    cfg = ConfigDict({"itc_label_smoothing": 0.1, "itg_label_smoothing": 0.1,
                      "bos_token_id": model.tokenizer.bos_token_id})
    loss, metrics, _ = objectives.stage1(Blip2(model.config), model.params, batch, jax.random.PRNGKey(0), cfg, {})
    for ours, theirs in (("itc", "loss_itc"), ("itm", "loss_itm"), ("itg", "loss_lm")):
        _relative(metrics[ours], arrays[theirs][0], f"stage 1 {ours}")
    _relative(loss, arrays["loss"][0], "stage 1 total")


# ------------------------------------------------------------------ BLIP-2 stage 2: OPT (LAVIS 1.0.2)
@pytest.fixture(scope="module")
def blip2_opt(tmp_path_factory):
    return _blip2(tmp_path_factory.mktemp("opt"), "blip2_opt", "blip2_opt/pretrain_opt2.7b", "opt-tiny")


@pytest.mark.parametrize("kind", ["full", "trimmed"])
def test_blip2_opt_equals_lavis(blip2_opt, kind, tmp_path):
    """Blip2OPT: the projected queries, and greedy / beam-3 ids after its caption prompt and a VQA
    prompt, ending at "\\n" (LAVIS's eos for OPT, written to generation_config.json)."""
    folder = FIXTURES / "blip2_opt"
    src = folder / ("model_trimmed.pth" if kind == "trimmed" else "model.pth")
    extra = ["--vision", str(FIXTURES / "eva_vit_tiny.pth")] if kind == "trimmed" else []
    _check_opt(blip2_opt[kind], json.loads((folder / "reference.json").read_text()), np.load(folder / "reference.npz"))
    missing = subprocess.run([sys.executable, "-m", "blip_jax.cli", "convert", str(src), str(tmp_path / "o2"), "--lavis",
                              "blip2_opt/pretrain_opt2.7b", "--tokenizer", str(TOKENIZER), *extra],
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and "--llm" in missing.stderr and "Traceback" not in missing.stderr


def _check_opt(model, ref, arrays):
    """A Blip2OPT model's projected queries and greedy / beam-3 ids (two prompts) against LAVIS's."""
    pixels = arrays["pixel_values"].transpose(0, 2, 3, 1)
    assert model.config.llm.eos_token_id == ref["eos_token_id(\\n)"]  # LAVIS's OPT texts end at "\\n"
    _close(model.image_embeddings(pixels), arrays["image_embeds_ln"], "OPT model ViT + ln_vision")
    prefix = model._prefixes(model.preprocess(pixels), np.arange(len(pixels)), [""] * len(pixels))
    _close(prefix, arrays["opt_proj_out"], "OPT model projected queries")
    options = dict(max_new_tokens=ref["generate_kwargs"]["max_length"], min_new_tokens=0, repetition_penalty=1.0,
                   length_penalty=1.0)
    for beams in (1, 3):
        for name in ("default_prompt", "vqa_prompt"):
            theirs = ref[f"generate_{name}_beam{beams}"]
            prompt = model.tokenizer.decode(theirs["llm_input_ids"][0], skip_special_tokens=True)
            ours = model._generate_ids(pixels, [prompt] * len(pixels), {**options, "num_beams": beams})
            new = np.asarray(theirs["ids"])[:, len(theirs["llm_input_ids"][0]):]
            np.testing.assert_array_equal(ours[:, : new.shape[1]], new)


# ------------------------------------------------------------------ BLIP-2 stage 2: Flan-T5 (LAVIS 1.0.2)
T5_PROMPTS = {  # the harness's prompts (variants.py: blip2_t5.caption_prompt, vqa_prompts)
    "caption": ["a photo of"] * 3,
    "vqa_prompt": ["Question: what shape? Short answer:", "Question: what color is it? Short answer:",
                   "describe the image"],
}


@pytest.fixture(scope="module")
def blip2_t5(tmp_path_factory):
    return _blip2(tmp_path_factory.mktemp("t5"), "blip2_t5", "blip2_t5/pretrain_flant5xl", "flan-t5-tiny")


@pytest.mark.parametrize("kind", ["full", "trimmed"])
def test_blip2_t5_equals_lavis(blip2_t5, kind):
    """Blip2T5: exact-erf GELU in the LLM (LAVIS's override), the projected queries, greedy and
    beam-3 ids after its caption prompt and three VQA prompts."""
    model = blip2_t5[kind]
    folder = FIXTURES / "blip2_t5"
    ref, arrays = json.loads((folder / "reference.json").read_text()), np.load(folder / "reference.npz")
    assert model.config.llm.activation == ref["dense_act_fn_used"] == "gelu"
    pixels = arrays["pixel_values"].transpose(0, 2, 3, 1)
    _close(model.image_embeddings(pixels), arrays["image_embeds_ln"], "T5 model ViT + ln_vision")
    prefix = model._prefixes(model.preprocess(pixels), np.arange(len(pixels)), [""] * len(pixels))
    _close(prefix, arrays["t5_proj_out"], "T5 model projected queries")
    options = dict(max_new_tokens=ref["generate_kwargs"]["max_length"], min_new_tokens=0, repetition_penalty=1.0,
                   length_penalty=1.0)
    for beams in (1, 3):
        for name in ("caption", "vqa_prompt"):
            theirs = np.asarray(ref[f"generate_{name}_beam{beams}"]["ids"])[:, 1:]  # after the decoder start
            ours = model._generate_ids(pixels, T5_PROMPTS[name], {**options, "num_beams": beams})
            np.testing.assert_array_equal(ours[:, : theirs.shape[1]], theirs)


# ------------------------------------------------------------------ InstructBLIP (LAVIS main)
INSTRUCT = {"vicuna": ("blip2_vicuna_instruct", "blip2_vicuna_instruct/vicuna7b", "vicuna-tiny", "llm_proj"),
            "t5": ("blip2_t5_instruct", "blip2_t5_instruct/flant5xl", "flan-t5-tiny", "t5_proj")}


@pytest.fixture(scope="module")
def instruct(tmp_path_factory):
    """"vicuna" / "t5" -> {"full", "trimmed"} converted InstructBLIP models."""
    root = tmp_path_factory.mktemp("instruct")
    return {name: _blip2(root / name, folder, model_type, llm)
            for name, (folder, model_type, llm, _) in INSTRUCT.items()}


def _until_eos(ids: np.ndarray, eos: int) -> list[list[int]]:
    """Each row up to and including its first eos (what follows is padding, which LAVIS maps to 2)."""
    rows = []
    for row in np.asarray(ids).tolist():
        rows.append(row[: row.index(eos) + 1] if eos in row else row)
    return rows


@pytest.mark.parametrize("kind", ["full", "trimmed"])
@pytest.mark.parametrize("name", ["vicuna", "t5"])
def test_instructblip_equals_lavis(instruct, name, kind):
    """Blip2VicunaInstruct / Blip2T5Instruct: the instruction in the Q-Former, the projected queries,
    Vicuna's [PAD] and </s> bos (left-padded prompts equal to LAVIS's ids), greedy and beam-3 ids and
    texts for per-image instructions and one shared prompt under LAVIS's generate() defaults
    (repetition penalty 1.5, counted over what transformers 4.33 generated from inputs_embeds)."""
    folder_name, _, _, proj = INSTRUCT[name]
    folder = FIXTURES / folder_name
    model = instruct[name][kind]
    ref, arrays = json.loads((folder / "reference.json").read_text()), np.load(folder / "reference.npz")
    assert model.config.instruct and model.qformer_tokenizer.truncation_side == "left"
    pixels = arrays["pixel_values"].transpose(0, 2, 3, 1)
    instructions = ref["train_samples"]["text_input"]  # the harness's instructions, one per image
    prefix = model._prefixes(model.preprocess(pixels), np.arange(len(pixels)), instructions)
    _close(prefix, arrays[f"gen_instr_{proj}_out"], f"InstructBLIP {name} projected queries")
    if name == "vicuna":
        enc = model.tokenizer(instructions, padding="longest", padding_side="left")
        np.testing.assert_array_equal(enc["input_ids"], ref["tokenized_instr_left_padded"])
    else:
        assert model.config.llm.activation == "gelu"
    eos = model.config.llm.eos_token_id
    single = ["describe the image."] * len(pixels)  # variants.py (blipjax): instruct.single_prompt
    for prompts, key in ((instructions, "instr"), (single, "single")):
        for beams in (1, 3):
            theirs = ref[f"generate_{key}_beam{beams}"]
            new = np.asarray(theirs["ids"])[:, 1:]  # after <s> (Vicuna) or the decoder start (T5)
            ours = model._generate_ids(pixels, prompts, {"max_new_tokens": new.shape[1], "num_beams": beams})
            assert _until_eos(ours, eos) == _until_eos(new, eos), (key, beams)
            texts = model.generate(pixels, prompts, max_new_tokens=new.shape[1], num_beams=beams)
            assert [t.strip() for t in texts] == theirs["text"]


def _lm_task(model, preset: str, **data):
    """The training input pipeline of `preset`'s tiny config on `model` (`data` over its data settings)."""
    from blip_jax.config_files import load_config
    from blip_jax.train import inputs

    cfg = load_config(ROOT / "configs" / f"{preset}.py", "tiny")
    cfg.model.init_from = str(model.path)
    cfg.data.update(data)
    return inputs.Task(cfg, inputs.stage_of(cfg), None, model.config.vision.image_size, *inputs.tokenizers(cfg),
                       model.config.family.encoder_decoder, llm_eos_id=model.config.llm.eos_token_id)


def _lm_loss(model, preset: str, records: list[dict], arrays, **data) -> float:
    """blip-jax's LM objective on `records` made into examples (each with the draws of seed 0) by
    `_lm_task`, on LAVIS's images."""
    import jax

    from blip_jax.models.blip2 import Blip2
    from blip_jax.train.objectives import blip2 as objectives

    task = _lm_task(model, preset, **data)
    rows = [task.stage.example(task, r, np.random.default_rng(0)) for r in records]
    batch = {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}
    batch["pixels"] = jnp.asarray(arrays["pixel_values"].transpose(0, 2, 3, 1))
    loss, _, _ = objectives.language_modeling(Blip2(model.config), model.params, batch, jax.random.PRNGKey(0),
                                              task.cfg.loss, {})
    return loss


def test_blip2_opt_loss_equals_lavis(blip2_opt):
    """Stage 2 with OPT: caption records under the data prompt "a photo of " become LAVIS's
    "prompt caption\n" (its eos, cut at max_txt_len), with the prompt's tokens out of the loss."""
    folder = FIXTURES / "blip2_opt"
    ref, arrays = json.loads((folder / "reference.json").read_text()), np.load(folder / "reference.npz")
    prompt = ref["config"]["prompt"] + " "
    records = [{"caption": t.removeprefix(prompt)} for t in ref["train_samples"]["text_input"]]
    loss = _lm_loss(blip2_opt["full"], "blip2_stage2_opt", records, arrays, prompt=prompt,
                    max_text_len=ref["config"]["max_txt_len"])
    _relative(loss, arrays["loss"][0], "BLIP-2 OPT stage-2 loss")
    # uncut, the examples are LAVIS's tokens of text + "\n" (the cut above drops its "\n")
    task = _lm_task(blip2_opt["full"], "blip2_stage2_opt", prompt=prompt, max_text_len=32)
    for record, row in zip(records, ref["tokenized_train_text"]):
        ours = task.stage.example(task, record, np.random.default_rng(0))
        np.testing.assert_array_equal(ours["ids"][: len(row)], row)
        assert ours["loss_mask"][: ref["prompt_length"]].sum() == 0 and ours["loss_mask"][ref["prompt_length"]] == 1


def test_blip2_t5_loss_equals_lavis(blip2_t5):
    """Stage 2 with Flan-T5: two VQA records (the family's "Question: {} Short answer:" prompt) and a
    caption split by the prefix LM after "a photo of" (the draw of seed 0), cut as LAVIS 1.0.2 cuts
    them at max_txt_len (prompt and target from the right, </s> kept)."""
    folder = FIXTURES / "blip2_t5"
    ref, arrays = json.loads((folder / "reference.json").read_text()), np.load(folder / "reference.npz")
    samples = ref["train_samples"]
    records = []
    for prompt, output in zip(samples["text_input"], samples["text_output"]):
        question = prompt.removeprefix("Question: ").removesuffix(" Short answer:")
        records.append({"question": question, "answers": [output]} if question != prompt
                       else {"caption": f"{prompt} {output}"})
    assert records[1] == {"caption": "a photo of two dogs sitting"}  # split after 3 words by seed 0
    length = ref["config"]["max_txt_len"]
    loss = _lm_loss(blip2_t5["full"], "blip2_stage2_t5", records, arrays, max_prompt_len=length,
                    max_target_len=length)
    _relative(loss, arrays["loss"][0], "BLIP-2 Flan-T5 stage-2 loss")


@pytest.mark.parametrize("name", ["vicuna", "t5"])
def test_instructblip_loss_equals_lavis(instruct, name):
    """blip-jax's InstructBLIP objective, its examples made from LAVIS's (instruction, output) batch
    by the training input pipeline, equals LAVIS's forward loss on the same weights."""
    folder = FIXTURES / INSTRUCT[name][0]
    ref, arrays = json.loads((folder / "reference.json").read_text()), np.load(folder / "reference.npz")
    samples = ref["train_samples"]
    records = [{"instruction": i, "output": o} for i, o in zip(samples["text_input"], samples["text_output"])]
    # LAVIS's max_txt_len / max_output_txt_len of the fixture's model
    loss = _lm_loss(instruct[name]["full"], f"instructblip_{name}", records, arrays, max_text_len=32,
                    max_prompt_len=ref["config"]["max_txt_len"], max_target_len=ref["config"]["max_output_txt_len"])
    _relative(loss, arrays["loss"][0], f"InstructBLIP {name} LM loss")


def test_a_vicuna_directory_without_lavis_pad_row_gets_one(tmp_path):
    """A real Vicuna directory has no row for the [PAD] LAVIS adds (LAVIS draws it at random on every
    load): the trimmed file converts with the mean row added, reported, and generates LAVIS's ids."""
    import shutil

    import torch

    vicuna = tmp_path / "vicuna"
    shutil.copytree(FIXTURES / "vicuna-tiny", vicuna)
    weights = torch.load(vicuna / "pytorch_model.bin", weights_only=True)
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        weights[key] = weights[key][:-1].clone()
    torch.save(weights, vicuna / "pytorch_model.bin")
    config = json.loads((vicuna / "config.json").read_text())
    (vicuna / "config.json").write_text(json.dumps({**config, "vocab_size": config["vocab_size"] - 1}))
    done = subprocess.run([sys.executable, "-m", "blip_jax.cli", "convert",
                           str(FIXTURES / "blip2_vicuna_instruct" / "model_trimmed.pth"), str(tmp_path / "m"),
                           "--lavis", "blip2_vicuna_instruct/vicuna7b", "--tokenizer", str(TOKENIZER),
                           "--heads", "vision=4,text=3", "--vision", str(FIXTURES / "eva_vit_tiny.pth"),
                           "--llm", str(vicuna)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "m" / "conversion.json").read_text())
    assert report["llm_rows_added"] == {"model.embed_tokens.weight": 1, "lm_head.weight": 1}
    model = blip_jax.load(tmp_path / "m")
    assert model.config.llm.vocab_size == config["vocab_size"] == len(model.tokenizer)
    folder = FIXTURES / "blip2_vicuna_instruct"
    ref, arrays = json.loads((folder / "reference.json").read_text()), np.load(folder / "reference.npz")
    theirs = np.asarray(ref["generate_instr_beam1"]["ids"])[:, 1:]
    ours = model._generate_ids(arrays["pixel_values"].transpose(0, 2, 3, 1), ref["train_samples"]["text_input"],
                               {"max_new_tokens": theirs.shape[1], "num_beams": 1})
    eos = model.config.llm.eos_token_id
    assert _until_eos(ours, eos) == _until_eos(theirs, eos)


# ------------------------------------------------------------------ LAVIS out: LAVIS runs what blip-jax exports
EXPORTED = FIXTURES / "exported"  # make_lavis_outputs.py: LAVIS's outputs on these files
EXPORTED_MODELS = {"blip_caption": ("blip_caption/base_coco", None, lambda m, r, a: _check_caption(
                       m, r, a, a["pixel_values"].transpose(0, 2, 3, 1))),
                   "blip2_qformer": ("blip2/pretrain", None, _check_stage1),
                   "blip2_opt": ("blip2_opt/pretrain_opt2.7b", "opt-tiny", _check_opt)}


@pytest.mark.parametrize("name", list(EXPORTED_MODELS))
def test_lavis_reproduces_a_moved_blip_jax_model_from_its_export(name, tmp_path):
    """A model moved away from its LAVIS weights (as training here would), exported with
    `--to lavis`, is what LAVIS's own code ran (LAVIS loaded the committed file with no missing or
    unexpected key): its outputs, generated ids included, equal blip-jax's on the moved model."""
    from blip_jax.testing import perturbed_copy

    model_type, llm = EXPORTED_MODELS[name][:2]
    done = subprocess.run([sys.executable, "-m", "blip_jax.cli", "convert", str(FIXTURES / name / "model.pth"),
                           str(tmp_path / "jax"), "--lavis", model_type, "--tokenizer", str(TOKENIZER),
                           "--heads", "vision=4,text=3", *(["--llm", str(FIXTURES / llm)] if llm else [])],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    perturbed_copy(tmp_path / "jax", tmp_path / "moved", seed=1)
    exported = subprocess.run([sys.executable, "-m", "blip_jax.cli", "export", str(tmp_path / "moved"),
                               str(tmp_path / "moved.pth"), "--to", "lavis"], cwd=ROOT, capture_output=True, text=True,
                              timeout=300)
    assert exported.returncode == 0, exported.stderr[-2000:]
    ours = torch.load(tmp_path / "moved.pth", weights_only=True)["model"]
    ran = torch.load(EXPORTED / f"{name}.pth", weights_only=True)["model"]  # the file LAVIS ran
    assert sorted(ours) == sorted(ran) and all(torch.equal(ours[k], ran[k]) for k in ours)
    ref = json.loads((EXPORTED / f"{name}.json").read_text())
    assert ref["missing_keys"] == [] and ref["unexpected_keys"] == []
    EXPORTED_MODELS[name][2](blip_jax.load(tmp_path / "moved"), ref, np.load(EXPORTED / f"{name}.npz"))
