"""Parity of blip_jax.models.llm.llama with transformers' LlamaForCausalLM on tiny random models."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import LlamaConfig as HFLlamaConfig
from transformers import LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from blip_jax.models.weights import ConversionError
from blip_jax.generation import GenerationConfig, generate
from blip_jax.models.layout import stack_layers
from blip_jax.models.llm.llama import Llama, LlamaConfig, decode_step, init_cache, load_llama_params

PAD = 0
LENGTHS = (5, 3, 7)
MAX_NEW = 8
VARIANTS = {
    "mha": {},
    "gqa": {"num_key_value_heads": 2},
    # one key/value head, biases, head_dim != hidden / heads, another rope_theta, tied lm_head
    "extras": {"num_key_value_heads": 1, "attention_bias": True, "mlp_bias": True, "head_dim": 16,
               "rope_parameters": {"rope_type": "default", "rope_theta": 500.0}, "tie_word_embeddings": True},
    # the other LLaMA-architecture families: Mistral's sliding window (short here, so it cuts the
    # prompts and the generated tokens), Qwen2's q / k / v biases with its tied head
    "mistral": {"num_key_value_heads": 2, "sliding_window": 4},
    "qwen2": {"num_key_value_heads": 2, "tie_word_embeddings": True, "use_sliding_window": False},
}
CLASSES = {"mistral": (MistralConfig, MistralForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}


def _hf_model(variant):
    torch.manual_seed(0)
    config_cls, model_cls = CLASSES.get(variant, (HFLlamaConfig, LlamaForCausalLM))
    hf_config = config_cls(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, max_position_embeddings=64, pad_token_id=PAD, bos_token_id=1,
                           eos_token_id=2, **VARIANTS[variant])
    hf_config._attn_implementation = "eager"
    model = model_cls(hf_config).eval()
    with torch.no_grad():
        for p in model.parameters():  # every norm scale and bias matters
            p.add_(torch.randn_like(p) * 0.1)
    return model


@functools.lru_cache(maxsize=None)
def _pair(variant):
    """(hf model, LlamaConfig, unrolled params)"""
    hf = _hf_model(variant)
    config = LlamaConfig.from_hf(hf.config.to_dict())
    return hf, config, load_llama_params(_state(hf), config)


@functools.lru_cache(maxsize=None)
def _forward(config, scan_layers=False):
    """Jitted `Llama.apply` (one compile beats op-by-op dispatch)."""
    return jax.jit(Llama(config, scan_layers=scan_layers).apply)


def _state(hf):
    return {k: v.numpy() for k, v in hf.state_dict().items()}


def _prompts():
    rng = np.random.default_rng(0)
    width = max(LENGTHS)
    ids = np.full((len(LENGTHS), width), PAD, np.int64)
    mask = np.zeros_like(ids)
    for i, n in enumerate(LENGTHS):  # left padding
        ids[i, width - n:] = rng.integers(3, 100, n)
        mask[i, width - n:] = 1
    return ids, mask


def _hf_positions(mask):
    """The position_ids HF generate derives from a mask (what our default positions are)."""
    return np.where(mask == 1, np.cumsum(mask, 1) - 1, 0)


def _hf_logits(hf, **kw):
    with torch.no_grad():
        return hf(**{k: torch.as_tensor(v) for k, v in kw.items()}).logits.numpy()


def _embeds(config, shape):
    return np.random.default_rng(1).normal(0, 1, shape + (config.embed_dim,)).astype(np.float32)


def test_config_from_hf():
    for variant in VARIANTS:
        hf, config, _ = _pair(variant)
        assert (config.hidden_size, config.num_layers, config.num_heads) == (32, 2, 4)
        assert config.num_kv_heads == hf.config.num_key_value_heads
        assert config.head_dim == getattr(hf.config, "head_dim", None) or 32 // 4  # Qwen2's config has none
        assert config.rope_theta == hf.config.rope_parameters["rope_theta"]
        assert config.tie_word_embeddings == hf.config.tie_word_embeddings
        assert config.model_type == hf.config.model_type
        assert config.sliding_window == (4 if variant == "mistral" else None)
        assert config.qkv_bias == (variant == "qwen2")
        assert LlamaConfig.from_hf(config.to_hf()) == config  # what export writes reads back the same
    # an older config.json: rope_theta at the top level, rope_scaling null, eos as a list
    old = LlamaConfig.from_hf({"rope_theta": 1e6, "rope_scaling": None, "eos_token_id": [2, 3],
                               "num_attention_heads": 8, "hidden_size": 64})
    assert (old.rope_theta, old.eos_token_id, old.head_dim, old.num_kv_heads) == (1e6, 2, 8, 8)
    with pytest.raises(ValueError, match="'linear'.*not supported"):
        LlamaConfig.from_hf({"rope_scaling": {"type": "linear", "factor": 2.0}})
    with pytest.raises(ValueError, match="'llama3'"):
        LlamaConfig.from_hf({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}})


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_left_padded(variant):
    hf, config, params = _pair(variant)
    ids, mask = _prompts()
    ours, _ = _forward(config)({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
    theirs = _hf_logits(hf, input_ids=ids, attention_mask=mask, position_ids=_hf_positions(mask))
    real = mask.astype(bool)
    diff = np.abs(np.asarray(ours)[real] - theirs[real]).max()
    print(f"max |logits - hf| ({variant}): {diff:.2e}")
    assert diff < 1e-4, diff
    # explicit positions: HF's plain-forward arange
    ours, _ = _forward(config)({"params": params}, jnp.asarray(ids), positions=jnp.arange(ids.shape[1])[None])
    diff = np.abs(np.asarray(ours) - _hf_logits(hf, input_ids=ids)).max()
    assert diff < 1e-4, diff


@pytest.mark.parametrize("variant", ["gqa", "extras"])
def test_inputs_embeds(variant):
    hf, config, params = _pair(variant)
    ids, mask = _prompts()
    embeds = _embeds(config, ids.shape)
    ours, _ = _forward(config)({"params": params}, None, jnp.asarray(mask), inputs_embeds=jnp.asarray(embeds))
    theirs = _hf_logits(hf, inputs_embeds=embeds, attention_mask=mask, position_ids=_hf_positions(mask))
    real = mask.astype(bool)
    diff = np.abs(np.asarray(ours)[real] - theirs[real]).max()
    print(f"max |inputs_embeds logits - hf| ({variant}): {diff:.2e}")
    assert diff < 1e-4, diff
    # embeddings followed by ids == the concatenated embeddings
    word = np.asarray(params["embed_tokens"]["embedding"])[ids[:, -2:]]
    full = np.concatenate([mask, np.ones((3, 2), mask.dtype)], 1)
    both, _ = _forward(config)({"params": params}, jnp.asarray(ids[:, -2:]), jnp.asarray(full),
                                  inputs_embeds=jnp.asarray(embeds))
    theirs = _hf_logits(hf, inputs_embeds=np.concatenate([embeds, word], 1), attention_mask=full,
                        position_ids=_hf_positions(full))
    diff = np.abs(np.asarray(both)[full == 1] - theirs[full == 1]).max()
    print(f"max |inputs_embeds + ids logits - hf| ({variant}): {diff:.2e}")
    assert diff < 1e-4, diff


@functools.lru_cache(maxsize=None)
def _embeds_step(config):
    """A generation step whose prefill reads the prompt embeddings from params["embeds"] [B, T, D]
    (the prompt ids are placeholders), repeated for the rows (beams) of each example."""
    model = Llama(config)

    def step(params, cache, ids, mask, index):
        embeds = None
        if ids.shape[1] > 1:  # the prefill
            embeds = jnp.repeat(params["embeds"], ids.shape[0] // params["embeds"].shape[0], axis=0)
            ids = None
        logits, aux = model.apply({"params": params["model"]}, ids, mask, inputs_embeds=embeds, cache=cache,
                                  cache_index=index, logits_at=slice(-1, None))
        return logits, aux["cache"]

    return step


def _hf_generate(hf, num_beams, eos, **inputs):
    """HF's new tokens (HF returns the prompt too only when given input_ids)."""
    with torch.no_grad():
        out = hf.generate(**{k: torch.as_tensor(v) for k, v in inputs.items()}, max_new_tokens=MAX_NEW,
                          num_beams=num_beams, do_sample=False, eos_token_id=eos, pad_token_id=PAD).numpy()
    return out[:, inputs["input_ids"].shape[1]:] if "input_ids" in inputs else out


def _eos(hf, num_beams, **inputs):
    """A token that, made eos, ends some row before MAX_NEW tokens (for beam search the best beam
    must keep it), so that early stopping is really exercised."""
    free = _hf_generate(hf, num_beams, None, **inputs)
    for token in dict.fromkeys(free[:, 1:-1].ravel().tolist()):  # emitted mid-way, in order
        if (_hf_generate(hf, num_beams, token, **inputs)[:, :-1] == token).any():
            return token
    raise AssertionError("no candidate eos ends a row early")


def _new_tokens(seqs, eos):
    """[B, MAX_NEW] new tokens, PAD after the first eos: HF beam search pads ended rows with eos
    when pad_token_id is 0, and crops to the longest row."""
    seqs = np.pad(seqs, ((0, 0), (0, MAX_NEW - seqs.shape[1])), constant_values=PAD)
    after = np.cumsum(np.cumsum(seqs == eos, 1), 1) > 1
    return np.where(after, PAD, seqs)


def _generate(config, params, ids, mask, num_beams, eos, step=None, scan_layers=False):
    """Our new tokens [B, MAX_NEW]."""
    gen = GenerationConfig.from_kwargs(max_new_tokens=MAX_NEW, num_beams=num_beams, eos_token_id=eos,
                                       pad_token_id=PAD)
    cache = init_cache(config, ids.shape[0], ids.shape[1] + MAX_NEW, scan_layers=scan_layers)
    out = generate(step or decode_step(config, scan_layers=scan_layers), cache, jnp.asarray(ids, jnp.int32),
                   jnp.asarray(mask, jnp.int32), gen, params=params).sequences
    return np.asarray(out)[:, ids.shape[1]:]


@pytest.mark.parametrize("variant,num_beams", [("mha", 1), ("gqa", 3), ("mistral", 1), ("mistral", 3), ("qwen2", 1),
                                               ("qwen2", 3)])
def test_generate_matches_hf(variant, num_beams):
    hf, config, params = _pair(variant)
    ids, mask = _prompts()
    eos = _eos(hf, num_beams, input_ids=ids, attention_mask=mask)
    theirs = _hf_generate(hf, num_beams, eos, input_ids=ids, attention_mask=mask)
    ours = _generate(config, params, ids, mask, num_beams, eos)
    np.testing.assert_array_equal(_new_tokens(ours, eos), _new_tokens(theirs, eos))
    assert (ours[:, :-1] == eos).any()  # the early stop was exercised
    print(f"{variant} beams={num_beams} eos={eos}")


@pytest.mark.parametrize("variant,num_beams", [("extras", 1), ("gqa", 3)])
def test_generate_from_embeds_matches_hf(variant, num_beams):
    hf, config, params = _pair(variant)
    ids, mask = _prompts()
    embeds = _embeds(config, ids.shape)
    eos = _eos(hf, num_beams, inputs_embeds=embeds, attention_mask=mask)
    theirs = _hf_generate(hf, num_beams, eos, inputs_embeds=embeds, attention_mask=mask)
    ours = _generate(config, {"model": params, "embeds": jnp.asarray(embeds)}, np.full_like(ids, PAD), mask,
                     num_beams, eos, step=_embeds_step(config))
    np.testing.assert_array_equal(_new_tokens(ours, eos), _new_tokens(theirs, eos))
    assert (ours[:, :-1] == eos).any()


def test_left_padded_batch_equals_rows_alone():
    _, config, params = _pair("gqa")
    ids, mask = _prompts()
    batch = _generate(config, params, ids, mask, 1, ())
    for i, n in enumerate(LENGTHS[:2]):  # the padded rows
        alone = _generate(config, params, ids[i:i + 1, -n:], mask[i:i + 1, -n:], 1, ())
        np.testing.assert_array_equal(batch[i:i + 1], alone)


def test_scan_equals_unrolled():
    _, config, params = _pair("gqa")
    ids, mask = _prompts()
    scanned = stack_layers(jax.tree.map(np.asarray, params))
    assert "layers" in scanned["decoder"]
    a, _ = _forward(config)({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
    b, _ = _forward(config, True)({"params": scanned}, jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    # the scanned layout's cache decodes the same tokens
    np.testing.assert_array_equal(_generate(config, params, ids, mask, 1, ()),
                                  _generate(config, scanned, ids, mask, 1, (), scan_layers=True))


@pytest.mark.parametrize("variant", ["gqa", "extras"])
def test_logical_axes_and_loader_shapes(variant):
    _, config, params = _pair(variant)
    boxed = jax.eval_shape(lambda: Llama(config).init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32)))["params"]
    is_boxed = lambda x: hasattr(x, "names")  # noqa: E731
    leaves = jax.tree.leaves(boxed, is_leaf=is_boxed)
    assert all(is_boxed(x) and None not in x.names for x in leaves)
    kernel = boxed["decoder"]["layers_0"]["self_attn"]["k_proj"]["kernel"]
    assert kernel.names == ("embed", "kv_heads", "kv")
    assert jax.tree.map(lambda x: x.shape, params) == jax.tree.map(lambda x: x.value.shape, boxed, is_leaf=is_boxed)


def test_loader_errors():
    hf, config, _ = _pair("gqa")
    state = _state(hf)
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(4, np.float32)  # older checkpoints: ignored
    scanned = load_llama_params(state, config, scan_layers=True)
    assert scanned["decoder"]["layers"]["self_attn"]["k_proj"]["kernel"].shape == (2, 32, 2, 8)
    bad = dict(state, **{"model.layers.1.self_attn.k_proj.weight": np.zeros((32, 32), np.float32)})
    del bad["model.norm.weight"]
    with pytest.raises(ConversionError, match=r"(?s)missing keys.*model\.norm\.weight.*shape mismatches.*k_proj"):
        load_llama_params(bad, config)
    with pytest.raises(ConversionError, match="unexpected keys"):
        load_llama_params(dict(state, **{"model.extra.weight": np.zeros(1)}), config)
