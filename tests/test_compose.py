"""Stage 2 onto a new LLM: `blip-jax convert STAGE1 DST --llm LLM` (blip_jax/convert/compose.py) with
tiny transformers LLaMA, Mistral and Qwen2 causal LMs, then `blip-jax train` from the result. The
composed model's LLM equals its transformers class inside the BLIP-2 model (logits after a soft
prompt within 1e-4), its Q-Former is stage 1's, and a tiny stage 2 trains with a falling loss."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flax import traverse_util

ROOT = Path(__file__).resolve().parents[1]
LLMS = ("llama", "mistral", "qwen2")


def _cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "blip_jax.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def _write_llm(directory: Path, kind: str):
    import torch
    import transformers

    from blip_jax.testing import _llm_tokenizer

    tok = _llm_tokenizer("llama")
    ids = dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
               bos_token_id=tok.bos_token_id)
    common = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, **ids)
    config, model = {"llama": (transformers.LlamaConfig(**common), transformers.LlamaForCausalLM),
                     "mistral": (transformers.MistralConfig(sliding_window=6, **common), transformers.MistralForCausalLM),
                     "qwen2": (transformers.Qwen2Config(tie_word_embeddings=True, use_sliding_window=False, **common),
                               transformers.Qwen2ForCausalLM)}[kind]
    torch.manual_seed(1)
    hf = model(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf.save_pretrained(directory)
    tok.save_pretrained(directory)
    return hf


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    from blip_jax.convert import convert
    from blip_jax.testing import write_tiny_blip2_checkpoint

    root = tmp_path_factory.mktemp("compose")
    stage1 = root / "stage1"
    convert(write_tiny_blip2_checkpoint(root / "hf_stage1", "retrieval"), stage1, progress=False)
    llms = {kind: (root / kind, _write_llm(root / kind, kind)) for kind in LLMS}
    return root, stage1, llms


@pytest.fixture(scope="module")
def composed(parts):
    root, stage1, llms = parts
    out = {}
    for kind in LLMS:
        done = _cli("convert", str(stage1), str(root / f"blip2_{kind}"), "--llm", str(llms[kind][0]))
        assert done.returncode == 0, done.stderr[-3000:]
        out[kind] = root / f"blip2_{kind}"
    return out


@pytest.mark.parametrize("kind", LLMS)
def test_the_llm_inside_equals_its_transformers_class(parts, composed, kind):
    import jax.numpy as jnp
    import torch

    from blip_jax import checkpoint
    from blip_jax.models.blip2 import Blip2

    _, stage1, llms = parts
    hf = llms[kind][1]
    config, params = checkpoint.load(composed[kind])
    assert config.llm.model_type == kind and config.llm_family == "llama"
    _, s1 = checkpoint.load(stage1)
    ours, theirs = (traverse_util.flatten_dict(t, sep="/") for t in (params, s1))
    for path, value in theirs.items():  # the Q-Former, queries, ln_vision and ViT are stage 1's
        if path.startswith(("qformer/", "vision/", "ln_vision/", "query_tokens")):
            np.testing.assert_array_equal(np.asarray(ours[path]), np.asarray(value), err_msg=path)
    rng = np.random.default_rng(0)
    prefix = rng.standard_normal((2, 4, config.llm.hidden_size)).astype(np.float32)
    ids = np.array([[1, 5, 9, 11, 4], [1, 7, 8, 3, 6]], np.int32)
    logits = Blip2(config).apply({"params": params}, jnp.asarray(prefix), jnp.asarray(ids), jnp.ones_like(ids),
                                 method=Blip2.language_model_logits)
    with torch.no_grad():
        embeds = torch.cat([torch.from_numpy(prefix), hf.get_input_embeddings()(torch.from_numpy(ids).long())], 1)
        expected = hf(inputs_embeds=embeds).logits.numpy()
    np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", LLMS)
def test_a_tiny_stage2_onto_each_trains(composed, kind, tmp_path):
    import blip_jax
    from blip_jax.testing import sample_images

    workdir = tmp_path / "run"
    done = _cli("train", "--config=configs/blip2_stage2_llm.py:tiny", f"--workdir={workdir}",
                f"--config.model.init_from={composed[kind]}", "--config.total_steps=30",
                "--config.optim.decay_steps=30", "--config.report=False")
    assert done.returncode == 0, done.stderr[-3000:]
    losses = [json.loads(line)["loss"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0], losses
    model = blip_jax.load(workdir)
    assert len(model.caption(sample_images(2, size=32), max_new_tokens=3)) == 2


def test_instruct_ready(parts, tmp_path):
    """`--instruct` keeps the Q-Former's text embeddings and tokenizer: instruction tuning runs on it."""
    root, stage1, llms = parts
    dst = tmp_path / "instruct"
    done = _cli("convert", str(stage1), str(dst), "--llm", str(llms["qwen2"][0]), "--instruct")
    assert done.returncode == 0, done.stderr[-3000:]
    workdir = tmp_path / "run"
    done = _cli("train", "--config=configs/instructblip_vicuna.py:tiny", f"--workdir={workdir}",
                f"--config.model.init_from={dst}", "--config.total_steps=10", "--config.report=False")
    assert done.returncode == 0, done.stderr[-3000:]


def test_bad_parts_are_one_line(parts, tmp_path):
    root, stage1, llms = parts
    opt_like = tmp_path / "gpt2"
    opt_like.mkdir()
    (opt_like / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    done = _cli("convert", str(stage1), str(tmp_path / "x"), "--llm", str(opt_like))
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "model_type 'gpt2' is not a language model blip-jax runs" in done.stderr
    done = _cli("convert", str(root / "blip2_llama"), str(tmp_path / "y"), "--llm", str(llms["llama"][0]))
    assert done.returncode != 0 and "is not a BLIP-2 stage-1 model" in done.stderr
    done = _cli("convert", str(stage1), str(tmp_path / "z"))
    assert done.returncode != 0 and "give --llm DIR" in done.stderr
