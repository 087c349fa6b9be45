"""`blip-jax export SRC OUT --to transformers`: what transformers' from_pretrained loads, equal to the
blip-jax model (HF -> blip-jax -> HF gives back the original tensors bit for bit; a LAVIS model's
exported form computes what blip-jax computes)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file

import blip_jax

ROOT = Path(__file__).resolve().parents[1]
LAVIS = ROOT / "tests" / "fixtures" / "lavis"


def export(src, out) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "blip_jax.cli", "export", str(src), str(out), "--to", "transformers"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("architecture", ["caption", "retrieval", "vqa"])
def test_transformers_round_trip_is_bit_for_bit(architecture, hf_checkpoint, converted, tmp_path):
    src = hf_checkpoint(architecture)
    done = export(converted(architecture), tmp_path / "hf")
    assert done.returncode == 0, done.stderr[-2000:]
    original, exported = load_file(src / "model.safetensors"), load_file(tmp_path / "hf" / "model.safetensors")
    assert set(original) == set(exported)
    for key in original:
        assert torch.equal(original[key], exported[key]), key
    model = transformers.AutoConfig.from_pretrained(tmp_path / "hf").architectures[0]
    getattr(transformers, model).from_pretrained(tmp_path / "hf")  # loads, every tensor in place
    assert (tmp_path / "hf" / "preprocessor_config.json").is_file()


def test_a_lavis_caption_model_exports_to_what_blip_jax_computes(tmp_path):
    convert = subprocess.run([sys.executable, "-m", "blip_jax.cli", "convert", str(LAVIS / "blip_caption" / "model.pth"),
                              str(tmp_path / "jax"), "--lavis", "blip_caption/base_coco", "--tokenizer",
                              str(LAVIS / "bert_tokenizer"), "--heads", "vision=4,text=3"],
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert convert.returncode == 0, convert.stderr[-2000:]
    assert export(tmp_path / "jax", tmp_path / "hf").returncode == 0
    ours = blip_jax.load(tmp_path / "jax")
    hf = transformers.BlipForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    pixels = np.load(LAVIS / "blip_caption" / "reference.npz")["pixel_values"]
    ids = torch.tensor([[ours.config.text.bos_token_id, 8, 44, 39, 66, 61]])
    with torch.no_grad():
        theirs = hf(pixel_values=torch.from_numpy(pixels[:1]), input_ids=ids)
    embeds = ours.image_embeddings(pixels[:1].transpose(0, 2, 3, 1))
    diff = np.abs(theirs.image_embeds.numpy() - embeds).max()
    print(f"exported LAVIS caption model: image embeds max |transformers - blip-jax| = {diff:.2e}")
    assert diff < 1e-4
    captions = ours.caption(pixels.transpose(0, 2, 3, 1), num_beams=3, max_new_tokens=8, min_new_tokens=0)
    with torch.no_grad():
        out = hf.generate(pixel_values=torch.from_numpy(pixels), num_beams=3, max_new_tokens=8, min_new_tokens=0)
    processor_tokens = ours.tokenizer.batch_decode(out.numpy())
    assert [c.strip() for c in captions] == [t.strip() for t in processor_tokens]


def test_models_transformers_has_no_class_for_are_refused(tmp_path):
    done = subprocess.run([sys.executable, "-m", "blip_jax.cli", "convert", str(LAVIS / "blip_pretrain" / "model.pth"),
                           str(tmp_path / "pt"), "--lavis", "blip_pretrain/base", "--tokenizer",
                           str(LAVIS / "bert_tokenizer"), "--heads", "vision=4,text=3"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0
    refused = export(tmp_path / "pt", tmp_path / "out")
    assert refused.returncode == 2 and "no class for" in refused.stderr and not (tmp_path / "out").exists()


# ------------------------------------------------------------------ BLIP-2 / InstructBLIP
@pytest.mark.parametrize("kind", ["opt", "t5", "retrieval", "instruct_t5", "instruct_llama"])
def test_blip2_transformers_round_trip_is_bit_for_bit(kind, tmp_path):
    """HF -> blip-jax -> HF gives back every tensor; so does the config blip-jax writes itself (for
    models without hf_config.json), and transformers reads it back to the same blip-jax config."""
    from blip_jax.convert import convert
    from blip_jax.convert.blip2_keys import blip2_config_from_hf
    from blip_jax.convert.export import export_transformers
    from blip_jax.testing import write_tiny_blip2_checkpoint

    src = write_tiny_blip2_checkpoint(tmp_path / "src", kind)
    convert(src, tmp_path / "jax", progress=False)
    done = export(tmp_path / "jax", tmp_path / "hf")
    assert done.returncode == 0, done.stderr[-2000:]
    (tmp_path / "jax" / "hf_config.json").unlink()
    export_transformers(tmp_path / "jax", tmp_path / "hf_written")
    original = load_file(src / "model.safetensors")
    for out in ("hf", "hf_written"):
        exported = load_file(tmp_path / out / "model.safetensors")
        assert set(original) == set(exported), out
        for key in original:
            assert torch.equal(original[key], exported[key]), (out, key)
    written = transformers.AutoConfig.from_pretrained(tmp_path / "hf_written")
    getattr(transformers, written.architectures[0]).from_pretrained(tmp_path / "hf_written")
    ours = blip_jax.load(tmp_path / "jax").config
    assert blip2_config_from_hf(written.to_dict()) == ours
    if kind.startswith("instruct"):
        assert (tmp_path / "hf" / "qformer_tokenizer" / "tokenizer_config.json").is_file()


def test_a_stage1_model_trained_here_scores_the_same_in_transformers(tmp_path):
    """A BLIP-2 stage-1 run's W/model goes to Blip2ForImageTextRetrieval (its ITG head and ITC
    temperature reported as dropped) and gives the same ITM probabilities and ITC similarities."""
    import json

    from blip_jax.config_files import load_config
    from blip_jax.testing import sample_images
    from blip_jax.train import trainer

    cfg = load_config(ROOT / "configs" / "blip2_stage1.py", "tiny")
    cfg.update_from_flattened_dict({"total_steps": 4, "log_every": 2, "checkpoint_every": 4})
    trainer.train(cfg, tmp_path / "w", progress=False)
    done = export(tmp_path / "w", tmp_path / "hf")
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["class"] == "Blip2ForImageTextRetrieval" and "temp" in report["dropped"]
    assert any(p.startswith("itg_") for p in report["dropped"])
    ours = blip_jax.load(tmp_path / "w")
    hf = transformers.Blip2ForImageTextRetrieval.from_pretrained(tmp_path / "hf").eval()
    images = sample_images(2, size=ours.config.vision.image_size)
    texts = ["a red circle", "two blue squares"]
    pixels = torch.as_tensor(ours.preprocess(images).transpose(0, 3, 1, 2).copy())
    enc = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        itm = hf(pixel_values=pixels, **enc, use_image_text_matching_head=True).logits_per_image
        itc = hf(pixel_values=pixels[:1], **enc, use_image_text_matching_head=False).logits_per_image
    itm_diff = np.abs(ours.itm(images, texts) - torch.softmax(itm, -1)[:, 1].numpy()).max()
    itc_diff = np.abs(ours.itc(images[:1], texts) - itc.numpy()).max()
    print(f"trained stage 1 in transformers: ITM max diff {itm_diff:.2e}, ITC {itc_diff:.2e}")
    assert itm_diff < 1e-5 and itc_diff < 1e-5


LAVIS_LLM_MODELS = {"opt": ("blip2_opt", "blip2_opt/pretrain_opt2.7b", "opt-tiny"),
                    "vicuna_instruct": ("blip2_vicuna_instruct", "blip2_vicuna_instruct/vicuna7b", "vicuna-tiny"),
                    "t5": ("blip2_t5", "blip2_t5/pretrain_flant5xl", "flan-t5-tiny")}


def _convert_lavis(name, out):
    folder, model_type, llm = LAVIS_LLM_MODELS[name]
    done = subprocess.run([sys.executable, "-m", "blip_jax.cli", "convert", str(LAVIS / folder / "model.pth"), str(out),
                           "--lavis", model_type, "--tokenizer", str(LAVIS / "bert_tokenizer"), "--heads",
                           "vision=4,text=3", "--llm", str(LAVIS / llm)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return LAVIS / folder


@pytest.mark.parametrize("name", ["opt", "vicuna_instruct"])
def test_a_lavis_blip2_model_exports_to_what_blip_jax_generates(name, tmp_path):
    """transformers' BLIP-2 classes place the queries at `<image>` tokens, which LAVIS models lack:
    the export adds the token (a mean row, suppressed in generation) and a processor; greedy and
    beam-3 ids after a prompt are then blip-jax's."""
    import json

    folder = _convert_lavis(name, tmp_path / "jax")
    done = export(tmp_path / "jax", tmp_path / "hf")
    assert done.returncode == 0, done.stderr[-2000:]
    added = json.loads(done.stdout)["image_token_added"]
    ours = blip_jax.load(tmp_path / "jax")
    hf = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path / "hf").eval()
    processor = transformers.AutoProcessor.from_pretrained(tmp_path / "hf")
    processor.tokenizer.padding_side = "left"
    pixels = np.load(folder / "reference.npz")["pixel_values"]
    prompts = ["a photo of", "a picture of two", "what is it?"]
    inputs = processor(images=list(pixels.transpose(0, 2, 3, 1)), text=prompts, padding=True, return_tensors="pt",
                       do_resize=False, do_rescale=False, do_normalize=False)
    assert (inputs.input_ids == added["id"]).sum(1).tolist() == [ours.config.num_query_tokens] * 3
    options = dict(max_new_tokens=8, min_new_tokens=0, repetition_penalty=1.0, length_penalty=1.0)
    for beams in (1, 3):
        mine = ours._generate_ids(pixels.transpose(0, 2, 3, 1), prompts, {**options, "num_beams": beams})
        with torch.no_grad():
            theirs = hf.generate(**inputs, num_beams=beams, do_sample=False, **options).numpy()
        np.testing.assert_array_equal(mine, theirs[:, inputs.input_ids.shape[1]:][:, : mine.shape[1]])


def test_a_flan_t5_transformers_5_cannot_hold_is_refused_in_one_line(tmp_path):
    """transformers 5 ties T5's lm_head to its shared embeddings; LAVIS's Flan-T5 has its own head."""
    _convert_lavis("t5", tmp_path / "jax")
    refused = export(tmp_path / "jax", tmp_path / "hf")
    assert refused.returncode == 2 and "lm_head" in refused.stderr and "Traceback" not in refused.stderr
    assert not (tmp_path / "hf").exists()


# ------------------------------------------------------------------ LAVIS out
@pytest.mark.parametrize("name,model_type", [("blip_caption", "blip_caption/base_coco"),
                                             ("blip_retrieval", "blip_retrieval/coco"),
                                             ("blip_vqa", "blip_vqa/vqav2"),
                                             ("blip_pretrain", "blip_pretrain/base")])
def test_lavis_round_trip_is_bit_for_bit(name, model_type, tmp_path):
    """LAVIS -> blip-jax -> LAVIS: every tensor LAVIS saved comes back under its name, dtype and
    bits (the tied decoder head and position_ids included; pre-training's decoder layers shared
    with the encoder, momentum encoders, queues and temperature too); only a fine-tuned model's
    momentum encoders and queues, which LAVIS builds itself when it loads with strict=False, and a
    retrieval model's ITC temperature (not a blip-jax retrieval parameter: rankings do not depend on
    it) are not written."""
    done = subprocess.run([sys.executable, "-m", "blip_jax.cli", "convert", str(LAVIS / name / "model.pth"),
                           str(tmp_path / "jax"), "--lavis", model_type, "--tokenizer", str(LAVIS / "bert_tokenizer"),
                           "--heads", "vision=4,text=3"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    out = subprocess.run([sys.executable, "-m", "blip_jax.cli", "export", str(tmp_path / "jax"),
                          str(tmp_path / "back.pth"), "--to", "lavis"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    original = torch.load(LAVIS / name / "model.pth", weights_only=True)
    original = original.get("model", original)
    back = torch.load(tmp_path / "back.pth", weights_only=True)["model"]
    assert set(back) <= set(original), sorted(set(back) - set(original))[:5]
    missing = sorted(set(original) - set(back))
    assert not (name == "blip_pretrain" and missing), missing[:5]
    assert all(k.endswith("_queue") or k in ("queue_ptr", "temp") or "_m." in k for k in missing), missing[:5]
    for key, value in back.items():
        assert value.dtype == original[key].dtype and torch.equal(value, original[key]), key


BLIP2_LAVIS = {  # fixture folder -> (LAVIS model type, the LLM's directory)
    "blip2_qformer": ("blip2/pretrain", None), "blip2_opt": ("blip2_opt/pretrain_opt2.7b", "opt-tiny"),
    "blip2_t5": ("blip2_t5/pretrain_flant5xl", "flan-t5-tiny"),
    "blip2_vicuna_instruct": ("blip2_vicuna_instruct/vicuna7b", "vicuna-tiny"),
    "blip2_t5_instruct": ("blip2_t5_instruct/flant5xl", "flan-t5-tiny")}


@pytest.mark.parametrize("name", list(BLIP2_LAVIS))
def test_lavis_blip2_round_trip_is_bit_for_bit(name, tmp_path):
    """LAVIS -> blip-jax -> LAVIS for BLIP-2 and InstructBLIP, full and `--trimmed`: the file LAVIS
    saved comes back key for key, dtype and bits (EVA's q / v biases, the ITG head tied to the word
    embeddings, the LLM's tied copies a trimmed file keeps, position_ids and Vicuna's inv_freq
    buffers included)."""
    model_type, llm = BLIP2_LAVIS[name]
    done = subprocess.run([sys.executable, "-m", "blip_jax.cli", "convert", str(LAVIS / name / "model.pth"),
                           str(tmp_path / "jax"), "--lavis", model_type, "--tokenizer", str(LAVIS / "bert_tokenizer"),
                           "--heads", "vision=4,text=3", *(["--llm", str(LAVIS / llm)] if llm else [])],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    for trimmed in (False, True):
        out = tmp_path / f"back_{trimmed}.pth"
        exported = subprocess.run([sys.executable, "-m", "blip_jax.cli", "export", str(tmp_path / "jax"), str(out),
                                   "--to", "lavis", *(["--trimmed"] if trimmed else [])], cwd=ROOT,
                                  capture_output=True, text=True, timeout=300)
        assert exported.returncode == 0, exported.stderr[-2000:]
        assert json.loads(exported.stdout)["lavis_class"] == model_type.split("/")[0]
        original = torch.load(LAVIS / name / ("model_trimmed.pth" if trimmed else "model.pth"),
                              weights_only=True)["model"]
        back = torch.load(out, weights_only=True)["model"]
        assert sorted(back) == sorted(original), (sorted(set(back) ^ set(original))[:5], trimmed)
        for key, value in back.items():
            assert value.dtype == original[key].dtype and torch.equal(value, original[key]), (key, trimmed)


def test_models_lavis_export_does_not_serve_are_refused(tmp_path):
    from blip_jax.convert import convert
    from blip_jax.testing import write_tiny_checkpoint

    convert(write_tiny_checkpoint(tmp_path / "src", "caption"), tmp_path / "jax", progress=False)
    refused = subprocess.run([sys.executable, "-m", "blip_jax.cli", "export", str(tmp_path / "jax"),
                              str(tmp_path / "out.pth"), "--to", "lavis", "--trimmed"], cwd=ROOT, capture_output=True,
                             text=True, timeout=300)
    assert refused.returncode == 2 and "--trimmed applies to BLIP-2 / InstructBLIP" in refused.stderr
    assert "Traceback" not in refused.stderr and not (tmp_path / "out.pth").exists()
