"""Parity of blip_jax.generation with HuggingFace transformers `generate`.

A tiny torch model (PreTrainedModel + GenerationMixin, full recomputation, no cache) whose logits are a
deterministic function of the token history is driven by HF `generate`; the same function written as
a JAX `step_fn` with a cache (token history + a running float state, so a wrong beam reorder or a
wrong attention mask changes the logits) is driven by `generate` here. Sequences must be identical.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.modeling_outputs import CausalLMOutputWithPast

from blip_jax import generation as G
from blip_jax.generation import GenerationConfig, generate

V, D, MAX_POS = 20, 8, 64
EOS, EOS2, PAD = 2, 3, 1
T, N = 5, 12  # prompt width, max_new_tokens


def _make_weights(seed=0, eos_bias=1.0, eos_ramp=0.6):
    rng = np.random.default_rng(seed)
    bias = np.zeros(V, np.float32)
    bias[[EOS, EOS2]] = eos_bias  # make eos frequent so that early stopping really happens
    bias[PAD] = -4.0
    pos = rng.normal(0, 0.5, (MAX_POS, V)).astype(np.float32)
    pos[:, EOS] += eos_ramp * np.arange(MAX_POS)  # eos ever more likely: every row ends eventually
    return {
        "cur": rng.normal(0, 1.0, (V, V)).astype(np.float32),
        "prev": rng.normal(0, 1.0, (V + 1, V)).astype(np.float32),  # row V: "no previous token"
        "pos": pos,
        # multiples of 1/4: the running sums below are exact in float32 in both frameworks
        "emb": (rng.integers(-2, 3, (V, D)) / 4).astype(np.float32),
        "out": rng.normal(0, 1.0, (D, V)).astype(np.float32),
        "bias": bias,
    }


WEIGHTS = _make_weights()


class TinyConfig(PretrainedConfig):
    model_type = "blip_jax_tiny_generation_test"

    def __init__(self, vocab_size=V, **kwargs):
        self.vocab_size = vocab_size
        super().__init__(**kwargs)


class TinyLM(PreTrainedModel, GenerationMixin):
    """logits_t = cur[x_t] + prev[x_{t-1}] + pos[#real tokens <= t] + tanh(sum_{s<=t} emb[x_s]) @ out + bias."""

    config_class = TinyConfig

    def __init__(self, config, weights):
        super().__init__(config)
        self.w = {k: torch.tensor(v) for k, v in weights.items()}
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.post_init()

    def _init_weights(self, module):
        pass

    def forward(self, input_ids, attention_mask=None, **kwargs):
        w, x = self.w, input_ids
        m = torch.ones_like(x) if attention_mask is None else attention_mask.long()
        prev = torch.cat([torch.full_like(x[:, :1], V), x[:, :-1]], 1)
        prev_m = torch.cat([torch.zeros_like(m[:, :1]), m[:, :-1]], 1)
        prev = torch.where(prev_m == 1, prev, V)
        pos = (m.cumsum(1) - 1).clamp(min=0)
        h = (w["emb"][x] * m[..., None]).cumsum(1)
        logits = w["cur"][x] + w["prev"][prev] + w["pos"][pos] + torch.tanh(h) @ w["out"] + w["bias"]
        return CausalLMOutputWithPast(logits=logits)


TORCH_MODEL = TinyLM(TinyConfig(), WEIGHTS).eval()
PARAMS = jax.tree.map(jnp.asarray, WEIGHTS)
TRACES = {"n": 0}


def step_fn(params, cache, tokens, mask, index):
    """The same function as TinyLM, incrementally, with a cache of (token history, running sum)."""
    TRACES["n"] += 1  # counts traces, not calls
    w, s = params, tokens.shape[1]
    hist = jax.lax.dynamic_update_slice(cache["hist"], tokens, (0, index))
    new_m = jax.lax.dynamic_slice_in_dim(mask, index, s, axis=1)
    h = cache["h"] + (w["emb"][tokens] * new_m[..., None]).sum(1)
    p = index + s - 1
    x = jax.lax.dynamic_index_in_dim(hist, p, 1, keepdims=False)
    q = jnp.maximum(p - 1, 0)
    has_prev = (p >= 1) & (jax.lax.dynamic_index_in_dim(mask, q, 1, keepdims=False) == 1)
    prev = jnp.where(has_prev, jax.lax.dynamic_index_in_dim(hist, q, 1, keepdims=False), V)
    pos = jnp.maximum(mask.sum(-1) - 1, 0)  # relies on unwritten positions being masked with 0
    mix = jnp.dot(jnp.tanh(h), w["out"], precision="highest")  # no TF32 on GPUs
    last = w["cur"][x] + w["prev"][prev] + w["pos"][pos] + mix + w["bias"]
    logits = jnp.zeros((tokens.shape[0], s, V), jnp.float32).at[:, -1].set(last)
    return logits, {"hist": hist, "h": h}


def new_cache(batch, max_len):
    return {"hist": jnp.zeros((batch, max_len), jnp.int32), "h": jnp.zeros((batch, D), jnp.float32)}


def make_prompts(lengths, seed):
    rng = np.random.default_rng(seed)
    ids = np.full((len(lengths), T), PAD, np.int64)
    mask = np.zeros((len(lengths), T), np.int64)
    for i, n in enumerate(lengths):  # left padding
        ids[i, T - n:] = rng.integers(4, V, n)
        mask[i, T - n:] = 1
    return ids, mask


# Two batches of 3 left-padded prompts (same shapes, so each config compiles once for both): in MAIN
# some rows run to max_new_tokens; in EARLY every row ends within a few tokens, so the while loop
# exits early (HF returns a narrower array).
MAIN_PROMPTS = make_prompts((5, 3, 1), seed=2)
EARLY_PROMPTS = make_prompts((5, 3, 1), seed=1)


def run_both(prompts, **options):
    ids, mask = prompts
    options = {"max_new_tokens": N, "eos_token_id": EOS, "pad_token_id": PAD, **options}
    cfg = GenerationConfig.from_kwargs(**options)
    hf_opts = {k: v for k, v in options.items() if k != "eos_token_id"}
    eos = list(cfg.eos_token_id)
    with torch.no_grad():
        hf = TORCH_MODEL.generate(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), eos_token_id=eos, use_cache=False,
            return_dict_in_generate=True, output_scores=True, **hf_opts)
    ours = generate(step_fn, new_cache(len(ids), T + cfg.max_new_tokens), ids, mask, cfg, params=PARAMS)
    return cfg, hf, ours


def pad_to(x, width, value):
    x = np.asarray(x)
    return np.pad(x, ((0, 0), (0, width - x.shape[1])), constant_values=value)


def generated_lengths(seqs, eos):
    """Number of generated tokens of each row, eos included."""
    gen = np.asarray(seqs)[:, T:]
    is_eos = np.isin(gen, eos)
    return np.where(is_eos.any(1), is_eos.argmax(1) + 1, gen.shape[1])


# ----------------------------------------------------------------------------------- greedy


@pytest.mark.parametrize("options", [
    {},
    {"repetition_penalty": 1.5},
    {"min_new_tokens": 4, "eos_token_id": (EOS, EOS2)},
    {"repetition_penalty": 1.5, "min_new_tokens": 2, "eos_token_id": (EOS2, EOS)},
], ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_greedy_matches_hf(options):
    widths, lens = [], []
    for prompts in (MAIN_PROMPTS, EARLY_PROMPTS):
        cfg, hf, ours = run_both(prompts, **options)
        np.testing.assert_array_equal(np.asarray(ours.sequences), pad_to(hf.sequences, T + N, PAD))
        # greedy score = sum of log-softmax(processed logits) of the chosen tokens, up to eos
        n = generated_lengths(ours.sequences, cfg.eos_token_id)
        logp = torch.stack([torch.log_softmax(s, -1) for s in hf.scores], 1)  # [B, steps, V]
        chosen = logp.gather(2, hf.sequences[:, T:, None])[..., 0]
        ref = [chosen[i, :n[i]].sum().item() for i in range(len(n))]
        np.testing.assert_allclose(np.asarray(ours.scores), ref, rtol=1e-5, atol=1e-5)
        widths.append(hf.sequences.shape[1] - T)
        lens.append(n)
    lens = np.concatenate(lens)
    # not vacuous: rows stop at eos at different steps, and the loop exits before max_new_tokens
    assert (lens < N).any() and len(set(lens.tolist())) > 2 and min(widths) < N, (lens, widths)
    assert (lens > cfg.min_new_tokens).all()


# ----------------------------------------------------------------------------------- beam search

BEAM_CASES = [  # every pair of (num_beams, length_penalty, early_stopping) values appears
    dict(num_beams=3, length_penalty=1.0, early_stopping=True),
    dict(num_beams=3, length_penalty=0.0, early_stopping=False),
    dict(num_beams=3, length_penalty=-1.0, early_stopping="never"),
    dict(num_beams=4, length_penalty=1.0, early_stopping=False),
    dict(num_beams=4, length_penalty=0.0, early_stopping="never"),
    dict(num_beams=4, length_penalty=-1.0, early_stopping=True),
    dict(num_beams=4, length_penalty=1.0, early_stopping="never"),
    dict(num_beams=3, length_penalty=0.0, early_stopping=True),
    dict(num_beams=4, length_penalty=-1.0, early_stopping=False),
    dict(num_beams=3, min_new_tokens=5),
    dict(num_beams=3, repetition_penalty=1.5),
    dict(num_beams=4, num_return_sequences=2),
    dict(num_beams=3, num_return_sequences=3, eos_token_id=(EOS, EOS2), early_stopping=True),
    dict(num_beams=4, length_penalty=0.5, early_stopping="never", eos_token_id=(EOS2, EOS)),
    dict(num_beams=4, num_return_sequences=2, repetition_penalty=1.5, min_new_tokens=2,
         eos_token_id=(EOS, EOS2), length_penalty=0.5),
]


@pytest.mark.parametrize("options", BEAM_CASES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_beam_search_matches_hf(options):
    widths, lens = [], []
    for prompts in (MAIN_PROMPTS, EARLY_PROMPTS):
        cfg, hf, ours = run_both(prompts, **options)
        assert ours.sequences.shape == (3 * cfg.num_return_sequences, T + N)
        np.testing.assert_array_equal(np.asarray(ours.sequences), pad_to(hf.sequences, T + N, PAD))
        np.testing.assert_allclose(np.asarray(ours.scores), hf.sequences_scores.numpy(), rtol=1e-5, atol=1e-5)
        widths.append(hf.sequences.shape[1] - T)
        lens.append(generated_lengths(ours.sequences, cfg.eos_token_id))
    lens = np.concatenate(lens)
    # not vacuous: some returned beams ended with eos, and the search loop ended before max length
    assert (lens < N).any() and min(widths) < N, (lens, widths)
    assert (lens > cfg.min_new_tokens).all()


def test_beam_search_pad_zero_differs_from_hf_only_in_fill():
    """HF fills ended beams with `pad_token_id or eos_token_id[0]` (= eos when pad is 0); we use pad."""
    cfg, hf, ours = run_both(MAIN_PROMPTS, num_beams=3, pad_token_id=0)
    ref = pad_to(hf.sequences, T + N, EOS)
    lens = generated_lengths(ref, [EOS])
    assert (lens < N).any()
    for i, n in enumerate(lens):
        ref[i, T + n:] = 0
    np.testing.assert_array_equal(np.asarray(ours.sequences), ref)


# ----------------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("temperature,top_k,top_p,min_keep", [
    (1.0, 50, 1.0, 1), (0.7, 5, 1.0, 1), (1.3, 0, 0.8, 1), (1.0, 4, 0.5, 1),
    (0.5, 0, 0.3, 3), (2.0, 2, 0.9, 3), (1.0, 0, 0.05, 1),
])
def test_sampling_warpers_match_hf(temperature, top_k, top_p, min_keep):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 40, generator=g) * 3
    logits[5] = torch.round(logits[5])  # ties
    ref = logits
    if temperature != 1.0:
        ref = TemperatureLogitsWarper(temperature)(None, ref)
    if top_k != 0:
        ref = TopKLogitsWarper(top_k, min_tokens_to_keep=min_keep)(None, ref)
    if top_p < 1.0:
        ref = TopPLogitsWarper(top_p, min_tokens_to_keep=min_keep)(None, ref)
    cfg = GenerationConfig(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p)
    ours = np.asarray(G.warp_for_sampling(jnp.asarray(logits.numpy()), cfg, min_keep))
    ref = ref.numpy()
    if top_p < 1.0:  # with exact ties at the top-p boundary HF's (unstable) sort decides: not compared
        ours, ref = ours[:5], ref[:5]
    np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(ref))
    np.testing.assert_allclose(ours[np.isfinite(ours)], ref[np.isfinite(ref)], rtol=1e-6)
    assert (np.isfinite(ours).sum(-1) >= min_keep).all()


def test_sampling_seed_and_kept_set():
    ids, mask = MAIN_PROMPTS
    base = dict(max_new_tokens=N, eos_token_id=EOS, pad_token_id=PAD, do_sample=True, temperature=1.5,
                top_k=6, top_p=0.9, num_return_sequences=2)
    run = lambda **kw: generate(step_fn, new_cache(3, T + N), ids, mask, GenerationConfig(**{**base, **kw}),
                                params=PARAMS)
    a, b, c = run(seed=0), run(seed=0), run(seed=1)
    np.testing.assert_array_equal(np.asarray(a.sequences), np.asarray(b.sequences))
    assert not np.array_equal(np.asarray(a.sequences), np.asarray(c.sequences))
    d = generate(step_fn, new_cache(3, T + N), ids, mask, GenerationConfig(**base), params=PARAMS,
                 rng=jax.random.key(1))
    np.testing.assert_array_equal(np.asarray(c.sequences), np.asarray(d.sequences))
    # every sampled token lies in HF's kept set for its history (recomputed with the torch model)
    seqs = torch.tensor(np.asarray(a.sequences), dtype=torch.long)
    rmask = torch.tensor(np.repeat(mask, 2, 0))
    lens = generated_lengths(seqs.numpy(), [EOS])
    with torch.no_grad():
        for step in range(N):
            full_mask = torch.cat([rmask, torch.ones(len(seqs), step, dtype=torch.long)], 1)
            logits = TORCH_MODEL(seqs[:, :T + step], attention_mask=full_mask).logits[:, -1]
            kept = TopPLogitsWarper(0.9)(None, TopKLogitsWarper(6)(None, TemperatureLogitsWarper(1.5)(None, logits)))
            tok = seqs[:, T + step]
            live = torch.tensor(lens > step)
            assert torch.isfinite(kept.gather(1, tok[:, None]))[:, 0][live].all()
    assert (lens < N).any()
    assert (np.asarray(a.sequences)[lens < N, -1] == PAD).all()


def const_step(params, cache, tokens, mask, index):
    return jnp.broadcast_to(params, (tokens.shape[0], tokens.shape[1], params.shape[-1])), cache


def test_sampling_distribution():
    """Empirical token frequencies follow softmax of the warped logits."""
    logits = jnp.asarray(np.random.default_rng(0).normal(0, 1.5, 12), jnp.float32)
    cfg = GenerationConfig(do_sample=True, temperature=0.8, top_k=5, top_p=0.95, max_new_tokens=1, seed=3)
    n = 10000
    out = generate(const_step, {"x": jnp.zeros((n, 1))}, np.zeros((n, 1)), np.ones((n, 1)), cfg, params=logits)
    freq = np.bincount(np.asarray(out.sequences[:, 1]), minlength=12) / n
    probs = np.asarray(jax.nn.softmax(G.warp_for_sampling(logits[None], cfg)[0]))
    np.testing.assert_allclose(freq, probs, atol=0.02)  # ~4 sigma
    assert (freq[probs == 0] == 0).all()
    np.testing.assert_allclose(np.asarray(out.scores), np.log(probs[np.asarray(out.sequences[:, 1])]), atol=1e-5)


# ----------------------------------------------------------------------------------- API


def test_compiles_once_per_shapes_and_config():
    ids, mask = MAIN_PROMPTS
    cfg = GenerationConfig(max_new_tokens=7, num_beams=2, eos_token_id=EOS, pad_token_id=PAD)
    generate(step_fn, new_cache(3, T + 7), ids, mask, cfg, params=PARAMS)
    n = TRACES["n"]
    other = jax.tree.map(lambda x: x * 0.5, PARAMS)  # new weights: no retrace
    generate(step_fn, new_cache(3, T + 7), ids, mask, cfg, params=other)
    s = dict(max_new_tokens=7, eos_token_id=EOS, pad_token_id=PAD, do_sample=True)
    generate(step_fn, new_cache(3, T + 7), ids, mask, GenerationConfig(**s, seed=1), params=PARAMS)
    m = TRACES["n"]
    generate(step_fn, new_cache(3, T + 7), ids, mask, GenerationConfig(**s, seed=2), params=PARAMS)  # new seed
    assert TRACES["n"] == m and m == n + 2  # prefill + loop body traced once for the sampling program


def test_step_fn_without_params():
    ids, mask = MAIN_PROMPTS
    cfg = GenerationConfig(max_new_tokens=N, eos_token_id=EOS, pad_token_id=PAD, repetition_penalty=1.5)
    a = generate(step_fn, new_cache(3, T + N), ids, mask, cfg, params=PARAMS)
    b = generate(STEP_NO_PARAMS, new_cache(3, T + N), ids, mask, cfg)
    np.testing.assert_array_equal(np.asarray(a.sequences), np.asarray(b.sequences))


def STEP_NO_PARAMS(cache, tokens, mask, index):
    return step_fn(PARAMS, cache, tokens, mask, index)


@pytest.mark.parametrize("kwargs,match", [
    ({"num_beams": 0}, "num_beams"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"temperature": 0.0}, "temperature"),
    ({"temperature": -1.0}, "temperature"),
    ({"num_beams": 2, "num_return_sequences": 3}, "num_return_sequences"),
    ({"num_return_sequences": 2}, "greedy"),
    ({"num_beams": 2, "do_sample": True}, "beam sampling"),
    ({"early_stopping": "sometimes"}, "early_stopping"),
    ({"early_stopping": 1}, "early_stopping"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"min_new_tokens": -1}, "min_new_tokens"),
    ({"top_k": -1}, "top_k"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"eos_token_id": -2}, "eos_token_id"),
    ({"pad_token_id": -1}, "pad_token_id"),
    ({"max_length": 20}, "Unknown"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GenerationConfig.from_kwargs(**kwargs)


def test_config_normalisation():
    cfg = GenerationConfig.from_kwargs(eos_token_id=5, do_sample=True, num_return_sequences=3)
    assert cfg.eos_token_id == (5,)
    assert GenerationConfig(eos_token_id=[5, 6]).eos_token_id == (5, 6)
    assert hash(cfg) == hash(dataclasses.replace(cfg))
    assert cfg.replace(top_k=3).top_k == 3
    beam = GenerationConfig(num_beams=3, num_return_sequences=3)
    with pytest.raises(ValueError, match="num_return_sequences"):
        beam.replace(num_beams=2)
