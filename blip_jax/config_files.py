"""Config files as `blip-jax train` / `eval` / `capfilt` read them (`--config=path.py:preset`), for
Python callers: tests, benchmarks, notebooks."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def load_config(path: str | Path, preset: str | None = None):
    """`get_config(preset)` of the config file at `path` (no argument when `preset` is None)."""
    path = Path(path)
    spec = importlib.util.spec_from_file_location(f"blip_jax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config() if preset is None else module.get_config(preset)
