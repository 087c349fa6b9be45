"""The device mesh and the one table that maps logical axis names onto it.

Mesh axes: `data` (pure data parallelism), `fsdp` (data parallelism with parameters, gradients and
optimizer state sharded over it) and `tensor` (model parallelism inside layers). The batch is split
over data x fsdp; parameters by the rules below (maxtext's convention), which the config may replace.
"""

from __future__ import annotations

import contextlib
import math
from typing import Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the mesh axes a batch is split over

# logical axis -> mesh axes; the first rule that names an unused mesh axis applies (flax's semantics)
DEFAULT_RULES = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("kv", None),
    ("qkv", None),
    ("layers", None),
    ("length", None),
)


def mesh_shape(axes: dict, device_count: int) -> tuple[int, ...]:
    """Sizes of (data, fsdp, tensor) from a dict where one value may be -1 (the remaining devices)."""
    sizes = [int(axes.get(name, 1)) for name in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if any(s == 0 or s < -1 for s in sizes) or device_count % known:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} does not divide {device_count} devices")
    sizes = [device_count // known if s == -1 else s for s in sizes]
    if math.prod(sizes) != device_count:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} uses {math.prod(sizes)} of {device_count} devices; "
                         "make one axis -1 to take the rest")
    return tuple(sizes)


def make_mesh(axes: dict, devices: Sequence | None = None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(axes, len(devices))
    try:  # a topology-aware layout on TPU / GPU; any order on CPU
        grid = jax.experimental.mesh_utils.create_device_mesh(shape, devices)
    except Exception:  # noqa: BLE001 - fall back to the listed order
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES)


def rules_from_config(rules) -> tuple:
    """Config rules (lists from a ConfigDict or JSON) -> the tuple flax expects."""
    return tuple((name, tuple(axes) if isinstance(axes, (list, tuple)) else axes) for name, axes in rules)


@contextlib.contextmanager
def activation_rules(mesh: Mesh, rules):
    """The context a traced step runs its models in: their activation constraints
    (`nn.with_logical_constraint`) resolve against `mesh` and the logical `rules`. Flax reads the
    abstract mesh; under a plain `with mesh:` (deprecated in jax 0.10) every constraint is silently
    dropped and the partitioner is free to shard activations like the weights."""
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules_from_config(rules)):
        yield


def logical_shardings(boxed_tree, mesh: Mesh, rules):
    """NamedShardings for a tree of `nn.LogicallyPartitioned` leaves (e.g. `jax.eval_shape(init)`).
    A dimension its mesh axes do not divide (e.g. Vicuna's 32001-token vocabulary over `tensor`) is
    replicated instead: parameters must split evenly to be placed."""
    specs = nn.get_partition_spec(boxed_tree)
    shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
    return jax.tree.map(lambda sh, x: divisible(sh, x.shape), shardings, nn.unbox(boxed_tree))


def divisible(sh: NamedSharding, shape: Sequence[int]) -> NamedSharding:
    """`sh` with the mesh axes of every dimension of `shape` they do not divide dropped."""
    spec = list(sh.spec) + [None] * (len(shape) - len(sh.spec))
    size = lambda axes: math.prod(sh.mesh.shape[a] for a in (axes if isinstance(axes, tuple) else (axes,)))  # noqa: E731
    fixed = [None if axes is not None and dim % size(axes) else axes for axes, dim in zip(spec, shape)]
    return sh if fixed == spec else NamedSharding(sh.mesh, PartitionSpec(*fixed), memory_kind=sh.memory_kind)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batch-major arrays: leading axis over data x fsdp, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def batch_shards(mesh: Mesh) -> int:
    """How many pieces `batch_sharding` cuts a batch into."""
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
