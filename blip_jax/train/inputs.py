"""What each objective reads: records -> tokenized, normalised host batches -> global arrays.

Tokenizers come from the converted checkpoint (`model.init_from`: its LLM tokenizer, and the
Q-Former's BERT tokenizer for stage 1 / InstructBLIP), or, for randomly initialised models, are
word-level tokenizers over the synthetic dataset's words, laid out like the LLM family's.
Formats follow LAVIS: decoder LLMs read [BOS] text [EOS] with the loss on every real token (on the
output only for instructions); Flan-T5 stage 2 is a prefix LM whose split point is drawn per record
(from token 1 to the middle); Q-Former text is [CLS] text [SEP].
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import jax
import numpy as np

from blip_jax.data import pipeline
from blip_jax.data.synthetic import WORDS, SyntheticShapes
from blip_jax.images import ImageProcessor
from blip_jax.text import BlipTokenizer, word_level_tokenizer
from blip_jax.train import sharding

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # BLIP-2's image normalisation
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
QFORMER_TOKENIZER = "qformer_tokenizer"

iterator_state = pipeline.iterator_state
restore_iterator = pipeline.restore_iterator


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
    """The data side of one run: source, tokenizers and the per-record transform."""

    cfg: object
    source: object
    image_processor: ImageProcessor
    qformer_tokenizer: BlipTokenizer | None
    llm_tokenizer: BlipTokenizer | None
    encoder_decoder: bool = False

    def vocab(self) -> dict:
        """Token ids a randomly initialised model must agree with."""
        out = {}
        if self.qformer_tokenizer is not None:
            out["qformer_vocab_size"] = len(self.qformer_tokenizer)
            out["qformer_bos_token_id"] = self.qformer_tokenizer.bos_token_id
        if self.llm_tokenizer is not None:
            tok = self.llm_tokenizer
            out.update(llm_vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                       bos_token_id=tok.bos_token_id)
        return out

    def transform(self, record: dict) -> dict:
        d = self.cfg.data
        out = {"pixels": self.image_processor([record["image"]])[0]}
        if self.cfg.objective == "stage1":
            ids, mask = _pad([self.qformer_tokenizer.encode(record["caption"])], d.max_text_len,
                             self.qformer_tokenizer.pad_token_id)
            return {**out, "text_ids": ids[0], "text_mask": mask[0]}
        instruct = self.cfg.model.instruct
        tok = self.llm_tokenizer
        if instruct:
            q_ids, q_mask = _pad([self.qformer_tokenizer.encode(record["instruction"])], d.max_text_len,
                                 self.qformer_tokenizer.pad_token_id)
            out.update(qformer_ids=q_ids[0], qformer_mask=q_mask[0])
        if self.encoder_decoder:
            if instruct:
                source, target = record["instruction"], record["output"]
            else:  # prefix LM: split the caption at a point drawn from [1, middle]
                words = record["caption"].split()
                rng = np.random.default_rng([self.cfg.seed, int(record["index"])])
                cut = int(rng.integers(1, max(len(words) // 2, 1) + 1))
                source, target = " ".join(words[:cut]), " ".join(words[cut:])
            ids, mask = _pad([tok.encode(source)], d.max_text_len, tok.pad_token_id)
            targets, target_mask = _pad([tok.encode(target)], d.max_text_len, tok.pad_token_id)
            return {**out, "ids": ids[0], "mask": mask[0], "targets": targets[0], "target_mask": target_mask[0]}
        eos = [tok.eos_token_id]
        if instruct:  # [BOS] instruction | output [EOS]; loss on the output and EOS only
            prompt = tok.encode(record["instruction"])
            answer = tok.encode(record["output"], add_special_tokens=False) + eos
            seq, loss_from = prompt + answer, len(prompt)
        else:  # [BOS] caption [EOS]; every real token is a target (LAVIS)
            seq, loss_from = tok.encode(record["caption"]) + eos, 0
        ids, mask = _pad([seq], d.max_text_len, tok.pad_token_id)
        loss_mask = mask.copy()
        loss_mask[:, :loss_from] = 0
        return {**out, "ids": ids[0], "mask": mask[0], "loss_mask": loss_mask[0]}

    def iterator(self, process_index: int, process_count: int):
        return pipeline.make_iterator(self.source, batch_size=self.cfg.batch_size, seed=self.cfg.data.seed,
                                      transform=self.transform, process_index=process_index,
                                      process_count=process_count)

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
    if cfg.objective == "stage1":
        return {**out, "text_ids": tokens, "text_mask": tokens}
    if cfg.model.instruct:
        out.update(qformer_ids=tokens, qformer_mask=tokens)
    names = ("ids", "mask", "targets", "target_mask") if encoder_decoder else ("ids", "mask", "loss_mask")
    return {**out, **{n: tokens for n in names}}


def make_task(cfg, image_size: int, encoder_decoder: bool) -> Task:
    d = cfg.data
    if d.name != "synthetic":
        raise ValueError(f"data.name {d.name!r}: only the built-in 'synthetic' source exists so far")
    source = SyntheticShapes(d.num_records, seed=d.seed, image_size=d.image_size)
    processor = ImageProcessor(size={"height": image_size, "width": image_size}, image_mean=list(CLIP_MEAN),
                               image_std=list(CLIP_STD))
    needs_qformer_text = cfg.objective == "stage1" or cfg.model.instruct
    return Task(cfg, source, processor, _qformer_tokenizer(cfg) if needs_qformer_text else None,
                None if cfg.objective == "stage1" else _llm_tokenizer(cfg), encoder_decoder)
