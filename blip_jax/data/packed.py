"""Any source packed into ArrayRecord shards, for fast random access on pods (`blip-jax data pack`).

A packed dataset is a directory:

    pack.json                     what was packed: source, counts, skipped records by reason
    part-00000.array_record ...   one record per entry: b"BJR1", uint32 header length (little
                                  endian), the JSON header (the raw record without its image),
                                  then the encoded image bytes as they were (no re-encoding)

Packing reads every image once (in a thread pool), checks that it decodes, and leaves bad
records out, counted by reason; it writes into a temporary directory renamed into place at the
end, so an interrupted pack never leaves a half-written dataset behind.
"""

from __future__ import annotations

import io
import json
import os
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from blip_jax.atomic import directory
from blip_jax.data.paths import Root
from blip_jax.data.records import BadRecord, add_counts

MAGIC = b"BJR1"
MANIFEST = "pack.json"
_HEADER = struct.Struct("<4sI")


def encode_record(record: dict, image: bytes) -> bytes:
    # surrogatepass: a text that is not valid Unicode travels as it is, for the pipeline to count as bad_text
    header = json.dumps({k: v for k, v in record.items() if k != "image"}, ensure_ascii=False).encode(
        "utf-8", errors="surrogatepass")
    return _HEADER.pack(MAGIC, len(header)) + header + image


def decode_record(blob: bytes) -> dict:
    """A packed record; one that cannot be parsed (a damaged shard) comes back marked
    `transforms.MALFORMED`, so the pipeline skips and counts it instead of stopping."""
    from blip_jax.data.transforms import MALFORMED

    try:
        magic, length = _HEADER.unpack_from(blob)
        if magic != MAGIC:
            raise ValueError(f"not a blip-jax packed record (magic {magic!r})")
        start = _HEADER.size
        record = json.loads(blob[start:start + length].decode("utf-8", errors="surrogatepass"))
        if not isinstance(record, dict):
            raise ValueError(f"the header holds a {type(record).__name__}, not a record")
    except (struct.error, ValueError) as e:
        return {MALFORMED: f"packed record: {e}", "image": b""}
    record["image"] = bytes(blob[start + length:])
    return record


def image_bytes(image) -> bytes:
    """The encoded bytes of a raw record's image: bytes as they are, a file's content, or an
    array encoded as PNG (lossless)."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise BadRecord("missing_file", str(path))
        return path.read_bytes()
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


class PackedSource:
    """Grain random-access source over a packed directory (module docstring)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        manifest = self.path / MANIFEST
        if not manifest.is_file():
            raise FileNotFoundError(f"{self.path} is not a packed dataset (no {MANIFEST}); "
                                    "make one with `blip-jax data pack`")
        try:
            self.manifest = json.loads(manifest.read_text(encoding="utf-8"))
            names, self.records = list(self.manifest["shards"]), int(self.manifest["records"])
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{manifest} is not a valid pack manifest ({type(e).__name__}: {e})") from None
        root = Root(self.path)
        self.shards = [root.resolve(name) for name in names]
        outside = [name for name, shard in zip(names, self.shards) if shard is None]
        if outside:
            raise ValueError(f"{manifest} names shards outside {self.path}: {outside[:3]}; refusing to read them")
        self._reader = None

    def _source(self):
        if self._reader is None:  # opened lazily: each (worker) process opens its own files
            import grain

            self._reader = grain.sources.ArrayRecordDataSource(self.shards)
        return self._reader

    def __getstate__(self):
        return {**self.__dict__, "_reader": None}

    def __len__(self) -> int:
        return self.records

    def __getitem__(self, index: int) -> dict:
        return decode_record(self._source()[int(index)])

    def __repr__(self) -> str:
        return f"PackedSource({str(self.path)!r}, records={len(self)}, shards={len(self.shards)})"


def _checked(record: dict, verify: bool) -> tuple[dict, bytes]:
    from blip_jax.data.transforms import decode_image

    data = image_bytes(record["image"])
    if verify:
        decode_image(data)
    return record, data


def _bounded_map(pool, fn, n: int, window: int):
    """pool.map(fn, range(n)) in order, with at most `window` results in flight (bounded memory)."""
    for begin in range(0, n, window):
        yield from pool.map(fn, range(begin, min(n, begin + window)))


def pack(source, out_dir: str | os.PathLike, *, records_per_shard: int = 10_000, verify: bool = True,
         threads: int = 8, overwrite: bool = False, progress: bool = True) -> dict:
    """Write `source` as a packed dataset in `out_dir`; returns the manifest (counts included)."""
    from array_record.python.array_record_module import ArrayRecordWriter
    from tqdm import tqdm

    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; choose another directory or pass overwrite")
    if records_per_shard < 1:
        raise ValueError(f"records_per_shard must be >= 1, got {records_per_shard}")
    skipped = dict(getattr(source, "skipped", {}) or {})
    shards, written, writer, start = [], 0, None, time.time()

    def attempt(i):
        try:
            return _checked(source[i], verify)
        except BadRecord as e:
            return e

    with directory(out, overwrite=True) as tmp:
        with ThreadPoolExecutor(max(1, threads)) as pool:
            results = _bounded_map(pool, attempt, len(source), window=64 * max(1, threads))
            for result in tqdm(results, total=len(source), desc="pack", unit="rec", disable=not progress):
                if isinstance(result, BadRecord):
                    add_counts(skipped, {result.reason: 1})
                    continue
                if writer is None or (written and written % records_per_shard == 0):
                    if writer is not None:
                        writer.close()
                    shards.append(f"part-{len(shards):05d}.array_record")
                    writer = ArrayRecordWriter(str(tmp / shards[-1]), "group_size:1")
                writer.write(encode_record(*result))
                written += 1
        if writer is not None:
            writer.close()
        manifest = {"records": written, "shards": shards, "skipped": skipped, "source": repr(source),
                    "seconds": round(time.time() - start, 2)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return manifest
