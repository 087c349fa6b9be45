"""BLIP text tokenization on top of the `tokenizers` library (no transformers at runtime).

BLIP uses the bert-base-uncased WordPiece tokenizer plus two extra special tokens that the
original code (LAVIS / salesforce BLIP) and the HF checkpoints append after the BERT vocab:

    [DEC]  bos token, id 30522 in real checkpoints (first token of the captioning decoder input)
    [ENC]  additional special token, id 30523 (replaces [CLS] for image-grounded text encoding)

The behaviour mirrors transformers 5.x `BertTokenizer` (a `tokenizers` backend) as loaded by
`BlipProcessor`: same normalizer / pre-tokenizer / post-processor / decoder, same truncation and
padding rules, same `clean_up_tokenization_spaces` handling (default False in transformers 5).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece

# transformers' "no limit" sentinel for model_max_length
VERY_LARGE_INTEGER = int(1e30)
# InstructBLIP checkpoints keep the Q-Former's BERT tokenizer in this subdirectory.
QFORMER_TOKENIZER = "qformer_tokenizer"
# transformers' SPECIAL_TOKENS_ATTRIBUTES order: missing special tokens are appended in this
# order, followed by the additional/extra special tokens ([DEC] -> 30522, then [ENC] -> 30523).
_NAMED_SPECIALS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_BLIP_SPECIALS = {"bos_token": "[DEC]", "unk_token": "[UNK]", "sep_token": "[SEP]",
                  "pad_token": "[PAD]", "cls_token": "[CLS]", "mask_token": "[MASK]"}
_BLIP_EXTRAS = ["[ENC]"]


def _token_str(value) -> str | None:
    """Special tokens appear in HF json files either as "tok" or {"content": "tok", ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _read_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _bert_normalizer(do_lower_case=True, strip_accents=None, tokenize_chinese_chars=True):
    return normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=tokenize_chinese_chars,
                                      strip_accents=strip_accents, lowercase=do_lower_case)


def _load_vocab_txt(path: Path) -> dict[str, int]:
    # Same parsing as transformers' load_vocab: one token per line, only "\n" stripped,
    # a duplicated token keeps its last index.
    with open(path, encoding="utf-8") as f:
        return {line.rstrip("\n"): i for i, line in enumerate(f.readlines())}


class BlipTokenizer:
    """BERT WordPiece tokenizer with BLIP's [DEC]/[ENC] tokens.

    Build with `BlipTokenizer.from_dir(checkpoint_dir)`; call on a string or list of strings to get
    numpy int32 `input_ids` / `attention_mask` of shape [B, L].
    """

    def __init__(self, tokenizer: Tokenizer, special_tokens: dict[str, str | None],
                 extra_special_tokens: Sequence[str] = (), model_max_length: int = VERY_LARGE_INTEGER,
                 padding_side: str = "right", truncation_side: str = "right",
                 clean_up_tokenization_spaces: bool = False, config: dict | None = None):
        self.tokenizer = tokenizer
        # We truncate / pad ourselves per call; settings baked into a tokenizer.json are dropped.
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.special_tokens = {k: special_tokens.get(k) for k in _NAMED_SPECIALS}
        self.extra_special_tokens = list(extra_special_tokens)
        # Like transformers: any special token the backend does not know yet is appended as a
        # special added token (named ones first, then extras). Tokens already in the WordPiece
        # vocab ([PAD], [CLS], ...) keep their id but become "special" (skipped by decode and
        # never split by the pre-tokenizer).
        known = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
        wanted = [t for t in list(self.special_tokens.values()) + self.extra_special_tokens if t]
        to_add = []
        for t in wanted:
            if t not in known and t not in to_add:
                to_add.append(t)
        if to_add:
            tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in to_add])
        self.model_max_length = int(model_max_length)
        self.padding_side = padding_side
        self.truncation_side = truncation_side
        self.clean_up_tokenization_spaces = bool(clean_up_tokenization_spaces)
        self.config = dict(config or {})
        if self.pad_token_id is None:
            raise ValueError(f"pad token {self.special_tokens['pad_token']!r} is not in the vocabulary")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_vocab(cls, vocab_file: str | os.PathLike, *, do_lower_case: bool = True,
                   strip_accents: bool | None = None, tokenize_chinese_chars: bool = True,
                   special_tokens: dict | None = None, extra_special_tokens: Sequence[str] | None = None,
                   **kwargs) -> "BlipTokenizer":
        """Build the bert-base-uncased pipeline from a bare WordPiece vocab.txt."""
        special = dict(_BLIP_SPECIALS if special_tokens is None else special_tokens)
        extras = _BLIP_EXTRAS if extra_special_tokens is None else list(extra_special_tokens)
        vocab = _load_vocab_txt(Path(vocab_file))
        unk = special.get("unk_token") or "[UNK]"
        tok = Tokenizer(WordPiece(vocab, unk_token=unk, max_input_chars_per_word=100))
        tok.normalizer = _bert_normalizer(do_lower_case, strip_accents, tokenize_chinese_chars)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece(prefix="##")
        cls_tok, sep_tok = special.get("cls_token") or "[CLS]", special.get("sep_token") or "[SEP]"
        if cls_tok not in vocab or sep_tok not in vocab:
            raise ValueError(f"{vocab_file}: {cls_tok!r} and {sep_tok!r} must be in the vocabulary")
        tok.post_processor = processors.TemplateProcessing(
            single=f"{cls_tok}:0 $A:0 {sep_tok}:0",
            pair=f"{cls_tok}:0 $A:0 {sep_tok}:0 $B:1 {sep_tok}:1",
            special_tokens=[(cls_tok, vocab[cls_tok]), (sep_tok, vocab[sep_tok])])
        return cls(tok, special, extras, **kwargs)

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "BlipTokenizer":
        """Load from a HF BLIP checkpoint / tokenizer directory.

        Uses tokenizer.json when present, else vocab.txt; reads tokenizer_config.json and
        special_tokens_map.json when present. Without either config file the BLIP setup is
        assumed (bos [DEC], extra special [ENC], appended after the vocab if missing).
        """
        path = Path(path)
        tj, vt = path / "tokenizer.json", path / "vocab.txt"
        if not path.is_dir():
            raise FileNotFoundError(f"tokenizer directory not found: {path}")
        if not tj.is_file() and not vt.is_file():
            raise FileNotFoundError(f"no tokenizer files in {path}: looked for 'tokenizer.json' and 'vocab.txt'")

        cfg, has_cfg = {}, False
        # tokenizer_config.json first, special_tokens_map.json overrides the special tokens.
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            if (path / name).is_file():
                cfg.update(_read_json(path / name))
                has_cfg = True
        if has_cfg:
            special = {k: _token_str(cfg[k]) for k in _NAMED_SPECIALS if k in cfg}
            for k, v in _BLIP_SPECIALS.items():
                if k != "bos_token":  # BERT defaults (transformers' BertTokenizer signature)
                    special.setdefault(k, v)
            extras = cfg.get("extra_special_tokens", cfg.get("additional_special_tokens")) or []
            if isinstance(extras, dict):  # transformers 5 may store {name: token}
                extras = list(extras.values())
            extras = [_token_str(t) for t in extras]
        else:
            special, extras = dict(_BLIP_SPECIALS), list(_BLIP_EXTRAS)

        bert_opts = {k: cfg[k] for k in ("do_lower_case", "strip_accents", "tokenize_chinese_chars") if k in cfg}
        kwargs = dict(
            model_max_length=cfg.get("model_max_length") or VERY_LARGE_INTEGER,
            padding_side=cfg.get("padding_side", "right"),
            truncation_side=cfg.get("truncation_side", "right"),
            clean_up_tokenization_spaces=cfg.get("clean_up_tokenization_spaces", False),
            config=cfg)
        if not tj.is_file():
            return cls.from_vocab(vt, special_tokens=special, extra_special_tokens=extras, **bert_opts, **kwargs)

        tok = Tokenizer.from_file(str(tj))
        present = {t.content for t in tok.get_added_tokens_decoder().values()}
        if special.get("bos_token") is None and "[DEC]" in present:
            special["bos_token"] = "[DEC]"  # config predates BLIP's bos but the file carries [DEC]
        if not has_cfg:
            # Bare tokenizer.json: the special tokens it marks decide (e.g. no [ENC] in an
            # InstructBLIP Q-Former tokenizer); only [DEC] is assumed.
            extras = [t for t in extras if t in present]
        # transformers 5 rebuilds BertTokenizer's normalizer from tokenizer_config options, so
        # those win over the serialized normalizer when both exist.
        if bert_opts and isinstance(tok.normalizer, normalizers.BertNormalizer):
            tok.normalizer = _bert_normalizer(bert_opts.get("do_lower_case", True),
                                              bert_opts.get("strip_accents"),
                                              bert_opts.get("tokenize_chinese_chars", True))
        return cls(tok, special, extras, **kwargs)

    @classmethod
    def from_llm_dir(cls, path: str | os.PathLike) -> "BlipTokenizer":
        """A BLIP-2 language model's tokenizer (OPT, T5, LLaMA): tokenizer.json with the special tokens
        tokenizer_config.json names, and no BERT defaults. Checkpoints whose tokenizer_config asks for
        `add_bos_token` / `add_eos_token` while their tokenizer.json post-processor does not add them
        (OPT's GPT-2 tokenizer) get a post-processor that does, as transformers builds one on load."""
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{path / 'tokenizer.json'} not found: BLIP-2 needs its LLM's fast tokenizer")
        cfg = {}
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            if (path / name).is_file():
                cfg.update(_read_json(path / name))
        special = {k: _token_str(cfg[k]) for k in _NAMED_SPECIALS if cfg.get(k)}
        if not special.get("pad_token"):  # LLaMA has none; padded positions are masked anyway
            special["pad_token"] = special.get("unk_token") or special.get("eos_token")
        tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        bos, eos = special.get("bos_token"), special.get("eos_token")
        probe = tok.encode("a", add_special_tokens=True).ids
        want_bos = cfg.get("add_bos_token") and bos and probe[:1] != [tok.token_to_id(bos)]
        want_eos = cfg.get("add_eos_token") and eos and probe[-1:] != [tok.token_to_id(eos)]
        if want_bos or want_eos:
            marks = ([bos] if cfg.get("add_bos_token") and bos else []) + ["$A"] + (
                [eos] if cfg.get("add_eos_token") and eos else [])
            tok.post_processor = processors.TemplateProcessing(
                single=" ".join(marks), special_tokens=[(t, tok.token_to_id(t)) for t in marks if t != "$A"])
        return cls(tok, special, [], model_max_length=cfg.get("model_max_length") or VERY_LARGE_INTEGER,
                   padding_side=cfg.get("padding_side", "right"), truncation_side=cfg.get("truncation_side", "right"),
                   clean_up_tokenization_spaces=cfg.get("clean_up_tokenization_spaces", False), config=cfg)

    def save(self, path: str | os.PathLike) -> None:
        """Write tokenizer.json (+ tokenizer_config.json), loadable by from_dir and by transformers."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(path / "tokenizer.json"))
        cfg = {k: v for k, v in self.config.items()
               if k not in ("added_tokens_decoder", "additional_special_tokens", "name_or_path",
                            "special_tokens_map_file", "tokenizer_file", "auto_map")}
        norm = self.tokenizer.normalizer
        if isinstance(norm, normalizers.BertNormalizer):
            cfg.update(do_lower_case=norm.lowercase, strip_accents=norm.strip_accents,
                       tokenize_chinese_chars=norm.handle_chinese_chars)
        cfg.update({k: v for k, v in self.special_tokens.items() if v is not None})
        cfg.update(tokenizer_class="BertTokenizer", model_max_length=self.model_max_length,
                   padding_side=self.padding_side, truncation_side=self.truncation_side,
                   clean_up_tokenization_spaces=self.clean_up_tokenization_spaces,
                   extra_special_tokens=self.extra_special_tokens)
        with open(path / "tokenizer_config.json", "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2, ensure_ascii=False)

    # ------------------------------------------------------------------ ids
    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.tokenizer.token_to_id(token)

    @property
    def pad_token_id(self): return self.token_to_id(self.special_tokens["pad_token"])
    @property
    def cls_token_id(self): return self.token_to_id(self.special_tokens["cls_token"])
    @property
    def sep_token_id(self): return self.token_to_id(self.special_tokens["sep_token"])
    @property
    def unk_token_id(self): return self.token_to_id(self.special_tokens["unk_token"])
    @property
    def mask_token_id(self): return self.token_to_id(self.special_tokens["mask_token"])
    @property
    def bos_token_id(self): return self.token_to_id(self.special_tokens["bos_token"])  # [DEC]

    @property
    def eos_token_id(self):
        # BLIP has no eos token: the decoder stops on [SEP] (what BlipForConditionalGeneration uses).
        return self.token_to_id(self.special_tokens["eos_token"])

    @property
    def enc_token_id(self):
        """Id of [ENC] (BLIP's image-grounded encoder token), else of the first extra special token."""
        i = self.token_to_id("[ENC]")
        if i is None and self.extra_special_tokens:
            i = self.token_to_id(self.extra_special_tokens[0])
        return i

    @property
    def vocab_size(self) -> int:
        """Size including added tokens (= len(hf_tokenizer), 30524 for BLIP)."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def __len__(self):
        return self.vocab_size

    # ------------------------------------------------------------------ encode
    def __call__(self, texts: str | Sequence[str], max_length: int | None = None,
                 padding: str | bool = "longest", truncation: bool = True,
                 padding_side: str | None = None, truncation_side: str | None = None,
                 add_special_tokens: bool = True) -> dict[str, np.ndarray]:
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("texts must be a string or a sequence of strings")
        padding = {True: "longest", False: "do_not_pad"}.get(padding, padding)
        if padding not in ("longest", "max_length", "do_not_pad"):
            raise ValueError(f"padding must be 'longest', 'max_length' or False, got {padding!r}")
        padding_side = padding_side or self.padding_side
        truncation_side = truncation_side or self.truncation_side
        has_limit = self.model_max_length < VERY_LARGE_INTEGER
        # transformers: with no max_length, truncation / max_length padding use model_max_length
        # when the model has one, and are skipped otherwise.
        if max_length is None and has_limit and (truncation or padding == "max_length"):
            max_length = self.model_max_length
        if padding == "max_length" and max_length is None:
            padding = "longest"

        encs = self.tokenizer.encode_batch(texts, add_special_tokens=False)
        n_special = self.tokenizer.num_special_tokens_to_add(False) if add_special_tokens else 0
        ids = []
        for enc in encs:
            if truncation and max_length is not None and len(enc.ids) + n_special > max_length:
                if max_length < n_special:
                    raise ValueError(f"max_length={max_length} leaves no room for the {n_special} special tokens")
                enc.truncate(max_length - n_special, direction=truncation_side)
            enc = self.tokenizer.post_process(enc, add_special_tokens=add_special_tokens)
            ids.append(enc.ids)

        longest = max((len(x) for x in ids), default=0)
        target = max_length if padding == "max_length" else longest
        if padding == "do_not_pad" or longest > target:
            if len({len(x) for x in ids}) > 1 or longest > target:
                raise ValueError("sequences have different lengths; use padding='longest' or "
                                 "padding='max_length' with truncation=True to get a [B, L] array")
            target = longest
        input_ids = np.full((len(ids), target), self.pad_token_id, dtype=np.int32)
        mask = np.zeros((len(ids), target), dtype=np.int32)
        for b, seq in enumerate(ids):
            sl = slice(0, len(seq)) if padding_side == "right" else slice(target - len(seq), target)
            input_ids[b, sl] = seq
            mask[b, sl] = 1
        return {"input_ids": input_ids, "attention_mask": mask}

    def encode(self, text: str, add_special_tokens: bool = True, max_length: int | None = None,
               truncation_side: str | None = None) -> list[int]:
        """`text`'s ids; with `max_length`, cut on `truncation_side` (default: the tokenizer's) with the
        special tokens kept, as `__call__` cuts."""
        if max_length is None:
            return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        enc = self(text, max_length=max_length, truncation=True, truncation_side=truncation_side,
                   add_special_tokens=add_special_tokens)
        return enc["input_ids"][0][enc["attention_mask"][0] == 1].tolist()

    # ------------------------------------------------------------------ decode
    @staticmethod
    def _to_list(ids) -> list[int]:
        return [int(i) for i in np.asarray(ids).reshape(-1)]

    def decode(self, ids, skip_special_tokens: bool = True,
               clean_up_tokenization_spaces: bool | None = None) -> str:
        text = self.tokenizer.decode(self._to_list(ids), skip_special_tokens=skip_special_tokens)
        if clean_up_tokenization_spaces is None:
            clean_up_tokenization_spaces = self.clean_up_tokenization_spaces
        if clean_up_tokenization_spaces:  # transformers' clean_up_tokenization
            for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                         (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
                text = text.replace(a, b)
        return text

    def batch_decode(self, batch: Iterable, skip_special_tokens: bool = True,
                     clean_up_tokenization_spaces: bool | None = None) -> list[str]:
        if isinstance(batch, np.ndarray) or hasattr(batch, "__array__"):
            batch = np.asarray(batch)
            batch = batch.reshape(1, -1) if batch.ndim == 1 else batch
        return [self.decode(x, skip_special_tokens, clean_up_tokenization_spaces) for x in batch]


# Special tokens of each LLM family, in id order, and the template its tokenizer adds them with.
LLM_SPECIAL_TOKENS = {
    "opt": (["<s>", "<pad>", "</s>", "<unk>"], "</s> $A",
            dict(bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")),
    "t5": (["<pad>", "</s>", "<unk>"], "$A </s>", dict(eos_token="</s>", pad_token="<pad>", unk_token="<unk>")),
    "llama": (["<unk>", "<s>", "</s>"], "<s> $A", dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>")),
}


def word_level_tokenizer(words: Sequence[str], family: str) -> tuple[Tokenizer, dict[str, str]]:
    """A small word-level tokenizer laid out like the `family`'s (its special tokens first, the same
    BOS/EOS template, `<image>` appended, and Vicuna's `<pad>` after the vocabulary for LLaMA), for
    tests and synthetic-data training. Returns (tokenizer, named special tokens)."""
    from tokenizers import models

    specials, template, named = LLM_SPECIAL_TOKENS[family]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(list(specials) + [w for w in words if w not in specials]))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    marks = [t for t in template.split() if t != "$A"]
    tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=[(t, vocab[t]) for t in marks])
    extra = (["<pad>"] if family == "llama" else []) + ["<image>"]
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in extra])
    return tok, {**named, **({"pad_token": "<pad>"} if family == "llama" else {})}
