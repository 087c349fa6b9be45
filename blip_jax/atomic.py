"""Atomic writes, the one place for them: a file or a directory is built under a temporary name
beside its destination and renamed into place only when complete, so a reader (or a resumed job)
never sees half of one, and a killed writer leaves only a hidden temporary, which the next writer
of the same destination removes."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import socket
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


def _owner() -> str:
    return f"{os.getpid()}@{socket.gethostname()}-"


def _owner_is_gone(name: str, prefix: str) -> bool:
    """Whether the temporary `name` (`prefix` + `_owner()` + a random tail, made by `directory`)
    belongs to a writer on this host that no longer runs: a killed job's leftover."""
    pid, _, host = name[len(prefix):].rpartition("-")[0].partition("@")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, someone else's
        return False
    return False


@contextlib.contextmanager
def directory(dst: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary directory that becomes `dst` when the block exits without error. Leftovers
    of killed writers of `dst` (their processes gone) are removed first."""
    dst = Path(dst).absolute()
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists (pass overwrite=True / --overwrite to replace it)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    for kind in ("partial", "old"):
        prefix = f".{dst.name}.{kind}-"
        for leftover in dst.parent.glob(glob.escape(prefix) + "*"):
            if _owner_is_gone(leftover.name, prefix):
                shutil.rmtree(leftover, ignore_errors=True)
    owner = _owner()
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-{owner}", dir=dst.parent))
    try:
        yield tmp
        if dst.exists():
            old = dst.with_name(f".{dst.name}.old-{owner}{tmp.name[-8:]}")
            os.replace(dst, old)
            os.replace(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
