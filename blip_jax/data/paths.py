"""The containment rule for every path a dataset file names (annotation image paths, a packed
manifest's shards): it must resolve, after `..` and symlinks, inside the dataset's root.

Dataset files are untrusted input: an entry naming `../../x.png`, `/etc/passwd`, or a symlink in the
root that points outside it is left out and counted as `outside_root`, and the real path is never
opened (resolving reads only directory entries and links). Absolute paths and symlinks that stay
inside the root are fine.
"""

from __future__ import annotations

import os


class Root:
    """A dataset root; `resolve(name)` is the real path of `name` under it, or None if outside."""

    def __init__(self, root: str | os.PathLike):
        self.path = os.path.realpath(root)
        self._dirs: dict[str, str] = {}  # resolved parent folders: most records share a few

    def contains(self, real: str) -> bool:
        return real == self.path or real.startswith(self.path.rstrip(os.sep) + os.sep)

    def resolve(self, name) -> str | None:
        if not isinstance(name, str) or not name or "\x00" in name:
            return None
        parent, base = os.path.split(os.path.join(self.path, name))  # an absolute name replaces the root
        real_parent = self._dirs.get(parent)
        if real_parent is None:
            real_parent = self._dirs[parent] = os.path.realpath(parent)
        real = os.path.join(real_parent, base)
        if base in ("", ".", "..") or os.path.islink(real):
            real = os.path.realpath(real)
        return real if self.contains(real) else None
