"""Accelerator facts: each chip's dense bf16 peak and memory, and TPU topologies compiled for without a TPU.

The peaks are the vendors' dense (no sparsity) bf16 matmul figures per chip; MFU divides achieved
model FLOPs by them. `tpu_devices("v5p:4x4x4")` gives the devices of that slice from libtpu
(PyPI `libtpu`), which jit(...).lower(...).compile() targets on a machine with no TPU.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    peak_bf16_flops: float  # dense, per chip
    memory_bytes: int  # HBM per chip


CHIPS = {
    "v4": Chip("TPU v4", 275e12, 32 * GIB),
    "v5e": Chip("TPU v5e", 197e12, 16 * GIB),
    "v5p": Chip("TPU v5p", 459e12, int(95.74 * GIB)),  # what its compiler reports available (libtpu 0.0.42)
    "v6e": Chip("TPU v6e (Trillium)", 918e12, 32 * GIB),
    "a100": Chip("NVIDIA A100 SXM", 312e12, 80 * 10**9),
    "h100": Chip("NVIDIA H100 SXM", 989e12, 80 * 10**9),
    "h200": Chip("NVIDIA H200", 989e12, 141 * 10**9),
}
TPU_GENERATIONS = ("v4", "v5e", "v5p", "v6e")
_TOPOLOGY = re.compile(r"^(v4|v5e|v5p|v6e):(\d+(?:x\d+){1,2})$")


@dataclasses.dataclass(frozen=True)
class Slice:
    """A TPU slice to compile for: its devices (one per JAX device), chip and chips."""

    name: str
    chip: Chip
    chips: int
    devices: list

    @property
    def devices_per_chip(self) -> int:
        return max(1, len(self.devices) // self.chips)

    @property
    def device_memory_bytes(self) -> int:
        return self.chip.memory_bytes // self.devices_per_chip

    @property
    def device_peak_flops(self) -> float:
        return self.chip.peak_bf16_flops / self.devices_per_chip


def _quiet_libtpu(name: str) -> None:
    """libtpu on a machine with no TPU looks for one (the metadata server, the worker hostnames)
    and prints pages of warnings unless told; a compile for a slice needs neither. It reads these
    when it loads (here, or when jax first initialises its backends); a value already set is kept."""
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{name.split(':')[0]}-8")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # no chip is opened: plans may run side by side


def tpu_slice(name: str) -> Slice:
    """The TPU slice `name` ("v5p:4x4x4", "v4:2x2x2", "v5e:4x4", "v6e:8x8"); ValueError in one line
    for a name libtpu does not know, ImportError when libtpu is not installed."""
    match = _TOPOLOGY.match(name)
    if not match:
        raise ValueError(f"--topology {name!r}: expected GENERATION:SHAPE with GENERATION one of "
                         f"{', '.join(TPU_GENERATIONS)} and SHAPE chips per axis, e.g. v5p:4x4x4, v5e:4x4")
    _quiet_libtpu(name)
    try:
        import libtpu  # noqa: F401
    except ImportError as e:
        raise ImportError("--topology compiles with libtpu: pip install libtpu (no TPU needed)") from e
    from jax.experimental import topologies

    dims = [int(n) for n in match.group(2).split("x")]
    # a slice smaller than one host (v5e:1x1, a single 16 GiB chip) is its own host
    small = dict(chips_per_host_bounds=tuple(dims + [1] * (3 - len(dims)))) if math.prod(dims) < 4 else {}
    try:
        devices = topologies.get_topology_desc(platform="tpu", topology_name=name, **small).devices
    except Exception as e:  # noqa: BLE001 - libtpu's errors are long; its first line says what is wrong
        raise ValueError(f"--topology {name!r}: libtpu refuses it: {str(e).strip().splitlines()[0][:300]}") from None
    chips = math.prod(int(n) for n in match.group(2).split("x"))
    return Slice(name, CHIPS[match.group(1)], chips, list(devices))


# jax's device_kind -> CHIPS key (TPU v5e and v6e call themselves "lite")
_KINDS = (("v5 lite", "v5e"), ("v5e", "v5e"), ("v6 lite", "v6e"), ("v6e", "v6e"), ("v5p", "v5p"), ("v5", "v5p"),
          ("v4", "v4"), ("a100", "a100"), ("h100", "h100"), ("h200", "h200"))


def peak_flops(device) -> tuple[float, str]:
    """(peak FLOP/s, what it is) of one jax device: its chip's bf16 figure (per device where a chip
    shows as several), or on a CPU host the measured fp32 matmul rate of all its cores (the
    devices of a host share them: divide by the host's device count)."""
    kind = device.device_kind.lower()
    if device.platform == "cpu":
        return measured_cpu_peak(), "measured fp32 matmul peak of this CPU"
    for needle, key in _KINDS:
        if needle in kind:
            return CHIPS[key].peak_bf16_flops, f"{CHIPS[key].name} dense bf16"
    raise KeyError(f"no peak FLOP/s known for device kind {device.device_kind!r}")


_CPU_PEAK: list[float] = []


def measured_cpu_peak(size: int = 1024, repeats: int = 8) -> float:
    """FLOP/s of this host's best fp32 square matmul (measured once per process, about a second)."""
    if not _CPU_PEAK:
        import time

        import jax
        import jax.numpy as jnp

        cpu = jax.devices("cpu")[0]
        a = jax.device_put(jnp.ones((size, size), jnp.float32), cpu)
        matmul = jax.jit(lambda x: x @ x)
        matmul(a).block_until_ready()
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            matmul(a).block_until_ready()
            best = min(best, time.perf_counter() - t0)
        _CPU_PEAK.append(2.0 * size**3 / best)
    return _CPU_PEAK[0]


def host_rss_bytes() -> int:
    """This process's resident host memory now (Linux /proc; elsewhere its peak so far)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024
