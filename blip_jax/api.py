"""The BLIP model object (caption, vqa, vqa_rank, itm, itc, nlvr), a sibling of `blip_jax.blip2_api`'s
over `blip_jax.model_base`; `load` (re-exported here) picks the class for a model directory.

Every compiled function takes the config as a static argument and the parameters as traced ones,
so each (config, shape) compiles once and is reused across calls and model instances.
Batches are processed in chunks padded to power-of-two sizes, bounding both memory and the
number of distinct compiled shapes.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from blip_jax import generation
from blip_jax.batching import pad_rows, pad_width, pair_up, texts_of
from blip_jax.losses import BLIP_LABEL_SMOOTHING, IGNORE, sequence_cross_entropy
from blip_jax.models.blip import Blip
from blip_jax.models.config import BlipConfig
from blip_jax.models.med import merge_cache, split_cache
from blip_jax.model_base import TASKS, ModelBase, UnsupportedTaskError, load  # noqa: F401 (public here too)
from blip_jax.prompts import BLIP_CAPTION, BLIP_VQA, task_options
from blip_jax.text import BlipTokenizer


# ------------------------------------------------------------------------- compiled pieces
@functools.partial(jax.jit, static_argnums=0)
def encode_image(config: BlipConfig, params, pixels):
    return Blip(config).apply({"params": params}, pixels, method=Blip.encode_image)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _init_cache(config: BlipConfig, params, encoder_states, encoder_mask, max_len: int):
    return Blip(config).apply({"params": params}, encoder_states, encoder_mask, max_len,
                              method=Blip.init_decode_cache)


@functools.lru_cache(maxsize=None)
def decode_step(config: BlipConfig):
    """The generation step of the BLIP text decoder (one stable callable per config).

    Its `params` are (weights, shared cache): the cross-attention keys/values of each example are
    passed once, beside the per-beam cache that generation expands and reorders."""
    model = Blip(config)

    def step(params, cache, token_ids, attention_mask, cache_index):
        weights, shared = params
        # transformers derives decoder positions from the mask (cumsum - 1) during generation.
        positions = jnp.maximum(jnp.cumsum(attention_mask, axis=1) - 1, 0)
        positions = jax.lax.dynamic_slice_in_dim(positions, cache_index, token_ids.shape[1], axis=1)
        logits, aux = model.apply({"params": weights}, token_ids, attention_mask, positions=positions,
                                  cache=merge_cache(cache, shared), cache_index=cache_index, method=Blip.decode)
        return logits, split_cache(aux["cache"])[0]

    return step


@functools.partial(jax.jit, static_argnums=0)
def _itm_logits(config: BlipConfig, params, image_embeds, ids, mask):
    return Blip(config).apply({"params": params}, image_embeds, ids, mask, method=Blip.itm_logits)


@functools.partial(jax.jit, static_argnums=0)
def _nlvr_logits(config: BlipConfig, params, embeds0, embeds1, ids, mask):
    return Blip(config).apply({"params": params}, embeds0, embeds1, ids, mask, method=Blip.nlvr_logits)


@functools.partial(jax.jit, static_argnums=0)
def _image_features(config: BlipConfig, params, image_embeds):
    return Blip(config).apply({"params": params}, image_embeds, method=Blip.image_features)


@functools.partial(jax.jit, static_argnums=0)
def _text_features(config: BlipConfig, params, ids, mask):
    return Blip(config).apply({"params": params}, ids, mask, method=Blip.text_features)


@functools.partial(jax.jit, static_argnums=0)
def _encode_question(config: BlipConfig, params, image_embeds, ids, mask):
    return Blip(config).apply({"params": params}, image_embeds, ids, mask, method=Blip.encode_question)


@functools.partial(jax.jit, static_argnums=0)
def _first_token_probs(config: BlipConfig, params, question_states, question_mask):
    """Answer decoder's next-token distribution after [DEC] over the question states [B, V]."""
    bos = jnp.full((question_states.shape[0], 1), config.text.bos_token_id, jnp.int32)
    logits, _ = Blip(config).apply({"params": params}, bos, jnp.ones_like(bos), question_states, question_mask,
                                   method=Blip.decode)
    return jax.nn.softmax(logits[:, 0].astype(jnp.float32), axis=-1)


@functools.partial(jax.jit, static_argnums=0)
def _answer_scores(config: BlipConfig, params, question_states, question_mask, answer_ids, answer_mask):
    """LAVIS's rank score of each answer [B]: minus its summed next-token cross-entropy with label
    smoothing 0.1 (BLIP's decoder loss, kept in its ranking), padding excluded."""
    logits, _ = Blip(config).apply({"params": params}, answer_ids, answer_mask, question_states, question_mask,
                                   method=Blip.decode)
    targets = jnp.where(answer_mask[:, 1:] > 0, answer_ids[:, 1:], IGNORE)
    return -sequence_cross_entropy(logits[:, :-1], targets, BLIP_LABEL_SMOOTHING)


def generate_text(config: BlipConfig, params, encoder_states, encoder_mask, prompt_ids,
                  generation_config: generation.GenerationConfig) -> np.ndarray:
    """Token ids [B * num_return_sequences, T + max_new_tokens] decoded over `encoder_states`
    (image tokens, or VQA question states) from `prompt_ids` [B, T]; what caption and vqa run."""
    max_len = prompt_ids.shape[1] + generation_config.max_new_tokens
    if max_len > config.text.max_position_embeddings:
        raise ValueError(f"prompt ({prompt_ids.shape[1]} tokens) + max_new_tokens ({generation_config.max_new_tokens}) "
                         f"exceeds the decoder's {config.text.max_position_embeddings} positions")
    return np.asarray(generate_sequences(config, params, encoder_states, encoder_mask, prompt_ids, generation_config))


def generate_sequences(config: BlipConfig, params, encoder_states, encoder_mask, prompt_ids,
                       generation_config: generation.GenerationConfig):
    """`generate_text`'s ids as a device array: traceable, what exported programs run
    (`blip_jax.convert.stablehlo`)."""
    max_len = prompt_ids.shape[1] + generation_config.max_new_tokens
    if encoder_mask is None:
        encoder_mask = jnp.ones(encoder_states.shape[:2], jnp.int32)
    cache, shared = split_cache(_init_cache(config, params, encoder_states, encoder_mask, max_len))
    out = generation.generate(decode_step(config), cache, prompt_ids, jnp.ones_like(prompt_ids), generation_config,
                              params=(params, shared))
    return out.sequences


class BlipModel(ModelBase):
    """A loaded BLIP model. Methods raise `UnsupportedTaskError` for tasks its heads cannot serve."""

    family = "BLIP"

    @classmethod
    def _tokenizers(cls, config, path: Path) -> dict:
        has_tokenizer = (path / "tokenizer.json").exists() or (path / "vocab.txt").exists()
        return {"tokenizer": BlipTokenizer.from_dir(path) if has_tokenizer else None}

    # ------------------------------------------------------------------ inputs
    def _tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        enc = self.tokenizer(list(texts), padding="longest", truncation=True,
                             max_length=self.config.text.max_position_embeddings)
        return pad_width(enc["input_ids"], enc["attention_mask"], self.tokenizer.pad_token_id)

    def _generation_config(self, defaults: dict, options: dict) -> generation.GenerationConfig:
        text = self.config.text
        return generation.GenerationConfig.from_kwargs(
            **{**task_options(defaults, options), "eos_token_id": text.sep_token_id, "pad_token_id": text.pad_token_id})

    # ------------------------------------------------------------------ tasks
    def caption(self, images, prompt: str | None = None, **generation_options) -> list[str]:
        """Captions (beam 3, <= 20 new tokens, >= 5 by default; any `GenerationConfig` option).

        As transformers does, a prompt ("a picture of") starts the caption and is part of the text returned.
        With `num_return_sequences=k` the k captions of each image are consecutive."""
        self._require("caption")
        pixels = self.preprocess(images)
        config = self._generation_config(BLIP_CAPTION, generation_options)
        if prompt:  # "[CLS] prompt [SEP]" -> "[DEC] prompt": the decoder continues the prompt
            prompt_ids = self.tokenizer([prompt])["input_ids"][0][:-1].copy()
        else:
            prompt_ids = np.array([0], np.int64)
        prompt_ids[0] = self.config.text.bos_token_id
        outputs = []
        for start, stop, rows in self._chunks(len(pixels)):
            chunk = self._rows(pixels[start:stop], rows)
            image_embeds = encode_image(self.config, self.params, chunk)
            ids = np.broadcast_to(prompt_ids.astype(np.int32), (rows, len(prompt_ids)))
            seqs = generate_text(self.config, self.params, image_embeds, None, ids, config)
            outputs += self._decode_texts(seqs[: (stop - start) * config.num_return_sequences])
        return outputs

    def _image_embeds(self, pixels: np.ndarray):
        """ViT tokens of every image [n, 1 + patches, D], encoded once, kept on device."""
        return jnp.concatenate([encode_image(self.config, self.params, self._rows(pixels[a:b], r))[: b - a]
                                for a, b, r in self._chunks(len(pixels))])

    def vqa(self, images, questions, **generation_options) -> list[str]:
        """Open-ended answers (beam 3, <= 10 new tokens by default), one per (image, question) pair."""
        self._require("vqa")
        pixels = self.preprocess(images)
        image_index, questions = pair_up(len(pixels), texts_of(questions, "questions"))
        image_embeds = self._image_embeds(pixels)
        config = self._generation_config(BLIP_VQA, generation_options)
        answers = []
        for start, stop, rows in self._chunks(len(questions)):
            ids, mask = self._tokenize(questions[start:stop])
            ids, mask = self._rows(ids, rows), self._rows(mask, rows)
            embeds = self._rows(image_embeds[pad_rows(image_index[start:stop], rows)], rows)
            question_states = _encode_question(self.config, self.params, embeds, ids, mask)
            # BLIP (and transformers) let the answer decoder see every question state, the padding
            # up to the longest question included; only our extra bucket padding is hidden.
            longest = int(np.asarray(mask).sum(1).max())
            states_mask = np.broadcast_to(np.arange(ids.shape[1]) < longest, ids.shape).astype(np.int32)
            bos = np.full((rows, 1), self.config.text.bos_token_id, np.int32)
            seqs = generate_text(self.config, self.params, question_states, jnp.asarray(states_mask), bos, config)
            answers += self._decode_texts(seqs[: (stop - start) * config.num_return_sequences])
        return answers

    def vqa_rank(self, images, questions, answer_list: Sequence[str], k: int = 128) -> list[str]:
        """BLIP's rank-mode VQA (LAVIS `_rank_answers`): the answer decoder's first-token probability
        picks the `k` most likely answers of `answer_list`; each is scored by its label-smoothed
        log-likelihood over the question states and the best one is returned per question."""
        candidates, scores = self.vqa_rank_scores(images, questions, answer_list, k)
        return [answer_list[c[i]] for c, i in zip(candidates, scores.argmax(1))]

    def vqa_rank_scores(self, images, questions, answer_list: Sequence[str], k: int = 128):
        """(candidate answer indices [N, k] by first-token probability, their rank scores [N, k]),
        as `vqa_rank` uses them."""
        self._require("vqa")
        pixels = self.preprocess(images)
        image_index, questions = pair_up(len(pixels), texts_of(questions, "questions"))
        image_embeds = self._image_embeds(pixels)
        enc = self.tokenizer(texts_of(list(answer_list), "answer_list"), padding="longest", truncation=True,
                             max_length=self.config.text.max_position_embeddings)
        answer_ids = np.asarray(enc["input_ids"], np.int32).copy()
        answer_ids[:, 0] = self.config.text.bos_token_id  # [CLS] answer [SEP] -> [DEC] answer [SEP]
        answer_mask = np.asarray(enc["attention_mask"], np.int32)
        k = min(k, len(answer_list))
        candidates, scores = [], []
        for start, stop, rows in self._chunks(len(questions)):
            ids, mask = self._tokenize(questions[start:stop])
            ids, mask = self._rows(ids, rows), self._rows(mask, rows)
            embeds = self._rows(image_embeds[pad_rows(image_index[start:stop], rows)], rows)
            states = _encode_question(self.config, self.params, embeds, ids, mask)
            first = np.asarray(_first_token_probs(self.config, self.params, states, mask))[:, answer_ids[:, 1]]
            topk = np.argsort(-first, axis=1, kind="stable")[:, :k]  # [rows, k]
            pairs, question = topk.ravel(), np.repeat(np.arange(rows), k)
            scored = []
            for a, b, r in self._chunks(len(pairs), progress=False):
                q = pad_rows(question[a:b], r)  # each pair's question, gathered on device
                scored.append(np.asarray(_answer_scores(
                    self.config, self.params, self._rows(states[q], r), self._rows(mask[q], r),
                    self._rows(answer_ids[pad_rows(pairs[a:b], r)], r),
                    self._rows(answer_mask[pad_rows(pairs[a:b], r)], r)))[: b - a])
            pair_scores = np.concatenate(scored)
            candidates.append(topk[: stop - start])
            scores.append(pair_scores.reshape(rows, k)[: stop - start])
        return np.concatenate(candidates), np.concatenate(scores)

    def nlvr_logits(self, left_images, right_images, statements) -> np.ndarray:
        """NLVR2 class logits [N, num_classes] (false, true) of each (left image, right image,
        statement) triple; one statement is broadcast over the pairs."""
        self._require("nlvr")
        left, right = self.preprocess(left_images), self.preprocess(right_images)
        if len(left) != len(right):
            raise ValueError(f"nlvr: {len(left)} left images but {len(right)} right images; give them in pairs")
        index, texts = pair_up(len(left), texts_of(statements, "statements"))
        if len(texts) != len(left) or list(index) != list(range(len(left))):
            raise ValueError(f"nlvr: {len(texts)} statements for {len(left)} image pairs; give one per pair, or one")
        out = []
        for start, stop, rows in self._chunks(len(left)):
            ids, mask = self._tokenize(texts[start:stop])
            ids, mask = self._rows(ids, rows), self._rows(mask, rows)
            e0 = encode_image(self.config, self.params, self._rows(left[start:stop], rows))
            e1 = encode_image(self.config, self.params, self._rows(right[start:stop], rows))
            out.append(np.asarray(_nlvr_logits(self.config, self.params, e0, e1, ids, mask))[: stop - start])
        return np.concatenate(out)

    def nlvr(self, left_images, right_images, statements) -> np.ndarray:
        """Probability [N] that each statement is true of its (left, right) image pair (NLVR2)."""
        return np.asarray(jax.nn.softmax(self.nlvr_logits(left_images, right_images, statements), -1)[:, 1])

    # ------------------------------------------------------------------ the heads ITM / ITC run
    def _itm_head(self, image_embeds, ids, mask):
        return _itm_logits(self.config, self.params, image_embeds, ids, mask)

    def _image_feature_head(self, image_embeds):
        return _image_features(self.config, self.params, image_embeds)

    def _text_feature_head(self, ids, mask):
        return _text_features(self.config, self.params, ids, mask)

    @staticmethod
    def similarity(image_features: np.ndarray, text_features: np.ndarray) -> np.ndarray:
        """[n_images, n_texts] cosine similarities of ITC features (no temperature)."""
        return image_features @ text_features.T
