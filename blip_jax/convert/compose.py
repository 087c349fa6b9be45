"""A new LLM for stage 2: a stage-1 model (its ViT, ln_vision, queries and Q-Former) put in front
of any language model transformers has in a family blip-jax runs (OPT, Flan-T5, and the LLaMA
architecture: LLaMA, Vicuna, Mistral, Qwen2), with a fresh projection between them.

    blip-jax convert STAGE1_MODEL DST --llm LLM_DIR [--instruct]

The Q-Former keeps everything stage 1 trained, its text embeddings and text FFN included, so the
result (and what stage 2 makes of it) can go on to instruction tuning (LAVIS#344: LAVIS's stage 2
drops them, and a Q-Former without them cannot take instructions); `--instruct` makes it an
InstructBLIP model at once, its Q-Former tokenizer written beside it. The projection
is initialised as transformers initialises Blip2's (normal, std 0.02; zero bias); stage 2
(`model.init_from=DST`) trains it with the Q-Former.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import jax
import numpy as np
from flax import traverse_util

from blip_jax import checkpoint, paths
from blip_jax.convert.blip2_keys import LLM_TYPES
from blip_jax.convert.hf_config import read_hf_config
from blip_jax.convert.reader import CheckpointReader
from blip_jax.models import blip2
from blip_jax.models.blip2 import Blip2Config
from blip_jax.text import QFORMER_TOKENIZER

# what of a stage-1 model goes on to stage 2 (the rest, ITC / ITM / ITG heads, stays behind)
KEPT = ("vision/", "ln_vision/", "query_tokens", "qformer/", "qformer_word/", "qformer_position/")
LLM_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
             "vocab.json", "merges.txt", "spiece.model", "tokenizer.model", "generation_config.json")
PROJECTION_STD = 0.02  # transformers' Blip2 initializer_range


def compose(stage1: str | Path, llm_dir: str | Path, dst: str | Path, *, instruct: bool = False, seed: int = 0,
            overwrite: bool = False, progress: bool = True) -> dict:
    """Write a BLIP-2 generation model at `dst` from the stage-1 model directory `stage1` and the
    transformers language model directory `llm_dir`; returns the conversion report."""
    from blip_jax.convert.converter import _write
    from blip_jax.models.llm import FAMILIES

    start = time.time()
    stage1, llm_dir, dst = checkpoint.model_dir(stage1), Path(llm_dir), paths.path(dst)
    base, params = checkpoint.load(stage1)
    if not isinstance(base, Blip2Config) or base.architecture != "retrieval":
        raise ValueError(f"{stage1} is not a BLIP-2 stage-1 model (a Q-Former with ITC / ITM heads): it is a "
                         f"{getattr(base, 'architecture', type(base).__name__)} model")
    hf = read_hf_config(llm_dir)
    kind = hf.get("model_type")
    if kind not in LLM_TYPES:
        raise ValueError(f"{llm_dir}: model_type {kind!r} is not a language model blip-jax runs; supported: "
                         f"{', '.join(sorted(LLM_TYPES))}")
    family = FAMILIES[LLM_TYPES[kind]]
    llm = family.config.from_hf(hf)
    config = Blip2Config(
        architecture="generation", instruct=instruct, vision=base.vision,
        qformer=dataclasses.replace(base.qformer, use_qformer_text_input=True),
        llm_family=family.name, llm=llm, num_query_tokens=base.num_query_tokens, embed_dim=base.embed_dim,
        qformer_vocab_size=base.qformer_vocab_size, qformer_max_positions=base.qformer_max_positions,
        ln_vision_eps=base.ln_vision_eps, scan_layers=base.scan_layers, param_dtype=base.param_dtype,
        frozen_param_dtype=base.frozen_param_dtype)
    kept = KEPT
    flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep="/").items() if k.startswith(kept)}
    reader = CheckpointReader(llm_dir)
    dtype = np.dtype(jax.numpy.dtype(config.frozen_param_dtype))
    lm = family.load_params(reader, llm, scan_layers=config.scan_layers, prefix="", dtype=dtype)
    flat.update({f"language_model/{k}": v for k, v in traverse_util.flatten_dict(lm, sep="/").items()})
    width = family.embed_dim(llm)
    rng = np.random.default_rng(seed)
    flat["language_projection/kernel"] = (rng.standard_normal((base.qformer.hidden_size, width)) *
                                          PROJECTION_STD).astype(np.float32)
    flat["language_projection/bias"] = np.zeros((width,), np.float32)
    expected = traverse_util.flatten_dict(blip2.param_shapes(config), sep="/")
    wrong = sorted(k for k in expected if k not in flat or tuple(flat[k].shape) != tuple(expected[k].shape))
    if wrong or set(flat) - set(expected):
        raise ValueError(f"{stage1} + {llm_dir} do not make a BLIP-2 model: missing or misshapen {wrong[:5]}, "
                         f"unexpected {sorted(set(flat) - set(expected))[:5]}")
    report = {"source": {"stage1": str(stage1), "llm": str(llm_dir)}, "llm_model_type": kind,
              "llm_family": family.name, "instruct": instruct, "parameters": int(sum(v.size for v in flat.values())),
              "initialised": ["language_projection"], "left_behind": sorted({k.split("/")[0] for k in
                                                                              traverse_util.flatten_dict(params, sep="/")
                                                                              if not k.startswith(kept)})}

    def side_files(tmp: Path) -> list[str]:
        import shutil

        files = [name for name in LLM_FILES if (llm_dir / name).is_file()]
        for name in files:
            shutil.copy2(llm_dir / name, tmp / name)
        shutil.copy2(stage1 / "preprocessor_config.json", tmp / "preprocessor_config.json")
        files.append("preprocessor_config.json")
        if (stage1 / "tokenizer.json").is_file():  # the Q-Former's BERT tokenizer, where InstructBLIP keeps it
            (tmp / QFORMER_TOKENIZER).mkdir()
            for name in ("tokenizer.json", "tokenizer_config.json"):
                if (stage1 / name).is_file():
                    shutil.copy2(stage1 / name, tmp / QFORMER_TOKENIZER / name)
            files.append(QFORMER_TOKENIZER + "/")
        return files

    return _write(dst, traverse_util.unflatten_dict(flat, sep="/"), config, report, side_files, start,
                  overwrite=overwrite, progress=progress)
