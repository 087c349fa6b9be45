"""Loss functions of the model heads, which the training objectives (`blip_jax.train.objectives`) compose."""

from __future__ import annotations

import jax
import jax.numpy as jnp

IGNORE = -100  # label value excluded from the loss, as in PyTorch
BLIP_LABEL_SMOOTHING = 0.1  # BLIP's text decoder loss (training, and LAVIS's VQA rank scores)
TEMPERATURE_RANGE = (0.001, 0.5)  # LAVIS clamps the learnable ITC temperature (BLIP and BLIP-2)


def clamped_temperature(temp):
    """The ITC temperature the losses divide by: the learnable one, clamped as LAVIS does."""
    return jnp.clip(temp, *TEMPERATURE_RANGE)


def token_cross_entropy(logits, labels, label_smoothing: float = 0.0):
    """(per-token cross-entropy, valid mask) over labels != IGNORE, with PyTorch's label smoothing
    ((1 - s) * NLL + s * mean over classes of -log p)."""
    logits = logits.astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    valid = labels != IGNORE
    safe = jnp.where(valid, labels, 0)
    nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
    per_token = nll
    if label_smoothing:  # a Python float: no extra pass over the vocabulary when it is 0
        per_token = (1.0 - label_smoothing) * nll + label_smoothing * -logp.mean(axis=-1)
    return per_token * valid, valid


def cross_entropy(logits, labels, label_smoothing: float = 0.0):
    """Mean token cross-entropy over labels != IGNORE (see `token_cross_entropy`)."""
    per_token, valid = token_cross_entropy(logits, labels, label_smoothing)
    return jnp.sum(per_token) / jnp.maximum(valid.sum(), 1)


def sequence_cross_entropy(logits, labels, label_smoothing: float = 0.0):
    """Each sequence's summed token cross-entropy [B] (PyTorch's reduction="none" summed per row)."""
    return token_cross_entropy(logits, labels, label_smoothing)[0].sum(axis=-1)


def lm_loss(logits, labels, label_smoothing: float = 0.0):
    """Next-token loss: position t predicts labels[t + 1] (transformers' shift)."""
    return cross_entropy(logits[:, :-1], labels[:, 1:], label_smoothing)
