"""The Python API: `blip_jax.load(path)` -> a model object with preprocess, caption, itm, itc, vqa.

Every compiled function takes the config as a static argument and the parameters as traced ones,
so each (config, shape) compiles once and is reused across calls and model instances.
Batches are processed in chunks padded to power-of-two sizes, bounding both memory and the
number of distinct compiled shapes.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from blip_jax import checkpoint, generation
from blip_jax.images import ImageProcessor
from blip_jax.losses import BLIP_LABEL_SMOOTHING, IGNORE, sequence_cross_entropy
from blip_jax.models.blip import Blip
from blip_jax.models.config import BlipConfig
from blip_jax.models.med import merge_cache, split_cache
from blip_jax.text import BlipTokenizer

# What each architecture serves.
TASKS = {"caption": ("caption",), "retrieval": ("itm", "itc"), "vqa": ("vqa",), "pretrain": ("caption", "itm", "itc")}

# Decoding defaults of the BLIP paper / reference code; every option can be overridden per call.
CAPTION_DEFAULTS = dict(num_beams=3, max_new_tokens=20, min_new_tokens=5)
VQA_DEFAULTS = dict(num_beams=3, max_new_tokens=10, min_new_tokens=1)
TEXT_PAD_MULTIPLE = 8  # pad token lengths to a multiple of this to share compiled programs


class UnsupportedTaskError(ValueError):
    """The loaded architecture has no head for the requested task."""


# ------------------------------------------------------------------------- compiled pieces
@functools.partial(jax.jit, static_argnums=0)
def _encode_image(config: BlipConfig, params, pixels):
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
    if encoder_mask is None:
        encoder_mask = jnp.ones(encoder_states.shape[:2], jnp.int32)
    cache, shared = split_cache(_init_cache(config, params, encoder_states, encoder_mask, max_len))
    out = generation.generate(decode_step(config), cache, prompt_ids, np.ones_like(prompt_ids), generation_config,
                              params=(params, shared))
    return np.asarray(out.sequences)


# ------------------------------------------------------------------------- helpers
def _bucket(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
    if x.shape[0] == rows:
        return x
    pad = np.zeros((rows - x.shape[0],) + x.shape[1:], x.dtype)
    return np.concatenate([x, pad])


MAX_SHARED_ROWS = 16  # ITM pairs of one image sharing its cross-attention keys and values in a batch


def _shared_rows(image_index: np.ndarray, batch_size: int) -> int:
    """Rows per image slot: the median number of pairs per image (so most images fill their slots),
    at most MAX_SHARED_ROWS and the batch size."""
    if not len(image_index):
        return 1
    median = int(np.median(np.unique(image_index, return_counts=True)[1]))
    return max(1, min(median, MAX_SHARED_ROWS, batch_size))


def _slots(image_index: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray]:
    """Pairs laid out by image: (image of each slot [S], pair indices of each slot [S, group], -1 padding)."""
    order = np.argsort(image_index, kind="stable")
    images, starts, counts = np.unique(image_index[order], return_index=True, return_counts=True)
    per_image = -(-counts // group)
    slot_image = np.repeat(images, per_image)
    slot_pairs = np.full((len(slot_image), group), -1, np.int64)
    first_slot = np.concatenate([[0], np.cumsum(per_image)[:-1]])
    for slot0, start, count in zip(first_slot, starts, counts):
        flat = slot_pairs[slot0:slot0 + -(-count // group)].reshape(-1)  # a view: writes land in slot_pairs
        flat[:count] = order[start:start + count]
    return slot_image, slot_pairs


def _as_list(x) -> list:
    if isinstance(x, (str, Path)) or not isinstance(x, (list, tuple)):
        return [x]
    return list(x)


class BlipModel:
    """A loaded BLIP model. Methods raise `UnsupportedTaskError` for tasks its heads cannot serve."""

    def __init__(self, config: BlipConfig, params, tokenizer: BlipTokenizer | None = None,
                 image_processor: ImageProcessor | None = None, path: str | Path | None = None,
                 batch_size: int = 32, progress: bool = False, mesh=None):
        self.config = config
        self.params = params
        self.tokenizer = tokenizer
        self.image_processor = image_processor or ImageProcessor(
            size={"height": config.vision.image_size, "width": config.vision.image_size})
        self.path = path
        self.batch_size = batch_size
        self.progress = progress  # a progress bar (rate, ETA) on stderr over batches
        self.mesh = None
        if mesh is not None:
            self.use_mesh(mesh)

    def use_mesh(self, mesh) -> "BlipModel":
        """Split every batch over `mesh`'s devices (data parallel; parameters replicated). Rows are
        independent, so results equal the one-device ones up to float rounding."""
        from jax.sharding import NamedSharding, PartitionSpec

        self.mesh = mesh
        self._batch_sharding = NamedSharding(mesh, PartitionSpec(mesh.axis_names))
        self.params = jax.device_put(self.params, NamedSharding(mesh, PartitionSpec()))
        return self

    @classmethod
    def from_dir(cls, path: str | Path, **kwargs) -> "BlipModel":
        config, params = checkpoint.load(path)
        path = Path(path)
        has_tokenizer = (path / "tokenizer.json").exists() or (path / "vocab.txt").exists()
        tokenizer = BlipTokenizer.from_dir(path) if has_tokenizer else None
        return cls(config, params, tokenizer, ImageProcessor.from_dir(path), path=path, **kwargs)

    @property
    def architecture(self) -> str:
        return self.config.architecture

    @property
    def tasks(self) -> tuple[str, ...]:
        return TASKS[self.architecture]

    def _require(self, task: str):
        if task not in self.tasks:
            raise UnsupportedTaskError(
                f"{task} needs a BLIP {_ARCH_FOR[task]} model, but {self.path or 'this model'} is a "
                f"{self.architecture} model, which serves: {', '.join(self.tasks)}")
        if self.tokenizer is None:
            raise FileNotFoundError(f"{self.path}: no tokenizer files (tokenizer.json or vocab.txt) to encode text")

    # ------------------------------------------------------------------ inputs
    def preprocess(self, images) -> np.ndarray:
        """PIL images, uint8 HxWx3 arrays, file paths or float NHWC pixel_values -> float32 [B, H, W, 3]."""
        if isinstance(images, np.ndarray) and images.dtype.kind == "f":
            return self.image_processor(images)
        return self.image_processor(_as_list(images))

    def _tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        enc = self.tokenizer(list(texts), padding="longest", truncation=True,
                             max_length=self.config.text.max_position_embeddings)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        width = -(-ids.shape[1] // TEXT_PAD_MULTIPLE) * TEXT_PAD_MULTIPLE
        pad = width - ids.shape[1]
        ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=self.tokenizer.pad_token_id)
        return ids.astype(np.int32), np.pad(mask, ((0, 0), (0, pad))).astype(np.int32)

    def _chunks(self, n: int, progress: bool | None = None, size: int | None = None):
        """(start, stop, padded rows) of each batch of `size` (default: the batch size); rows are a
        power of two (one compile per size) and, on a mesh, a multiple of its devices so each gets
        the same number."""
        size = size or self.batch_size
        starts = range(0, n, size)
        if (self.progress if progress is None else progress) and len(starts) > 1:
            starts = tqdm(starts, unit="batch", desc=f"blip-jax {self.architecture}")
        for start in starts:
            stop = min(n, start + size)
            rows = _bucket(stop - start)
            if self.mesh is not None:
                rows = -(-rows // self.mesh.size) * self.mesh.size
            yield start, stop, rows

    def _rows(self, x, rows: int):
        """`x` padded to `rows` rows, on a mesh split along the batch (else on the default device)."""
        if x.shape[0] != rows:
            x = _pad_rows(np.asarray(x), rows)
        return jnp.asarray(x) if self.mesh is None else jax.device_put(x, self._batch_sharding)

    def _generation_config(self, defaults: dict, options: dict) -> generation.GenerationConfig:
        text = self.config.text
        return generation.GenerationConfig.from_kwargs(
            **{**defaults, **options, "eos_token_id": text.sep_token_id, "pad_token_id": text.pad_token_id})

    def _decode_texts(self, sequences: np.ndarray) -> list[str]:
        return [s.strip() for s in self.tokenizer.batch_decode(np.asarray(sequences), skip_special_tokens=True)]

    # ------------------------------------------------------------------ tasks
    def caption(self, images, prompt: str | None = None, **generation_options) -> list[str]:
        """Captions (beam 3, <= 20 new tokens, >= 5 by default; any `GenerationConfig` option).

        As transformers does, a prompt ("a picture of") starts the caption and is part of the text returned.
        With `num_return_sequences=k` the k captions of each image are consecutive."""
        self._require("caption")
        pixels = self.preprocess(images)
        config = self._generation_config(CAPTION_DEFAULTS, generation_options)
        if prompt:  # "[CLS] prompt [SEP]" -> "[DEC] prompt": the decoder continues the prompt
            prompt_ids = self.tokenizer([prompt])["input_ids"][0][:-1].copy()
        else:
            prompt_ids = np.array([0], np.int64)
        prompt_ids[0] = self.config.text.bos_token_id
        outputs = []
        for start, stop, rows in self._chunks(len(pixels)):
            chunk = self._rows(pixels[start:stop], rows)
            image_embeds = _encode_image(self.config, self.params, chunk)
            ids = np.broadcast_to(prompt_ids.astype(np.int32), (rows, len(prompt_ids)))
            seqs = generate_text(self.config, self.params, image_embeds, None, ids, config)
            outputs += self._decode_texts(seqs[: (stop - start) * config.num_return_sequences])
        return outputs

    def _image_embeds(self, pixels: np.ndarray):
        """ViT tokens of every image [n, 1 + patches, D], encoded once, kept on device."""
        return jnp.concatenate([_encode_image(self.config, self.params, self._rows(pixels[a:b], r))[: b - a]
                                for a, b, r in self._chunks(len(pixels))])

    def vqa(self, images, questions, **generation_options) -> list[str]:
        """Open-ended answers (beam 3, <= 10 new tokens by default), one per (image, question) pair."""
        self._require("vqa")
        pixels = self.preprocess(images)
        image_index, questions = _pair_up(len(pixels), _as_list(questions))
        image_embeds = self._image_embeds(pixels)
        config = self._generation_config(VQA_DEFAULTS, generation_options)
        answers = []
        for start, stop, rows in self._chunks(len(questions)):
            ids, mask = self._tokenize(questions[start:stop])
            ids, mask = self._rows(ids, rows), self._rows(mask, rows)
            embeds = self._rows(image_embeds[_pad_rows(image_index[start:stop], rows)], rows)
            question_states = _encode_question(self.config, self.params, embeds, ids, mask)
            # BLIP (and transformers) let the answer decoder see every question state, the padding
            # up to the longest question included; only our extra bucket padding is hidden.
            longest = int(np.asarray(mask).sum(1).max())
            states_mask = np.broadcast_to(np.arange(ids.shape[1]) < longest, ids.shape).astype(np.int32)
            bos = np.full((rows, 1), self.config.text.bos_token_id, np.int32)
            seqs = generate_text(self.config, self.params, question_states, jnp.asarray(states_mask), bos, config)
            answers += self._decode_texts(seqs[: (stop - start) * config.num_return_sequences])
        return answers

    _itm_logits = staticmethod(_itm_logits)  # the jitted heads of this model family
    _image_features = staticmethod(_image_features)
    _text_features = staticmethod(_text_features)

    def _itm_rows(self, image_embeds, image_index: np.ndarray, texts: list[str]) -> np.ndarray:
        """ITM logits [N, 2] of (image_embeds[image_index[i]], texts[i]) pairs.

        Pairs of one image run together, `group` rows to a slot that holds the image once: the
        cross-attention keys and values of its tokens (most of an ITM pass's work) are computed
        once per slot, not once per pair (`layers.attend` shares them across the slot's rows)."""
        image_index = np.asarray(image_index)
        group = _shared_rows(image_index, self.batch_size)
        slot_image, slot_pairs = _slots(image_index, group)
        out = np.zeros((len(texts), 2), np.float32)
        per_batch = 1 << ((self.batch_size // group).bit_length() - 1)  # group <= batch size
        for start, stop, slots in self._chunks(len(slot_image), size=per_batch):  # whole power-of-two batches
            pairs = slot_pairs[start:stop].ravel()
            real = pairs >= 0
            ids, mask = self._tokenize([texts[p] if p >= 0 else "" for p in pairs])
            embeds = self._rows(image_embeds[_pad_rows(slot_image[start:stop], slots)], slots)
            logits = self._itm_logits(self.config, self.params, embeds, self._rows(ids, slots * group),
                                      self._rows(mask, slots * group))
            out[pairs[real]] = np.asarray(logits)[: len(pairs)][real]
        return out

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
        image_index, questions = _pair_up(len(pixels), _as_list(questions))
        image_embeds = self._image_embeds(pixels)
        enc = self.tokenizer(list(answer_list), padding="longest", truncation=True,
                             max_length=self.config.text.max_position_embeddings)
        answer_ids = np.asarray(enc["input_ids"], np.int32).copy()
        answer_ids[:, 0] = self.config.text.bos_token_id  # [CLS] answer [SEP] -> [DEC] answer [SEP]
        answer_mask = np.asarray(enc["attention_mask"], np.int32)
        k = min(k, len(answer_list))
        candidates, scores = [], []
        for start, stop, rows in self._chunks(len(questions)):
            ids, mask = self._tokenize(questions[start:stop])
            ids, mask = self._rows(ids, rows), self._rows(mask, rows)
            embeds = self._rows(image_embeds[_pad_rows(image_index[start:stop], rows)], rows)
            states = _encode_question(self.config, self.params, embeds, ids, mask)
            first = np.asarray(_first_token_probs(self.config, self.params, states, mask))[:, answer_ids[:, 1]]
            topk = np.argsort(-first, axis=1, kind="stable")[:, :k]  # [rows, k]
            pairs, question = topk.ravel(), np.repeat(np.arange(rows), k)
            scored = []
            for a, b, r in self._chunks(len(pairs), progress=False):
                q = _pad_rows(question[a:b], r)  # each pair's question, gathered on device
                scored.append(np.asarray(_answer_scores(
                    self.config, self.params, self._rows(states[q], r), self._rows(mask[q], r),
                    self._rows(answer_ids[_pad_rows(pairs[a:b], r)], r),
                    self._rows(answer_mask[_pad_rows(pairs[a:b], r)], r)))[: b - a])
            pair_scores = np.concatenate(scored)
            candidates.append(topk[: stop - start])
            scores.append(pair_scores.reshape(rows, k)[: stop - start])
        return np.concatenate(candidates), np.concatenate(scores)

    def itm(self, images, texts) -> np.ndarray:
        """Match probability of each (image, text) pair [N]; one image or one text is broadcast."""
        self._require("itm")
        pixels = self.preprocess(images)
        image_index, texts = _pair_up(len(pixels), _as_list(texts))
        return np.asarray(jax.nn.softmax(self._itm_rows(self._image_embeds(pixels), image_index, texts), -1)[:, 1])

    def image_embeddings(self, images) -> np.ndarray:
        """The image tokens the ITM / captioning heads attend to [n_images, tokens, D] (float32)."""
        return np.asarray(self._image_embeds(self.preprocess(images)))

    def match_logits(self, image_embeddings: np.ndarray, image_index, texts) -> np.ndarray:
        """ITM match logit (the "match" class, before softmax) of each (image_embeddings[image_index[i]],
        texts[i]) pair [N]: what retrieval evaluation re-ranks with."""
        self._require("itm")
        return self._itm_rows(image_embeddings, np.asarray(image_index), list(texts))[:, 1]

    def features_of(self, image_embeddings: np.ndarray) -> np.ndarray:
        """Unit-norm ITC features of already encoded images (see `image_features`)."""
        self._require("itc")
        return np.concatenate([np.asarray(self._image_features(self.config, self.params,
                                                               self._rows(image_embeddings[a:b], r)))[: b - a]
                               for a, b, r in self._chunks(len(image_embeddings))])

    def image_features(self, images) -> np.ndarray:
        """Unit-norm ITC image features [n_images, embed_dim] (BLIP-2: [n_images, Q, embed_dim])."""
        self._require("itc")
        return self.features_of(self._image_embeds(self.preprocess(images)))

    def text_features(self, texts) -> np.ndarray:
        """Unit-norm ITC text features [n_texts, embed_dim]."""
        self._require("itc")
        texts = _as_list(texts)
        feats = []
        for a, b, r in self._chunks(len(texts)):
            ids, mask = self._tokenize(texts[a:b])
            feats.append(np.asarray(self._text_features(self.config, self.params, self._rows(ids, r),
                                                        self._rows(mask, r)))[: b - a])
        return np.concatenate(feats)

    @staticmethod
    def similarity(image_features: np.ndarray, text_features: np.ndarray) -> np.ndarray:
        """[n_images, n_texts] cosine similarities of ITC features (no temperature)."""
        return image_features @ text_features.T

    def itc(self, images, texts) -> np.ndarray:
        """ITC similarity matrix [n_images, n_texts] (see `similarity`)."""
        return self.similarity(self.image_features(images), self.text_features(texts))


_ARCH_FOR = {task: arch for arch, tasks in TASKS.items() for task in tasks}


def _pair_up(n_images: int, texts: list) -> tuple[np.ndarray, list]:
    """(image index of each pair, text of each pair): one to one, or a single image or a single
    text broadcast. Images are indexed, not copied, so each is encoded once."""
    if n_images == len(texts):
        return np.arange(n_images), texts
    if n_images == 1:
        return np.zeros(len(texts), np.int64), texts
    if len(texts) == 1:
        return np.arange(n_images), texts * n_images
    raise ValueError(f"got {n_images} images and {len(texts)} texts: give as many of each, or one of either")


def load(path: str | Path, **kwargs: Any) -> BlipModel:
    """Load a blip-jax model directory (made by `blip-jax convert`): a BLIP model, or a BLIP-2 /
    InstructBLIP one (`blip_jax.blip2_api.Blip2Model`, the same interface plus generate and rank)."""
    if not isinstance(checkpoint.read_config(path), BlipConfig):
        from blip_jax.blip2_api import Blip2Model

        return Blip2Model.from_dir(path, **kwargs)
    return BlipModel.from_dir(path, **kwargs)
