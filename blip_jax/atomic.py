"""Atomic writes, the one place for them: a file or a directory is built under a temporary name
beside its destination and renamed into place only when complete, so a reader (or a resumed job)
never sees half of one, and a killed writer leaves only a hidden temporary."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable


def write_file(path: str | os.PathLike, data: bytes | str | Callable[[BinaryIO], object]) -> Path:
    """Write `data` (bytes, text as UTF-8, or a function writing to the open binary file) at `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_json(path: str | os.PathLike, obj, *, ensure_ascii: bool = True) -> Path:
    """`obj` as indented JSON (and a final newline) at `path`."""
    return write_file(path, json.dumps(obj, indent=2, ensure_ascii=ensure_ascii) + "\n")


@contextlib.contextmanager
def directory(dst: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary directory that becomes `dst` when the block exits without error."""
    dst = Path(dst).absolute()
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists (pass overwrite=True / --overwrite to replace it)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))
    try:
        yield tmp
        if dst.exists():
            old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
            os.replace(dst, old)
            os.replace(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
