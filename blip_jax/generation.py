"""Autoregressive generation shared by every decoder of the library (BLIP, OPT, T5, LLaMA).

Reproduces HuggingFace transformers 5.x ``generate`` token for token for greedy search and beam
search, and implements HF's multinomial sampling (temperature / top-k / top-p) with ``jax.random``.

API
---
``generate(step_fn, cache, prompt_ids, prompt_mask, config, *, params=None, rng=None)``

* ``step_fn`` is a *static* jit argument: pass a stable callable (a module-level function or one
  built once and reused), never a fresh lambda/closure per call, or every call recompiles.
  Model weights go in ``params`` (an arbitrary pytree, traced), so that one compiled program
  serves any weights:

      params is None:      step_fn(cache, token_ids, attention_mask, cache_index)
      params is not None:  step_fn(params, cache, token_ids, attention_mask, cache_index)

  and returns ``(logits [R, S, V], new_cache)``. ``token_ids`` int32 [R, S] are the tokens at
  positions ``cache_index .. cache_index+S-1`` (first call: the prompt, S=T, cache_index=0; then
  S=1). ``attention_mask`` int32 [R, T+max_new_tokens] covers every cache position: the prompt
  mask, 1 for each position written so far, 0 for positions not yet written. Only the logits of
  the last position are used. R = B * num_beams (beam search) or B * num_return_sequences.
* ``cache``: any pytree whose leaves all have the batch (B) as leading axis, sized for
  T + max_new_tokens positions. Rows are expanded with ``jnp.repeat(x, n, axis=0)`` (rows
  b*n .. b*n+n-1 belong to example b, as in HF) and, in beam search, reordered after every step by
  a gather along axis 0.
* ``config``: a :class:`GenerationConfig` (frozen, hashable, static). ``config.seed`` is *not*
  baked into the compiled program (it is passed traced), so changing the seed does not recompile;
  ``rng`` (a jax PRNG key) overrides the seed.
* One compiled program per (step_fn, config without seed, shapes/dtypes of params/cache/prompt).
  Everything runs in a single ``jax.lax.while_loop`` that exits as soon as every row is done.

Returns ``GenerationOutput(sequences int32 [B*nrs, T+max_new_tokens], scores float32 [B*nrs])``:
prompt + generated tokens, ``pad_token_id`` after a row's end; ``scores`` are HF's beam
``sequences_scores`` (length-penalised), or for greedy/sampling the sum of the log-probabilities
(log_softmax of the processed logits) of the chosen tokens up to and including eos.

Example (a model exposing ``decode_step(params, cache, ids, mask, index)`` at module level)::

    cfg = GenerationConfig.from_kwargs(num_beams=3, max_new_tokens=30, eos_token_id=102)
    cache = init_cache(batch=B, max_len=T + cfg.max_new_tokens)
    out = generate(decode_step, cache, ids, mask, cfg, params=params)

Known differences from HF: HF crops the output to the longest row (we always return the full
width); in beam search HF fills ended rows with ``pad_token_id or eos_token_id[0]``, i.e. with eos
when pad_token_id == 0 -- we always use ``pad_token_id``. Exact ties (argmax, top-k, top-p
boundary) may be broken differently. Sampling draws from the same distribution as HF but with
jax.random, so sampled tokens differ. Beam sampling is not implemented.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

_NEG = -1.0e9  # HF's "very large negative" used to mask beams


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """Decoding options; defaults are HF's effective defaults. Hashable (a static jit argument)."""

    max_new_tokens: int = 20
    min_new_tokens: int = 0
    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50  # only used when sampling; 0 disables
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    # LAVIS's semantics: transformers 4.33 generating from inputs_embeds (the prompt as embeddings)
    # starts the sequence with this id (LLaMA's bos, T5's decoder start). Then the repetition penalty
    # sees this id and the new tokens, not the prompt, and a beam cut at max_new_tokens is scored over
    # one more token than it generated (4.33's finalize counts the start). None: transformers 5.
    inputs_embeds_start_id: int | None = None
    length_penalty: float = 1.0
    early_stopping: bool | str = False  # True, False or "never"
    num_return_sequences: int = 1
    eos_token_id: int | tuple[int, ...] = ()
    pad_token_id: int = 0
    seed: int = 0

    def __post_init__(self):
        eos = self.eos_token_id
        if eos is None:
            eos = ()
        elif isinstance(eos, (int, np.integer)) and not isinstance(eos, bool):
            eos = (int(eos),)
        else:
            eos = tuple(int(e) for e in eos)
        object.__setattr__(self, "eos_token_id", eos)
        self._validate()

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "GenerationConfig":
        """Builds a config from keyword options, rejecting unknown names with a ValueError."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"Unknown generation option(s) {unknown}; valid options: {sorted(known)}")
        return cls(**kwargs)

    def replace(self, **kwargs: Any) -> "GenerationConfig":
        return type(self).from_kwargs(**{**dataclasses.asdict(self), **kwargs})

    def _validate(self):
        def is_int(v):
            return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

        def check(ok, msg):
            if not ok:
                raise ValueError(msg)

        check(is_int(self.max_new_tokens) and self.max_new_tokens >= 1,
              f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        check(is_int(self.min_new_tokens) and self.min_new_tokens >= 0,
              f"min_new_tokens must be an int >= 0, got {self.min_new_tokens!r}")
        check(is_int(self.num_beams) and self.num_beams >= 1, f"num_beams must be an int >= 1, got {self.num_beams!r}")
        check(isinstance(self.do_sample, bool), f"do_sample must be a bool, got {self.do_sample!r}")
        check(self.temperature > 0, f"temperature must be > 0 (use do_sample=False for greedy), got {self.temperature!r}")
        check(is_int(self.top_k) and self.top_k >= 0, f"top_k must be an int >= 0 (0 disables), got {self.top_k!r}")
        check(0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p!r}")
        check(self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        check(self.inputs_embeds_start_id is None or (is_int(self.inputs_embeds_start_id)
                                                      and self.inputs_embeds_start_id >= 0),
              f"inputs_embeds_start_id must be None or an int >= 0, got {self.inputs_embeds_start_id!r}")
        check(isinstance(self.length_penalty, (int, float)) and not isinstance(self.length_penalty, bool),
              f"length_penalty must be a number, got {self.length_penalty!r}")
        check(self.early_stopping is True or self.early_stopping is False or self.early_stopping == "never",
              f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        check(is_int(self.num_return_sequences) and self.num_return_sequences >= 1,
              f"num_return_sequences must be an int >= 1, got {self.num_return_sequences!r}")
        check(all(e >= 0 for e in self.eos_token_id), f"eos_token_id must be >= 0, got {self.eos_token_id!r}")
        check(is_int(self.pad_token_id) and self.pad_token_id >= 0,
              f"pad_token_id must be an int >= 0, got {self.pad_token_id!r}")
        check(is_int(self.seed), f"seed must be an int, got {self.seed!r}")
        if self.num_beams > 1:
            check(not self.do_sample, "beam sampling (do_sample=True with num_beams > 1) is not supported")
            check(self.num_return_sequences <= self.num_beams,
                  f"num_return_sequences ({self.num_return_sequences}) must be <= num_beams ({self.num_beams})")
        elif not self.do_sample:
            check(self.num_return_sequences == 1,
                  f"greedy search cannot return {self.num_return_sequences} sequences; use beams or do_sample=True")


class GenerationOutput(NamedTuple):
    sequences: jax.Array  # int32 [B * num_return_sequences, T + max_new_tokens]
    scores: jax.Array  # float32 [B * num_return_sequences]


# ----------------------------------------------------------------------------------------------
# Logits processors (HF semantics). All act on float32 scores [R, V].


def repetition_penalty(scores, seqs, valid, penalty, start_id=None):
    """HF RepetitionPenaltyLogitsProcessor: every token id present in ``seqs`` where ``valid``
    (and ``start_id``, when given) gets its score divided by ``penalty`` (if positive) or multiplied
    by it (if negative)."""
    r, v = scores.shape
    ids = jnp.where(valid & (seqs < v) & (seqs >= 0), seqs, v)  # v = "nothing" (dropped)
    present = jnp.zeros((r, v + 1), bool).at[jnp.arange(r)[:, None], ids].set(True)[:, :v]
    if start_id is not None and start_id < v:
        present = present.at[:, start_id].set(True)
    return jnp.where(present, jnp.where(scores < 0, scores * penalty, scores / penalty), scores)


def top_k_filter(scores, top_k, min_tokens_to_keep=1):
    """HF TopKLogitsWarper: keep every score >= the k-th largest (ties kept)."""
    k = min(max(top_k, min_tokens_to_keep), scores.shape[-1])
    kth = jax.lax.top_k(scores, k)[0][..., -1:]
    return jnp.where(scores < kth, -jnp.inf, scores)


def top_p_filter(scores, top_p, min_tokens_to_keep=1):
    """HF TopPLogitsWarper: sort ascending, drop tokens whose cumulative probability is
    <= 1 - top_p, always keeping the ``min_tokens_to_keep`` most likely."""
    order = jnp.argsort(scores, axis=-1)
    cum = jnp.cumsum(jax.nn.softmax(jnp.take_along_axis(scores, order, -1), -1), -1)
    remove = (cum <= 1 - top_p).at[..., -min_tokens_to_keep:].set(False)
    remove = jnp.take_along_axis(remove, jnp.argsort(order, axis=-1), -1)  # back to vocab order
    return jnp.where(remove, -jnp.inf, scores)


def warp_for_sampling(scores, config: GenerationConfig, min_tokens_to_keep=1):
    """HF's sampling warpers in HF order: temperature, top-k, top-p (each only when active)."""
    if config.temperature != 1.0:
        scores = scores / config.temperature
    if config.top_k != 0:
        scores = top_k_filter(scores, config.top_k, min_tokens_to_keep)
    if config.top_p < 1.0:
        scores = top_p_filter(scores, config.top_p, min_tokens_to_keep)
    return scores


def _is_eos(tokens, eos):
    return (tokens[..., None] == eos).any(-1) if eos.size else jnp.zeros(tokens.shape, bool)


def _process(config, scores, seqs, cur, prompt_len, pad_len, eos):
    """HF's non-sampling processors, in HF order: repetition penalty, then min_new_tokens eos ban.
    ``seqs`` [R, L] hold the history in columns < cur; HF ignores the left padding of the prompt
    (prompt_ignore_length = index of the first 1 of the prompt mask)."""
    if config.repetition_penalty != 1.0:
        pos = jnp.arange(seqs.shape[1])[None]
        start = config.inputs_embeds_start_id
        valid = (pos < cur) & (pos >= (pad_len[:, None] if start is None else prompt_len))
        scores = repetition_penalty(scores, seqs, valid, config.repetition_penalty, start)
    if config.min_new_tokens > 0 and eos.size:
        banned = _is_eos(jnp.arange(scores.shape[-1]), eos)[None] & (cur - prompt_len < config.min_new_tokens)
        scores = jnp.where(banned, -jnp.inf, scores)
    return scores


# ----------------------------------------------------------------------------------------------
# Decoding loops.


def _generate_impl(step_fn, config, params, cache, prompt_ids, prompt_mask, key):
    b, t = prompt_ids.shape
    n_new = config.max_new_tokens
    total = t + n_new
    k = config.num_beams
    beam = k > 1
    expand = k if beam else config.num_return_sequences
    pad = config.pad_token_id
    eos = jnp.asarray(config.eos_token_id, jnp.int32).reshape(-1)
    f32 = jnp.float32

    def call(cache, tokens, mask, index):
        args = (cache, tokens, mask, index) if params is None else (params, cache, tokens, mask, index)
        logits, cache = step_fn(*args)
        return logits[:, -1].astype(f32), cache

    # the prompt is prefilled once per example; then its rows are copied for the beams or samples
    # (HF's _expand_inputs_for_generation copies before the prefill: the same rows, k times the work)
    logits, cache = call(cache, prompt_ids, jnp.concatenate([prompt_mask, jnp.zeros((b, n_new), jnp.int32)], 1),
                         jnp.int32(0))
    if expand > 1:
        rep = functools.partial(jnp.repeat, repeats=expand, axis=0)
        cache, prompt_ids, prompt_mask, logits = jax.tree.map(rep, (cache, prompt_ids, prompt_mask, logits))
    rows = b * expand
    mask = jnp.concatenate([prompt_mask, jnp.zeros((rows, n_new), jnp.int32)], 1)
    seqs = jnp.concatenate([prompt_ids, jnp.full((rows, n_new), pad, jnp.int32)], 1)
    pad_len = jnp.argmax(prompt_mask != 0, axis=1)  # leading padding, ignored by repetition penalty
    cur = jnp.int32(t)  # absolute position of the next token to choose

    def last_tokens(flat_seqs, cur):
        return jax.lax.dynamic_index_in_dim(flat_seqs, cur - 1, axis=1, keepdims=True)

    if not beam:
        # ---- greedy / multinomial sampling (HF _sample) ----
        def select(st, logits):
            scores = _process(config, logits, st["seqs"], st["cur"], t, pad_len, eos)
            if config.do_sample:
                scores = warp_for_sampling(scores, config)
                key, sub = jax.random.split(st["key"])
                tok = jax.random.categorical(sub, scores, axis=-1).astype(jnp.int32)
            else:
                key = st["key"]
                tok = jnp.argmax(scores, axis=-1).astype(jnp.int32)
            logp = jnp.take_along_axis(jax.nn.log_softmax(scores), tok[:, None], 1)[:, 0]
            unf = st["unfinished"]
            tok = jnp.where(unf, tok, pad)  # finished rows keep emitting pad
            c = st["cur"]
            return dict(
                st,
                key=key,
                cur=c + 1,
                seqs=jax.lax.dynamic_update_index_in_dim(st["seqs"], tok, c, 1),
                mask=jax.lax.dynamic_update_index_in_dim(st["mask"], jnp.ones((rows,), jnp.int32), c, 1),
                score=st["score"] + jnp.where(unf, logp, 0.0),
                unfinished=unf & ~_is_eos(tok, eos) & (c + 1 < total),
            )

        def body(st):
            logits, cache = call(st["cache"], last_tokens(st["seqs"], st["cur"]), st["mask"], st["cur"] - 1)
            return select(dict(st, cache=cache), logits)

        st = dict(cache=cache, seqs=seqs, mask=mask, cur=cur, key=key,
                  score=jnp.zeros((rows,), f32), unfinished=jnp.ones((rows,), bool))
        st = select(st, logits)
        st = jax.lax.while_loop(lambda s: s["unfinished"].any() & (s["cur"] < total), body, st)
        return GenerationOutput(st["seqs"], st["score"])

    # ---- beam search (HF _beam_search) ----
    es, lp = config.early_stopping, config.length_penalty
    n_keep = max(2, 1 + eos.size) * k  # candidates kept per step, so >= k of them are not eos
    # HF divides float32 scores by the Python float n ** length_penalty; tabulate it exactly.
    lp_table = jnp.asarray([1.0] + [float(n) ** lp for n in range(1, n_new + 2)], f32)
    top_k_mask = jnp.arange(n_keep) < k

    def gather(x, idx):  # x [B, M, ...], idx [B, J] -> [B, J, ...]
        return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)

    def select(st, logits):
        c = st["cur"]
        logp = jax.nn.log_softmax(logits)  # HF applies the processors *after* log_softmax here
        logp = _process(config, logp, st["run_seqs"].reshape(rows, total), c, t, pad_len, eos)
        acc = (logp.reshape(b, k, -1) + st["run_scores"][..., None]).reshape(b, -1)
        vocab = logits.shape[-1]
        top_lp, top_idx = jax.lax.top_k(acc, n_keep)
        src, tok = top_idx // vocab, (top_idx % vocab).astype(jnp.int32)
        cand = jax.lax.dynamic_update_index_in_dim(gather(st["run_seqs"], src), tok, c, 2)
        hits = _is_eos(tok, eos) | (c + 1 >= total)  # eos or max length reached

        # running beams for the next step: the best k candidates that did not just stop
        run_lp = top_lp + hits.astype(f32) * _NEG
        nxt = jax.lax.top_k(run_lp, k)[1]
        run_seqs, run_scores, run_src = gather(cand, nxt), gather(run_lp, nxt), gather(src, nxt)

        # finished hypotheses: merge the newly stopped top-k candidates into the k best so far
        did = hits & top_k_mask[None]
        length = c + 1 - t
        if config.inputs_embeds_start_id is not None:  # 4.33 scores a beam cut at max length with its start
            length = length + (hits & ~_is_eos(tok, eos)).astype(jnp.int32)
        fin_lp = top_lp / lp_table[length]
        if es is True:
            fin_lp = fin_lp + (st["fin"].all(-1, keepdims=True)).astype(f32) * _NEG
        fin_lp = fin_lp + (~st["unsat"])[:, None].astype(f32) * _NEG
        fin_lp = fin_lp + (~did).astype(f32) * _NEG
        m_scores = jnp.concatenate([st["beam_scores"], fin_lp], 1)
        best = jax.lax.top_k(m_scores, k)[1]
        fin_seqs = gather(jnp.concatenate([st["fin_seqs"], cand], 1), best)
        beam_scores = gather(m_scores, best)
        fin = gather(jnp.concatenate([st["fin"], did], 1), best)

        # reorder the cache rows to follow their beams
        flat_src = (jnp.arange(b)[:, None] * k + run_src).reshape(-1)
        cache = jax.tree.map(lambda x: jnp.take(x, flat_src, axis=0), st["cache"])

        # HF _check_early_stop_heuristic / _beam_search_has_unfinished_sequences
        c = c + 1
        n_best = n_new if (es == "never" and lp > 0.0) else c - t
        best_run = run_scores[:, :1] / lp_table[n_best]
        worst_fin = jnp.where(fin, beam_scores.min(-1, keepdims=True), _NEG)
        unsat = st["unsat"] & (best_run > worst_fin).any(-1)
        open_beams = ~(fin.all() & (es is True))
        done = ~(unsat.any() & open_beams & ~hits.all())
        return dict(
            cache=cache, cur=c, run_seqs=run_seqs, run_scores=run_scores, fin_seqs=fin_seqs,
            beam_scores=beam_scores, fin=fin, unsat=unsat, done=done,
            mask=jax.lax.dynamic_update_index_in_dim(st["mask"], jnp.ones((rows,), jnp.int32), c - 1, 1),
        )

    def body(st):
        flat = st["run_seqs"].reshape(rows, total)
        logits, cache = call(st["cache"], last_tokens(flat, st["cur"]), st["mask"], st["cur"] - 1)
        return select(dict(st, cache=cache), logits)

    run_seqs = seqs.reshape(b, k, total)
    st = dict(
        cache=cache, cur=cur, mask=mask, run_seqs=run_seqs,
        run_scores=jnp.tile(jnp.asarray([0.0] + [_NEG] * (k - 1), f32), (b, 1)),  # only beam 0 live
        fin_seqs=run_seqs, beam_scores=jnp.full((b, k), _NEG, f32), fin=jnp.zeros((b, k), bool),
        unsat=jnp.ones((b,), bool), done=jnp.asarray(False),
    )
    st = select(st, logits)
    st = jax.lax.while_loop(lambda s: ~s["done"] & (s["cur"] < total), body, st)
    nrs = config.num_return_sequences
    return GenerationOutput(
        st["fin_seqs"][:, :nrs].reshape(b * nrs, total), st["beam_scores"][:, :nrs].reshape(b * nrs)
    )


_generate_jit = jax.jit(_generate_impl, static_argnames=("step_fn", "config"))


def generate(
    step_fn: Callable,
    cache: Any,
    prompt_ids,
    prompt_mask,
    config: GenerationConfig,
    *,
    params: Any = None,
    rng: jax.Array | None = None,
) -> GenerationOutput:
    """Generates continuations of ``prompt_ids`` (see the module docstring for the contract)."""
    if not isinstance(config, GenerationConfig):
        raise TypeError(f"config must be a GenerationConfig, got {type(config).__name__}")
    prompt_ids = jnp.asarray(prompt_ids, jnp.int32)
    prompt_mask = jnp.asarray(prompt_mask, jnp.int32)
    if prompt_ids.ndim != 2 or prompt_ids.shape[1] < 1 or prompt_mask.shape != prompt_ids.shape:
        raise ValueError(
            f"prompt_ids and prompt_mask must both be [B, T] with T >= 1, got {prompt_ids.shape} and {prompt_mask.shape}"
        )
    key = None
    if config.do_sample:
        key = rng if rng is not None else jax.random.key(config.seed)
    # The seed travels in `key` (traced), so it is zeroed in the static config to share programs.
    return _generate_jit(step_fn, dataclasses.replace(config, seed=0), params, cache, prompt_ids, prompt_mask, key)
