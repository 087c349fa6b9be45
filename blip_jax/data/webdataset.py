"""A random-access grain source over WebDataset tar shards, as img2dataset writes them.

A shard is a plain (uncompressed) tar whose members are `<key>.<ext>`; the sample key is the
member path up to the first dot of its basename, the extension is the rest (the WebDataset
convention), e.g. `00000/000000012.jpg`, `.txt`, `.json` form sample `00000/000000012`.

At construction every shard is indexed once by walking its tar headers (no member data is read,
except the .json of a sample that has no .txt, whose caption then decides whether it is usable).
Each usable sample keeps the data offset and size of its image, text and json members, so
`source[i]` is one seek+read per member, from a file handle cached per process and thread
(handles are never pickled: grain workers reopen them, and a forked child never shares a file
offset with its parent).

Damage never raises: a shard cut short or corrupt is indexed up to the damage; samples that cannot
be used are counted by reason (records.REASONS) in `source.skipped`, and shards whose remaining
samples are lost (uncountable) are listed in `source.damaged` (shard path -> what was wrong).
Reading never raises for bad data either (see `WebDatasetSource.__getitem__`).
"""

from __future__ import annotations

import collections
import glob
import json
import logging
import os
import re
import tarfile
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple, Sequence

import numpy as np

logger = logging.getLogger(__name__)

_MEMBER_RE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # (key, extension), as webdataset splits names
_NONE = -1  # offset of an absent member
_MAX_OPEN_PER_THREAD = 64  # file handles one thread keeps open (LRU); bounded for datasets with many shards


class _Span(NamedTuple):
    offset: int
    size: int


class _ShardIndex(NamedTuple):
    keys: list[str]
    spans: list[tuple[int, int, int, int, int, int]]  # image, text, json (offset, size); _NONE when absent
    skipped: dict[str, int]
    damage: str | None  # why the shard's walk stopped early, None for a clean end


# ----------------------------------------------------------------------------------------- paths


def _expand_braces(pattern: str) -> list[str]:
    """`shard-{000..009}.tar` / `{a,b}` expansion (the WebDataset URL convention), recursively."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    body, head, tail = m.group(1), pattern[: m.start()], pattern[m.end():]
    r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if r:
        width = len(r.group(1))
        items = [str(n).zfill(width) for n in range(int(r.group(1)), int(r.group(2)) + 1)]
    else:
        items = body.split(",")
    return [p for item in items for p in _expand_braces(head + item + tail)]


def find_shards(paths_or_dir_or_glob) -> list[str]:
    """Sorted tar shard paths: a directory (its *.tar), a glob or brace pattern, a path, or a list."""
    specs = [paths_or_dir_or_glob] if isinstance(paths_or_dir_or_glob, (str, os.PathLike)) else paths_or_dir_or_glob
    shards = []
    for spec in map(os.fspath, specs):
        if os.path.isdir(spec):
            found = glob.glob(os.path.join(glob.escape(spec), "*.tar"))
            if not found:
                raise FileNotFoundError(f"no .tar shards in directory {spec}")
        elif os.path.isfile(spec):
            found = [spec]
        else:
            found = [p for pattern in _expand_braces(spec) for p in (glob.glob(pattern) or [pattern])]
            missing = [p for p in found if not os.path.isfile(p)]
            if missing:
                raise FileNotFoundError(f"WebDataset shard(s) not found for {spec!r}: {', '.join(missing[:5])}"
                                        + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
        shards.extend(found)
    if not shards:
        raise FileNotFoundError(f"no WebDataset shards given: {paths_or_dir_or_glob!r}")
    for path in shards:
        if not os.access(path, os.R_OK):
            raise FileNotFoundError(f"WebDataset shard {path} is not readable")
    return sorted(set(shards))


def shard_name(path: str) -> str:
    """The shard's part of an image_id: its basename without `.tar`."""
    name = os.path.basename(path)
    return name[: -len(".tar")] if name.endswith(".tar") else name


# ------------------------------------------------------------------------------------- indexing


def _walk_members(path: str) -> tuple[list[tuple[str, int, int]], str | None]:
    """(name, data offset, size) of every regular member, and why the walk stopped early (or None)."""
    members = []
    try:
        with tarfile.open(path, mode="r:") as tar:
            for info in tar:  # headers only: tarfile seeks over member data
                if info.isfile():
                    members.append((info.name, info.offset_data, info.size))
            end = tar.offset  # where the next header would be
    except (tarfile.ReadError, OSError, UnicodeError, ValueError) as e:
        # tarfile says "unexpected end of data" when a member is cut short, "invalid header" for garbage
        return members, f"tar cut short or corrupt ({type(e).__name__}: {e})"
    # A complete archive ends with a zero block; a walk that stops anywhere else hit a cut or garbage.
    with open(path, "rb") as f:
        f.seek(end)
        block = f.read(tarfile.BLOCKSIZE)
    if len(block) < tarfile.BLOCKSIZE or block.count(0) != len(block):
        return members, f"no end-of-archive marker at byte {end} (tar cut short or corrupt)"
    return members, None


def _json_caption(f, span: _Span) -> str | None:
    """The non-empty "caption" of a json member; None without one; ValueError when malformed."""
    f.seek(span.offset)
    meta = json.loads(f.read(span.size).decode("utf-8"))
    if not isinstance(meta, dict):
        raise ValueError("json metadata is not an object")
    caption = meta.get("caption")
    return caption if isinstance(caption, str) and caption.strip() else None


def index_shard(path: str, image_keys: Sequence[str], text_keys: Sequence[str], json_key: str | None) -> _ShardIndex:
    """The usable samples of one shard (tar order) and counts of the unusable ones, by reason."""
    file_size = os.path.getsize(path)
    members, damage = _walk_members(path)
    groups: dict[str, dict[str, _Span]] = collections.OrderedDict()
    truncated: set[str] = set()
    known = {*image_keys, *text_keys, *([json_key] if json_key else [])}
    for name, offset, size in members:
        m = _MEMBER_RE.match(name)
        if not m or m.group(2).lower() not in known:  # other modalities, hidden files, non-sample members
            continue
        key, ext = m.group(1), m.group(2).lower()
        group = groups.setdefault(key, {})
        if offset + size > file_size:
            truncated.add(key)  # dropped: a member cut short is unusable
        else:
            group[ext] = _Span(offset, size)
    if damage and groups:
        truncated.add(next(reversed(groups)))  # the sample the damage cut through may miss members

    keys, spans, skipped = [], [], collections.Counter()
    with open(path, "rb") as f:
        for key, group in groups.items():
            image = next((group[k] for k in image_keys if k in group), None)
            text = next((group[k] for k in text_keys if k in group), None)
            meta = group.get(json_key) if json_key else None
            reason = None
            if image is not None and text is None and meta is not None:
                try:  # no .txt: the json's caption is the text
                    if _json_caption(f, meta) is not None:
                        text = _Span(_NONE, 0)  # marks "caption from json"
                except ValueError:  # includes JSONDecodeError and UnicodeDecodeError
                    reason = "malformed_json"
            if image is None or text is None:
                skipped["truncated_tar_member" if key in truncated else reason or "incomplete_sample"] += 1
                continue
            meta = meta or _Span(_NONE, 0)
            keys.append(key)
            spans.append((image.offset, image.size, text.offset, text.size, meta.offset, meta.size))
    return _ShardIndex(keys, spans, dict(skipped), damage)


# --------------------------------------------------------------------------------------- source


class _Handles(threading.local):
    """Open shard files of one thread of one process (LRU)."""

    def __init__(self):
        self.pid = os.getpid()
        self.files: collections.OrderedDict[str, object] = collections.OrderedDict()


class WebDatasetSource:
    """Random-access source of raw records {"image": bytes, "caption": str, "image_id": "<shard>/<key>",
    "json": dict (when the sample has valid json metadata)} over WebDataset tar shards.

    `caption` is the .txt member (the first of `text_keys`), utf-8, stripped of surrounding
    whitespace (left as bytes when not utf-8); without one, the json's "caption". The image is the
    first of `image_keys` present. Members with other extensions are ignored.
    """

    def __init__(self, paths_or_dir_or_glob, *, image_keys: Sequence[str] = ("jpg", "jpeg", "png", "webp"),
                 text_keys: Sequence[str] = ("txt",), json_key: str | None = "json", index_threads: int = 8):
        self.shards = find_shards(paths_or_dir_or_glob)
        # Extensions match case-insensitively (.JPG is an image too).
        self.image_keys = tuple(k.lower() for k in image_keys)
        self.text_keys = tuple(k.lower() for k in text_keys)
        self.json_key = json_key = json_key.lower() if json_key else None
        # Threads overlap the header reads' I/O latency (network file systems); indexing is otherwise cheap.
        with ThreadPoolExecutor(max(1, min(index_threads, len(self.shards)))) as pool:
            indexes = list(pool.map(lambda p: index_shard(p, self.image_keys, self.text_keys, json_key), self.shards))
        self.skipped: dict[str, int] = {}
        self.damaged: dict[str, str] = {}
        for path, idx in zip(self.shards, indexes):
            for reason, n in idx.skipped.items():
                self.skipped[reason] = self.skipped.get(reason, 0) + n
            if idx.damage:
                self.damaged[path] = idx.damage
                logger.warning("WebDataset shard %s is damaged (%s); its samples after the damage are lost",
                               path, idx.damage)
        self._shard_of = np.concatenate([np.full(len(idx.keys), i, np.int32) for i, idx in enumerate(indexes)])
        self._keys = np.array([k for idx in indexes for k in idx.keys], dtype=str)
        self._spans = np.array([s for idx in indexes for s in idx.spans], dtype=np.int64).reshape(-1, 6)
        if self.skipped:
            logger.warning("WebDataset: skipped %s while indexing %s", self.skipped, self)
        self._local = _Handles()

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return f"WebDatasetSource({len(self.shards)} shards, {len(self)} samples)"

    def __getstate__(self):
        state = dict(self.__dict__)
        del state["_local"]  # open files do not pickle; the receiving process opens its own
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._local = _Handles()

    def _file(self, shard: int):
        handles = self._local
        if handles.pid != os.getpid():  # forked: inherited handles share file offsets with the parent
            handles.files.clear()
            handles.pid = os.getpid()
        path = self.shards[shard]
        f = handles.files.pop(path, None) or open(path, "rb")
        handles.files[path] = f  # most recently used last
        if len(handles.files) > _MAX_OPEN_PER_THREAD:
            handles.files.popitem(last=False)[1].close()
        return f

    def close(self):
        """Closes the calling thread's open shard files (they reopen on the next read)."""
        for f in self._local.files.values():
            f.close()
        self._local.files.clear()

    def __getitem__(self, index: int) -> dict:
        # Never raises for bad data: the pipeline guards only the transform, so anything wrong here
        # (the shard changed since indexing, text that is not utf-8) goes on to it in a form it
        # reports (records.py): short image bytes -> corrupt_image, bytes or no caption -> bad_text.
        i = range(len(self))[index]  # IndexError out of range; negative indices count from the end
        shard, key = int(self._shard_of[i]), str(self._keys[i])
        image_off, image_size, text_off, text_size, meta_off, meta_size = (int(v) for v in self._spans[i])
        f = self._file(shard)

        def read(offset, size):
            f.seek(offset)
            return f.read(size)

        record = {"image": read(image_off, image_size), "image_id": f"{shard_name(self.shards[shard])}/{key}"}
        meta = None
        if meta_off != _NONE:
            try:
                meta = json.loads(read(meta_off, meta_size).decode("utf-8"))
            except ValueError:
                pass  # indexing kept this sample for its .txt: the metadata is only extra
            if isinstance(meta, dict):
                record["json"] = meta
        if text_off != _NONE:
            text = read(text_off, text_size)
            try:
                record["caption"] = text.decode("utf-8").strip()
            except UnicodeDecodeError:
                record["caption"] = text  # not a str: the transform counts it as bad_text
        elif isinstance(meta, dict) and isinstance(meta.get("caption"), str):
            record["caption"] = meta["caption"].strip()
        return record
