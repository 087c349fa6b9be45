"""LoRA (`configs/blip2_lora.py`, `blip_jax.models.lora`) through `blip-jax train` and
`blip_jax.load(base, adapter=W)`: on tiny transformers BLIP-2 OPT and InstructBLIP Vicuna bases
converted here, the loss falls, only the adapter trains and has optimizer state, and the merged
model equals the base with the adapter applied on every output."""

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


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    from blip_jax.convert import convert
    from blip_jax.testing import write_tiny_blip2_checkpoint

    root = tmp_path_factory.mktemp("lora_bases")
    out = {}
    for kind, seed in (("opt", 0), ("instruct_llama", 0), ("other_opt", 1)):
        hf = write_tiny_blip2_checkpoint(root / f"hf_{kind}", kind.removeprefix("other_"), seed=seed)
        convert(hf, root / kind, progress=False)
        out[kind] = root / kind
    return out


def _train(preset: str, workdir: Path, base: Path, *flags: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "blip_jax.cli", "train", f"--config=configs/blip2_lora.py:{preset}",
           f"--workdir={workdir}", f"--config.model.init_from={base}", "--config.report=False", *flags]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})


@pytest.fixture(scope="module")
def runs(bases, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_runs")
    out = {}
    for preset, base in (("tiny", "opt"), ("tiny_vicuna", "instruct_llama")):
        done = _train(preset, root / preset, bases[base])
        assert done.returncode == 0, done.stderr[-3000:]
        out[preset] = root / preset
    return out


def _losses(workdir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _size(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


@pytest.mark.parametrize("preset", ["tiny", "tiny_vicuna"])
def test_loss_falls_and_the_adapter_is_small(runs, preset, record_property):
    workdir = runs[preset]
    losses = _losses(workdir)
    assert losses[-1] < losses[0], losses
    adapter, model = _size(workdir / "adapter"), _size(workdir / "model")
    record_property("adapter_bytes", adapter)
    print(f"{preset}: adapter {adapter} bytes, merged model {model} bytes")
    assert adapter < model / 3


def test_only_the_adapter_trains_and_has_optimizer_state(bases):
    """The train state the run builds: trainable = A and B of each targeted kernel; Adam's moments
    mirror exactly those; the base kernels and the scales are frozen."""
    import jax

    from blip_jax.config_files import load_config
    from blip_jax.train import optim, sharding
    from blip_jax.train import state as state_lib

    cfg = load_config(ROOT / "configs" / "blip2_lora.py", "tiny")
    cfg.model.init_from = str(bases["opt"])
    mesh = sharding.make_mesh(cfg.mesh.to_dict())
    st = state_lib.abstract(cfg, mesh, optim.make_optimizer(cfg.optim), {})
    trainable = set(traverse_util.flatten_dict(st.train["params"], sep="/"))
    assert trainable and all(p.endswith(("/lora_a", "/lora_b")) for p in trainable)
    modules = {p.rsplit("/", 1)[0] for p in trainable}
    assert modules and all(m.startswith("language_model/") and m.endswith(("q_proj", "v_proj")) for m in modules)
    frozen = traverse_util.flatten_dict(st.frozen, sep="/")
    assert all(f"{m}/kernel" in frozen and f"{m}/lora_scale" in frozen for m in modules)
    moments = {"/".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))
               for path, leaf in jax.tree_util.tree_flatten_with_path(st.train["opt_state"])[0] if leaf.ndim}
    assert moments == trainable


def test_merged_model_equals_base_plus_adapter(runs, bases):
    """W/model == the base kernels + scale · A B (checked here in numpy); `blip_jax.load(base,
    adapter=W)` gives the same parameters and captions; the adapter applied live (the trainer's
    form, a separate fp32 product) gives the merged model's logits within 1e-5."""
    import jax
    import jax.numpy as jnp

    import blip_jax
    from blip_jax import checkpoint
    from blip_jax.models.blip2 import Blip2
    from blip_jax.testing import sample_images

    workdir = runs["tiny"]
    _, base = checkpoint.load(bases["opt"])
    _, merged = checkpoint.load(workdir / "model")
    adapter = traverse_util.flatten_dict(checkpoint.restore_params(workdir / "adapter"), sep="/")
    flat_base, flat_merged = (traverse_util.flatten_dict(t, sep="/") for t in (base, merged))
    adapted = {p.rsplit("/", 1)[0] for p in adapter if p.endswith("/lora_a")}
    assert adapted
    for path, value in flat_merged.items():
        module = path.rsplit("/", 1)[0]
        expected = np.asarray(flat_base[path])
        if path.endswith("/kernel") and module in adapted:
            a, b = np.asarray(adapter[f"{module}/lora_a"]), np.asarray(adapter[f"{module}/lora_b"])
            expected = expected + float(adapter[f"{module}/lora_scale"]) * (a @ b.reshape(b.shape[0], -1)).reshape(
                expected.shape)
            assert np.abs(expected - np.asarray(flat_base[path])).max() > 0  # the adapter learned something
        np.testing.assert_allclose(np.asarray(value), expected, rtol=0, atol=1e-6, err_msg=path)

    images = sample_images(3, size=32, seed=2)
    loaded = blip_jax.load(bases["opt"], adapter=workdir)
    model = blip_jax.load(workdir / "model")
    for path, value in traverse_util.flatten_dict(loaded.params, sep="/").items():
        np.testing.assert_array_equal(np.asarray(value), np.asarray(flat_merged[path]), err_msg=path)
    assert loaded.caption(images, max_new_tokens=5) == model.caption(images, max_new_tokens=5)

    config = model.config
    live = traverse_util.unflatten_dict({**flat_base, **adapter}, sep="/")
    pixels = jnp.asarray(model.preprocess(images))
    ids = jnp.asarray([[2, 5, 7, 9]] * 3, jnp.int32)

    def logits(params):
        m = Blip2(config)
        image = m.apply({"params": params}, pixels, method=Blip2.encode_image)
        prefix = m.apply({"params": params}, image, method=Blip2.language_prefix)
        return m.apply({"params": params}, prefix, ids, jnp.ones_like(ids), method=Blip2.language_model_logits)

    np.testing.assert_allclose(np.asarray(jax.jit(logits)(live)), np.asarray(jax.jit(logits)(merged)), atol=1e-5)


def test_adapter_dropout_acts_in_training_only():
    """With `lora.dropout`, x is dropped before A when the apply has a "dropout" rng (training);
    without one (evaluation, generation, the merged model) the output is the plain adapter's."""
    import jax
    import jax.numpy as jnp

    from blip_jax.models import layers, lora

    dense = layers.Dense(6, ("embed", "mlp"))
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 5))
    params = dense.init(jax.random.PRNGKey(1), x)["params"]
    adapter = lora.init(jax.random.PRNGKey(2), {"dense/kernel": (5, 6)}, {"dense/kernel": (0, 1)},
                        lora.LoraConfig(targets=("kernel",), dropout=0.5))
    adapter = {k.removeprefix("dense/"): v for k, v in adapter.items()}
    adapter["lora_b"] = jnp.ones_like(adapter["lora_b"])
    with_dropout = {**params, **adapter}
    no_dropout = {k: v for k, v in with_dropout.items() if k != "lora_dropout"}
    run = lambda p, **kw: np.asarray(dense.apply({"params": p}, x, **kw))  # noqa: E731
    np.testing.assert_array_equal(run(with_dropout), run(no_dropout))  # no rng: no dropout
    trained = run(with_dropout, rngs={"dropout": jax.random.PRNGKey(3)})
    assert np.abs(trained - run(no_dropout)).max() > 1e-3
    assert not np.array_equal(trained, run(with_dropout, rngs={"dropout": jax.random.PRNGKey(4)}))
    assert run(no_dropout, rngs={"dropout": jax.random.PRNGKey(3)}).tolist() == run(no_dropout).tolist()
    assert "lora_dropout" not in traverse_util.flatten_dict(lora.merged(with_dropout), sep="/")


def test_bad_input_is_one_line(runs, bases, tmp_path):
    """A target regex that matches nothing; an adapter onto another base."""
    import blip_jax

    done = _train("tiny", tmp_path / "typo", bases["opt"], "--config.lora.targets=('^language_model/.*/qproj/',)")
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "lora.targets: '^language_model/.*/qproj/' matches no kernel of this model" in done.stderr
    with pytest.raises(ValueError, match="was trained on another base"):
        blip_jax.load(bases["other_opt"], adapter=runs["tiny"])


def test_export_merge_lora(runs, bases, tmp_path):
    """`blip-jax export BASE OUT --merge-lora W --to blip-jax` writes W/model's parameters; with
    --to transformers the merged model goes on to transformers."""
    from blip_jax import checkpoint

    out = tmp_path / "merged"
    cmd = [sys.executable, "-m", "blip_jax.cli", "export", str(bases["opt"]), str(out), "--to", "blip-jax",
           "--merge-lora", str(runs["tiny"])]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ours = traverse_util.flatten_dict(checkpoint.load(out)[1], sep="/")
    trained = traverse_util.flatten_dict(checkpoint.load(runs["tiny"] / "model")[1], sep="/")
    assert ours.keys() == trained.keys()
    for path in ours:
        np.testing.assert_array_equal(np.asarray(ours[path]), np.asarray(trained[path]), err_msg=path)
    hf = tmp_path / "hf"
    done = subprocess.run(cmd[:5] + [str(hf), "--to", "transformers", "--merge-lora", str(runs["tiny"])],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (hf / "config.json").is_file()
