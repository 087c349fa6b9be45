"""Atomic writes, the one place for them: a file or a directory is built under a temporary name
beside its destination and renamed into place only when complete, so a reader (or a resumed job)
never sees half of one, and a killed writer leaves only a hidden temporary, which the next writer
of the same destination removes.

On object storage (gs://, s3://: `blip_jax.paths`), which has no rename, a file is one upload (an
object is replaced whole or not at all) and a directory is built locally and uploaded with its
`config.json`, the file every reader of a model directory opens first, written last (and removed
first when a directory is replaced)."""

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

from blip_jax import paths

# what a reader opens first, so what a directory upload writes last
COMPLETE_WHEN = ("config.json",)


def write_file(path: str | os.PathLike, data: bytes | str | Callable[[BinaryIO], object]) -> Path:
    """Write `data` (bytes, text as UTF-8, or a function writing to the open binary file) at `path`."""
    if paths.is_remote(path):
        with tempfile.TemporaryDirectory() as tmp:
            write_file(Path(tmp) / "file", data)
            paths.path(path).parent.mkdir(parents=True, exist_ok=True)
            paths.upload(Path(tmp) / "file", path)
        return paths.path(path)
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
    if paths.is_remote(dst):
        with _remote_directory(paths.path(dst), overwrite) as tmp:
            yield tmp
        return
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


@contextlib.contextmanager
def _remote_directory(dst, overwrite: bool):
    """`directory` for object storage: built in a local temporary directory, then uploaded."""
    marker = dst / COMPLETE_WHEN[0]
    if dst.exists() and any(True for _ in dst.iterdir()) and not overwrite:
        raise FileExistsError(f"{dst} already exists (pass overwrite=True / --overwrite to replace it)")
    with tempfile.TemporaryDirectory(prefix=".blip_jax_upload.") as tmp:
        yield Path(tmp)
        if dst.exists():  # readers stop seeing the old directory first, then it goes
            if marker.exists():
                marker.unlink()
            dst.rmtree()
        paths.upload_tree(tmp, dst, last=COMPLETE_WHEN)
