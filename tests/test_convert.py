"""Conversion: parity with transformers for every BLIP class and layout, formats, and bad checkpoints."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from blip_jax import checkpoint
from blip_jax.convert import ConversionError, convert
from blip_jax.convert.verify import compare
from blip_jax.models.layout import stack_layers, unstack_layers

TOL = 1e-4


@pytest.mark.parametrize("architecture", ["caption", "retrieval", "vqa"])
@pytest.mark.parametrize("scan_layers", [False, True])
def test_outputs_match_transformers(hf_checkpoint, converted, architecture, scan_layers):
    diffs = compare(hf_checkpoint(architecture), converted(architecture, scan_layers))
    expected = {"caption": 2, "retrieval": 4, "vqa": 3}[architecture]
    assert len(diffs) == expected, diffs
    assert all(d < TOL for d in diffs.values()), diffs


def test_scan_and_unrolled_layouts_hold_the_same_weights(converted):
    _, unrolled = checkpoint.load(converted("vqa", False))
    _, scanned = checkpoint.load(converted("vqa", True))
    restacked = stack_layers(jax_to_numpy(unrolled))
    flat_a = flatten(restacked)
    flat_b = flatten(jax_to_numpy(scanned))
    assert flat_a.keys() == flat_b.keys()
    for k in flat_a:
        np.testing.assert_array_equal(flat_a[k], flat_b[k])
    back = flatten(unstack_layers(jax_to_numpy(scanned)))
    assert back.keys() == flatten(jax_to_numpy(unrolled)).keys()


@pytest.mark.parametrize("weights_format", ["sharded", "bin"])
def test_other_weight_formats(hf_checkpoint, tmp_path, weights_format):
    src = hf_checkpoint("caption", weights_format)
    report = convert(src, tmp_path / "out", progress=False)
    assert report["tensors"] > 0
    assert all(d < TOL for d in compare(src, tmp_path / "out").values())


def test_bfloat16_parameters(hf_checkpoint, tmp_path):
    convert(hf_checkpoint("caption"), tmp_path / "bf16", param_dtype="bfloat16", progress=False)
    config, params = checkpoint.load(tmp_path / "bf16")
    assert config.param_dtype == "bfloat16"
    assert {str(x.dtype) for x in flatten(params).values()} == {"bfloat16"}
    # Weights rounded to bf16 then computed in fp32: close to the fp32 model, not equal.
    diffs = compare(hf_checkpoint("caption"), tmp_path / "bf16")
    assert 0 < max(diffs.values()) < 0.1, diffs


def test_side_files_are_copied(converted):
    dst = converted("caption")
    for name in ("tokenizer.json", "vocab.txt", "preprocessor_config.json", "config.json", "hf_config.json"):
        assert (dst / name).exists(), name
    report = json.loads((dst / "conversion.json").read_text())
    assert report["architecture"] == "caption"


# ---------------------------------------------------------------- bad checkpoints
def _copy(src, tmp_path):
    bad = tmp_path / "bad_src"
    shutil.copytree(src, bad)
    return bad


def _rewrite_weights(directory, edit):
    tensors = load_file(directory / "model.safetensors")
    edit(tensors)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})


def test_missing_key_is_reported_and_nothing_written(hf_checkpoint, tmp_path):
    src = _copy(hf_checkpoint("retrieval"), tmp_path)
    _rewrite_weights(src, lambda t: t.pop("itm_head.weight"))
    with pytest.raises(ConversionError, match=r"missing keys \(1\):\n\s+itm_head.weight"):
        convert(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no partial leftovers


def test_wrong_shape_and_unexpected_key_are_reported_together(hf_checkpoint, tmp_path):
    src = _copy(hf_checkpoint("caption"), tmp_path)

    def edit(t):
        t["vision_model.post_layernorm.weight"] = np.ones(7, np.float32)
        t["text_decoder.bert.surprise.weight"] = np.ones(3, np.float32)

    _rewrite_weights(src, edit)
    with pytest.raises(ConversionError) as info:
        convert(src, tmp_path / "out", progress=False)
    message = str(info.value)
    assert "unexpected keys (1)" in message and "text_decoder.bert.surprise.weight" in message
    assert "shape mismatches (1)" in message and "vision_model.post_layernorm.weight: checkpoint (7,)" in message
    assert not (tmp_path / "out").exists()


def test_unknown_architecture(hf_checkpoint, tmp_path):
    src = _copy(hf_checkpoint("caption"), tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    cfg["architectures"] = ["BlipForSomethingElse"]
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported architecture.*BlipForConditionalGeneration"):
        convert(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_no_weights_and_existing_destination(hf_checkpoint, tmp_path):
    src = _copy(hf_checkpoint("caption"), tmp_path)
    (src / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weights"):
        convert(src, tmp_path / "out", progress=False)
    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError):
        convert(hf_checkpoint("caption"), tmp_path / "exists", progress=False)


def test_failure_while_writing_leaves_no_destination(hf_checkpoint, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(checkpoint, "write_config", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        convert(hf_checkpoint("caption"), tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_default_text_heads_follow_transformers(tmp_path):
    """A config.json without num_attention_heads means transformers' default of 8, not 12."""
    from blip_jax.convert.hf_config import blip_config_from_hf

    cfg = blip_config_from_hf({"architectures": ["BlipForConditionalGeneration"], "text_config": {}})
    assert cfg.text.num_heads == 8 and cfg.vision.num_heads == 12 and cfg.vision.layer_norm_eps == 1e-5


# ---------------------------------------------------------------- helpers
def jax_to_numpy(tree):
    import jax

    return jax.tree.map(np.asarray, tree)


def flatten(tree):
    from flax import traverse_util

    return traverse_util.flatten_dict(tree, sep="/")


def test_layout_can_be_switched_on_load(converted):
    config, switched = checkpoint.load(converted("caption", False), scan_layers=True)
    assert config.scan_layers
    _, scanned = checkpoint.load(converted("caption", True))
    a, b = flatten(jax_to_numpy(switched)), flatten(jax_to_numpy(scanned))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _status_mb(field: str) -> float:
    return int([line for line in open("/proc/self/status") if line.startswith(field)][0].split()[1]) / 1024


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
def test_release_hands_back_mapped_pages_and_nothing_else(tmp_path):
    import torch

    from blip_jax.convert.reader import release, torch_load

    values = torch.randn(64, 1 << 14, generator=torch.Generator().manual_seed(0))  # 4 MB
    torch.save({"w": values}, tmp_path / "model.pth")
    mapped = torch_load(tmp_path / "model.pth")["w"]
    before = _status_mb("RssFile")
    total = float(mapped.sum())  # reads every page of the map
    assert _status_mb("RssFile") - before > 3
    release(mapped)
    assert _status_mb("RssFile") - before < 1
    assert float(mapped.sum()) == total and torch.equal(mapped, values)  # read back from the file
    heap = np.arange(1 << 20, dtype=np.float32)  # not a map of a checkpoint: left alone
    release(heap)
    release(torch.from_numpy(heap))
    assert np.array_equal(heap, np.arange(1 << 20, dtype=np.float32))


def test_parts_never_exceed_the_part_size(tmp_path):
    params = {f"w{i}": np.full((256, 256), i, np.float32) for i in range(7)}  # 256 KB each
    checkpoint.save_params(tmp_path, dict(params), part_bytes=600 << 10)
    parts = json.loads((tmp_path / "params" / "parts.json").read_text())["parts"]
    assert [len(p) for p in parts] == [2, 2, 2, 1]
    restored = checkpoint.restore_params(tmp_path)
    assert all(np.array_equal(restored[k], v) for k, v in params.items())
