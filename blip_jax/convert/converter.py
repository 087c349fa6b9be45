"""Convert a transformers BLIP / BLIP-2 / InstructBLIP model directory into a blip-jax model directory.

Every parameter the blip-jax model expects is looked up in the source, reshaped to the Flax layout
and checked against the expected shape; missing keys, unexpected keys and shape mismatches are
gathered and reported together in one error, and nothing is written then.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import jax
import numpy as np
from flax import traverse_util

from blip_jax import atomic, checkpoint, paths
from blip_jax.convert import blip2_keys, blip_keys
from blip_jax.convert.blip2_keys import blip2_config_from_hf
from blip_jax.convert.hf_config import blip_config_from_hf, read_hf_config
from blip_jax.models.weights import expected_params, map_weights
from blip_jax.convert.reader import CheckpointReader
from blip_jax.models.blip import param_shapes
from blip_jax.models import tying
from blip_jax.models.layout import stack_layers
from blip_jax.text import QFORMER_TOKENIZER

# Files a model directory needs beside the weights: tokenizer and image preprocessing.
SIDE_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json",
              "added_tokens.json", "preprocessor_config.json", "processor_config.json", "generation_config.json")


def convert(src: str | Path, dst: str | Path, *, scan_layers: bool = False, param_dtype: str = "float32",
            frozen_dtype: str | None = None, overwrite: bool = False, progress: bool = True) -> dict:
    """Convert `src` (a transformers model directory) into `dst`. Returns a report dict.

    `param_dtype` stores every parameter; for BLIP-2 / InstructBLIP `frozen_dtype` (default:
    `param_dtype`) stores the frozen ViT and LLM instead, e.g. bfloat16 beside a float32 Q-Former."""
    src, dst = Path(src), paths.path(dst)  # DST may be a gs:// or s3:// URL
    start = time.time()
    hf = read_hf_config(src)
    reader = CheckpointReader(src)
    what = f"{src} does not match the model its config.json describes"
    if any(name in blip2_keys.ARCHITECTURES for name in hf.get("architectures") or []):
        config = blip2_config_from_hf(hf, scan_layers=scan_layers, param_dtype=param_dtype,
                                      frozen_param_dtype=frozen_dtype or param_dtype)
        params, ignored = blip2_keys.load_params(reader, config, progress=progress, what=what)
    else:
        if frozen_dtype not in (None, param_dtype):
            raise ValueError("frozen_dtype applies to BLIP-2 / InstructBLIP models; BLIP stores every parameter "
                             "in param_dtype")
        config = blip_config_from_hf(hf, scan_layers=scan_layers, param_dtype=param_dtype)
        flat, ignored = map_weights(reader, expected_params(param_shapes(config.replace(scan_layers=False))),
                                    blip_keys.hf_key, what=what, ignore=blip_keys.IGNORED, progress=progress)
        params = traverse_util.unflatten_dict(flat, sep="/")
        del flat
        if scan_layers:
            params = stack_layers(params)

    report = _report(src, config, params, ignored, scan_layers, param_dtype, frozen_dtype)
    report["hf_architectures"] = hf.get("architectures")

    def side_files(tmp: Path) -> list[str]:
        copied = []
        for name in SIDE_FILES:
            if (src / name).exists():
                shutil.copy2(src / name, tmp / name)
                copied.append(name)
        if (src / QFORMER_TOKENIZER).is_dir():  # InstructBLIP's second (BERT) tokenizer
            shutil.copytree(src / QFORMER_TOKENIZER, tmp / QFORMER_TOKENIZER)
            copied.append(QFORMER_TOKENIZER + "/")
        shutil.copy2(src / "config.json", tmp / "hf_config.json")
        return copied

    return _write(dst, params, config, report, side_files, start, overwrite=overwrite, progress=progress)


def _report(src: Path, config, params, ignored, scan_layers, param_dtype, frozen_dtype) -> dict:
    leaves = jax.tree.leaves(params)
    return {
        "source": str(src.absolute()),
        "model_type": config.to_dict()["model_type"],
        "architecture": config.architecture,
        "tensors": len(leaves),
        "parameters": int(sum(np.size(x) for x in leaves)),
        "ignored_keys": ignored,
        "scan_layers": scan_layers,
        "param_dtype": param_dtype,
        "frozen_dtype": frozen_dtype or param_dtype,
    }


def _write(dst: Path, params, config, report: dict, side_files, start: float, *, overwrite: bool,
           progress: bool) -> dict:
    """The model directory: parameters, config, the files `side_files(tmp)` adds, conversion.json."""
    with atomic.directory(dst, overwrite=overwrite) as tmp:
        checkpoint.save_params(tmp, params, progress=progress)
        checkpoint.write_config(tmp, config)
        report["files"] = side_files(tmp)
        report["seconds"] = round(time.time() - start, 2)
        (tmp / "conversion.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def convert_lavis(src: str | Path, dst: str | Path, model_type: str, *, tokenizer: str | Path,
                  heads: dict | None = None, vision: str | Path | None = None, llm: str | Path | None = None,
                  scan_layers: bool = False,
                  param_dtype: str = "float32", overwrite: bool = False, progress: bool = True) -> dict:
    """Convert a LAVIS `.pth` (`blip_jax.convert.lavis`) into `dst`; `tokenizer` is the BERT
    tokenizer directory (its vocab.txt: LAVIS's special tokens are added after it, as LAVIS adds
    them); `vision` the ViT's own file for a checkpoint without it (LAVIS's trimmed BLIP-2 files);
    `llm` the transformers directory of a BLIP-2 model's LLM (its config and tokenizer; its weights
    when the checkpoint is trimmed)."""
    from blip_jax.convert import lavis
    from blip_jax.images import ImageProcessor
    from blip_jax.text import BlipTokenizer

    src, dst = Path(src), paths.path(dst)  # DST may be a gs:// or s3:// URL
    start = time.time()
    arch, architecture = lavis.parse_model_type(model_type)
    if not (Path(tokenizer) / "vocab.txt").is_file():
        raise FileNotFoundError(f"--tokenizer {tokenizer}: no vocab.txt (a bert-base-uncased tokenizer directory)")
    state = lavis.load_state_dict(src)
    if vision is not None:
        state = lavis.with_vision(state, lavis.load_state_dict(vision), vision)
    if arch in lavis.BLIP2_CLASSES:
        return _convert_lavis_blip2(src, dst, model_type, state, Path(tokenizer), heads, architecture, start, arch, llm,
                                    scan_layers=scan_layers, param_dtype=param_dtype, overwrite=overwrite,
                                    progress=progress)
    tok = BlipTokenizer.from_vocab(Path(tokenizer) / "vocab.txt")
    config = lavis.blip_config(state, architecture, tok, heads).replace(param_dtype=param_dtype)
    unused = lavis.MOMENTUM_AND_QUEUES.pattern + "|" + blip_keys.IGNORED.pattern
    if architecture != "pretrain":  # the ITC temperature is a pre-training parameter here
        unused += r"|^temp$"
    if arch == "blip_feature_extractor":  # read from a pre-training checkpoint: its decoder is unused
        unused += r"|^text_decoder\."
    if architecture == "pretrain":  # the tied decoder: its shared tensors are the encoder's, stored once
        unused += r"|^text_decoder\.bert\."
    shapes = tying.stored_form(config, param_shapes(config))  # pre-training's tied decoder: stored once
    flat, ignored = map_weights(lavis.RenamedTensors(state), expected_params(shapes),
                                blip_keys.hf_key, what=f"{src} does not match LAVIS {model_type}",
                                ignore=re.compile(unused), progress=progress)
    params = traverse_util.unflatten_dict(flat, sep="/")
    # pre-training keeps its momentum encoders and queues, so the LAVIS run continues here
    extra = lavis.momentum_state(state, config) if architecture == "pretrain" else None
    if scan_layers:
        params = stack_layers(params)
        config = config.replace(scan_layers=True)
        if extra is not None:
            extra["momentum"] = stack_layers(extra["momentum"])
    report = _report(src, config, params, ignored, scan_layers, param_dtype, None)
    report["lavis_model_type"] = model_type
    report["kept_train_state"] = extra is not None

    def side_files(tmp: Path) -> list[str]:
        if extra is not None:
            checkpoint.save_params(tmp / checkpoint.TRAIN_EXTRA, extra)
        tok.save(tmp)
        size = config.vision.image_size
        ImageProcessor(size={"height": size, "width": size}).save(tmp)
        return ["tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"] + (
            [checkpoint.TRAIN_EXTRA + "/"] if extra is not None else [])

    return _write(dst, params, config, report, side_files, start, overwrite=overwrite, progress=progress)


def _convert_lavis_blip2(src: Path, dst: Path, model_type: str, state: dict, tokenizer: Path, heads, architecture: str,
                         start: float, arch: str, llm_dir, *, scan_layers: bool, param_dtype: str, overwrite: bool,
                         progress: bool) -> dict:
    """A LAVIS BLIP-2 checkpoint: ViT, ln_vision, Q-Former and its heads (stage 1), or the Q-Former,
    projection and LLM (stage 2: the LLM's config and tokenizer from `llm_dir`, its weights from the
    checkpoint or, trimmed, from `llm_dir`)."""
    from blip_jax.convert import lavis
    from blip_jax.images import ImageProcessor
    from blip_jax.models.llm import FAMILIES
    from blip_jax.text import BlipTokenizer

    llm_prefix, proj_prefix, family = lavis.LLM_PARTS.get(arch, ("", "", ""))
    llm_config, llm_reader = None, None
    if family:
        if llm_dir is None:
            raise ValueError(f"--lavis {model_type} needs --llm DIR: the transformers directory of its language model")
        import dataclasses

        import transformers

        llm_dir = Path(llm_dir)
        llm_tok = lavis.lavis_llm_tokenizer(arch, transformers.AutoTokenizer.from_pretrained(str(llm_dir), use_fast=True))
        generation = lavis.generation_config(arch, llm_tok)
        # LAVIS's decoding facts are the model's: e.g. Blip2OPT's texts end at "\n"
        llm_config = dataclasses.replace(FAMILIES[family].config.from_hf(read_hf_config(llm_dir)),
                                         **{k: v for k, v in generation.items() if k == "eos_token_id"},
                                         **lavis.LLM_OVERRIDES.get(arch, {}))
        if lavis.llm_is_trimmed(state, llm_prefix):  # the LLM's own weights, from its directory
            llm_reader = CheckpointReader(llm_dir)
        if arch in lavis.LLM_SPECIAL_TOKENS:  # LAVIS resizes the LLM to its tokenizer (Vicuna's [PAD])
            llm_config = dataclasses.replace(llm_config, vocab_size=len(llm_tok))
    instruct = arch in lavis.INSTRUCT_CLASSES
    config = lavis.blip2_config(state, architecture, heads, family, llm_config, instruct).replace(
        param_dtype=param_dtype, frozen_param_dtype=param_dtype, scan_layers=scan_layers)
    # the Q-Former's tokenizer: bert-base-uncased plus [DEC] (its bos), as LAVIS's Blip2Base adds it;
    # InstructBLIP's cuts instructions from the left
    tok = BlipTokenizer.from_vocab(tokenizer / "vocab.txt", extra_special_tokens=[],
                                   truncation_side=lavis.INSTRUCTION_TRUNCATION_SIDE if instruct else "right")
    if config.has_qformer_text and len(tok) != config.qformer_vocab_size:
        raise ValueError(f"the checkpoint's Q-Former vocabulary has {config.qformer_vocab_size} tokens, the tokenizer "
                         f"{len(tok)} (LAVIS's is bert-base-uncased plus [DEC]): give its --tokenizer")
    tensors = lavis.Blip2Tensors(state, llm_prefix, proj_prefix, llm_reader, lavis.LLM_WEIGHT_DTYPES.get(arch),
                                 instruct=instruct,
                                 llm_vocab_size=llm_config.vocab_size if arch in lavis.LLM_SPECIAL_TOKENS else None)
    params, ignored = blip2_keys.load_params(tensors, config, progress=progress,
                                             what=f"{src} does not match LAVIS {model_type}")
    report = _report(src, config, params, ignored, scan_layers, param_dtype, None)
    report["lavis_model_type"] = model_type
    added = tensors.added_rows()
    if added:
        report["llm_rows_added"] = added  # mean rows for LAVIS's added tokens

    def side_files(tmp: Path) -> list[str]:
        size = config.vision.image_size
        ImageProcessor(size={"height": size, "width": size}).save(tmp)
        if not family:
            tok.save(tmp)
            return ["tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"]
        llm_tok.save_pretrained(str(tmp))  # the LLM's tokenizer (fast), and the decoding facts for transformers
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        files = ["tokenizer.json", "preprocessor_config.json", "generation_config.json"]
        if instruct:
            tok.save(tmp / QFORMER_TOKENIZER)
            files.append(QFORMER_TOKENIZER + "/")
        return files

    return _write(dst, params, config, report, side_files, start, overwrite=overwrite, progress=progress)
