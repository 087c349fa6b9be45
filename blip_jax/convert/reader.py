"""Streaming access to the tensors of a transformers checkpoint directory.

Reads `model.safetensors`, sharded safetensors (`model.safetensors.index.json`) or
`pytorch_model.bin` (optionally sharded). Tensors are read one at a time, so converting never holds
the source model and the converted one in memory together. Safetensors are read without torch;
`.bin` files need torch and are loaded with `weights_only=True` and memory-mapped.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"
TORCH_BIN_INDEX = "pytorch_model.bin.index.json"


class CheckpointReader:
    """A read-only mapping from tensor name to numpy array, loaded on access."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self._handles: dict[Path, object] = {}
        self._files = self._locate()

    def _locate(self) -> dict[str, Path]:
        d = self.directory
        if (d / SAFETENSORS_INDEX).exists():
            return {k: d / f for k, f in json.loads((d / SAFETENSORS_INDEX).read_text())["weight_map"].items()}
        if (d / SAFETENSORS).exists():
            from safetensors import safe_open

            with safe_open(d / SAFETENSORS, framework="numpy") as f:
                return {k: d / SAFETENSORS for k in f.keys()}
        if (d / TORCH_BIN_INDEX).exists():
            return {k: d / f for k, f in json.loads((d / TORCH_BIN_INDEX).read_text())["weight_map"].items()}
        if (d / TORCH_BIN).exists():
            return {k: d / TORCH_BIN for k in self._torch_file(d / TORCH_BIN)}
        raise FileNotFoundError(
            f"no weights in {d}: expected one of {SAFETENSORS}, {SAFETENSORS_INDEX}, {TORCH_BIN}, {TORCH_BIN_INDEX}"
        )

    def _torch_file(self, path: Path) -> dict:
        if path not in self._handles:
            try:
                import torch
            except ImportError as e:  # pragma: no cover - depends on the install
                raise ImportError(f"reading {path.name} needs torch: pip install 'blip-jax[convert]'") from e
            # weights_only refuses pickled code; mmap keeps the file on disk until a tensor is read.
            self._handles[path] = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return self._handles[path]

    def keys(self) -> list[str]:
        return list(self._files)

    def __contains__(self, key: str) -> bool:
        return key in self._files

    def shape(self, key: str) -> tuple[int, ...]:
        """A tensor's shape, from the file header (safetensors) or the memory map (.bin): nothing is read."""
        path = self._files[key]
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(path, framework="numpy") as f:
                return tuple(f.get_slice(key).get_shape())
        return tuple(self._torch_file(path)[key].shape)

    def __getitem__(self, key: str) -> np.ndarray:
        path = self._files[key]
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(path, framework="numpy") as f:
                try:
                    return f.get_tensor(key)
                except (TypeError, ValueError):  # bfloat16 has no numpy dtype: read it through flax
                    pass
            with safe_open(path, framework="flax") as f:
                return np.asarray(f.get_tensor(key))
        tensor = self._torch_file(path)[key]
        if str(tensor.dtype) == "torch.bfloat16":
            import ml_dtypes

            return tensor.float().numpy().astype(ml_dtypes.bfloat16)
        return tensor.numpy()
