"""Job identity: what produced a resumable job's outputs (eval, capfilt, train), so a rerun in the
same workdir resumes only the same job and never mixes the outputs of two models.

A job records in `W/job.json` the models it reads (path plus a content fingerprint) and the settings
that change its outputs. A rerun with the same identity resumes; one with another model or other
settings is refused while W holds outputs, with a message that says how to start fresh.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from blip_jax import paths
from blip_jax.atomic import write_json

JOB_FILE = "job.json"
SMALL_FILE = 1 << 20  # files up to this size are hashed whole (configs, tokenizers, indexes)
EDGE = 1 << 16  # of a larger file, its first and last bytes (with its size) stand for it


def fingerprint(directory: str | os.PathLike) -> str:
    """A content fingerprint of a model directory: every file's relative path and size, small files
    whole, large ones by their first and last 64 KiB. Cheap for a 10 GB model, and it changes when
    the weights are replaced, re-converted or trained further."""
    root = Path(directory)
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        size = path.stat().st_size
        digest.update(f"{path.relative_to(root).as_posix()}\0{size}\0".encode())
        with open(path, "rb") as f:
            if size <= SMALL_FILE:
                digest.update(f.read())
            else:
                digest.update(f.read(EDGE))
                f.seek(size - EDGE)
                digest.update(f.read(EDGE))
    return digest.hexdigest()[:16]


def model_identity(directory: str | os.PathLike) -> dict:
    return {"path": str(Path(directory).resolve()), "fingerprint": fingerprint(directory)}


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}")
    return out


def claim(workdir: str | os.PathLike, identity: dict, *, has_outputs: bool, write: bool = True) -> None:
    """Resume only the job that wrote `workdir`: record `identity` (models by `model_identity`, the
    settings that change outputs) or refuse when W's outputs (`has_outputs`) came from another.
    A model found at another path with the same fingerprint is the same model."""
    path = paths.path(workdir) / JOB_FILE
    old = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    if old is not None and has_outputs:
        changed = [k for k in _differences(old, identity) if not k.endswith(".path")]
        if changed:
            models = ", ".join(f"{name} {m.get('path')} ({m.get('fingerprint')})"
                               for name, m in old.get("models", {}).items())
            raise ValueError(f"{workdir} holds outputs of another {old.get('job', 'job')} (written with "
                             f"{models or 'other settings'}; differs in {', '.join(changed[:6])}): resume it with "
                             f"the same model and settings, or start fresh with a new --workdir (or delete "
                             f"{workdir})")
    if write and old != identity:
        write_json(path, identity)
