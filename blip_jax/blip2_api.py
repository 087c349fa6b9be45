"""The BLIP-2 / InstructBLIP model object, a sibling of `blip_jax.api`'s over `blip_jax.model_base`:
caption, generate, vqa, vqa_rank and rank for the LLM models, itm / itc for the retrieval model.

Users pass plain text: the soft prompt (the projected Q-Former outputs) takes the place of the
`<image>` tokens a transformers v5 processor would insert, and is placed before the text
embeddings. Decoder LLMs (OPT, LLaMA) get left-padded prompts and a cache pre-filled with the soft
prompt; Flan-T5 encodes [soft prompt; right-padded prompt] once and decodes from its start token.
Each (config, shape) compiles once; prompts are padded to multiples of 8 tokens.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from blip_jax import generation
from blip_jax.batching import TEXT_PAD_MULTIPLE, as_list, pad_rows, pad_width, pair_up, texts_of
from blip_jax.model_base import MODEL_GENERATION_FACTS, ModelBase
from blip_jax.models.blip2 import Blip2, Blip2Config
from blip_jax.models.config import DTYPES
from blip_jax.prompts import BLIP2_CAPTION, BLIP2_VQA, CAPTION_PROMPTS, VQA_TEMPLATES, task_options
from blip_jax.text import QFORMER_TOKENIZER, BlipTokenizer

QFORMER_MAX_INSTRUCTION = 128  # InstructBLIP's Q-Former instruction length


# ------------------------------------------------------------------------- compiled pieces
@functools.partial(jax.jit, static_argnums=0)
def encode_image(config: Blip2Config, params, pixels):
    return Blip2(config).apply({"params": params}, pixels, method=Blip2.encode_image)


@functools.partial(jax.jit, static_argnums=0)
def language_prefix(config: Blip2Config, params, image_embeds, instruction_ids, instruction_mask):
    return Blip2(config).apply({"params": params}, image_embeds, instruction_ids, instruction_mask,
                               method=Blip2.language_prefix)


def _llm(config: Blip2Config):
    return config.family.module(config.llm, dtype=DTYPES[config.dtype], scan_layers=config.scan_layers)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _prefill(config: Blip2Config, llm_params, prefix, max_len: int):
    """A decoder LLM's cache with the soft prompt written at positions 0..Q-1 (room for `max_len` more)."""
    batch, q = prefix.shape[:2]
    cache = config.family.init_cache(config.llm, batch, q + max_len, DTYPES[config.dtype],
                                     scan_layers=config.scan_layers)
    mask = jnp.concatenate([jnp.ones((batch, q), jnp.int32), jnp.zeros((batch, max_len), jnp.int32)], 1)
    _, aux = _llm(config).apply({"params": llm_params}, None, mask, inputs_embeds=prefix, cache=cache,
                                cache_index=jnp.int32(0))
    return aux["cache"]


@functools.lru_cache(maxsize=None)
def prefixed_step(config: Blip2Config, prefix_length: int):
    """The LLM's generation step shifted past a soft prompt of `prefix_length` cached positions."""
    step = config.family.decode_step(config.llm, scan_layers=config.scan_layers, dtype=DTYPES[config.dtype])

    def shifted(params, cache, token_ids, attention_mask, cache_index):
        mask = jnp.concatenate([jnp.ones((attention_mask.shape[0], prefix_length), attention_mask.dtype),
                                attention_mask], 1)
        return step(params, cache, token_ids, mask, cache_index + prefix_length)

    return shifted


@functools.partial(jax.jit, static_argnums=0)
def _encode_t5(config: Blip2Config, llm_params, prefix, ids, mask):
    full = jnp.concatenate([jnp.ones(prefix.shape[:2], jnp.int32), mask], 1)
    model = _llm(config)
    states = model.apply({"params": llm_params}, ids, full, inputs_embeds=prefix, method=type(model).encode)
    return states, full


def generate_tokens(config: Blip2Config, params, prefix, prompt_ids, prompt_mask,
                    generation_config: generation.GenerationConfig) -> np.ndarray:
    """New token ids [B * num_return_sequences, max_new_tokens] continuing [soft prompt; prompt]
    (decoder LLMs, prompts left-padded) or decoded from [soft prompt; prompt] (T5, right-padded)."""
    return np.asarray(new_token_array(config, params, prefix, prompt_ids, prompt_mask, generation_config))


def new_token_array(config: Blip2Config, params, prefix, prompt_ids, prompt_mask,
                    generation_config: generation.GenerationConfig):
    """`generate_tokens` as a device array: traceable, what exported programs run."""
    llm_params = params["language_model"]
    new = generation_config.max_new_tokens
    if config.family.encoder_decoder:
        states, mask = _encode_t5(config, llm_params, prefix, prompt_ids, prompt_mask)
        shared = config.family.cross_cache(config.llm, llm_params, states, mask, scan_layers=config.scan_layers,
                                           dtype=DTYPES[config.dtype])
        batch = prefix.shape[0]
        start = jnp.full((batch, 1), config.llm.decoder_start_token_id, jnp.int32)
        cache = config.family.init_cache(config.llm, batch, 1 + new, DTYPES[config.dtype],
                                         scan_layers=config.scan_layers)
        step = config.family.decode_step(config.llm, scan_layers=config.scan_layers, dtype=DTYPES[config.dtype])
        out = generation.generate(step, cache, start, jnp.ones_like(start), generation_config,
                                  params=(llm_params, shared))
        return out.sequences[:, 1:]
    cache = _prefill(config, llm_params, prefix, prompt_ids.shape[1] + new)
    out = generation.generate(prefixed_step(config, prefix.shape[1]), cache, prompt_ids, prompt_mask,
                              generation_config, params=llm_params)
    return out.sequences[:, prompt_ids.shape[1]:]


@functools.partial(jax.jit, static_argnums=0)
def _candidate_logprobs(config: Blip2Config, params, prefix, ids, mask, targets, target_mask):
    """Summed log-probabilities of `targets` where `target_mask` is 1. Decoder LLMs: `ids` = prompt +
    candidate tokens, targets aligned with `ids` (a target at t is predicted at t - 1); T5: `ids` is
    the encoder prompt and targets the decoder's (teacher-forced after the start token)."""
    model = Blip2(config)
    if config.family.encoder_decoder:
        start = jnp.full((targets.shape[0], 1), config.llm.decoder_start_token_id, targets.dtype)
        decoder_ids = jnp.concatenate([start, targets[:, :-1]], 1)
        # causal decoding: padding after a candidate cannot change the scores of its tokens
        predicted = model.apply({"params": params}, prefix, ids, mask, decoder_ids,
                                method=Blip2.language_model_logits)
    else:
        logits = model.apply({"params": params}, prefix, ids, mask, method=Blip2.language_model_logits)
        predicted = logits[:, prefix.shape[1] - 1: -1]  # text token t is predicted at position Q - 1 + t
    logp = jax.nn.log_softmax(predicted, axis=-1)
    picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(picked * target_mask, axis=1)


@functools.partial(jax.jit, static_argnums=0)
def _itm_logits(config: Blip2Config, params, image_embeds, ids, mask):
    """Mean over the query outputs of the 2-way ITM head [B, 2] (LAVIS's score)."""
    return Blip2(config).apply({"params": params}, image_embeds, ids, mask, method=Blip2.itm_logits)


@functools.partial(jax.jit, static_argnums=0)
def _image_features(config: Blip2Config, params, image_embeds):
    return Blip2(config).apply({"params": params}, image_embeds, method=Blip2.image_features)


@functools.partial(jax.jit, static_argnums=0)
def _text_features(config: Blip2Config, params, ids, mask):
    return Blip2(config).apply({"params": params}, ids, mask, method=Blip2.text_features)


# ------------------------------------------------------------------------- the model object
class Blip2Model(ModelBase):
    """A loaded BLIP-2 / InstructBLIP model (see the module docstring)."""

    family = "BLIP-2"

    def __init__(self, config: Blip2Config, params, tokenizer: BlipTokenizer | None = None,
                 image_processor=None, qformer_tokenizer: BlipTokenizer | None = None, **kwargs):
        super().__init__(config, params, tokenizer, image_processor, **kwargs)
        self.qformer_tokenizer = qformer_tokenizer

    @classmethod
    def _tokenizers(cls, config, path: Path) -> dict:
        tokenizer = qformer_tokenizer = None
        if config.architecture == "retrieval":
            tokenizer = BlipTokenizer.from_dir(path)
        elif (path / "tokenizer.json").exists():
            tokenizer = BlipTokenizer.from_llm_dir(path)
        if config.instruct:
            qformer_tokenizer = BlipTokenizer.from_dir(path / QFORMER_TOKENIZER)
        return {"tokenizer": tokenizer, "qformer_tokenizer": qformer_tokenizer}

    @property
    def _kind(self) -> str:
        # an InstructBLIP model reads instructions; a BLIP-2 VQA fine-tune its family's prompts
        return "instruct" if self.config.instruct and self.config.qformer_input == "prompt" else self.config.llm_family

    # ------------------------------------------------------------------ LLM inputs
    def _llm_tokens(self, texts: Sequence[str]):
        """Prompt tokens: left-padded for decoder LLMs (generation continues at the right edge),
        right-padded for T5's encoder."""
        side = "right" if self.config.family.encoder_decoder else "left"
        enc = self.tokenizer(list(texts), padding="longest", truncation=False, padding_side=side)
        return pad_width(enc["input_ids"], enc["attention_mask"], self.tokenizer.pad_token_id, side)

    def _image_embeds(self, pixels: np.ndarray):
        """ViT tokens after ln_vision of every image [n, 1 + patches, D], encoded once, on device."""
        return jnp.concatenate([encode_image(self.config, self.params, self._rows(pixels[a:b], r))[: b - a]
                                for a, b, r in self._chunks(len(pixels))])

    def _prefixes(self, pixels: np.ndarray, image_index: np.ndarray, instructions: list[str]):
        """Soft prompts [N, Q, D_llm] for each (image, instruction) pair; images encoded once."""
        image_embeds = self._image_embeds(pixels)
        prefixes = []
        for a, b, r in self._chunks(len(image_index)):
            embeds = self._rows(image_embeds[pad_rows(image_index[a:b], r)], r)
            q_ids = q_mask = None
            if self.config.instruct:
                enc = self.qformer_tokenizer(instructions[a:b], padding="longest", truncation=True,
                                             max_length=QFORMER_MAX_INSTRUCTION)
                q_ids, q_mask = pad_width(enc["input_ids"], enc["attention_mask"],
                                           self.qformer_tokenizer.pad_token_id, "right")
                q_ids, q_mask = self._rows(q_ids, r), self._rows(q_mask, r)
            prefixes.append(language_prefix(self.config, self.params, embeds, q_ids, q_mask)[: b - a])
        return jnp.concatenate(prefixes)

    def _generation_config(self, defaults: dict, options: dict) -> generation.GenerationConfig:
        llm = self.config.llm
        # what the repetition penalty sees is the model's (LAVIS: not the prompt), whatever the task
        facts = {k: v for k, v in self.checkpoint_generation_options().items() if k in MODEL_GENERATION_FACTS}
        return generation.GenerationConfig.from_kwargs(
            **{**facts, **task_options(defaults, options), "eos_token_id": llm.eos_token_id,
               "pad_token_id": self.tokenizer.pad_token_id, **options})

    def _as_new_tokens(self, options: dict, prompts: list[str]) -> dict:
        """transformers' max_length / min_length (or its default of 20) as new-token counts. They count
        the model's input: for decoder LLMs the soft prompt and the longest prompt (the `<image>` tokens
        are input_ids there), for T5 the decoder start token."""
        options = dict(options)
        max_length, min_length = options.pop("max_length", None), options.pop("min_length", None)
        if self.config.family.encoder_decoder:
            used, limit = 1, None
        else:
            longest = max(len(ids) for ids in self.tokenizer(prompts)["input_ids"])
            used, limit = self.config.num_query_tokens + longest, self.config.llm.max_position_embeddings
        if "max_new_tokens" not in options:
            # no max_length anywhere: transformers generates 20 new tokens, within the positions
            options["max_new_tokens"] = (max_length - used if max_length is not None
                                         else min(20 + used, limit or 20 + used) - used)
        if "min_new_tokens" not in options and min_length:
            options["min_new_tokens"] = max(0, min_length - used)
        return options

    # ------------------------------------------------------------------ tasks
    def generate(self, images, prompts: str | Sequence[str] = "", **generation_options) -> list[str]:
        """Text generated for each (image, prompt) pair (one image or one prompt is broadcast); the
        prompt is not repeated in the output. InstructBLIP prompts are instructions and also feed the
        Q-Former. transformers' `generate` semantics: the defaults are the checkpoint's
        generation_config.json, else transformers' (greedy, max_length 20), and the options
        (`max_length` and `min_length` included) mean what they mean there. InstructBLIP's paper
        settings: `**blip_jax.INSTRUCT_PAPER`. With `num_return_sequences=k` the k texts of each pair
        are consecutive."""
        return self._decode_texts(self._generate_ids(images, prompts, generation_options))

    def _generate_ids(self, images, prompts, options: dict) -> np.ndarray:
        """What `generate` decodes: new token ids [N * num_return_sequences, max_new_tokens]."""
        self._require("generate")
        prompts = as_list(prompts)
        options = self._as_new_tokens({**self.checkpoint_generation_options(), **options}, prompts)
        return self._new_tokens(images, prompts, self._generation_config({}, options))

    def _generate(self, images, prompts: list[str], defaults: dict, options: dict,
                  qformer_texts: list[str] | None = None) -> list[str]:
        """Texts after `prompts` with a task's `defaults` under the caller's `options`."""
        return self._decode_texts(self._new_tokens(images, prompts, self._generation_config(defaults, options),
                                                   qformer_texts))

    def _new_tokens(self, images, prompts: list[str], config: generation.GenerationConfig,
                    qformer_texts: list[str] | None = None) -> np.ndarray:
        """`qformer_texts` (default: the prompts) is what an instruct Q-Former reads."""
        pixels = self.preprocess(images)
        image_index, prompts = pair_up(len(pixels), prompts)
        _, qformer_texts = pair_up(len(pixels), qformer_texts) if qformer_texts is not None else (None, prompts)
        prefixes = self._prefixes(pixels, image_index, qformer_texts)
        tokens = []
        for start, stop, rows in self._chunks(len(prompts)):
            ids, mask = self._llm_tokens(prompts[start:stop])
            new = generate_tokens(self.config, self.params, self._rows(prefixes[start:stop], rows),
                                  self._rows(ids, rows), self._rows(mask, rows), config)
            tokens.append(new[: (stop - start) * config.num_return_sequences])
        return np.concatenate(tokens)

    def caption(self, images, prompt: str | None = None, **generation_options) -> list[str]:
        """Captions: beam 5, 8 to 30 new tokens, after the prompt "a photo of" (InstructBLIP: the
        instruction "A short image description:"), as the papers evaluate; the prompt is not returned."""
        self._require("caption")
        if prompt is None:
            prompt = CAPTION_PROMPTS["instruct" if self.config.instruct else "blip2"]
        return self._generate(images, [prompt], BLIP2_CAPTION, generation_options)

    def vqa(self, images, questions, **generation_options) -> list[str]:
        """Short answers with the paper's prompt ("Question: {} Answer:" for OPT, "Question: {} Short
        answer:" for Flan-T5 and InstructBLIP) and zero-shot settings (beam 5, <= 10 new tokens)."""
        self._require("vqa")
        questions = texts_of(questions, "questions")
        prompts = [VQA_TEMPLATES[self._kind].format(q) for q in questions]
        return self._generate(images, prompts, BLIP2_VQA[self._kind], generation_options, self._qformer_reads(questions))

    def _qformer_reads(self, questions: list[str]) -> list[str] | None:
        """What the Q-Former reads for VQA: the bare questions for a BLIP-2 VQA fine-tune (None: the prompts)."""
        return questions if self.config.qformer_input == "question" else None

    def vqa_rank(self, images, questions, answer_list: Sequence[str], k: int | None = None) -> list[str]:
        """The most likely answer of `answer_list` for each (image, question) pair, by `rank` after
        the paper's VQA prompt. Every candidate is scored: `k` (BLIP's first-token shortlist) is
        accepted for the shared signature and not used."""
        self._require("vqa")
        questions = texts_of(questions, "questions")
        prompts = [VQA_TEMPLATES[self._kind].format(q) for q in questions]
        scores = self.rank(images, prompts, texts_of(list(answer_list), "answer_list"), self._qformer_reads(questions))
        return [answer_list[i] for i in scores.argmax(1)]

    def rank(self, images, prompts, candidates: Sequence[str], qformer_texts: Sequence[str] | None = None
             ) -> np.ndarray:
        """Log-likelihood [N, len(candidates)] of each candidate answer after each (image, prompt)
        pair: the summed log-probabilities of the candidate's tokens (for T5 including its `</s>`), what
        multiple-choice evaluation ranks by. One image or one prompt is broadcast. `qformer_texts`:
        what an instruct Q-Former reads instead of the prompts (a BLIP-2 VQA fine-tune: the questions)."""
        self._require("rank")
        pixels = self.preprocess(images)
        image_index, prompts = pair_up(len(pixels), as_list(prompts))
        reads = prompts if qformer_texts is None else pair_up(len(pixels), as_list(qformer_texts))[1]
        prefixes = self._prefixes(pixels, image_index, reads)
        candidates = texts_of(list(candidates), "candidates")
        t5 = self.config.family.encoder_decoder
        cand = self.tokenizer(candidates, padding="longest", add_special_tokens=t5, padding_side="right")
        scores = np.zeros((len(prompts), len(candidates)), np.float32)
        for start, stop, rows in self._chunks(len(prompts)):
            prefix = self._rows(prefixes[start:stop], rows)
            if t5:
                ids, mask = self._llm_tokens(prompts[start:stop])
                ids, mask = self._rows(ids, rows), self._rows(mask, rows)
            else:  # each prompt's tokens, once for all candidates
                enc = self.tokenizer(prompts[start:stop], padding="longest", truncation=False)
                prompt_tokens = [list(p[m == 1]) for p, m in zip(enc["input_ids"], enc["attention_mask"])]
            for j in range(len(candidates)):
                if t5:
                    targets, tmask = pad_width(cand["input_ids"][j:j + 1], cand["attention_mask"][j:j + 1],
                                                self.tokenizer.pad_token_id, "right")
                    targets, tmask = np.repeat(targets, rows, 0), np.repeat(tmask, rows, 0)
                    s = _candidate_logprobs(self.config, self.params, prefix, ids, mask, targets, tmask)
                else:
                    s = _candidate_logprobs(self.config, self.params, prefix,
                                            *self._joined(prompt_tokens, cand, j, rows))
                scores[start:stop, j] = np.asarray(s)[: stop - start]
        return scores

    def _joined(self, prompt_tokens: list[list[int]], cand: dict, j: int, rows: int):
        """Decoder LLMs: rows of prompt + candidate j tokens, right-padded, with the candidate's
        positions as targets (aligned so that position t's target is the token at t + 1)."""
        c = cand["input_ids"][j][cand["attention_mask"][j] == 1]
        seqs = [p + list(c) for p in prompt_tokens]
        width = -(-max(map(len, seqs)) // TEXT_PAD_MULTIPLE) * TEXT_PAD_MULTIPLE
        ids = np.full((rows, width), self.tokenizer.pad_token_id, np.int32)
        mask = np.zeros((rows, width), np.int32)
        targets = np.zeros((rows, width), np.int32)
        tmask = np.zeros((rows, width), np.float32)
        for i, s in enumerate(seqs):
            ids[i, : len(s)], mask[i, : len(s)] = s, 1
            n = len(s) - len(c)
            # logits at Q-1 + t predict token t: target row t holds token t for the candidate span
            targets[i, n: len(s)], tmask[i, n: len(s)] = c, 1.0
        return ids, mask, targets, tmask

    def _itm_head(self, image_embeds, ids, mask):
        return _itm_logits(self.config, self.params, image_embeds, ids, mask)

    def _image_feature_head(self, image_embeds):
        return _image_features(self.config, self.params, image_embeds)

    def _text_feature_head(self, ids, mask):
        return _text_features(self.config, self.params, ids, mask)

    @staticmethod
    def similarity(image_features: np.ndarray, text_features: np.ndarray) -> np.ndarray:
        """[n_images, n_texts]: the best-matching query's cosine similarity (BLIP-2's ITC)."""
        return np.einsum("iqd,td->iqt", image_features, text_features).max(axis=1)

    def _tokenize(self, texts):
        enc = self.tokenizer(list(texts), padding="longest", truncation=True,
                             max_length=self.config.qformer_max_positions)
        return pad_width(enc["input_ids"], enc["attention_mask"], self.tokenizer.pad_token_id, "right")
