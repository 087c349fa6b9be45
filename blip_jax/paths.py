"""Local paths and object storage (gs://, s3://) behind one type, etils `epath`.

A job's workdir, a model directory or a checkpoint may live in a bucket: TPU VMs have no shared
disk. `path()` gives a `pathlib.Path` for a local name and an `epath.Path` (fsspec: gcsfs, s3fs)
for a URL; Orbax and TensorStore read and write the same URLs themselves. An object store has no
rename and no append, so `blip_jax.atomic` stages directories locally and uploads them with the
file readers open first written last, and `upload` replaces a whole object.
"""

from __future__ import annotations

import json
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

    logging.getLogger("gcsfs").setLevel(logging.CRITICAL)  # it logs each retry with a traceback; errors are raised
    store = str(p).split("/", 3)[:3]  # scheme, "", bucket
    if tuple(store) not in _CHECKED:
        check_access(str(p))
        _CHECKED.add(tuple(store))
    return epath.Path(str(p))


_CHECKED: set[tuple] = set()  # the buckets check_access passed in this process


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


def cache_root() -> Path:
    """Where copies of remote model directories are kept ($BLIP_JAX_CACHE, else ~/.cache/blip_jax)."""
    return Path(os.environ.get("BLIP_JAX_CACHE", Path.home() / ".cache" / "blip_jax"))


def local_copy(url: str) -> Path:
    """A local copy of the remote directory `url` (a model to load): downloaded once into
    `cache_root()/models/<key>`, the key naming the URL and its listing (names, sizes, change
    times), so a replaced model is downloaded again and never mixed with the old one."""
    import hashlib

    import fsspec

    path(url)  # the store is usable
    fs, root = fsspec.core.url_to_fs(url)
    fs.invalidate_cache()
    listing = sorted((name, info.get("size"), str(info.get("updated") or info.get("LastModified") or ""))
                     for name, info in fs.find(root, detail=True).items())
    if not listing:
        raise FileNotFoundError(f"{url}: no such model directory (nothing under that prefix)")
    key = hashlib.sha256(json.dumps([url, listing]).encode()).hexdigest()[:24]
    target = cache_root() / "models" / key
    if not target.is_dir():
        staging = target.with_name(f".{key}.{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        for name, _, _ in listing:
            out = staging / name[len(root.rstrip("/")) + 1:]
            out.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(name, str(out))
        try:
            staging.rename(target)  # whole or not at all; a concurrent copy may have won
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def check_access(url: str) -> None:
    """Fail in one line, before any work, where `url`'s store cannot be used: s3:// without s3fs,
    gs:// without credentials (none in the environment and no emulator), a bucket that does not exist."""
    scheme, _, rest = str(url).partition("://")
    bucket = rest.split("/", 1)[0]
    if scheme == "s3":
        try:
            import s3fs  # noqa: F401
        except ImportError:
            raise ValueError(f"{url}: s3:// needs s3fs (pip install s3fs)") from None
    if scheme == "gs" and not os.environ.get("STORAGE_EMULATOR_HOST"):
        import google.auth
        from google.auth.exceptions import DefaultCredentialsError

        try:
            google.auth.default()
        except DefaultCredentialsError:
            raise ValueError(f"{url}: no Google Cloud credentials found (set GOOGLE_APPLICATION_CREDENTIALS, run "
                             "`gcloud auth application-default login`, or run on a VM with a service account)"
                             ) from None
    import fsspec

    fs = fsspec.filesystem(scheme)
    if not fs.exists(bucket):
        raise ValueError(f"{url}: the bucket {bucket!r} does not exist (or these credentials cannot see it)")
