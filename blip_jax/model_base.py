"""What the BLIP and BLIP-2 model objects share: loading, the task registry and its error,
image preprocessing, batching into power-of-two chunks (one compile per size), a mesh, and the
checkpoint's generation defaults. `load` picks the sibling class for a model directory."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from blip_jax import checkpoint
from blip_jax.batching import as_list, bucket, pad_rows, pair_up, shared_rows, slots, texts_of
from blip_jax.images import ImageProcessor

# What each architecture of each family serves: the one registry every "unsupported" error reads.
TASKS = {
    "BLIP": {"caption": ("caption",), "retrieval": ("itm", "itc"), "vqa": ("vqa",),
             "pretrain": ("caption", "itm", "itc"), "nlvr": ("nlvr",)},
    "BLIP-2": {"generation": ("caption", "generate", "vqa", "rank"), "retrieval": ("itm", "itc")},
}
GENERATION_CONFIG = "generation_config.json"
# transformers' GenerationConfig fields that map one to one onto ours (max_length is converted).
_GENERATION_FIELDS = ("max_new_tokens", "min_new_tokens", "num_beams", "do_sample", "temperature", "top_k",
                      "top_p", "repetition_penalty", "length_penalty", "early_stopping", "num_return_sequences",
                      "inputs_embeds_start_id")
# ...of which these are facts of the model (blip-jax's own keys: LAVIS's semantics), used by every task
MODEL_GENERATION_FACTS = ("inputs_embeds_start_id",)


class UnsupportedTaskError(ValueError):
    """The loaded architecture has no head for the requested task."""


def _servers(task: str) -> str:
    return " or ".join(f"{family} {arch}" for family, archs in TASKS.items() for arch, tasks in archs.items()
                       if task in tasks) or "no"


class ModelBase:
    """A loaded model; subclasses add the task methods of their family."""

    family = ""  # a key of TASKS

    def __init__(self, config, params, tokenizer=None, image_processor: ImageProcessor | None = None,
                 path: str | Path | None = None, batch_size: int = 32, progress: bool = False, mesh=None):
        self.config = config
        self.params = params
        self.tokenizer = tokenizer
        size = config.vision.image_size
        self.image_processor = image_processor or ImageProcessor(size={"height": size, "width": size})
        self.path = path
        self.batch_size = batch_size
        self.progress = progress  # a progress bar (rate, ETA) on stderr over batches
        self.mesh = None
        if mesh is not None:
            self.use_mesh(mesh)

    @classmethod
    def from_dir(cls, path: str | Path, *, dtype: str | None = None, adapter: str | Path | None = None,
                 int8: bool = False, **kwargs):
        """The model in a blip-jax model directory (config, weights, tokenizers, image processor);
        `dtype` ("bfloat16") computes every tower in it, the weights kept as stored and cast at use;
        `adapter` (a LoRA run's W/adapter, or W) is applied onto these weights and folded in; `int8`
        stores the ViT's and the LLM's kernels in int8 with per-channel scales (`models.quant`)."""
        config, params = checkpoint.load(path)
        if adapter is not None:
            from blip_jax.models import lora

            params = lora.apply_adapter(path, params, lora.find_adapter(adapter))
        if int8:
            from blip_jax.models import quant

            params = quant.quantize(params, scanned=config.scan_layers)
        if dtype is not None:
            towers = ("dtype", "qformer_dtype") if hasattr(config, "qformer_dtype") else ("dtype",)
            config = config.replace(**dict.fromkeys(towers, dtype))
        path = Path(path)
        size = config.vision.image_size
        processor = ImageProcessor.from_dir(path, image_size=size)
        return cls(config, params, image_processor=processor, path=path, **cls._tokenizers(config, path), **kwargs)

    @classmethod
    def _tokenizers(cls, config, path: Path) -> dict:
        raise NotImplementedError

    def use_mesh(self, mesh):
        """Split every batch over `mesh`'s devices (data parallel; parameters replicated). Rows are
        independent, so results equal the one-device ones up to float rounding."""
        from jax.sharding import NamedSharding, PartitionSpec

        self.mesh = mesh
        self._batch_sharding = NamedSharding(mesh, PartitionSpec(mesh.axis_names))
        self.params = jax.device_put(self.params, NamedSharding(mesh, PartitionSpec()))
        return self

    @property
    def architecture(self) -> str:
        return self.config.architecture

    @property
    def tasks(self) -> tuple[str, ...]:
        return TASKS[self.family][self.architecture]

    def require(self, task: str) -> None:
        """Raise UnsupportedTaskError, naming what this model serves, unless it serves `task`."""
        if task not in self.tasks:
            raise UnsupportedTaskError(
                f"{task} needs a {_servers(task)} model, but {self.path or 'this model'} is a {self.family} "
                f"{self.architecture} model, which serves: {', '.join(self.tasks)}")
        if self.tokenizer is None:
            raise FileNotFoundError(f"{self.path}: no tokenizer files to encode text")

    _require = require  # the name the task methods use

    # ------------------------------------------------------------------ inputs
    def preprocess(self, images) -> np.ndarray:
        """PIL images, uint8 HxWx3 arrays, file paths or float NHWC pixel_values -> float32 [B, H, W, 3]
        at the vision tower's size."""
        given = isinstance(images, np.ndarray) and images.dtype.kind == "f"
        if given:  # checked before the processor's own check, to name the model's size
            self._check_size(images)
        pixels = self.image_processor(images if given else as_list(images))
        self._check_size(pixels)  # a preprocessor_config.json for another size
        return pixels

    def _check_size(self, pixels: np.ndarray) -> None:
        size = self.config.vision.image_size
        if pixels.shape[-3:-1] != (size, size):
            raise ValueError(f"pixel_values of shape {pixels.shape} do not fit {self.path or 'this model'}'s "
                             f"vision tower: expected [B, {size}, {size}, 3]")

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
            rows = bucket(stop - start)
            if self.mesh is not None:
                rows = -(-rows // self.mesh.size) * self.mesh.size
            yield start, stop, rows

    def _rows(self, x, rows: int):
        """`x` padded to `rows` rows, on a mesh split along the batch (else on the default device)."""
        if x.shape[0] != rows:
            x = pad_rows(np.asarray(x), rows)
        return jnp.asarray(x) if self.mesh is None else jax.device_put(x, self._batch_sharding)

    def _decode_texts(self, sequences: np.ndarray) -> list[str]:
        return [s.strip() for s in self.tokenizer.batch_decode(np.asarray(sequences), skip_special_tokens=True)]

    # ------------------------------------------------------------------ ITM / ITC (both families)
    def _itm_rows(self, image_embeds, image_index: np.ndarray, texts: list[str]) -> np.ndarray:
        """ITM logits [N, 2] of (image_embeds[image_index[i]], texts[i]) pairs.

        Pairs of one image run together, `group` rows to a slot that holds the image once: the
        cross-attention keys and values of its tokens (most of an ITM pass's work) are computed
        once per slot, not once per pair (`layers.attend` shares them across the slot's rows)."""
        image_index = np.asarray(image_index)
        group = shared_rows(image_index, self.batch_size)
        slot_image, slot_pairs = slots(image_index, group)
        out = np.zeros((len(texts), 2), np.float32)
        per_batch = 1 << ((self.batch_size // group).bit_length() - 1)  # group <= batch size
        for start, stop, n_slots in self._chunks(len(slot_image), size=per_batch):  # whole power-of-two batches
            pairs = slot_pairs[start:stop].ravel()
            real = pairs >= 0
            ids, mask = self._tokenize([texts[p] if p >= 0 else "" for p in pairs])
            embeds = self._rows(image_embeds[pad_rows(slot_image[start:stop], n_slots)], n_slots)
            logits = self._itm_head(embeds, self._rows(ids, n_slots * group), self._rows(mask, n_slots * group))
            out[pairs[real]] = np.asarray(logits)[: len(pairs)][real]
        return out

    def itm(self, images, texts) -> np.ndarray:
        """Match probability of each (image, text) pair [N]; one image or one text is broadcast."""
        self._require("itm")
        pixels = self.preprocess(images)
        image_index, texts = pair_up(len(pixels), texts_of(texts, "texts"))
        return np.asarray(jax.nn.softmax(self._itm_rows(self._image_embeds(pixels), image_index, texts), -1)[:, 1])

    def embed_images(self, images) -> np.ndarray:
        """Unit-norm ITC features of images, as `blip-jax embed` stores them: BLIP [n, embed_dim],
        BLIP-2 every query's [n, Q, embed_dim]."""
        return self.image_features(images)

    def embed_texts(self, texts) -> np.ndarray:
        """Unit-norm ITC features of texts [n, embed_dim], as `blip-jax embed` stores them."""
        return self.text_features(texts)

    def image_embeddings(self, images) -> np.ndarray:
        """The image tokens the ITM / captioning heads attend to [n_images, tokens, D] (float32)."""
        return np.asarray(self._image_embeds(self.preprocess(images)))

    def match_logits(self, image_embeddings: np.ndarray, image_index, texts) -> np.ndarray:
        """ITM match logit (the "match" class, before softmax) of each (image_embeddings[image_index[i]],
        texts[i]) pair [N]: what retrieval evaluation re-ranks with."""
        self._require("itm")
        return self._itm_rows(image_embeddings, np.asarray(image_index), texts_of(list(texts), "texts", at_least_one=False))[:, 1]

    def features_of(self, image_embeddings: np.ndarray) -> np.ndarray:
        """Unit-norm ITC features of already encoded images (see `image_features`)."""
        self._require("itc")
        return np.concatenate([np.asarray(self._image_feature_head(self._rows(image_embeddings[a:b], r)))[: b - a]
                               for a, b, r in self._chunks(len(image_embeddings))])

    def image_features(self, images) -> np.ndarray:
        """Unit-norm ITC image features [n_images, embed_dim] (BLIP-2: [n_images, Q, embed_dim])."""
        self._require("itc")
        return self.features_of(self._image_embeds(self.preprocess(images)))

    def text_features(self, texts) -> np.ndarray:
        """Unit-norm ITC text features [n_texts, embed_dim]."""
        self._require("itc")
        texts = texts_of(texts, "texts")
        feats = []
        for a, b, r in self._chunks(len(texts)):
            ids, mask = self._tokenize(texts[a:b])
            feats.append(np.asarray(self._text_feature_head(self._rows(ids, r), self._rows(mask, r)))[: b - a])
        return np.concatenate(feats)

    def itc(self, images, texts) -> np.ndarray:
        """ITC similarity matrix [n_images, n_texts] (see `similarity`)."""
        return self.similarity(self.image_features(images), self.text_features(texts))

    def checkpoint_generation_options(self) -> dict:
        """The decoding options of the checkpoint's generation_config.json (as transformers reads them;
        {} without one): what `generate` starts from. `max_length` is returned as is; the caller
        turns it into new tokens, since what it counts depends on the model."""
        return dict(self._saved_generation)

    @functools.cached_property
    def _saved_generation(self) -> dict:  # read once: every generate / task call consults it
        path = self.path and Path(self.path) / GENERATION_CONFIG
        if not path or not path.is_file():
            return {}
        saved = json.loads(path.read_text())
        options = {k: saved[k] for k in _GENERATION_FIELDS if saved.get(k) is not None}
        if saved.get("max_length") is not None and "max_new_tokens" not in options:
            options["max_length"] = saved["max_length"]
        if saved.get("min_length") and "min_new_tokens" not in options:
            options["min_length"] = saved["min_length"]
        return options


def load(path: str | Path, **kwargs: Any):
    """The model in a blip-jax model directory (made by `blip-jax convert`): a `blip_jax.api.BlipModel`,
    or a `blip_jax.blip2_api.Blip2Model` for BLIP-2 / InstructBLIP."""
    from blip_jax.models.config import BlipConfig

    if isinstance(checkpoint.read_config(path), BlipConfig):
        from blip_jax.api import BlipModel as cls
    else:
        from blip_jax.blip2_api import Blip2Model as cls
    return cls.from_dir(path, **kwargs)
