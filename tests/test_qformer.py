"""The Q-Former against transformers' Blip2QFormerModel (tiny random weights)."""

import jax
import numpy as np
import pytest
import torch
from flax import linen as nn

from blip_jax.models.weights import ConversionError
from blip_jax.models.qformer import (QFormer, QFormerConfig, load_qformer_params,
                                     param_shapes)


def hf_qformer(freq, text=False, seed=0):
    from transformers import Blip2QFormerConfig, Blip2QFormerModel

    hf_cfg = Blip2QFormerConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
                                encoder_hidden_size=48, cross_attention_frequency=freq, vocab_size=100,
                                use_qformer_text_input=text)
    torch.manual_seed(seed)
    model = Blip2QFormerModel(hf_cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    tensors = {"qformer." + k: v.numpy() for k, v in model.state_dict().items()}
    return model, QFormerConfig.from_hf(hf_cfg.to_dict()), tensors


def inputs(seed=0, text=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((2, 8, 32)).astype(np.float32)
    e = rng.standard_normal((2, 10, 48)).astype(np.float32)
    t = rng.standard_normal((2, text, 32)).astype(np.float32) if text else None
    return q, e, t


@pytest.mark.parametrize("freq", [1, 2])
@pytest.mark.parametrize("scan", [False, True])
def test_query_path_matches_transformers(freq, scan):
    model, cfg, tensors = hf_qformer(freq)
    q, e, _ = inputs()
    emask = np.ones((2, 10), np.int64)
    emask[1, 7:] = 0
    with torch.no_grad():
        want = model(query_embeds=torch.from_numpy(q), encoder_hidden_states=torch.from_numpy(e),
                     encoder_attention_mask=torch.from_numpy(emask)).last_hidden_state.numpy()
        want_nomask = model(query_embeds=torch.from_numpy(q),
                            encoder_hidden_states=torch.from_numpy(e)).last_hidden_state.numpy()
    params = load_qformer_params(tensors, cfg, scan_layers=scan)
    jax_model = QFormer(cfg, scan_layers=scan)
    got, aux = jax_model.apply({"params": params}, q, e, encoder_mask=emask)
    got_nomask, _ = jax_model.apply({"params": params}, q, e)
    assert got.shape == (2, 8, 32) and aux == {}
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(got_nomask), want_nomask, atol=1e-4, rtol=0)


@pytest.mark.parametrize("freq", [1, 2])
def test_query_text_path_matches_transformers(freq):
    model, cfg, tensors = hf_qformer(freq, text=True, seed=1)
    q, e, t = inputs(seed=1, text=5)
    tmask = np.ones((2, 5), np.int64)
    tmask[0, 3:] = 0
    full = np.concatenate([np.ones((2, 8), np.int64), tmask], axis=1)
    with torch.no_grad():
        want = model(query_embeds=torch.from_numpy(np.concatenate([q, t], 1)), query_length=8,
                     attention_mask=torch.from_numpy(full),
                     encoder_hidden_states=torch.from_numpy(e)).last_hidden_state.numpy()
    params = load_qformer_params(tensors, cfg)
    got, _ = QFormer(cfg).apply({"params": params}, q, e, text_embeds=t, text_mask=tmask)
    assert got.shape == (2, 13, 32)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)


def test_params_have_logical_axes_and_scan_groups():
    cfg = QFormerConfig(hidden_size=32, intermediate_size=64, num_layers=4, num_heads=4, encoder_hidden_size=48,
                        cross_attention_frequency=2)
    q, e, _ = inputs()
    boxed = jax.eval_shape(lambda: QFormer(cfg).init(jax.random.PRNGKey(0), q, e))["params"]
    leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
    shapes = param_shapes(cfg)
    assert "cross_attn" in shapes["encoder"]["layers_0"] and "cross_attn" not in shapes["encoder"]["layers_1"]
    scanned = param_shapes(cfg, scan_layers=True)["encoder"]["layers"]
    assert scanned["sub_0"]["cross_attn"]["key"]["kernel"].shape == (2, 48, 4, 8)
    assert "cross_attn" not in scanned["sub_1"]


def test_loader_reports_missing_and_unexpected_keys():
    _, cfg, tensors = hf_qformer(2)
    broken = dict(tensors)
    del broken["qformer.encoder.layer.2.crossattention.attention.key.weight"]
    broken["qformer.encoder.layer.9.extra.weight"] = np.zeros(3, np.float32)
    broken["language_projection.weight"] = np.zeros(3, np.float32)  # outside the prefix: ignored
    with pytest.raises(ConversionError) as err:
        load_qformer_params(broken, cfg)
    msg = str(err.value)
    assert "missing keys (1)" in msg and "layer.2.crossattention.attention.key.weight" in msg
    assert "unexpected keys (1)" in msg and "layer.9.extra.weight" in msg
    assert "language_projection" not in msg
