"""What each objective reads: records -> tokenized, normalised host batches -> global arrays.

Records come from `cfg.data` (a source or a mixture, `blip_jax.data.sources`); images are decoded
and transformed by `cfg.data.augment` ("blip2_train": random resized crop + flip, as BLIP-2;
"blip_train": + RandAugment, as BLIP; "eval": resize only); texts are cleaned as LAVIS does
(`pre_caption` with `cfg.data.prompt` and `max_words`, `pre_question`). Tokenizers come from the
converted checkpoint (`model.init_from`: its LLM tokenizer, and the Q-Former's BERT tokenizer for
stage 1 / InstructBLIP), or, for randomly initialised models, are word-level tokenizers over the
synthetic dataset's words, laid out like the LLM family's.
Formats follow LAVIS: decoder LLMs read [BOS] text [EOS] with the loss on every real token (on the
output only for instructions and questions); Flan-T5 stage 2 is a prefix LM whose split point is
drawn per record (from token 1 to the middle); Q-Former text is [CLS] text [SEP]. InstructBLIP
records without an instruction get one from the templates of `cfg.data.instruction_family` (or
their task's family); BLIP-2 question records read the model family's VQA prompt.
"""

from __future__ import annotations

import dataclasses
import tempfile
import zlib
from pathlib import Path

import jax
import numpy as np

from blip_jax.blip2_api import VQA_TEMPLATES
from blip_jax.data import pipeline, sources, transforms
from blip_jax.data.instructions import instruct, sample_answer
from blip_jax.data.records import BadRecord
from blip_jax.data.synthetic import WORDS
from blip_jax.text import QFORMER_TOKENIZER, BlipTokenizer, word_level_tokenizer
from blip_jax.train import objectives, sharding

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


def _pad(seqs: list[list[int]], length: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.full((len(seqs), length), pad, np.int32)
    mask = np.zeros((len(seqs), length), np.int32)
    for i, s in enumerate(seqs):
        s = s[:length]
        ids[i, : len(s)], mask[i, : len(s)] = s, 1
    return ids, mask


@dataclasses.dataclass
class Task:
    """The data side of one run: records, tokenizers and the per-record transform."""

    cfg: object
    records: object  # a grain source, or a MapDataset (mixture)
    image_size: int
    qformer_tokenizer: BlipTokenizer | None
    llm_tokenizer: BlipTokenizer | None
    encoder_decoder: bool = False
    source_skipped: dict = dataclasses.field(default_factory=dict)  # counted while indexing

    def __post_init__(self):
        d = self.cfg.data
        scale = (d.min_scale, 1.0)
        self.train_image = transforms.image_transform(d.augment, self.image_size, scale=scale)
        self.eval_image = transforms.image_transform("eval", self.image_size)

    def vocab(self) -> dict:
        """Token ids a randomly initialised model must agree with."""
        out = {}
        if self.qformer_tokenizer is not None:  # the BERT tokenizer: Q-Former's, or BLIP's text transformer's
            tok = self.qformer_tokenizer
            out.update(qformer_vocab_size=len(tok), qformer_bos_token_id=tok.bos_token_id,
                       qformer_pad_token_id=tok.pad_token_id, qformer_sep_token_id=tok.sep_token_id,
                       qformer_enc_token_id=tok.enc_token_id)
        if self.llm_tokenizer is not None:
            tok = self.llm_tokenizer
            out.update(llm_vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                       bos_token_id=tok.bos_token_id)
        return out

    def _texts(self, record: dict, rng: np.random.Generator) -> tuple[str, str]:
        """(prompt, target) for the LM objectives; the prompt is empty for plain captions."""
        d = self.cfg.data
        cleaned = dict(record)
        if "caption" in record:
            cleaned["caption"] = transforms.pre_caption(record["caption"], d.max_words, d.prompt)
        if "question" in record:
            cleaned["question"] = transforms.pre_question(record["question"], d.max_words)
        if self.cfg.model.instruct:
            return instruct(cleaned, d.instruction_family, rng)
        if "caption" in cleaned:
            return "", cleaned["caption"]
        if "question" in cleaned:
            template = VQA_TEMPLATES["t5" if self.encoder_decoder else "opt"]
            return template.format(cleaned["question"]), sample_answer(cleaned, rng)
        raise BadRecord("bad_text", "a record with neither caption nor question")

    def transform(self, record: dict, rng: np.random.Generator, *, train: bool = True) -> dict:
        """One raw record -> model inputs; raises BadRecord for unusable records."""
        d = self.cfg.data
        if "caption" not in record and record.get("captions"):  # unexpanded: one caption per visit
            record = {**record, "caption": record["captions"][int(rng.integers(len(record["captions"])))]}
        image = transforms.decode_image(record["image"])
        out = {"pixels": (self.train_image if train else self.eval_image)(image, rng)}
        if self.cfg.objective == "blip_vqa":
            return {**out, **self._question_answers(record)}
        if self.cfg.objective in ("stage1", *objectives.BLIP):  # BERT tokens of the caption
            if "caption" not in record:
                raise BadRecord("bad_text", f"{self.cfg.objective} trains on captions; the record has none")
            text = transforms.pre_caption(record["caption"], d.max_words, d.prompt)
            ids, mask = _pad([self.qformer_tokenizer.encode(text)], d.max_text_len,
                             self.qformer_tokenizer.pad_token_id)
            out.update(text_ids=ids[0], text_mask=mask[0])
            if self.cfg.objective == "blip_retrieval":  # texts of one image are each other's positives
                out["image_index"] = np.int32(self.image_index(record))
            return out
        prompt, target = self._texts(record, rng)
        instruct_mode = self.cfg.model.instruct
        tok = self.llm_tokenizer
        if instruct_mode:
            q_ids, q_mask = _pad([self.qformer_tokenizer.encode(prompt)], d.max_text_len,
                                 self.qformer_tokenizer.pad_token_id)
            out.update(qformer_ids=q_ids[0], qformer_mask=q_mask[0])
        if self.encoder_decoder:
            if not prompt:  # prefix LM: split the caption at a point drawn from [1, middle]
                words = target.split()
                cut = int(rng.integers(1, max(len(words) // 2, 1) + 1))
                prompt, target = " ".join(words[:cut]), " ".join(words[cut:])
            ids, mask = _pad([tok.encode(prompt)], d.max_text_len, tok.pad_token_id)
            targets, target_mask = _pad([tok.encode(target)], d.max_text_len, tok.pad_token_id)
            return {**out, "ids": ids[0], "mask": mask[0], "targets": targets[0], "target_mask": target_mask[0]}
        eos = [tok.eos_token_id]
        if prompt:  # [BOS] prompt | target [EOS]; loss on the target and EOS only
            head = tok.encode(prompt)
            seq, loss_from = head + tok.encode(target, add_special_tokens=False) + eos, len(head)
        else:  # [BOS] caption [EOS]; every real token is a target (LAVIS)
            seq, loss_from = tok.encode(target) + eos, 0
        ids, mask = _pad([seq], d.max_text_len, tok.pad_token_id)
        loss_mask = mask.copy()
        loss_mask[:, :loss_from] = 0
        return {**out, "ids": ids[0], "mask": mask[0], "loss_mask": loss_mask[0]}

    def _question_answers(self, record: dict) -> dict:
        """BLIP VQA: the question's BERT tokens and up to `data.max_answers` of its answers (the
        heaviest first) with their weights (LAVIS: each distinct answer's share of the annotators;
        a single answer weighs 1); padding answers weigh 0."""
        d, tok = self.cfg.data, self.qformer_tokenizer
        answers = list(record.get("answers") or ([record["answer"]] if record.get("answer") else []))
        if "question" not in record or not answers:
            raise BadRecord("bad_text", "blip_vqa trains on questions with answers; the record lacks them")
        weights = list(record.get("answer_weights") or [1.0 / len(answers)] * len(answers))
        keep = np.argsort(-np.asarray(weights, np.float64), kind="stable")[: d.max_answers]
        q_ids, q_mask = _pad([tok.encode(transforms.pre_question(record["question"], d.max_words))],
                             d.max_text_len, tok.pad_token_id)
        rows = [tok.encode(str(answers[i])) for i in keep]
        a_ids, a_mask = _pad(rows + [[]] * (d.max_answers - len(rows)), d.max_answer_len, tok.pad_token_id)
        a_weights = np.zeros(d.max_answers, np.float32)
        a_weights[: len(keep)] = [weights[i] for i in keep]
        return {"question_ids": q_ids[0], "question_mask": q_mask[0], "answer_ids": a_ids, "answer_mask": a_mask,
                "answer_weights": a_weights}

    def image_index(self, record: dict) -> int:
        """A stable non-negative integer per image (retrieval fine-tuning's positives)."""
        if "index" in record and "image_id" not in record:  # synthetic records: one caption per image
            return int(record["index"])
        return zlib.crc32(str(record.get("image_id", record["image"])).encode()) & 0x7FFFFFFF

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
    b, length = cfg.batch_size, cfg.data.max_text_len
    tokens = jax.ShapeDtypeStruct((b, length), np.int32)
    out = {"pixels": jax.ShapeDtypeStruct((b, image_size, image_size, 3), np.float32)}
    if cfg.objective == "blip_vqa":
        k, a = cfg.data.max_answers, cfg.data.max_answer_len
        answers = jax.ShapeDtypeStruct((b, k, a), np.int32)
        return {**out, "question_ids": tokens, "question_mask": tokens, "answer_ids": answers,
                "answer_mask": answers, "answer_weights": jax.ShapeDtypeStruct((b, k), np.float32)}
    if cfg.objective == "stage1" or cfg.objective in objectives.BLIP:
        out.update(text_ids=tokens, text_mask=tokens)
        if cfg.objective == "blip_retrieval":
            out["image_index"] = jax.ShapeDtypeStruct((b,), np.int32)
        return out
    if cfg.model.instruct:
        out.update(qformer_ids=tokens, qformer_mask=tokens)
    names = ("ids", "mask", "targets", "target_mask") if encoder_decoder else ("ids", "mask", "loss_mask")
    return {**out, **{n: tokens for n in names}}


def make_task(cfg, image_size: int, encoder_decoder: bool) -> Task:
    records, skipped = sources.build_records(cfg.data, seed=cfg.data.seed)
    bert_only = cfg.objective == "stage1" or cfg.objective in objectives.BLIP
    needs_qformer_text = bert_only or cfg.model.instruct
    return Task(cfg, records, image_size, _qformer_tokenizer(cfg) if needs_qformer_text else None,
                None if bert_only else _llm_tokenizer(cfg), encoder_decoder, skipped)
