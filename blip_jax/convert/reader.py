"""Streaming access to the tensors of a transformers checkpoint directory.

Reads `model.safetensors`, sharded safetensors (`model.safetensors.index.json`) or
`pytorch_model.bin` (optionally sharded). Tensors are read one at a time, so converting never holds
the source model and the converted one in memory together. Safetensors are read without torch;
`.bin` files need torch and are loaded with `weights_only=True`, memory-mapped when they are zip
archives (a legacy, pre-1.6 `torch.save` file is read whole); once a tensor has been copied out,
`release` hands its pages of the map back, so the file read does not pile up in the process's RSS.
A file that cannot be read (truncated, empty, not a checkpoint, or a pickle holding objects rather
than tensors) is a `ValueError` naming it.
"""

from __future__ import annotations

import ctypes
import json
import mmap
from pathlib import Path

import numpy as np

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"
TORCH_BIN_INDEX = "pytorch_model.bin.index.json"


def _unreadable(path: Path, e: Exception) -> ValueError:
    detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return ValueError(f"cannot read {path}: {detail[:300]}")


def _safe_open(path: Path, framework: str = "numpy"):
    from safetensors import SafetensorError, safe_open

    if path.is_file() and path.stat().st_size == 0:
        raise ValueError(f"cannot read {path}: the file is empty")
    try:
        return safe_open(path, framework=framework)
    except (SafetensorError, OSError, ValueError) as e:
        raise _unreadable(path, e) from None


def _index(d: Path, name: str) -> dict[str, Path]:
    """A sharded checkpoint's weight map: tensor name -> shard file (inside `d`)."""
    try:
        weight_map = json.loads((d / name).read_text())["weight_map"]
        files = {k: d / f for k, f in weight_map.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"cannot read {d / name}: not a weight index ({type(e).__name__}: {e})") from None
    outside = sorted({str(f) for f in files.values() if f.resolve().parent != d.resolve()})
    if outside:
        raise ValueError(f"{d / name} names shards outside {d}: {outside[:3]}")
    return files


def torch_load(path: Path):
    """What a `torch.save` file holds, loaded with `weights_only=True` (pickled code is refused) and
    memory-mapped when it is a zip archive (a legacy torch.save file is read whole); a file that
    cannot be read is a one-line ValueError naming it."""
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError(f"reading {path.name} needs torch: pip install 'blip-jax[convert]'") from e
    import pickle
    import zipfile

    if path.stat().st_size == 0:
        raise ValueError(f"cannot read {path}: the file is empty")
    mapped = zipfile.is_zipfile(path)
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=mapped)
    except pickle.UnpicklingError as e:
        raise ValueError(f"refusing {path}: it holds pickled objects, not only tensors (torch.load with "
                         f"weights_only=True: {str(e).splitlines()[0][:200]})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise _unreadable(path, e) from None
    if mapped:
        _MAPPED_FILES.add(str(path.resolve()))
    return loaded


_MAPPED_FILES: set[str] = set()  # the files torch_load memory-mapped
_MADV_DONTNEED = 4


def _mapping_of(address: int) -> str | None:
    """The file whose private, read-back mapping holds `address` (from /proc/self/maps), if any."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:  # not Linux: nothing to release
        return None
    for line in lines:
        fields = line.split(maxsplit=5)
        start, end = (int(x, 16) for x in fields[0].split("-"))
        if start <= address < end:
            return fields[5] if len(fields) == 6 and fields[1].endswith("p") else None
    return None


def release(tensor) -> None:
    """Drop the pages a memory-mapped checkpoint tensor occupies in this process (its values have
    been copied out). The map is private and never written, so the pages are the file's own and
    would be read back from it unchanged if touched again; anything not in a map of a file
    `torch_load` opened is left alone."""
    if hasattr(tensor, "untyped_storage"):  # torch
        address, size = tensor.data_ptr(), tensor.numel() * tensor.element_size()
    elif isinstance(tensor, np.ndarray):
        address, size = tensor.__array_interface__["data"][0], tensor.nbytes
    else:
        return
    if not _MAPPED_FILES or size < mmap.PAGESIZE or _mapping_of(address) not in _MAPPED_FILES:
        return
    # whole pages inside the tensor only: its neighbours' pages stay
    start = -(-address // mmap.PAGESIZE) * mmap.PAGESIZE
    end = (address + size) // mmap.PAGESIZE * mmap.PAGESIZE
    if end > start:
        ctypes.CDLL(None).madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED)


def free_large_blocks_at_once() -> None:
    """Make glibc give every block of 1 MB or more back to the system when it is freed. By default
    it keeps freed blocks of up to 32 MB for reuse, so a conversion's peak would be a part plus
    whatever those blocks add up to; this is process-wide, for the conversion commands."""
    try:
        ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, 1 << 20)
    except (AttributeError, OSError):  # not glibc
        pass


_M_MMAP_THRESHOLD = -3


class CheckpointReader:
    """A read-only mapping from tensor name to numpy array, loaded on access."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self._handles: dict[Path, object] = {}
        self._files = self._locate()

    def _locate(self) -> dict[str, Path]:
        d = self.directory
        if (d / SAFETENSORS_INDEX).exists():
            return _index(d, SAFETENSORS_INDEX)
        if (d / SAFETENSORS).exists():
            with _safe_open(d / SAFETENSORS) as f:
                return {k: d / SAFETENSORS for k in f.keys()}
        if (d / TORCH_BIN_INDEX).exists():
            return _index(d, TORCH_BIN_INDEX)
        if (d / TORCH_BIN).exists():
            return {k: d / TORCH_BIN for k in self._torch_file(d / TORCH_BIN)}
        raise FileNotFoundError(
            f"no weights in {d}: expected one of {SAFETENSORS}, {SAFETENSORS_INDEX}, {TORCH_BIN}, {TORCH_BIN_INDEX}"
        )

    def _torch_file(self, path: Path) -> dict:
        if path not in self._handles:
            state = torch_load(path)
            if not isinstance(state, dict):
                raise ValueError(f"cannot read {path}: it holds a {type(state).__name__}, not a state dict")
            self._handles[path] = state
        return self._handles[path]

    def keys(self) -> list[str]:
        return list(self._files)

    release = staticmethod(release)  # a tensor read and copied out: its mapped pages can go

    def __contains__(self, key: str) -> bool:
        return key in self._files

    def shape(self, key: str) -> tuple[int, ...]:
        """A tensor's shape, from the file header (safetensors) or the memory map (.bin): nothing is read."""
        path = self._files[key]
        if path.suffix == ".safetensors":
            with _safe_open(path) as f:
                return tuple(f.get_slice(key).get_shape())
        return tuple(self._torch_file(path)[key].shape)

    def __getitem__(self, key: str) -> np.ndarray:
        path = self._files[key]
        if path.suffix == ".safetensors":
            from safetensors import SafetensorError

            try:
                with _safe_open(path) as f:
                    try:
                        return f.get_tensor(key)
                    except (TypeError, ValueError):  # bfloat16 has no numpy dtype: read it through flax
                        pass
                with _safe_open(path, "flax") as f:
                    return np.asarray(f.get_tensor(key))
            except SafetensorError as e:
                raise _unreadable(path, e) from None
        tensor = self._torch_file(path)[key]
        if str(tensor.dtype) == "torch.bfloat16":
            import ml_dtypes

            return tensor.float().numpy().astype(ml_dtypes.bfloat16)
        return tensor.numpy()
