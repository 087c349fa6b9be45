"""LoRA: low-rank adapters on chosen kernels of any tower (the LLM, the Q-Former, the ViT).

An adapted `layers.Dense` finds two more parameters beside its kernel, `lora_a` [in..., r] and
`lora_b` [r, out...], and a frozen `lora_scale` (alpha / r), and adds scale · (x A) B to its output,
accumulated in fp32: the base kernel is untouched (frozen, stored and sharded as it is) and the
adapter's own product is not rounded into it, so bf16 towers lose nothing of a small update. B
starts at zero, A as PEFT's (uniform +-1/sqrt(in)): training starts from the base model exactly.
Scanned stacks carry a leading layers axis on all three, as on the kernel. With `dropout` > 0 a
frozen `lora_dropout` rate rides along too, and x is dropped out before A (PEFT's place) whenever the
apply is given a "dropout" rng, i.e. in training only.

The adapter is the tree of these leaves alone (`adapter_of`); `merged` folds it into the kernels
(W + scale · A B) for a plain model, what `blip-jax export --merge-lora` writes.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

LEAVES = ("lora_a", "lora_b", "lora_scale", "lora_dropout")
TRAINABLE = (r"/lora_[ab]$",)  # what trains of an adapter (the scale is a setting)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    targets: tuple[str, ...] = ()  # regexes on the '/'-joined paths of the adapted modules' kernels
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_config(cls, section) -> "LoraConfig":
        d = dict(section) if section else {}
        return cls(targets=tuple(d.get("targets", ())), rank=int(d.get("rank", 8)),
                   alpha=float(d.get("alpha", 16.0)), dropout=float(d.get("dropout", 0.0)))

    def validate(self) -> None:
        if self.rank < 1:
            raise ValueError(f"lora.rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        for pattern in self.targets:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"lora.targets: {pattern!r} is not a regular expression ({e})") from None


def input_ndim(names: Sequence[str | None]) -> int:
    """How many leading axes of a Dense kernel (logical axis `names`, without a layers axis) are
    its input: all but the last when it projects back to the model width ("embed": attention
    outputs [heads, kv, embed], FFN outputs [mlp, embed]), else the first."""
    return len(names) - 1 if len(names) > 1 and names[-1] == "embed" else 1


def targets(kernels: dict[str, Sequence[str | None]], config: LoraConfig) -> dict[str, tuple[int, int]]:
    """The adapted kernels: '/'-joined path -> (layer axes, input axes), from every kernel's logical
    axis names. Each pattern must match at least one kernel (a typo would train nothing)."""
    chosen = {}
    for pattern in config.targets:
        hits = [p for p in kernels if re.search(pattern, p)]
        if not hits:
            sample = ", ".join(sorted(kernels)[:4])
            raise ValueError(f"lora.targets: {pattern!r} matches no kernel of this model (kernels look like: "
                             f"{sample}, ...)")
        for path in hits:
            names = tuple(kernels[path])
            layer = 1 if names and names[0] == "layers" else 0
            chosen[path] = (layer, input_ndim(names[layer:]))
    return chosen


def init(key, shapes: dict[str, tuple[int, ...]], chosen: dict[str, tuple[int, int]], config: LoraConfig) -> dict:
    """Fresh adapter leaves ('/'-joined paths beside each kernel) for kernels of `shapes`."""
    out = {}
    for i, (path, (layer, n_in)) in enumerate(sorted(chosen.items())):
        shape = tuple(shapes[path])
        lead, ins, outs = shape[:layer], shape[layer:layer + n_in], shape[layer + n_in:]
        bound = 1.0 / math.sqrt(math.prod(ins))
        module = path.rsplit("/", 1)[0]
        a = jax.random.uniform(jax.random.fold_in(key, i), lead + ins + (config.rank,), jnp.float32, -bound, bound)
        out[f"{module}/lora_a"] = a
        out[f"{module}/lora_b"] = jnp.zeros(lead + (config.rank,) + outs, jnp.float32)
        out[f"{module}/lora_scale"] = jnp.full(lead, config.scale, jnp.float32)
        if config.dropout:
            out[f"{module}/lora_dropout"] = jnp.full(lead, config.dropout, jnp.float32)
    return out


def is_adapter_path(path: str) -> bool:
    return path.rsplit("/", 1)[-1] in LEAVES


def adapter_of(params: dict) -> dict:
    """The adapter leaves of a parameter tree (nested dict)."""
    flat = traverse_util.flatten_dict(params, sep="/")
    return traverse_util.unflatten_dict({k: v for k, v in flat.items() if is_adapter_path(k)}, sep="/")


def merged(params: dict) -> dict:
    """`params` with each adapter folded into its kernel (W + scale · A B, in fp32, stored in the
    kernel's dtype) and the adapter leaves removed."""
    flat = traverse_util.flatten_dict(params, sep="/")
    out = {k: v for k, v in flat.items() if not is_adapter_path(k)}
    modules = {k.rsplit("/", 1)[0] for k in flat if k.endswith("/lora_a")}
    for module in modules:
        kernel = np.asarray(flat[f"{module}/kernel"])
        a, b = np.asarray(flat[f"{module}/lora_a"], np.float32), np.asarray(flat[f"{module}/lora_b"], np.float32)
        scale = np.asarray(flat[f"{module}/lora_scale"], np.float32)
        layer = scale.ndim
        if layer:  # a scanned stack: one product per layer
            d = np.stack([s * np.tensordot(a[i], b[i], axes=1) for i, s in enumerate(scale)])
        else:
            d = scale * np.tensordot(a, b, axes=1)
        out[f"{module}/kernel"] = (kernel.astype(np.float32) + d).astype(kernel.dtype)
    return traverse_util.unflatten_dict(out, sep="/")


ADAPTER_FILE = "adapter.json"


def save_adapter(directory, trained: dict, cfg, model_config) -> None:
    """An adapter directory: `adapter.json` (the LoRA settings, the base it was trained on by path
    and fingerprint, the model config) and the parameters that trained (A, B, scales, and any
    other trainable ones), as `checkpoint.save_params` stores a model's."""
    from blip_jax import checkpoint, jobs
    from blip_jax.atomic import write_json

    init_from = cfg.model.init_from
    base = {"path": str(init_from), "fingerprint": jobs.fingerprint(init_from)} if init_from else None
    write_json(f"{directory}/{ADAPTER_FILE}", {"lora": dict(cfg.lora), "base": base,
                                               "model_config": model_config.to_dict()})
    checkpoint.save_params(directory, trained)


def is_adapter_dir(path) -> bool:
    from pathlib import Path

    return (Path(path) / ADAPTER_FILE).is_file()


def apply_adapter(base_dir, base_params: dict, adapter_dir) -> dict:
    """`base_params` (of the model directory `base_dir`) with the adapter in `adapter_dir` applied
    and folded in. Refused in one line when the adapter was trained on another base (another
    fingerprint, or parameters whose shapes the base does not have)."""
    import json
    from pathlib import Path

    from blip_jax import checkpoint, jobs

    meta = json.loads((Path(adapter_dir) / ADAPTER_FILE).read_text())
    base = meta.get("base")
    if base and base.get("fingerprint") and jobs.fingerprint(base_dir) != base["fingerprint"]:
        raise ValueError(f"{adapter_dir} was trained on another base ({base['path']}, fingerprint "
                         f"{base['fingerprint']}); {base_dir} is not it (fingerprint {jobs.fingerprint(base_dir)})")
    flat = traverse_util.flatten_dict(base_params, sep="/")
    stored = checkpoint.stored_shapes(adapter_dir)
    for path, shape in stored.items():
        kernel = f"{path.rsplit('/', 1)[0]}/kernel" if is_adapter_path(path) else path
        if kernel not in flat:
            raise ValueError(f"{adapter_dir} does not fit {base_dir}: it has {path}, the base has no {kernel}")
        if not is_adapter_path(path) and tuple(flat[path].shape) != tuple(shape):
            raise ValueError(f"{adapter_dir} does not fit {base_dir}: {path} is {tuple(shape)} in the adapter, "
                             f"{tuple(flat[path].shape)} in the base")
    adapter = traverse_util.flatten_dict(checkpoint.restore_params(adapter_dir), sep="/")
    for path, value in adapter.items():
        if path.endswith("/lora_a"):
            kernel = flat[f"{path.rsplit('/', 1)[0]}/kernel"]
            lead = value.ndim - 1
            if tuple(value.shape[:lead]) != tuple(kernel.shape[:lead]):
                raise ValueError(f"{adapter_dir} does not fit {base_dir}: {path} is {tuple(value.shape)}, its "
                                 f"kernel {tuple(kernel.shape)}")
    return merged(traverse_util.unflatten_dict({**flat, **adapter}, sep="/"))


def write_merged(base_dir, adapter_dir, out, *, overwrite: bool = False):
    """A plain model directory at `out`: the base's config, tokenizers and processor with its
    parameters replaced by base + adapter folded in (what `blip-jax export --merge-lora` writes)."""
    import shutil
    from pathlib import Path

    from blip_jax import atomic, checkpoint

    base_dir = checkpoint.model_dir(base_dir)
    _, params = checkpoint.load(base_dir)
    params = apply_adapter(base_dir, params, adapter_dir)
    with atomic.directory(out, overwrite=overwrite) as tmp:
        for item in Path(base_dir).iterdir():
            if item.name == checkpoint.PARAMS:
                continue
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, Path(tmp) / item.name)
        checkpoint.save_params(tmp, params)
    return Path(out)


def find_adapter(path):
    """The adapter directory `path` names: itself, or a LoRA run's W/adapter."""
    from pathlib import Path

    for candidate in (Path(path), Path(path) / "adapter"):
        if is_adapter_dir(candidate):
            return candidate
    raise FileNotFoundError(f"{path}: no {ADAPTER_FILE} here or in its adapter/ (not a LoRA run's adapter)")
