"""Records -> tokenized, normalised host batches -> global arrays, for any stage.

Records come from `cfg.data` (a source or a mixture, `blip_jax.data.sources`); images are decoded
and transformed by `cfg.data.augment` ("blip2_train": random resized crop + flip, as BLIP-2;
"blip_train": + RandAugment, as BLIP; "eval": resize only); the stage's `example` makes the text
arrays (`blip_jax.train.objectives`), with texts cleaned as LAVIS does (`pre_caption` with
`cfg.data.prompt` and `max_words`, `pre_question`). Tokenizers come from the converted checkpoint
(`model.init_from`: its LLM tokenizer, and the BERT tokenizer of the Q-Former or BLIP's text
transformer), or, for randomly initialised models, are word-level tokenizers over the synthetic
dataset's words, laid out like the LLM family's. BERT text is [CLS] text [SEP].
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import jax
import numpy as np

from blip_jax.data import pipeline, sources, transforms
from blip_jax.data.records import BadRecord
from blip_jax.data.synthetic import WORDS
from blip_jax.text import QFORMER_TOKENIZER, BlipTokenizer, word_level_tokenizer
from blip_jax.train import sharding
from blip_jax.train.objectives import Stage, stage_of

iterator_state = pipeline.iterator_state
restore_iterator = pipeline.restore_iterator
skipped_counts = pipeline.skipped_counts


def _qformer_tokenizer(cfg) -> BlipTokenizer:
    root = Path(cfg.model.init_from) if cfg.model.init_from else None
    if root is not None:
        sub = root / QFORMER_TOKENIZER
        return BlipTokenizer.from_dir(sub if sub.is_dir() else root)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [w for w in WORDS]
    path = Path(tempfile.mkdtemp(prefix="blip_jax_vocab_")) / "vocab.txt"
    path.write_text("\n".join(dict.fromkeys(vocab)) + "\n")
    return BlipTokenizer.from_vocab(path)  # + [DEC] and [ENC] after the vocabulary, as BLIP's


def _llm_tokenizer(cfg) -> BlipTokenizer:
    if cfg.model.init_from:
        return BlipTokenizer.from_llm_dir(cfg.model.init_from)
    tok, named = word_level_tokenizer(WORDS, cfg.model.llm_family)
    return BlipTokenizer(tok, named)


@dataclasses.dataclass
class Task:
    """The data side of one run: records, tokenizers and the per-record transform."""

    cfg: object
    stage: Stage
    records: object  # a grain source, or a MapDataset (mixture)
    image_size: int
    qformer_tokenizer: BlipTokenizer | None
    llm_tokenizer: BlipTokenizer | None
    encoder_decoder: bool = False
    source_skipped: dict = dataclasses.field(default_factory=dict)  # counted while indexing
    llm_eos_id: int | None = None  # the model's own end of text, where it differs from the tokenizer's

    @property
    def text_end_id(self) -> int:
        """The id an LLM text ends with in training, where generation stops: the model's eos (OPT in
        LAVIS and transformers' BLIP-2: "\\n"), else the LLM tokenizer's."""
        return self.llm_tokenizer.eos_token_id if self.llm_eos_id is None else self.llm_eos_id

    def __post_init__(self):
        d = self.cfg.data
        scale = (d.min_scale, 1.0)
        self.train_image = transforms.image_transform(d.augment, self.image_size, scale=scale)
        self.eval_image = transforms.image_transform("eval", self.image_size)

    def vocab(self) -> dict:
        """Token ids a randomly initialised model must agree with."""
        return vocab(self.qformer_tokenizer, self.llm_tokenizer)

    @staticmethod
    def pad(ids: list[int], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, mask) [length]: `ids` cut or right-padded to `length`."""
        ids = ids[:length]
        out, mask = np.full(length, pad_id, np.int32), np.zeros(length, np.int32)
        out[: len(ids)], mask[: len(ids)] = ids, 1
        return out, mask

    def bert_tokens(self, text: str, max_length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """[CLS] text [SEP] in BERT tokens (cut to `max_length` on the tokenizer's side, [SEP] kept),
        padded to `data.max_text_len`."""
        tok = self.qformer_tokenizer
        return self.pad(tok.encode(text, max_length=max_length), self.cfg.data.max_text_len, tok.pad_token_id)

    def bert_caption(self, record: dict) -> tuple[np.ndarray, np.ndarray]:
        """The record's caption, cleaned (`pre_caption` with the data prompt), in BERT tokens."""
        if "caption" not in record:
            raise BadRecord("bad_text", f"{self.stage.name} trains on captions; the record has none")
        d = self.cfg.data
        return self.bert_tokens(transforms.pre_caption(record["caption"], d.max_words, d.prompt))

    def transform(self, record: dict, rng: np.random.Generator, *, train: bool = True) -> dict:
        """One raw record -> model inputs; raises BadRecord for unusable records."""
        transforms.check_record(record)  # as `blip-jax data check` does
        if "caption" not in record and record.get("captions"):  # unexpanded: one caption per visit
            record = {**record, "caption": record["captions"][int(rng.integers(len(record["captions"])))]}
        image_transform = self.train_image if train else self.eval_image
        out = {"pixels": image_transform(transforms.decode_image(record["image"]), rng)}
        if self.stage.two_images:  # NLVR2: the right image, transformed on its own
            if "image1" not in record:
                raise BadRecord("malformed_json", f"{self.stage.name} trains on image pairs; the record has one image")
            out["pixels1"] = image_transform(transforms.decode_image(record["image1"]), rng)
        return {**out, **self.stage.example(self, record, rng)}

    def eval_batch(self, records: list[dict]) -> dict:
        """Records -> one stacked batch with the evaluation image transform (bad records raise)."""
        rng = np.random.default_rng(0)
        rows = [self.transform(r, rng, train=False) for r in records]
        return {k: np.stack([row[k] for row in rows]) for k in rows[0]}

    def iterator(self, process_index: int, process_count: int):
        d = self.cfg.data
        return pipeline.make_iterator(self.records, batch_size=self.cfg.batch_size, seed=d.seed,
                                      transform=self.transform, process_index=process_index,
                                      process_count=process_count, read_threads=d.read_threads,
                                      worker_count=d.worker_count)

    def skipped(self, iterator) -> dict[str, int]:
        """Records this process's pipeline skipped so far, by reason (`source_skipped` holds what
        the sources left out while indexing, the same on every process)."""
        return skipped_counts(iterator_state(iterator))

    @staticmethod
    def global_batch(local: dict, mesh) -> dict:
        """This process's rows -> global arrays sharded over the batch axes."""
        sh = sharding.batch_sharding(mesh)
        return {k: jax.make_array_from_process_local_data(sh, np.asarray(v)) for k, v in local.items()}


def batch_shapes(cfg, image_size: int, encoder_decoder: bool) -> dict:
    """The global batch `Task.transform` produces, as ShapeDtypeStructs (for ahead-of-time compiles)."""
    pixels = jax.ShapeDtypeStruct((cfg.batch_size, image_size, image_size, 3), np.float32)
    stage = stage_of(cfg)
    return {"pixels": pixels, **({"pixels1": pixels} if stage.two_images else {}),
            **stage.batch_shapes(cfg, encoder_decoder)}


def tokenizers(cfg) -> tuple[BlipTokenizer | None, BlipTokenizer | None]:
    """(BERT tokenizer, LLM tokenizer) of a run, None where its stage reads no such text."""
    stage = stage_of(cfg)
    bert = stage.bert_text_only or cfg.model.instruct  # InstructBLIP's instruction also feeds the Q-Former
    return (_qformer_tokenizer(cfg) if bert else None, None if stage.bert_text_only else _llm_tokenizer(cfg))


def vocab(qformer_tokenizer: BlipTokenizer | None, llm_tokenizer: BlipTokenizer | None) -> dict:
    """Token ids a randomly initialised model must agree with."""
    out = {}
    if qformer_tokenizer is not None:  # the BERT tokenizer: Q-Former's, or BLIP's text transformer's
        tok = qformer_tokenizer
        out.update(qformer_vocab_size=len(tok), qformer_bos_token_id=tok.bos_token_id,
                   qformer_pad_token_id=tok.pad_token_id, qformer_sep_token_id=tok.sep_token_id,
                   qformer_enc_token_id=tok.enc_token_id)
    if llm_tokenizer is not None:
        tok = llm_tokenizer
        out.update(llm_vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                   bos_token_id=tok.bos_token_id)
    return out


def prepare_loss(cfg, mesh, qformer_tokenizer: BlipTokenizer | None, llm_tokenizer: BlipTokenizer | None) -> None:
    """Loss settings a run knows once its mesh and tokenizers are: [DEC] (ITG's and BLIP's LM's first
    token), the batch's shards (ITM negatives per device) and the stage's own."""
    if qformer_tokenizer is not None:
        cfg.loss.bos_token_id = qformer_tokenizer.bos_token_id
    cfg.loss.batch_shards = sharding.batch_shards(mesh)
    stage = stage_of(cfg)
    if stage.prepare:
        stage.prepare(cfg, qformer_tokenizer, llm_tokenizer)


def make_task(cfg, image_size: int, encoder_decoder: bool, llm_eos_id: int | None = None) -> Task:
    records, skipped = sources.build_records(cfg.data, seed=cfg.data.seed)
    return Task(cfg, stage_of(cfg), records, image_size, *tokenizers(cfg), encoder_decoder, skipped, llm_eos_id)
