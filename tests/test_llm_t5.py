"""Parity of blip_jax.models.llm.t5 with transformers' T5ForConditionalGeneration on tiny random models."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import T5Config as HFT5Config
from transformers import T5ForConditionalGeneration
from transformers.models.t5.modeling_t5 import T5Attention

from blip_jax.models.weights import ConversionError
from blip_jax.generation import GenerationConfig, generate
from blip_jax.models import layers
from blip_jax.models.layout import stack_layers
from blip_jax.models.llm.t5 import (T5, T5Config, cross_cache, decode_step, init_cache, load_t5_params,
                                    param_shapes, relative_position_bucket)

PAD = 0
QUERY = 6  # soft-prompt (projected Q-Former) tokens before the text
TEXT = (12, 7, 3)  # right-padded text lengths: BLIP-2's encoder mask has its padding in the middle
MAX_NEW = 8
VARIANTS = {  # both with heads * d_kv != d_model
    "flan": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False, num_heads=6),
    # a deeper encoder than decoder (transformers 5 fails to generate with the converse)
    "t5": dict(feed_forward_proj="relu", tie_word_embeddings=True, num_heads=4, d_kv=12, num_layers=3,
               num_decoder_layers=2),
}


def _hf_model(variant):
    torch.manual_seed(0)
    kw = dict(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, relative_attention_num_buckets=8,
              relative_attention_max_distance=16, dropout_rate=0.0, pad_token_id=PAD, eos_token_id=1,
              decoder_start_token_id=PAD)
    hf_config = HFT5Config(**{**kw, **VARIANTS[variant]})
    hf_config._attn_implementation = "eager"
    model = T5ForConditionalGeneration(hf_config).eval()
    if not hf_config.scale_decoder_outputs:  # transformers 5 ties the head anyway; v1.1 checkpoints do not
        model.lm_head.weight = torch.nn.Parameter(model.shared.weight.detach().clone())
    with torch.no_grad():
        for p in model.parameters():  # every norm scale and bias bucket matters
            p.add_(torch.randn_like(p) * 0.1)
    return model


@functools.lru_cache(maxsize=None)
def _pair(variant):
    """(hf model, T5Config, unrolled params)"""
    hf = _hf_model(variant)
    config = T5Config.from_hf(hf.config.to_dict())
    state = {k: v.numpy() for k, v in hf.state_dict().items()}
    return hf, config, load_t5_params(state, config)


def _inputs():
    """(soft prompt [B, QUERY, D], right-padded text ids [B, T], mask [B, QUERY + T])"""
    rng = np.random.default_rng(0)
    embeds = rng.normal(0, 1, (len(TEXT), QUERY, 32)).astype(np.float32)
    ids = np.full((len(TEXT), max(TEXT)), PAD, np.int64)
    text_mask = np.zeros_like(ids)
    for i, n in enumerate(TEXT):
        ids[i, :n] = rng.integers(2, 100, n)
        text_mask[i, :n] = 1
    return embeds, ids, np.concatenate([np.ones((len(TEXT), QUERY), np.int64), text_mask], 1)


def _targets():
    """Teacher-forced decoder ids [B, 9] and their right-padded mask."""
    dec = np.random.default_rng(1).integers(2, 100, (len(TEXT), 9))
    return dec, (np.arange(9) < np.array([[9], [6], [4]])).astype(np.int64)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _logits(config, scan_layers, params, ids, mask, dec, dec_mask, embeds):
    return T5(config, scan_layers=scan_layers).apply({"params": params}, ids, mask, dec, dec_mask,
                                                     inputs_embeds=embeds)[0]


@functools.partial(jax.jit, static_argnums=(0, 1))
def _encode(config, scan_layers, params, ids, mask, embeds):
    return T5(config, scan_layers=scan_layers).apply({"params": params}, ids, mask, inputs_embeds=embeds,
                                                     method=T5.encode)


def _hf_embeds(hf, embeds, ids):
    """transformers takes ids or embeddings: give it the concatenation we build."""
    with torch.no_grad():
        return torch.cat([torch.as_tensor(embeds), hf.shared(torch.as_tensor(ids))], 1)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_config_from_hf(variant):
    hf, config, _ = _pair(variant)
    want = VARIANTS[variant]
    assert (config.d_model, config.d_kv, config.num_heads) == (32, want.get("d_kv", 8), want["num_heads"])
    num_layers = want.get("num_layers", 2)
    assert (config.num_layers, config.num_decoder_layers) == (num_layers, want.get("num_decoder_layers", num_layers))
    assert (config.relative_attention_num_buckets, config.relative_attention_max_distance) == (8, 16)
    assert config.tie_word_embeddings == want["tie_word_embeddings"]
    assert config.gated == (variant == "flan")
    assert config.activation == ("gelu_new" if variant == "flan" else "relu")
    assert (config.pad_token_id, config.eos_token_id, config.decoder_start_token_id) == (0, 1, 0)
    # a config.json (or BLIP-2 text_config) as written before transformers 5
    legacy = {k: v for k, v in hf.config.to_dict().items() if k not in ("scale_decoder_outputs", "num_decoder_layers")}
    legacy.update(tie_word_embeddings=want["tie_word_embeddings"], decoder_start_token_id=None)
    again = T5Config.from_hf(legacy)
    assert again == dataclasses.replace(config, num_decoder_layers=num_layers)  # absent: as many as the encoder
    # a named activation wins over feed_forward_proj's, as in transformers (BLIP-2's Flan-T5 uses exact GELU)
    named = {"feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu"}
    assert HFT5Config(**named).dense_act_fn == T5Config.from_hf(named).activation == "gelu"
    assert T5Config.from_hf(named).gated


def test_relative_position_buckets_match_hf():
    rel = np.arange(-600, 600)[None, :] - np.arange(3)[:, None]
    for buckets, distance in ((8, 16), (32, 128), (32, 64)):
        for bidirectional in (True, False):
            want = T5Attention._relative_position_bucket(torch.as_tensor(rel), bidirectional=bidirectional,
                                                         num_buckets=buckets, max_distance=distance).numpy()
            got = relative_position_bucket(jnp.asarray(rel), bidirectional=bidirectional, num_buckets=buckets,
                                           max_distance=distance)
            np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_hf(variant):
    hf, config, params = _pair(variant)
    embeds, ids, mask = _inputs()
    dec, dec_mask = _targets()
    ours = _logits(config, False, params, ids, mask, dec, dec_mask, embeds)
    with torch.no_grad():
        theirs = hf(inputs_embeds=_hf_embeds(hf, embeds, ids), attention_mask=torch.as_tensor(mask),
                    decoder_input_ids=torch.as_tensor(dec),
                    decoder_attention_mask=torch.as_tensor(dec_mask)).logits.numpy()
    real = dec_mask.astype(bool)
    diff = np.abs(np.asarray(ours)[real] - theirs[real]).max()
    print(f"max |logits - hf| ({variant}): {diff:.2e}")
    assert diff < 1e-4, diff


def _generate_hf(hf, embeds, mask, **options):
    with torch.no_grad():
        return hf.generate(inputs_embeds=embeds, attention_mask=torch.as_tensor(mask), max_new_tokens=MAX_NEW,
                           do_sample=False, pad_token_id=PAD, decoder_start_token_id=PAD, **options).numpy()


def _generate_ours(config, params, ids, mask, embeds, gen, scan_layers=False):
    states = _encode(config, scan_layers, params, ids, mask, embeds)
    shared = cross_cache(config, params, states, jnp.asarray(mask, jnp.int32), scan_layers=scan_layers)
    batch = ids.shape[0]
    cache = init_cache(config, batch, 1 + gen.max_new_tokens, scan_layers=scan_layers)
    start = jnp.full((batch, 1), config.decoder_start_token_id, jnp.int32)
    out = generate(decode_step(config, scan_layers=scan_layers), cache, start, jnp.ones_like(start), gen,
                   params=(params, shared))
    return np.asarray(out.sequences)


def _after_eos_to_pad(seqs, eos, width):
    """Pad to `width`, and pad after each row's first eos: transformers crops to the longest row and,
    in beam search with pad id 0, fills ended rows with eos instead (see blip_jax.generation)."""
    seqs = np.pad(seqs, ((0, 0), (0, width - seqs.shape[1])), constant_values=PAD)
    for row in seqs:
        hits = np.flatnonzero(row[1:] == eos)
        if hits.size:
            row[hits[0] + 2:] = PAD
    return seqs


def _eos(hf, embeds, mask, options):
    """A token the search emits mid-way in some returned sequence once it is the eos, so that rows /
    beams really end early: the first of row 0's tokens (then row 1's, ...) for which it happens,
    the pad (also the decoder start) aside."""
    plain = _generate_hf(hf, embeds, mask, eos_token_id=None, **options)
    candidates = [t for t in dict.fromkeys(plain[:, 1:MAX_NEW - 1].reshape(-1).tolist()) if t != PAD]
    for token in candidates:
        if (_generate_hf(hf, embeds, mask, eos_token_id=token, **options)[:, 1:MAX_NEW] == token).any():
            return token
    raise AssertionError("no token ends a sequence early")


BEAMS = dict(num_beams=3, num_return_sequences=3)  # every beam compared


@pytest.mark.parametrize("variant,options,scan", [
    ("flan", {}, False),
    ("flan", BEAMS, False),
    ("t5", dict(BEAMS, length_penalty=0.5), False),  # with 1.0 no beam of this model ends early
    ("t5", dict(BEAMS, length_penalty=0.5), True),
], ids=["flan-greedy", "flan-beam", "t5-beam", "t5-beam-scan"])
def test_generate_matches_hf(variant, options, scan):
    hf, config, params = _pair(variant)
    embeds, ids, mask = _inputs()
    hf_embeds = _hf_embeds(hf, embeds, ids)
    eos = _eos(hf, hf_embeds, mask, options)
    theirs = _generate_hf(hf, hf_embeds, mask, eos_token_id=eos, **options)
    gen = GenerationConfig.from_kwargs(max_new_tokens=MAX_NEW, eos_token_id=eos, pad_token_id=PAD, **options)
    if scan:
        params = stack_layers(jax.tree.map(np.asarray, params))
    ours = _generate_ours(config, params, ids, mask, embeds, gen, scan_layers=scan)
    assert ours.shape == (len(TEXT) * gen.num_return_sequences, 1 + MAX_NEW)
    assert (ours[:, 0] == config.decoder_start_token_id).all()
    width = ours.shape[1]
    np.testing.assert_array_equal(ours, _after_eos_to_pad(ours, eos, width))
    np.testing.assert_array_equal(ours, _after_eos_to_pad(theirs, eos, width))
    assert (ours[:, 1:MAX_NEW] == eos).any()  # the early stop was exercised
    print(f"{variant} {options} scan={scan} eos={eos}\n{ours}")


def test_scan_equals_unrolled():
    """Logits here; generated ids in test_generate_matches_hf, with the scanned caches too."""
    _, config, params = _pair("t5")
    embeds, ids, mask = _inputs()
    scanned = stack_layers(jax.tree.map(np.asarray, params))
    assert "layers" in scanned["encoder"]["block"] and "layers" in scanned["decoder"]["block"]
    a, b = (_logits(config, s, p, ids, mask, *_targets(), embeds) for s, p in ((False, params), (True, scanned)))
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logical_axes_and_loader_shapes(variant):
    _, config, params = _pair(variant)
    ids = jnp.zeros((1, 2), jnp.int32)
    boxed = jax.eval_shape(lambda: T5(config).init(jax.random.PRNGKey(0), ids, ids, ids))["params"]
    is_boxed = lambda x: hasattr(x, "names")
    leaves = jax.tree.leaves(boxed, is_leaf=is_boxed)
    assert all(is_boxed(x) for x in leaves)
    init_shapes = jax.tree.map(lambda x: x.value.shape, boxed, is_leaf=is_boxed)
    assert jax.tree.map(lambda x: x.shape, params) == init_shapes
    assert jax.tree.map(lambda x: x.shape, param_shapes(config)) == init_shapes
    assert ("lm_head" in params) != config.tie_word_embeddings
    assert ("wi_0" in params["encoder"]["block"]["layers_0"]["mlp"]) == config.gated


def test_loader_prefix_and_errors():
    hf, config, params = _pair("flan")
    state = {"language_model." + k: v.numpy() for k, v in hf.state_dict().items()}
    state["qformer.layer.0.weight"] = np.zeros(3)  # outside the prefix: not ours to check
    scanned = load_t5_params(state, config, prefix="language_model.", scan_layers=True)
    np.testing.assert_array_equal(scanned["decoder"]["block"]["layers"]["mlp"]["wo"]["kernel"][1],
                                  params["decoder"]["block"]["layers_1"]["mlp"]["wo"]["kernel"])

    broken = dict(state)
    del broken["language_model.decoder.block.1.layer.1.EncDecAttention.k.weight"]
    broken["language_model.encoder.block.0.layer.1.DenseReluDense.wo.weight"] = np.zeros((32, 63), np.float32)
    broken["language_model.encoder.block.9.layer.0.layer_norm.weight"] = np.zeros(32, np.float32)
    with pytest.raises(ConversionError) as info:
        load_t5_params(broken, config, prefix="language_model.")
    message = str(info.value)
    assert "decoder.block.1.layer.1.EncDecAttention.k.weight" in message  # missing
    assert "encoder.block.0.layer.1.DenseReluDense.wo.weight: checkpoint (32, 63)" in message  # misshapen
    assert "encoder.block.9.layer.0.layer_norm.weight" in message  # unexpected
    # transformers 5 saves v1.1 models without their head, which it ties to `shared` on loading
    headless = load_t5_params({k: v for k, v in state.items() if "lm_head" not in k}, config, prefix="language_model.")
    np.testing.assert_array_equal(headless["lm_head"]["kernel"], params["shared"]["embedding"].T)


def test_attend_bias_with_grouped_queries():
    """Beams sharing one key/value row see the same position bias as with one copy per beam."""
    rng = np.random.default_rng(0)
    b, group, t, s, h, d = 2, 3, 2, 5, 4, 8
    q = jnp.asarray(rng.standard_normal((b * group, t, h, d)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((b, h, s, d)), jnp.float32) for _ in range(2))
    rep = lambda x: jnp.repeat(x, group, axis=0)
    mask = jnp.asarray(rng.random((b, 1, 1, s)) > 0.3).at[..., 0].set(True)
    attend = jax.jit(functools.partial(layers.attend, scale=1.0))
    for bias in (rng.standard_normal((1, h, t, s)), rng.standard_normal((b * group, h, t, s))):
        bias = jnp.asarray(bias, jnp.float32)
        want = attend(q, rep(k), rep(v), rep(mask), bias=bias)
        got = attend(q, k, v, mask, bias=bias)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)
