"""Parity of blip_jax.models.llm.opt with transformers' OPTForCausalLM on tiny random models."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import OPTConfig as HFOPTConfig
from transformers import OPTForCausalLM

from blip_jax.generation import GenerationConfig, generate
from blip_jax.models.layout import stack_layers
from blip_jax.models.llm.opt import OPT, OptConfig, decode_step, init_cache, load_opt_params

PAD = 1
LENGTHS = (5, 3, 7)
MAX_NEW = 8
VARIANTS = {"base": {}, "proj": {"word_embed_proj_dim": 16}, "post_ln": {"do_layer_norm_before": False}}


def _hf_model(variant):
    torch.manual_seed(0)
    hf_config = HFOPTConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
                            max_position_embeddings=64, dropout=0.0, pad_token_id=PAD, bos_token_id=2,
                            eos_token_id=2, **VARIANTS[variant])
    hf_config._attn_implementation = "eager"
    model = OPTForCausalLM(hf_config).eval()
    with torch.no_grad():
        for p in model.parameters():  # every LN scale / bias / position row matters
            p.add_(torch.randn_like(p) * 0.1)
    return model


@functools.lru_cache(maxsize=None)
def _pair(variant):
    """(hf model, OptConfig, unrolled params)"""
    hf = _hf_model(variant)
    config = OptConfig.from_hf(hf.config.to_dict())
    state = {k: v.numpy() for k, v in hf.state_dict().items()}
    return hf, config, load_opt_params(state, config)


def _prompts():
    rng = np.random.default_rng(0)
    width = max(LENGTHS)
    ids = np.full((len(LENGTHS), width), PAD, np.int64)
    mask = np.zeros_like(ids)
    for i, n in enumerate(LENGTHS):  # left padding
        ids[i, width - n:] = rng.integers(3, 100, n)
        mask[i, width - n:] = 1
    return ids, mask


def _hf_logits(hf, **kw):
    with torch.no_grad():
        return hf(**{k: torch.as_tensor(v) for k, v in kw.items()}).logits.numpy()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_config_from_hf(variant):
    hf, config, _ = _pair(variant)
    assert config.hidden_size == 32 and config.num_layers == 2 and config.num_heads == 4
    assert config.embed_dim == hf.config.word_embed_proj_dim
    assert config.do_layer_norm_before == hf.config.do_layer_norm_before


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_left_padded(variant):
    hf, config, params = _pair(variant)
    ids, mask = _prompts()
    ours, _ = OPT(config).apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
    theirs = _hf_logits(hf, input_ids=ids, attention_mask=mask)
    real = mask.astype(bool)
    diff = np.abs(np.asarray(ours)[real] - theirs[real]).max()
    print(f"max |logits - hf| ({variant}): {diff:.2e}")
    assert diff < 1e-4, diff


@pytest.mark.parametrize("variant", ["base", "proj"])
def test_inputs_embeds(variant):
    hf, config, params = _pair(variant)
    ids, mask = _prompts()
    embeds = np.random.default_rng(1).normal(0, 1, ids.shape + (config.embed_dim,)).astype(np.float32)
    ours, _ = OPT(config).apply({"params": params}, None, jnp.asarray(mask), inputs_embeds=jnp.asarray(embeds))
    theirs = _hf_logits(hf, inputs_embeds=embeds, attention_mask=mask)
    real = mask.astype(bool)
    diff = np.abs(np.asarray(ours)[real] - theirs[real]).max()
    print(f"max |inputs_embeds logits - hf| ({variant}): {diff:.2e}")
    assert diff < 1e-4, diff
    # embeddings followed by ids == the concatenated embeddings
    word = np.asarray(params["embed_tokens"]["embedding"])[ids[:, -2:]]
    both, _ = OPT(config).apply({"params": params}, jnp.asarray(ids[:, -2:]), jnp.ones((3, ids.shape[1] + 2)),
                                inputs_embeds=jnp.asarray(embeds))
    cat, _ = OPT(config).apply({"params": params}, None, jnp.ones((3, ids.shape[1] + 2)),
                               inputs_embeds=jnp.asarray(np.concatenate([embeds, word], 1)))
    np.testing.assert_allclose(np.asarray(both), np.asarray(cat), atol=1e-5)


def _eos(hf, ids, mask, num_beams):
    """A token the search emits mid-way in row 0, so that some rows/beams really end early."""
    with torch.no_grad():
        out = hf.generate(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), max_new_tokens=MAX_NEW,
                          num_beams=num_beams, do_sample=False, eos_token_id=None, pad_token_id=PAD)
    return int(out[0, ids.shape[1] + 3])


def _pad_to(a, width):
    return np.pad(a, ((0, 0), (0, width - a.shape[1])), constant_values=PAD)


@pytest.mark.parametrize("variant,num_beams", [("base", 1), ("base", 3), ("proj", 3)])
def test_generate_matches_hf(variant, num_beams):
    hf, config, params = _pair(variant)
    ids, mask = _prompts()
    eos = _eos(hf, ids, mask, num_beams)
    with torch.no_grad():
        theirs = hf.generate(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), max_new_tokens=MAX_NEW,
                             num_beams=num_beams, do_sample=False, eos_token_id=eos, pad_token_id=PAD).numpy()
    gen = GenerationConfig.from_kwargs(max_new_tokens=MAX_NEW, num_beams=num_beams, eos_token_id=eos,
                                       pad_token_id=PAD)
    cache = init_cache(config, len(LENGTHS), ids.shape[1] + MAX_NEW)
    ours = np.asarray(generate(decode_step(config), cache, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32),
                               gen, params=params).sequences)
    width = max(ours.shape[1], theirs.shape[1])
    np.testing.assert_array_equal(_pad_to(ours, width), _pad_to(theirs, width))
    if num_beams == 1:
        assert (ours[:, ids.shape[1]:] == eos).any()  # the early stop was exercised
    print(f"{variant} beams={num_beams} eos={eos} emitted={(ours[:, ids.shape[1]:] == eos).any()}")


def test_scan_equals_unrolled():
    _, config, params = _pair("base")
    ids, mask = _prompts()
    ids, mask = jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)
    scanned = stack_layers(jax.tree.map(np.asarray, params))
    assert "layers" in scanned["decoder"]
    a, _ = OPT(config).apply({"params": params}, ids, mask)
    b, _ = OPT(config, scan_layers=True).apply({"params": scanned}, ids, mask)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    # the scanned layout's cache decodes the same tokens
    gen = GenerationConfig.from_kwargs(max_new_tokens=MAX_NEW, pad_token_id=PAD)
    max_len = ids.shape[1] + MAX_NEW
    seq = [generate(decode_step(config, scan_layers=s), init_cache(config, 3, max_len, scan_layers=s), ids, mask,
                    gen, params=p).sequences for s, p in ((False, params), (True, scanned))]
    np.testing.assert_array_equal(np.asarray(seq[0]), np.asarray(seq[1]))


def test_logical_axes_and_loader_shapes():
    _, config, params = _pair("proj")
    boxed = jax.eval_shape(lambda: OPT(config).init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32)))["params"]
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: hasattr(x, "names"))
    assert all(hasattr(x, "names") for x in leaves)
    shapes = jax.tree.map(lambda x: x.shape, params)
    assert shapes == jax.tree.map(lambda x: x.shape, jax.tree.map(lambda x: x.value, boxed,
                                                                   is_leaf=lambda x: hasattr(x, "names")))
