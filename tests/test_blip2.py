"""BLIP-2 / InstructBLIP parity with transformers: conversion, LLM logits, generation (greedy and
beam, batched prompts of different lengths), candidate ranking, ITM/ITC, on tiny random checkpoints
written by transformers itself (processors included, so the `<image>` expansion is theirs)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import blip_jax
import blip_jax.api  # noqa: F401 (blip_jax.api.UnsupportedTaskError below)
from blip_jax.blip2_api import generate_tokens
from blip_jax.convert import ConversionError, convert
from blip_jax.models.blip2 import Blip2
from blip_jax.testing import sample_images, write_tiny_blip2_checkpoint

LLM_KINDS = ("opt", "t5", "instruct_t5", "instruct_llama")
PROMPTS = ["a dog on the", "two cats lying on a red couch in the", "a"]
MAX_NEW = 6


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """kind -> (hf directory, converted blip-jax model, transformers model), built once."""
    made = {}

    def get(kind):
        if kind not in made:
            root = tmp_path_factory.mktemp(f"blip2_{kind}")
            src = write_tiny_blip2_checkpoint(root / "hf", kind)
            convert(src, root / "jax", progress=False)
            hf_cls = getattr(transformers, transformers.AutoConfig.from_pretrained(src).architectures[0])
            made[kind] = (src, blip_jax.load(root / "jax"), hf_cls.from_pretrained(src, dtype="float32").eval())
        return made[kind]

    return get


@functools.lru_cache(maxsize=None)
def _processor(src):
    processor = transformers.AutoProcessor.from_pretrained(src)
    if "t5" not in str(src):
        processor.tokenizer.padding_side = "left"  # decoder LLMs generate from the right edge
    return processor


def _hf_inputs(src, images, prompts):
    return _processor(src)(images=images, text=prompts, padding=True, return_tensors="pt")


def _is_t5(model):
    return model.config.family.encoder_decoder


# --------------------------------------------------------------------------------- logits
@pytest.mark.parametrize("kind", LLM_KINDS)
def test_language_model_logits(tiny, kind):
    src, model, hf = tiny(kind)
    images = sample_images(3)
    inputs = _hf_inputs(src, images, PROMPTS)
    pixels = model.preprocess(images)
    np.testing.assert_allclose(pixels, inputs["pixel_values"].numpy().transpose(0, 2, 3, 1), atol=1e-6)
    cfg = model.config
    q = cfg.num_query_tokens
    ids, mask = inputs["input_ids"].numpy(), inputs["attention_mask"].numpy()
    with torch.no_grad():
        kwargs = {}
        if _is_t5(model):
            kwargs["decoder_input_ids"] = torch.as_tensor(ids[:, q: q + 4] % cfg.llm.vocab_size)
        if cfg.llm_family == "llama":  # a plain LLaMA forward counts positions from the padding; generate does not
            kwargs["position_ids"] = torch.as_tensor(np.maximum(np.cumsum(mask, 1) - 1, 0))
        theirs = hf(**inputs, **kwargs).logits.numpy()
    variables = {"params": model.params}
    m = Blip2(cfg)
    embeds = m.apply(variables, jnp.asarray(pixels), method=Blip2.encode_image)
    with torch.no_grad():
        hf_embeds = hf.vision_model(inputs["pixel_values"]).last_hidden_state.numpy()
    assert np.abs(np.asarray(embeds) - hf_embeds).max() < 1e-4
    q_ids = q_mask = None
    if cfg.instruct:
        q_ids, q_mask = (jnp.asarray(inputs[k].numpy(), jnp.int32) for k in ("qformer_input_ids",
                                                                             "qformer_attention_mask"))
    prefix = m.apply(variables, embeds, q_ids, q_mask, method=Blip2.language_prefix)
    # our text: the prompt tokens without the <image> placeholders (which sit right after the padding)
    is_image = ids == cfg.image_token_id
    assert (is_image.sum(1) == q).all()
    text = np.stack([row[~img] for row, img in zip(ids, is_image)])
    text_mask = np.stack([row[~img] for row, img in zip(mask, is_image)])
    if _is_t5(model):
        ours = m.apply(variables, prefix, jnp.asarray(text), jnp.asarray(text_mask),
                       jnp.asarray(kwargs["decoder_input_ids"].numpy()), method=Blip2.language_model_logits)
        diff = np.abs(np.asarray(ours) - theirs).max()
    else:
        ours = np.asarray(m.apply(variables, prefix, jnp.asarray(text), jnp.asarray(text_mask),
                                  method=Blip2.language_model_logits))
        # HF: [pads, images, text]; ours: [soft prompt, pads, text]; compare real positions in order
        ours_real = [o[np.concatenate([np.ones(q, bool), tm == 1])] for o, tm in zip(ours, text_mask)]
        theirs_real = [t[mk == 1] for t, mk in zip(theirs, mask)]
        diff = max(np.abs(a - b).max() for a, b in zip(ours_real, theirs_real))
    print(f"{kind}: max |logits - transformers| = {diff:.2e}")
    assert diff < 1e-4, diff


# ------------------------------------------------------------------------------ generation
def _eos(hf, inputs, num_beams):
    """A token the search emits mid-way in row 0, so rows really end early."""
    with torch.no_grad():
        out = hf.generate(**inputs, max_new_tokens=MAX_NEW, num_beams=num_beams, do_sample=False, eos_token_id=None)
    new = out[:, 1:] if hf.config.text_config.is_encoder_decoder else out[:, inputs["input_ids"].shape[1]:]
    return int(new[0, 2])


def _hf_new_tokens(hf, inputs, **gen):
    with torch.no_grad():
        out = hf.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False, **gen).numpy()
    return out[:, 1:] if hf.config.text_config.is_encoder_decoder else out[:, inputs["input_ids"].shape[1]:]


@pytest.mark.parametrize("kind,num_beams", [("opt", 1), ("opt", 3), ("t5", 1), ("t5", 3), ("instruct_t5", 3),
                                            ("instruct_llama", 1), ("instruct_llama", 3)])
def test_generate_matches_transformers(tiny, kind, num_beams):
    src, model, hf = tiny(kind)
    images = sample_images(3)
    inputs = _hf_inputs(src, images, PROMPTS)
    eos = _eos(hf, inputs, num_beams)
    pad = model.tokenizer.pad_token_id
    # transformers' beam search fills ended rows with eos when the pad id is 0 (T5): compare up to eos
    theirs = _after_eos(_hf_new_tokens(hf, inputs, num_beams=num_beams, eos_token_id=eos, pad_token_id=pad), eos, pad)
    texts = model.generate(images, PROMPTS, num_beams=num_beams, max_new_tokens=MAX_NEW, min_new_tokens=0,
                           repetition_penalty=1.0, length_penalty=1.0, eos_token_id=eos)
    expected = [s.strip() for s in model.tokenizer.batch_decode(theirs)]
    assert texts == expected, (texts, expected)
    # token level too: ours is padded to MAX_NEW with pad after eos
    ours = _our_new_tokens(model, images, PROMPTS, num_beams=num_beams, eos_token_id=eos)
    width = theirs.shape[1]
    np.testing.assert_array_equal(ours[:, :width], theirs)
    assert (ours[:, width:] == pad).all()
    if num_beams == 1:
        assert (ours == eos).any()  # the early stop was exercised
    print(f"{kind} beams={num_beams}: {texts}")


def _after_eos(tokens, eos, pad):
    """Everything after each row's first eos set to pad."""
    tokens = tokens.copy()
    for row in tokens:
        hits = np.flatnonzero(row == eos)
        if hits.size:
            row[hits[0] + 1:] = pad
    return tokens


def _our_new_tokens(model, images, prompts, **options):
    pixels = model.preprocess(images)
    prefixes = model._prefixes(pixels, np.arange(len(prompts)), prompts)
    ids, mask = model._llm_tokens(prompts)
    config = model._generation_config({}, dict(max_new_tokens=MAX_NEW, **options))
    return generate_tokens(model.config, model.params, prefixes, ids, mask, config)


@pytest.mark.parametrize("kind", ["opt", "instruct_llama", "t5"])
def test_batch_equals_one_by_one(tiny, kind):
    _, model, _ = tiny(kind)
    images = sample_images(3)
    batched = model.generate(images, PROMPTS, num_beams=3, max_new_tokens=MAX_NEW)
    alone = [model.generate([image], [prompt], num_beams=3, max_new_tokens=MAX_NEW)[0]
             for image, prompt in zip(images, PROMPTS)]
    assert batched == alone


# --------------------------------------------------------------------------------- ranking
@pytest.mark.parametrize("kind", ["opt", "instruct_t5", "instruct_llama"])
def test_rank_matches_transformers(tiny, kind):
    src, model, hf = tiny(kind)
    images = sample_images(2)
    prompt, candidates = "a photo of", ["dog", "two cats", "a red bus on the street"]
    ours = model.rank(images, prompt, candidates)
    tok = model.tokenizer
    theirs = np.zeros_like(ours)
    for j, cand in enumerate(candidates):
        if _is_t5(model):
            inputs = _hf_inputs(src, images, [prompt] * 2)
            target = torch.as_tensor(tok([cand])["input_ids"], dtype=torch.long).repeat(2, 1)
            with torch.no_grad():
                logits = hf(**inputs, labels=target).logits
            logp = torch.log_softmax(logits, -1).gather(-1, target[..., None])[..., 0]
            theirs[:, j] = logp.sum(1).numpy()
        else:
            inputs = _hf_inputs(src, images, [prompt] * 2)
            c = tok([cand], add_special_tokens=False)["input_ids"][0]
            ids = torch.cat([inputs["input_ids"], torch.as_tensor(c)[None].repeat(2, 1)], 1)
            mask = torch.cat([inputs["attention_mask"], torch.ones(2, len(c), dtype=torch.long)], 1)
            extra = {k: v for k, v in inputs.items() if k.startswith("qformer")}
            with torch.no_grad():
                logits = hf(pixel_values=inputs["pixel_values"], input_ids=ids, attention_mask=mask, **extra).logits
            logp = torch.log_softmax(logits[:, -len(c) - 1: -1], -1)
            theirs[:, j] = logp.gather(-1, torch.as_tensor(c)[None, :, None].repeat(2, 1, 1))[..., 0].sum(1).numpy()
    print(f"{kind}: ours {ours.tolist()} transformers {theirs.tolist()}")
    np.testing.assert_allclose(ours, theirs, atol=1e-4)


# ------------------------------------------------------------------------------- retrieval
def test_retrieval_itm_itc(tiny):
    src, model, hf = tiny("retrieval")
    images = sample_images(2)
    texts = ["a dog sitting on the grass", "two cats"]
    pixels = torch.as_tensor(model.preprocess(images).transpose(0, 3, 1, 2).copy())
    enc = transformers.AutoTokenizer.from_pretrained(src)(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        itm = hf(pixel_values=pixels, **enc, use_image_text_matching_head=True).logits_per_image
        itc = hf(pixel_values=pixels[:1], **enc, use_image_text_matching_head=False).logits_per_image
    np.testing.assert_allclose(model.itm(images, texts), torch.softmax(itm, -1)[:, 1].numpy(), atol=1e-5)
    np.testing.assert_allclose(model.itc(images[:1], texts), itc.numpy(), atol=1e-5)
    with pytest.raises(blip_jax.api.UnsupportedTaskError):
        model.caption(images)


def test_itm_pairs_sharing_an_image(tiny):
    """Several texts of one image share its slot (Q-Former cross-attention keys/values once per
    image); equal to transformers pair by pair."""
    src, model, hf = tiny("retrieval")
    images = sample_images(2)
    image_index = np.array([1, 0, 1, 1, 0, 1])
    texts = ["a dog sitting on the grass", "two cats", "a red car", "a dog", "the grass", "two cats on a bed"]
    pixels = torch.as_tensor(model.preprocess([images[i] for i in image_index]).transpose(0, 3, 1, 2).copy())
    enc = transformers.AutoTokenizer.from_pretrained(src)(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        itm = hf(pixel_values=pixels, **enc, use_image_text_matching_head=True).logits_per_image
    ours = model.match_logits(model.image_embeddings(images), image_index, texts)
    np.testing.assert_allclose(ours, itm[:, 1].numpy(), atol=1e-5)


def test_llm_model_refuses_retrieval(tiny):
    _, model, _ = tiny("opt")
    with pytest.raises(blip_jax.api.UnsupportedTaskError):
        model.itm(sample_images(1), "a dog")


# ------------------------------------------------------------------------------ conversion
def test_frozen_bf16_and_errors(tiny, tmp_path):
    src, model, _ = tiny("opt")
    convert(src, tmp_path / "bf16", frozen_dtype="bfloat16", progress=False)
    half = blip_jax.load(tmp_path / "bf16")
    dtypes = {k: {str(x.dtype) for x in jax.tree.leaves(v)} for k, v in half.params.items()}
    assert dtypes["vision"] == {"bfloat16"} and dtypes["language_model"] == {"bfloat16"}
    assert dtypes["qformer"] == {"float32"} and dtypes["ln_vision"] == {"float32"}
    assert len(half.caption(sample_images(1), num_beams=1, max_new_tokens=4)) == 1

    # a missing and a misshapen tensor are both named, and nothing is written
    from safetensors.numpy import load_file, save_file

    broken = tmp_path / "broken"
    import shutil

    shutil.copytree(src, broken)
    tensors = load_file(broken / "model.safetensors")
    tensors.pop("qformer.layernorm.weight")
    tensors["language_projection.bias"] = tensors["language_projection.bias"][:-1]
    save_file(tensors, broken / "model.safetensors")
    with pytest.raises(ConversionError) as err:
        convert(broken, tmp_path / "out", progress=False)
    assert "qformer.layernorm.weight" in str(err.value) and "language_projection.bias" in str(err.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["opt", "t5", "retrieval", "instruct_t5", "instruct_llama"])
def test_verify_every_class(tiny, kind):
    """`blip-jax convert --verify` on every transformers class: each output within 1e-4."""
    from blip_jax.convert.verify import compare

    src, model, _ = tiny(kind)
    diffs = compare(src, model.path)
    print(kind, diffs)
    assert len(diffs) >= 2 and max(diffs.values()) < 1e-4, diffs


def test_qformer_stage1_masks_and_itg_head(tiny):
    """ITG's multimodal-causal mask: a text position sees the queries and its own prefix only, and
    the queries' outputs are those of a queries-only pass (what LAVIS gets by reusing their K/V)."""
    _, model, _ = tiny("retrieval")
    config = model.config.replace(stage1_heads=True)
    m = Blip2(config)
    from blip_jax.models.blip2 import init_params

    params = {**init_params(config, jax.random.PRNGKey(1)), **model.params}  # converted weights + a new head
    embeds = m.apply({"params": params}, jnp.asarray(model.preprocess(sample_images(2))), method=Blip2.encode_image)
    ids = jnp.asarray(np.random.default_rng(0).integers(5, 200, (2, 7)), jnp.int32)
    mask = jnp.ones_like(ids)
    logits = m.apply({"params": params}, embeds, ids, mask, method=Blip2.itg_logits)
    assert logits.shape == (2, 7, config.qformer_vocab_size)
    changed = ids.at[:, 4:].set(7)  # later tokens must not change earlier positions' logits
    logits2 = m.apply({"params": params}, embeds, changed, mask, method=Blip2.itg_logits)
    np.testing.assert_allclose(np.asarray(logits[:, :4]), np.asarray(logits2[:, :4]), atol=1e-5)
    assert np.abs(np.asarray(logits[:, 4:]) - np.asarray(logits2[:, 4:])).max() > 1e-3
    q = config.num_query_tokens
    causal = m.apply({"params": params}, embeds, ids, mask, causal_text=True, method=Blip2.query_outputs)[:, :q]
    alone = m.apply({"params": params}, embeds, method=Blip2.query_outputs)
    np.testing.assert_allclose(np.asarray(causal), np.asarray(alone), atol=1e-5)
    bidirectional = m.apply({"params": params}, embeds, ids, mask, method=Blip2.query_outputs)[:, :q]
    assert np.abs(np.asarray(bidirectional) - np.asarray(alone)).max() > 1e-3  # ITM's queries do see the text


# ------------------------------------------------------------------ generate's defaults (transformers')
def _hf_generate(hf, inputs, **options):
    """transformers' new tokens, with its defaults for what `options` leaves out."""
    with torch.no_grad():
        out = hf.generate(**inputs, **options).numpy()
    return out[:, 1:] if hf.config.text_config.is_encoder_decoder else out[:, inputs["input_ids"].shape[1]:]


def _assert_same_tokens(ours, theirs, pad):
    """transformers crops to the longest row (ours is max_new_tokens wide, padded after the end)."""
    np.testing.assert_array_equal(ours[:, :theirs.shape[1]], theirs)
    assert (ours[:, theirs.shape[1]:] == pad).all()


@pytest.mark.parametrize("kind", LLM_KINDS)
def test_generate_defaults_and_lengths_are_transformers(tiny, kind):
    """No options: transformers' defaults (greedy, 20 new tokens; the tiny checkpoints'
    generation_config.json holds token ids only). max_length counts what transformers counts: the
    `<image>` tokens and the longest prompt for decoder LLMs, the start token for T5."""
    src, model, hf = tiny(kind)
    images = sample_images(3)
    inputs = _hf_inputs(src, images, PROMPTS)
    pad, eos = model.tokenizer.pad_token_id, model.config.llm.eos_token_id
    counted = 1 if _is_t5(model) else inputs["input_ids"].shape[1]
    for options in ({}, {"num_beams": 3, "max_length": counted + 5}):
        ours = model._generate_ids(images, PROMPTS, options)
        theirs = _after_eos(_hf_generate(hf, inputs, **options), eos, pad)
        assert ours.shape[1] == (20 if not options else 5)
        _assert_same_tokens(ours, theirs, pad)
        assert model.generate(images, PROMPTS, **options) == [
            s.strip() for s in model.tokenizer.batch_decode(theirs, skip_special_tokens=True)]


def test_generate_defaults_come_from_generation_config_json(tiny, tmp_path):
    """A checkpoint whose generation_config.json asks for beam 3 and 6 new tokens (Flan-T5; an
    explicit eos ends rows early): generate with no options decodes with those settings, as
    transformers' generate with them does. (transformers' BLIP-2 generate itself does not read the
    file: its language model keeps its own generation config; so they are passed to it here.)"""
    import json
    import shutil

    src, model, hf = tiny("t5")
    dst = shutil.copytree(model.path, tmp_path / "t5")
    saved = json.loads((dst / "generation_config.json").read_text())
    (dst / "generation_config.json").write_text(json.dumps({**saved, "num_beams": 3, "max_new_tokens": MAX_NEW,
                                                           "length_penalty": 0.5}))
    configured = blip_jax.load(dst)
    images = sample_images(3)
    inputs = _hf_inputs(src, images, PROMPTS)
    eos, pad = _eos(hf, inputs, 3), model.tokenizer.pad_token_id
    theirs = _after_eos(_hf_generate(hf, inputs, num_beams=3, max_new_tokens=MAX_NEW, length_penalty=0.5,
                                     eos_token_id=eos), eos, pad)
    ours = configured._generate_ids(images, PROMPTS, {"eos_token_id": eos})
    assert (ours == eos).any() and theirs.shape[1] <= MAX_NEW
    _assert_same_tokens(ours, theirs, pad)
    assert not np.array_equal(ours, model._generate_ids(images, PROMPTS, {"eos_token_id": eos}))


def test_instruct_paper_preset_is_opt_in(tiny):
    _, model, _ = tiny("instruct_t5")
    images = sample_images(2)
    paper = model.generate(images, PROMPTS[:2], **{**blip_jax.INSTRUCT_PAPER, "max_new_tokens": MAX_NEW})
    explicit = model.generate(images, PROMPTS[:2], num_beams=5, max_new_tokens=MAX_NEW, min_new_tokens=1,
                              repetition_penalty=1.5)
    assert paper == explicit
