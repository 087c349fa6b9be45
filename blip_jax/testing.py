"""Tiny random transformers BLIP checkpoints, for the test-suite and the `blip-jax demo` command.

`write_tiny_checkpoint(dir, "caption" | "retrieval" | "vqa")` writes a complete transformers model
directory laid out like the Salesforce/blip-* checkpoints (config.json, weights, tokenizer files,
preprocessor_config.json) but a few hundred kB in size: a 264-entry BERT-style vocabulary (266 tokens with [DEC]/[ENC]) and a
32-wide, 2-layer model. Only this function needs torch and transformers, imported lazily, so the
module itself (and `sample_images`, `TINY_TEXTS`, `TINY_QUESTIONS`) imports without them.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from blip_jax.images import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

ARCHITECTURES = {
    "caption": "BlipForConditionalGeneration",
    "retrieval": "BlipForImageTextRetrieval",
    "vqa": "BlipForQuestionAnswering",
}
WEIGHTS_FORMATS = ("safetensors", "sharded", "bin")

# BERT's specials; [DEC] and [ENC] are appended after the vocab by the tokenizer (ids V and V+1),
# exactly as bert-base-uncased + BLIP gives [DEC]=30522, [ENC]=30523.
_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_PUNCT = list(".,!?'\"-:;()&/")
_WORDS = """
a an the this that these those there here it its is are was be being been has have had do does
of on in with at by for from to into near next under over behind front top up down out off and or
but while as very some two three four five one many much few several lots lot other each all no
yes not what which who where when why how color colour kind type sort number time sport animal
man woman men women person people boy girl child children baby player players group crowd team
dog dogs cat cats horse horses bird birds cow sheep bear elephant giraffe zebra animals fish
car cars bus truck train plane bike motorcycle boat street road sidewalk sign light traffic city
table chair bed couch room kitchen bathroom window door wall floor plate bowl cup food pizza cake
sandwich banana apple orange donut hot field grass tree trees sky water beach ocean snow mountain
park building clock tv laptop phone ball frisbee kite umbrella bag hat shirt picture photo image
close view large small big little old young white black red blue green yellow brown gray grey
pink purple dark bright sitting standing walking running riding playing eating holding looking
lying flying parked wearing laying sits stands walks rides holds
circle circles square squares triangle triangles zero answer question caption describe briefly short show
word write
""".split()  # the last lines: the words of blip_jax.data.synthetic, so tiny models can train on it
_SUFFIXES = ["##s", "##es", "##ed", "##ing", "##er", "##ly", "##y", "##n", "##al", "##e"]
VOCAB = list(dict.fromkeys(_SPECIALS + _PUNCT + _WORDS + _SUFFIXES))  # de-duplicated, order kept

# Short strings made of in-vocab words only (no [UNK]), for captions / retrieval texts / questions.
TINY_TEXTS = [
    "a picture of a dog sitting on the grass",
    "a man riding a horse on the beach",
    "two cats lying on a red couch",
    "a woman holding an umbrella in the street",
    "a plate of food on a table",
    "a group of people playing frisbee in a park",
]
TINY_QUESTIONS = [
    "what color is the dog?",
    "how many people are there?",
    "is the man wearing a hat?",
    "what is the woman holding?",
    "where is the cat sitting?",
    "what animal is this?",
]


def sample_images(n: int, size: int = 48, seed: int = 0):
    """`n` small random RGB PIL images of varied sizes (around `size`, never all square/equal)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = []
    for i in range(n):
        # the first is size x 4/3 size (landscape), the others random in [0.6, 1.4] x size per side
        h = int(size * (0.6 + 0.8 * rng.random())) if i else size
        w = int(size * (0.6 + 0.8 * rng.random())) if i else size + size // 3
        # a smooth gradient plus noise, so resizing has something to interpolate
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([xx * 255 / max(w - 1, 1), yy * 255 / max(h - 1, 1), np.full((h, w), 255.0 * i / max(n, 1))], -1)
        pixels = np.clip(base + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
        images.append(Image.fromarray(pixels, "RGB"))
    return images


def write_tiny_checkpoint(directory: str | os.PathLike, architecture: str = "caption", *, seed: int = 0,
                          image_size: int = 32, patch_size: int = 8, hidden_size: int = 32, num_layers: int = 2,
                          num_heads: int = 4, weights_format: str = "safetensors", perturb: float = 0.1) -> Path:
    """Write a tiny random transformers BLIP model directory and return its path.

    weights_format: "safetensors" (model.safetensors), "sharded" (>= 2 safetensors shards plus
    model.safetensors.index.json) or "bin" (pytorch_model.bin, the pre-safetensors layout).
    """
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {sorted(ARCHITECTURES)}, got {architecture!r}")
    if weights_format not in WEIGHTS_FORMATS:
        raise ValueError(f"weights_format must be one of {WEIGHTS_FORMATS}, got {weights_format!r}")
    import torch
    import transformers

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for stale in [*directory.glob("model*.safetensors*"), *directory.glob("pytorch_model*.bin*")]:
        stale.unlink()  # weights of an earlier call in another format would shadow the new ones
    max_positions = 64

    # Tokenizer, configured like the HF BLIP checkpoints: bert-base-uncased + bos [DEC] + extra [ENC].
    vocab_file = directory / "vocab.txt"
    vocab_file.write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    tokenizer = transformers.BertTokenizer(str(vocab_file), bos_token="[DEC]", additional_special_tokens=["[ENC]"],
                                           model_max_length=max_positions)
    tokenizer.save_pretrained(directory)  # tokenizer.json + tokenizer_config.json (vocab.txt kept as written)
    dec_id, sep_id = tokenizer.convert_tokens_to_ids(["[DEC]", "[SEP]"])
    assert len(tokenizer) == len(VOCAB) + 2 and dec_id == len(VOCAB), (len(tokenizer), dec_id)

    transformers.BlipImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(directory)

    config = transformers.BlipConfig(
        vision_config=dict(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
                           num_attention_heads=num_heads, image_size=image_size, patch_size=patch_size),
        # num_attention_heads given explicitly: BlipTextConfig's class default is 8, not the vision's 12.
        text_config=dict(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=num_layers, num_attention_heads=num_heads,
                         max_position_embeddings=max_positions, bos_token_id=dec_id, sep_token_id=sep_id,
                         eos_token_id=sep_id, pad_token_id=tokenizer.pad_token_id),
        image_text_hidden_size=16,
    )
    torch.manual_seed(seed)
    model = getattr(transformers, ARCHITECTURES[architecture])(config).eval()
    # HF initialises LayerNorms to 1/0, biases to 0 and the vision weights to ~1e-10: perturb every
    # parameter (tied ones once) so that a transposed or swapped tensor cannot go unnoticed. At 0.05
    # the image and question barely move greedy outputs (often the same text for every input); 0.1
    # gives distinct outputs per input (seed 0 caption: 6 distinct captions for sample_images(6)).
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(perturb * torch.randn(p.shape, generator=gen, dtype=p.dtype))

    if weights_format == "bin":
        # transformers 5's save_pretrained only writes safetensors; write the legacy layout by hand.
        model.config.architectures = [type(model).__name__]  # model.save_pretrained would set this
        model.config.save_pretrained(directory)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        torch.save(state, directory / "pytorch_model.bin")
        expected = ["pytorch_model.bin"]
    elif weights_format == "sharded":
        size = sum(p.numel() * p.element_size() for p in model.parameters())
        model.save_pretrained(directory, max_shard_size=max(size // 3, 1))
        expected = ["model.safetensors.index.json"]
    else:
        model.save_pretrained(directory)
        expected = ["model.safetensors"]
    for name in ["config.json", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", *expected]:
        assert (directory / name).is_file(), f"{name} was not written to {directory}"
    if weights_format == "sharded":
        assert len(list(directory.glob("model-*-of-*.safetensors"))) >= 2, "expected >= 2 safetensors shards"
    return directory


# ------------------------------------------------------------------------------------------ BLIP-2
BLIP2_KINDS = {  # kind -> (transformers class, LLM family)
    "opt": ("Blip2ForConditionalGeneration", "opt"),
    "t5": ("Blip2ForConditionalGeneration", "t5"),
    "retrieval": ("Blip2ForImageTextRetrieval", None),
    "instruct_t5": ("InstructBlipForConditionalGeneration", "t5"),
    "instruct_llama": ("InstructBlipForConditionalGeneration", "llama"),
}
TINY_QUERY_TOKENS = 4


def _llm_tokenizer(family: str):
    """`blip_jax.text.word_level_tokenizer` over the tiny vocabulary, as a transformers fast tokenizer."""
    from transformers import PreTrainedTokenizerFast

    from blip_jax.text import word_level_tokenizer

    tok, named = word_level_tokenizer([w for w in VOCAB if w not in _SPECIALS and not w.startswith("##")], family)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, **named)
    hf.padding_side = "right" if family == "t5" else "left"
    return hf


def _tiny_llm_config(family: str, tokenizer, hidden: int, layers: int, heads: int):
    import transformers

    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in
           (("pad", tokenizer.pad_token), ("eos", tokenizer.eos_token))}
    common = dict(vocab_size=len(tokenizer), pad_token_id=ids["pad"], eos_token_id=ids["eos"])
    if family == "opt":
        return transformers.OPTConfig(hidden_size=hidden, num_hidden_layers=layers, ffn_dim=2 * hidden,
                                      num_attention_heads=heads, max_position_embeddings=64, dropout=0.0,
                                      bos_token_id=tokenizer.bos_token_id, **common).to_dict()
    if family == "t5":
        # BLIP-2's Flan-T5: gated FFN with exact GELU; untied head; decoder starts from pad
        return transformers.T5Config(d_model=hidden, d_kv=hidden // heads, d_ff=2 * hidden, num_layers=layers,
                                     num_heads=heads, relative_attention_num_buckets=8,
                                     relative_attention_max_distance=16, feed_forward_proj="gated-gelu",
                                     dense_act_fn="gelu", tie_word_embeddings=False, dropout_rate=0.0,
                                     decoder_start_token_id=ids["pad"], **common).to_dict()
    return transformers.LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                                    num_attention_heads=heads, num_key_value_heads=heads // 2,
                                    max_position_embeddings=128, bos_token_id=tokenizer.bos_token_id,
                                    **common).to_dict()


def write_tiny_blip2_checkpoint(directory: str | os.PathLike, kind: str = "opt", *, seed: int = 0,
                                image_size: int = 32, patch_size: int = 8, hidden_size: int = 32,
                                num_layers: int = 2, num_heads: int = 4, perturb: float = 0.1) -> Path:
    """Write a tiny random transformers BLIP-2 / InstructBLIP model directory (config, safetensors,
    LLM tokenizer with `<image>`, BERT Q-Former tokenizer for InstructBLIP under qformer_tokenizer/,
    processor files) laid out like the Salesforce checkpoints; `kind` is a key of BLIP2_KINDS."""
    if kind not in BLIP2_KINDS:
        raise ValueError(f"kind must be one of {sorted(BLIP2_KINDS)}, got {kind!r}")
    import torch
    import transformers

    cls_name, family = BLIP2_KINDS[kind]
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab_file = directory / "vocab.txt"
    vocab_file.write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    bert = transformers.BertTokenizer(str(vocab_file), bos_token="[DEC]", model_max_length=64)
    image_processor = transformers.BlipImageProcessor(size={"height": image_size, "width": image_size},
                                                      image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD)
    vision = dict(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
                  num_attention_heads=num_heads, image_size=image_size, patch_size=patch_size)
    qformer = dict(vocab_size=len(bert), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                   num_hidden_layers=2 * num_layers, num_attention_heads=num_heads, cross_attention_frequency=2,
                   max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    kwargs = dict(vision_config=vision, num_query_tokens=TINY_QUERY_TOKENS)
    if family is None:  # retrieval: the Q-Former's BERT tokenizer is the model's tokenizer
        bert.save_pretrained(directory)
        image_processor.save_pretrained(directory)
        config = transformers.Blip2Config(qformer_config={**qformer, "use_qformer_text_input": True},
                                          image_text_hidden_size=16, **kwargs)
    else:
        vocab_file.unlink()
        tokenizer = _llm_tokenizer(family)
        image_token = tokenizer.convert_tokens_to_ids("<image>")
        text = _tiny_llm_config(family, tokenizer, hidden_size, num_layers, num_heads)
        if cls_name.startswith("Instruct"):
            processor = transformers.InstructBlipProcessor(image_processor, tokenizer, bert,
                                                           num_query_tokens=TINY_QUERY_TOKENS)
            config = transformers.InstructBlipConfig(qformer_config=qformer, text_config=text,
                                                     image_token_index=image_token, **kwargs)
        else:
            processor = transformers.Blip2Processor(image_processor, tokenizer, num_query_tokens=TINY_QUERY_TOKENS)
            config = transformers.Blip2Config(qformer_config=qformer, text_config=text,
                                              image_token_index=image_token, **kwargs)
        processor.save_pretrained(directory)
        image_processor.save_pretrained(directory)  # the hub checkpoints also have preprocessor_config.json
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(config).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # see write_tiny_checkpoint: every tensor must matter
        for p in model.parameters():
            p.add_(perturb * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    model.save_pretrained(directory)
    for name in ["config.json", "model.safetensors", "preprocessor_config.json"]:
        assert (directory / name).is_file(), f"{name} was not written to {directory}"
    return directory


# ---------------------------------------------------------------------------- data fixtures
BAD_IMAGE_FILES = {  # file name -> the reason the pipeline must give when it reads that file
    "zero_bytes.jpg": "empty_file",
    "truncated.jpg": "corrupt_image",
    "garbage.png": "corrupt_image",
    "missing.jpg": "missing_file",
}
CONVERTED_MODES = ("L", "1", "LA", "RGBA", "P", "P+transparency", "CMYK", "I;16")  # must be converted, not skipped


def _encode(image, fmt: str, **options) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def odd_images(seed: int = 0, size: int = 24) -> dict[str, bytes]:
    """Encoded images in the modes real datasets contain, name -> bytes (all decodable)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, (size, size + 4, 3), dtype=np.uint8)
    base = Image.fromarray(rgb)
    out = {"rgb.jpg": _encode(base, "JPEG"), "rgb.png": _encode(base, "PNG")}
    for mode in CONVERTED_MODES:
        if mode == "I;16":
            image = Image.fromarray(rng.integers(0, 65536, (size, size), dtype=np.uint16))
        else:
            image = base.convert(mode.split("+")[0])
        fmt = "JPEG" if mode == "CMYK" else "PNG"
        options = {"transparency": 0} if mode.endswith("transparency") else {}
        name = f"mode_{mode.replace(';', '_').replace('+', '_')}.{fmt.lower().replace('jpeg', 'jpg')}"
        out[name] = _encode(image, fmt, **options)
    return out


def write_caption_folder(root: str | os.PathLike, *, seed: int = 0, size: int = 24) -> dict:
    """A COCO-style folder for data tests: images/ with good images of every mode and each kind of
    bad file, plus LAVIS-layout annotations (`train.json`, one caption per entry, some bad texts).

    Returns {"annotations": path, "image_root": path, "good": [image_id of records that must
    arrive], "skipped": {reason: count the pipeline must report}}.
    """
    root = Path(root)
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    good_files = odd_images(seed, size)
    for name, data in good_files.items():
        (images / name).write_bytes(data)
    jpeg = good_files["rgb.jpg"]
    (images / "zero_bytes.jpg").write_bytes(b"")
    (images / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (images / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    entries, good, skipped = [], [], {}
    for name in good_files:
        entries.append({"image": name, "caption": f"A photo: {name.split('.')[0].replace('_', ' ')}!",
                        "image_id": f"good/{name}"})
        good.append(f"good/{name}")
    for name, reason in BAD_IMAGE_FILES.items():
        entries.append({"image": name, "caption": "a fine caption", "image_id": f"bad/{name}"})
        skipped[reason] = skipped.get(reason, 0) + 1
    for i, text in enumerate(["", "   ", "...", 42, None]):  # empty, blank, nothing left after cleaning, not text
        entries.append({"image": "rgb.jpg", "caption": text, "image_id": f"bad/text{i}"})
    skipped["bad_text"] = 4  # the caption None leaves the entry without text: malformed, counted at load
    skipped["malformed_json"] = 2
    entries.append({"caption": "an entry without an image", "image_id": "bad/noimage"})
    path = root / "train.json"
    import json

    path.write_text(json.dumps(entries))
    return {"annotations": str(path), "image_root": str(images), "good": good, "skipped": skipped}


def write_tar(path: str | os.PathLike, members: list[tuple[str, bytes]]) -> dict:
    """A tar of `members` (name, bytes), in order, for WebDataset tests; returns name -> (header
    offset, data offset, size), so a test can cut a member short."""
    import io
    import tarfile

    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with tarfile.open(path) as tar:
        return {m.name: (m.offset, m.offset_data, m.size) for m in tar}


def perturbed_copy(src: str | os.PathLike, dst: str | os.PathLike, *, seed: int = 0, scale: float = 0.02,
                   frozen: bool = False) -> Path:
    """A copy of the blip-jax model directory `src` whose parameters moved by N(0, scale) noise (a
    fixed seed per parameter path), standing in for a model trained here: its exported form is not
    the file it was converted from. A BLIP-2 model's frozen ViT and LLM stay unless `frozen`."""
    import shutil
    import zlib

    from flax import traverse_util

    from blip_jax import checkpoint

    src, dst = Path(src), Path(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(checkpoint.PARAMS))
    flat = traverse_util.flatten_dict(checkpoint.restore_params(src), sep="/")
    blip2 = checkpoint.read_config(src).to_dict()["model_type"] == "blip2"
    for path, value in flat.items():
        value = np.asarray(value)
        if value.dtype.kind != "f" or (blip2 and not frozen and path.startswith(("vision/", "language_model/"))):
            continue
        noise = np.random.default_rng([seed, zlib.crc32(path.encode())]).normal(0, scale, value.shape)
        flat[path] = (value + noise).astype(value.dtype)
    checkpoint.save_params(dst, traverse_util.unflatten_dict(flat, sep="/"))
    return dst


def write_synthetic_index(directory: str | os.PathLike, features, *, model_path: str | os.PathLike,
                          shard_size: int = 10_000, kind: str = "images", similarity: str = "dot") -> Path:
    """An embedding index (`blip_jax.embed`'s layout) of given feature rows, for search tests and
    benchmarks at sizes no tiny model is worth running for: rows "id" = their number."""
    import json

    import numpy as np

    from blip_jax import jobs
    from blip_jax.embed import IDS_FILE, INDEX_FILE

    directory = Path(directory)
    (directory / "shards" / kind).mkdir(parents=True, exist_ok=True)
    features = np.asarray(features, np.float32)
    shards = []
    for i, start in enumerate(range(0, len(features), shard_size)):
        part = features[start:start + shard_size]
        np.savez(directory / "shards" / kind / f"{i:05d}.npz", features=part, ok=np.ones(len(part), bool))
        shards.append({"file": f"shards/{kind}/{i:05d}.npz", "rows": len(part)})
    (directory / IDS_FILE).write_text("".join(json.dumps({"id": str(i)}) + "\n" for i in range(len(features))))
    (directory / INDEX_FILE).write_text(json.dumps({
        "kind": kind, "model": jobs.model_identity(model_path), "similarity": similarity, "count": len(features),
        "feature_shape": list(features.shape[1:]), "shards": shards}))
    return directory
