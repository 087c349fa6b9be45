"""BlipTokenizer vs transformers' BertTokenizer configured as in the HF BLIP checkpoints."""

import json
import shutil

import numpy as np
import pytest

from blip_jax.text import BlipTokenizer

transformers = pytest.importorskip("transformers")

VOCAB = (["[PAD]"] + [f"[unused{i}]" for i in range(3)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
         + list(".,!?'\"-()#:;") + ["a", "the", "dog", "cat", "picture", "of", "on", "is", "it", "don", "t", "s",
                                    "play", "##ing", "##s", "cafe", "noel", "naive", "hello", "world", "un", "##aff",
                                    "##able", "photo", "##graph", "we", "re", "man", "in", "red", "中", "文", "1", "##2"])

TEXTS = [
    "A picture of a DOG.",
    "Café Noël, naïve!",                 # accents stripped by lower-casing BERT
    "don't play: it's a cat?!",          # punctuation split / decode spacing
    "xyzzy unaffable photograph",        # unknown word + ## pieces
    "中文 in red 12",                     # Chinese chars are split per char
    "[MASK] [DEC] dog [ENC] [CLS]",      # special tokens kept whole
    "",
    "  playing\tcats\n\x00 ",            # whitespace / control chars cleaned
    "a man in red playing with the dog " * 8,  # long: truncated
]

ENCODE_OPTIONS = [
    dict(max_length=12),
    dict(max_length=35),
    dict(max_length=10, padding="max_length"),
    dict(max_length=9, padding_side="left"),
    dict(max_length=9, truncation_side="left"),
    dict(max_length=2),
]


def _hf_encode(hf, texts, max_length=None, padding="longest", truncation=True, padding_side="right",
               truncation_side="right"):
    hf.truncation_side = truncation_side
    try:
        out = hf(texts, max_length=max_length, padding=padding, truncation=truncation,
                 padding_side=padding_side, return_tensors="np")
    finally:
        hf.truncation_side = "right"
    return out["input_ids"], out["attention_mask"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    (root / "vocab").mkdir()
    (root / "vocab" / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    # The HF BLIP setup: bert-base-uncased + bos [DEC] + additional special [ENC].
    hf = transformers.BertTokenizer(str(root / "vocab" / "vocab.txt"), bos_token="[DEC]",
                                    additional_special_tokens=["[ENC]"], model_max_length=20)
    hf.save_pretrained(root / "saved")  # tokenizer.json + tokenizer_config.json (transformers 5 style)
    # transformers-4-era checkpoint layout (like Salesforce/blip-*): tokenizer.json + vocab.txt +
    # tokenizer_config.json without bos + special_tokens_map.json naming [DEC] / [ENC].
    v4 = root / "v4"
    v4.mkdir()
    shutil.copy(root / "saved" / "tokenizer.json", v4)
    shutil.copy(root / "vocab" / "vocab.txt", v4)
    (v4 / "tokenizer_config.json").write_text(json.dumps(
        {"cls_token": "[CLS]", "do_basic_tokenize": True, "do_lower_case": True, "mask_token": "[MASK]",
         "model_max_length": 16, "never_split": None, "pad_token": "[PAD]", "processor_class": "BlipProcessor",
         "sep_token": "[SEP]", "strip_accents": None, "tokenize_chinese_chars": True,
         "tokenizer_class": "BertTokenizer", "unk_token": "[UNK]", "clean_up_tokenization_spaces": True}))
    (v4 / "special_tokens_map.json").write_text(json.dumps(
        {"additional_special_tokens": ["[ENC]"], "bos_token": "[DEC]", "cls_token": "[CLS]", "mask_token": "[MASK]",
         "pad_token": "[PAD]", "sep_token": "[SEP]", "unk_token": "[UNK]"}))
    return root


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json.*vocab.txt"):
        BlipTokenizer.from_dir(tmp_path)
    with pytest.raises(FileNotFoundError):
        BlipTokenizer.from_dir(tmp_path / "nope")


@pytest.mark.parametrize("source", ["tokenizer.json", "vocab.txt"])
def test_special_ids(dirs, source):
    hf = transformers.AutoTokenizer.from_pretrained(dirs / "saved")
    ours = BlipTokenizer.from_dir(dirs / ("saved" if source == "tokenizer.json" else "vocab"))
    # [DEC] / [ENC] are appended right after the WordPiece vocab, in that order (30522 / 30523 for BLIP)
    assert ours.bos_token_id == hf.bos_token_id == hf.convert_tokens_to_ids("[DEC]") == len(VOCAB)
    assert ours.enc_token_id == hf.convert_tokens_to_ids("[ENC]") == len(VOCAB) + 1
    assert (ours.pad_token_id, ours.cls_token_id, ours.sep_token_id) == (hf.pad_token_id, hf.cls_token_id,
                                                                         hf.sep_token_id)
    assert ours.vocab_size == len(hf) == len(VOCAB) + 2


@pytest.mark.parametrize("source", ["saved", "vocab", "v4"])
def test_encode_matches_hf(dirs, source):
    ours = BlipTokenizer.from_dir(dirs / source)
    if source == "vocab":  # bare vocab.txt: compare with the in-memory BLIP setup
        hf = transformers.BertTokenizer(str(dirs / "vocab" / "vocab.txt"), bos_token="[DEC]",
                                        additional_special_tokens=["[ENC]"])
    else:
        hf = transformers.AutoTokenizer.from_pretrained(dirs / source)
    assert ours.model_max_length == hf.model_max_length
    options = ENCODE_OPTIONS + [dict(), dict(padding="max_length")] if source != "vocab" else ENCODE_OPTIONS
    for opts in options:
        ids, mask = _hf_encode(hf, TEXTS, **opts)
        out = ours(TEXTS, **opts)
        assert out["input_ids"].dtype == np.int32 and out["attention_mask"].dtype == np.int32
        np.testing.assert_array_equal(out["input_ids"], ids, err_msg=str(opts))
        np.testing.assert_array_equal(out["attention_mask"], mask, err_msg=str(opts))
    # single string, no truncation limit hit
    np.testing.assert_array_equal(ours("a dog")["input_ids"], hf(["a dog"], return_tensors="np")["input_ids"])


@pytest.mark.parametrize("source", ["saved", "v4"])
def test_decode_matches_blip_processor(dirs, source):
    hf = transformers.AutoTokenizer.from_pretrained(dirs / source)
    proc = transformers.BlipProcessor(image_processor=transformers.BlipImageProcessor(), tokenizer=hf)
    ours = BlipTokenizer.from_dir(dirs / source)
    ids = hf(TEXTS, padding=True, truncation=True, max_length=40, return_tensors="np")["input_ids"]
    # a generated caption: [DEC] prefix, [SEP] stop, padding afterwards
    gen = np.array([[len(VOCAB), *hf("a picture of a dog, playing!", add_special_tokens=False)["input_ids"],
                     hf.sep_token_id, 0, 0]])
    for batch in (ids, gen):
        assert ours.batch_decode(batch) == proc.batch_decode(batch, skip_special_tokens=True)
        assert ours.batch_decode(batch, skip_special_tokens=False) == hf.batch_decode(batch)
        for flag in (True, False):
            assert (ours.batch_decode(batch, clean_up_tokenization_spaces=flag)
                    == hf.batch_decode(batch, skip_special_tokens=True, clean_up_tokenization_spaces=flag))
    assert ours.decode(gen[0]) == "a picture of a dog, playing!"
    # clean_up_tokenization_spaces follows tokenizer_config (False by default in transformers 5)
    assert ours.decode(ids[2]) == ("don't play : it's a cat?!" if source == "v4" else "don ' t play : it ' s a cat?!")


def test_save_roundtrip(dirs, tmp_path):
    ours = BlipTokenizer.from_dir(dirs / "v4")
    ours.save(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    again = BlipTokenizer.from_dir(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ref = transformers.AutoTokenizer.from_pretrained(dirs / "v4")
    for opts in ENCODE_OPTIONS:
        a, b = ours(TEXTS, **opts), again(TEXTS, **opts)
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
        np.testing.assert_array_equal(a["input_ids"], _hf_encode(hf, TEXTS, **opts)[0])
        np.testing.assert_array_equal(a["input_ids"], _hf_encode(ref, TEXTS, **opts)[0])
    assert (again.bos_token_id, again.enc_token_id, again.model_max_length) == (ours.bos_token_id,
                                                                                ours.enc_token_id, 16)
    assert hf.bos_token_id == ours.bos_token_id and len(hf) == ours.vocab_size


def test_ragged_without_padding_raises(dirs):
    ours = BlipTokenizer.from_dir(dirs / "saved")
    with pytest.raises(ValueError, match="different lengths"):
        ours(["a dog", "a"], padding=False)
