"""Model FLOPs of one train step, counted from the program, frozen-aware.

Every matmul (dot_general, convolution) of the traced loss is counted at 2·M·N·K FLOPs for its
forward, and the backward pass adds the same again for each operand that needs a gradient, that
is, depends on a trainable parameter. So a trainable layer costs 6N per token, a frozen LLM that
the Q-Former's gradient flows back through 4N (activation gradients only), the frozen ViT and the
momentum encoders (`stop_gradient`) 2N. Recomputation (remat) is not model FLOPs and not counted;
XLA's own count (`cost_analysis`) includes it and the elementwise work.
"""

from __future__ import annotations

import math

import jax
from jax import extend as jex


def loss_flops(loss_fn, trainable, *others) -> float:
    """FLOPs of forward + backward of `loss_fn(trainable, *others)` (arrays or ShapeDtypeStructs)
    with a gradient for `trainable` only."""
    closed = jax.make_jaxpr(loss_fn)(trainable, *others)
    n_trainable = len(jax.tree.leaves(trainable))
    needs_grad = [i < n_trainable for i in range(len(closed.jaxpr.invars))]
    flops, _ = _walk(closed.jaxpr, needs_grad)
    return flops


def _matmul_flops(eqn) -> float:
    out = eqn.outvars[0].aval.shape
    if eqn.primitive.name == "dot_general":
        (contract, _), _ = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval.shape
        return 2.0 * math.prod(out) * math.prod(lhs[d] for d in contract)
    # convolution: each output element sums kernel window x input features / groups
    rhs = eqn.invars[1].aval.shape
    spec = eqn.params["dimension_numbers"].rhs_spec  # (out features, in features, spatial...)
    window = math.prod(rhs[d] for d in spec[2:])
    return 2.0 * math.prod(out) * window * rhs[spec[1]]


def _walk(jaxpr, needs_grad: list[bool]) -> tuple[float, list[bool]]:
    """(FLOPs, which outputs need a gradient) of `jaxpr` given which inputs do."""
    grad = {v: g for v, g in zip(jaxpr.invars, needs_grad)}
    for v in jaxpr.constvars:
        grad[v] = False
    total = 0.0

    def of(x) -> bool:
        return isinstance(x, jex.core.Var) and grad.get(x, False)

    for eqn in jaxpr.eqns:
        ins = [of(x) for x in eqn.invars]
        name = eqn.primitive.name
        outs = [any(ins)] * len(eqn.outvars)
        if name in ("dot_general", "conv_general_dilated"):
            total += _matmul_flops(eqn) * (1 + ins[0] + ins[1])
        elif name == "stop_gradient":
            outs = [False] * len(eqn.outvars)
        elif name == "scan":
            body = eqn.params["jaxpr"].jaxpr
            consts, carries = eqn.params["num_consts"], eqn.params["num_carry"]
            carry = ins[consts:consts + carries]
            for _ in range(2):  # a carry that comes to need a gradient in one pass does from the start
                flops, body_outs = _walk(body, ins[:consts] + carry + ins[consts + carries:])
                carry = [a or b for a, b in zip(carry, body_outs[:carries])]
            total += flops * eqn.params["length"]
            outs = carry + body_outs[carries:]
        elif name == "cond":
            results = [_walk(b.jaxpr, ins[1:]) for b in eqn.params["branches"]]
            total += max(f for f, _ in results)
            outs = [any(o[i] for _, o in results) for i in range(len(eqn.outvars))]
        elif name == "while":  # trip count unknown to the trace: the body once (no train step loops)
            total += _walk(eqn.params["body_jaxpr"].jaxpr, ins[eqn.params["cond_nconsts"]:])[0]
        else:
            for sub in jex.core.jaxprs_in_params(eqn.params):
                sub = getattr(sub, "jaxpr", sub)
                if len(sub.invars) == len(ins):  # a call (pjit, remat, custom_jvp / vjp): same inputs
                    flops, sub_outs = _walk(sub, ins)
                    total += flops
                    if len(sub_outs) == len(eqn.outvars):
                        outs = sub_outs
                    break
        for v, g in zip(eqn.outvars, outs):
            grad[v] = g
    return total, [of(x) for x in jaxpr.outvars]


def batch_counts(batch: dict) -> tuple[int, int]:
    """(images, text tokens) of a host batch: pixel rows, and the non-pad positions of its masks."""
    images = int(batch["pixels"].shape[0]) if "pixels" in batch else 0
    tokens = sum(int((v != 0).sum()) for k, v in batch.items() if k.endswith("mask") and k != "loss_mask")
    return images, tokens


def throughput(step_flops: float, steps_per_sec: float, devices: int, peak_per_device: float,
               images: float, tokens: float) -> dict[str, float]:
    """Per-device rates and MFU of steps at `steps_per_sec` (images and tokens: per step, global)."""
    return {
        "model_flops_per_step": step_flops,
        "tflops_per_sec_per_device": step_flops * steps_per_sec / devices / 1e12,
        "mfu": step_flops * steps_per_sec / (devices * peak_per_device),
        "images_per_sec_per_device": images * steps_per_sec / devices,
        "tokens_per_sec_per_device": tokens * steps_per_sec / devices,
    }
