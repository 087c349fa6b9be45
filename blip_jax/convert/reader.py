"""Streaming access to the tensors of a transformers checkpoint directory.

Reads `model.safetensors`, sharded safetensors (`model.safetensors.index.json`) or
`pytorch_model.bin` (optionally sharded). Tensors are read one at a time, so converting never holds
the source model and the converted one in memory together. Safetensors are read without torch;
`.bin` files need torch and are loaded with `weights_only=True`, memory-mapped when they are zip
archives (a legacy, pre-1.6 `torch.save` file is read whole). A file that cannot be read (truncated,
empty, not a checkpoint, or a pickle holding objects rather than tensors) is a `ValueError` naming it.
"""

from __future__ import annotations

import json
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
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        raise ValueError(f"refusing {path}: it holds pickled objects, not only tensors (torch.load with "
                         f"weights_only=True: {str(e).splitlines()[0][:200]})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise _unreadable(path, e) from None


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
