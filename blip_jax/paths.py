"""Local paths and object storage (gs://, s3://) behind one type, etils `epath`.

A job's workdir, a model directory or a checkpoint may live in a bucket: TPU VMs have no shared
disk. `path()` gives a `pathlib.Path` for a local name and an `epath.Path` (fsspec: gcsfs, s3fs)
for a URL; Orbax and TensorStore read and write the same URLs themselves. An object store has no
rename and no append, so `blip_jax.atomic` stages directories locally and uploads them with the
file readers open first written last, and `upload` replaces a whole object.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

REMOTE_SCHEMES = ("gs://", "s3://")


def is_remote(p) -> bool:
    return str(p).startswith(REMOTE_SCHEMES)


def path(p):
    """`p` as a path object: `pathlib.Path` when local, `epath.Path` for gs:// and s3:// URLs."""
    if not is_remote(p):
        return Path(p)
    from etils import epath

    logging.getLogger("gcsfs").setLevel(logging.ERROR)  # it warns on every call without cloud credentials
    return epath.Path(str(p))


def absolute(p):
    """An absolute form of `p` (a URL is one already; epath would prefix it with the cwd)."""
    return p if is_remote(p) else Path(p).absolute()


def upload(local: str | os.PathLike, dst) -> None:
    """Copy the local file `local` to `dst` (local or remote), replacing it whole."""
    if not is_remote(dst):
        shutil.copy2(local, dst)
        return
    with open(local, "rb") as src, path(dst).open("wb") as out:
        shutil.copyfileobj(src, out, 16 << 20)


def upload_tree(local: str | os.PathLike, dst, *, last: tuple[str, ...] = ()) -> None:
    """Copy the local directory `local` under `dst`; the files named in `last` (relative paths)
    are written after every other, so a reader that opens them first sees a complete directory."""
    local = Path(local)
    files = sorted(p for p in local.rglob("*") if p.is_file())
    files.sort(key=lambda p: str(p.relative_to(local)) in last)
    dst = path(dst)
    for file in files:
        target = dst / str(file.relative_to(local))
        target.parent.mkdir(parents=True, exist_ok=True)
        upload(file, target)
