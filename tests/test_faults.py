"""The fault suite: bad input never stops a run, never reads outside its root, never mixes results.

Part 1 (data): for every source kind (JSON list, JSON Lines, WebDataset, packed, TFDS), a dataset mixing
good records with every kind of bad one listed in FAULTS goes through the training transform for one
epoch: exactly the good records arrive, every bad one is counted under its reason, nothing outside
the root is opened, and `blip-jax data check` counts the same. A `blip-jax train` run on it completes.
Part 2 (jobs) is in tests/test_job_faults.py.
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from blip_jax.data import pipeline, transforms
from blip_jax.data.check import check
from blip_jax.data.sources import build_source
from blip_jax.testing import write_tar
from blip_jax.train import inputs

ROOT = Path(__file__).resolve().parents[1]


def _png(width: int, height: int, value: int = 90) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), value, np.uint8)).save(out, format="PNG")
    return out.getvalue()


def _jpeg(value: int = 200, mode: str = "RGB") -> bytes:
    out = io.BytesIO()
    Image.new(mode, (20, 16), value).save(out, format="JPEG")
    return out.getvalue()


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height (and no pixel data worth the name)."""
    body = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = lambda kind, data: (struct.pack(">I", len(data)) + kind + data  # noqa: E731
                                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", body) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


GOOD_IMAGE = _jpeg()
NON_UTF8 = "@@NON_UTF8@@"  # replaced by raw invalid UTF-8 bytes in the written annotation file

# Every kind of bad image file and the reason it is counted under.
BAD_FILES = {
    "zero_bytes.jpg": (b"", "empty_file"),
    "truncated.jpg": (GOOD_IMAGE[: len(GOOD_IMAGE) // 2], "corrupt_image"),
    "random_bytes.jpg": (np.random.default_rng(0).bytes(3000), "corrupt_image"),
    "bomb.png": (_png_header(20_000, 20_000), "image_too_large"),  # 400 M pixels: PIL refuses it
    "big_bomb.png": (_png_header(12_000, 12_000), "image_too_large"),  # 144 M: PIL would only warn
    "zero_size.png": (_png_header(0, 16), "zero_size_image"),
}
# (image path, caption) -> reason, for annotation files; "{outside}" is a file outside the root.
BAD_ENTRIES = [
    ({"image": "missing.jpg", "caption": "a missing file"}, "missing_file"),
    ({"image": "a_folder.jpg", "caption": "a directory, not an image"}, "missing_file"),
    ({"image": "../outside/secret.jpg", "caption": "dot-dot out of the root"}, "outside_root"),
    ({"image": "{outside}", "caption": "an absolute path outside the root"}, "outside_root"),
    ({"image": "link_out.jpg", "caption": "a symlink pointing outside"}, "outside_root"),
    ({"image": "../../../../../../etc/passwd", "caption": "the password file"}, "outside_root"),
    ({"image": "nul\u0000byte.jpg", "caption": "a NUL in the path"}, "outside_root"),
    ({"image": "good.jpg", "caption": ""}, "bad_text"),
    ({"image": "good.jpg", "caption": "   \t "}, "bad_text"),
    ({"image": "good.jpg", "caption": "... !!! ;;"}, "bad_text"),  # nothing left after cleaning
    ({"image": "good.jpg", "caption": 42}, "bad_text"),
    ({"image": "good.jpg", "caption": {"text": "a dict"}}, "bad_text"),
    ({"image": "good.jpg", "caption": "w" * 70_000}, "bad_text"),  # a 70k-character "word"
    ({"image": "good.jpg", "caption": "a lone surrogate \udcff here"}, "bad_text"),
    ({"image": "good.jpg", "caption": f"bytes that are not UTF-8 {NON_UTF8}"}, "bad_text"),
    ({"image": "good.jpg", "question": "", "answer": "yes"}, "bad_text"),
    ({"caption": "an entry without an image"}, "malformed_json"),
    ({"image": 17, "caption": "an image that is a number"}, "malformed_json"),
    ({"image": "good.jpg", "caption": None}, "malformed_json"),
    ("not a record at all", "malformed_json"),
    (["a", "list"], "malformed_json"),
]
GOOD_ENTRIES = [
    {"image": "good.jpg", "caption": "a grey rectangle"},
    {"image": "good.png", "caption": "a PNG picture"},
    {"image": "gray.jpg", "caption": "a grey-scale picture"},
    {"image": "link_in.jpg", "caption": "a symlink that stays inside"},
    {"image": "sub/nested.jpg", "caption": "a picture in a sub-folder"},
    {"image": "sub/../good.jpg", "caption": "dot-dot that stays inside"},
    {"image": "{inside}", "caption": "an absolute path inside the root"},
    {"image": "good.jpg", "caption": "un café très noir, ünïcödé"},
    {"image": "good.jpg", "caption": "Caption with CAPS, punctuation!!! and  spaces."},
]


def _fault_folder(root: Path) -> dict:
    """images/ (the root) with good and bad files, a file outside it, and the annotation entries."""
    images = root / "images"
    (images / "sub").mkdir(parents=True)
    (root / "outside").mkdir()
    (root / "outside" / "secret.jpg").write_bytes(_jpeg(10))
    (images / "good.jpg").write_bytes(GOOD_IMAGE)
    (images / "good.png").write_bytes(_png(12, 10))
    (images / "gray.jpg").write_bytes(_jpeg(128, "L"))
    (images / "sub" / "nested.jpg").write_bytes(_jpeg(30))
    (images / "a_folder.jpg").mkdir()
    os.symlink(images / "good.jpg", images / "link_in.jpg")
    os.symlink(root / "outside" / "secret.jpg", images / "link_out.jpg")
    for name, (data, _) in BAD_FILES.items():
        (images / name).write_bytes(data)
    fill = {"{outside}": str(root / "outside" / "secret.jpg"), "{inside}": str(images / "good.jpg")}

    def filled(entry):
        if isinstance(entry, dict) and entry.get("image") in fill:
            return {**entry, "image": fill[entry["image"]]}
        return entry

    entries, good, expected = [], [], Counter()
    for i, entry in enumerate(GOOD_ENTRIES):
        entries.append({**filled(entry), "image_id": f"good{i}"})
        good.append(f"good{i}")
    for name, (_, reason) in BAD_FILES.items():
        entries.append({"image": name, "caption": f"the file {name}", "image_id": f"bad_{name}"})
        expected[reason] += 1
    for i, (entry, reason) in enumerate(BAD_ENTRIES):
        entries.append({**filled(entry), "image_id": f"bad{i}"} if isinstance(entry, dict) else entry)
        expected[reason] += 1
    return {"images": images, "entries": entries, "good": good, "expected": dict(expected)}


def _dump(entry) -> bytes:
    """One entry as JSON bytes (surrogates kept as escapes; the NON_UTF8 marker as raw bad bytes)."""
    return json.dumps(entry).encode().replace(NON_UTF8.encode(), b"\xff\xfe\xc3")


@pytest.fixture(scope="module")
def faults(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    folder = _fault_folder(root)
    entries = folder["entries"]
    (root / "train.json").write_bytes(b"[" + b",\n".join(_dump(e) for e in entries) + b"]")
    lines = [_dump(e) for e in entries] + [b'{"image": "good.jpg", "caption": "cut sh', b"\xff\xfe not json"]
    (root / "train.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return {**folder, "root": root}


def _spec(faults, kind: str) -> dict:
    return {"kind": "json", "path": str(faults["root"] / f"train.{kind}"), "image_root": str(faults["images"])}


def _config(spec: dict):
    import importlib.util

    module = importlib.util.spec_from_file_location("stage1", ROOT / "configs" / "blip2_stage1.py")
    config = importlib.util.module_from_spec(module)
    module.loader.exec_module(config)
    cfg = config.get_config("tiny")
    cfg.data.update(spec)
    return cfg


class TrainingTransform:
    """The training run's own per-record transform, plus the record's id so a test sees who arrived."""

    def __init__(self, task):
        self.task = task

    def __call__(self, record, rng):
        return {**self.task.transform(record, rng), "id": np.array(record.get("image_id", ""), dtype=object)}


def _one_epoch(spec: dict) -> tuple[list[str], dict]:
    """(ids delivered, counts by reason) for one epoch of `spec` through training's transform."""
    cfg = _config(spec)
    task = inputs.make_task(cfg, 32, False)
    it = pipeline.make_iterator(task.records, batch_size=4, seed=0, transform=TrainingTransform(task),
                                process_index=0, process_count=1, shuffle=False, num_epochs=1,
                                drop_remainder=False, read_threads=0)
    ids = [str(i) for batch in it for i in batch["id"]]
    counts = dict(task.source_skipped)
    for reason, n in pipeline.skipped_counts(pipeline.iterator_state(it)).items():
        counts[reason] = counts.get(reason, 0) + n
    return ids, counts


@pytest.mark.parametrize("kind", ["json", "jsonl"])
def test_annotation_files_deliver_exactly_the_good_records(faults, kind, monkeypatch):
    opened = []
    real_read = transforms._read_file
    monkeypatch.setattr(transforms, "_read_file", lambda path: opened.append(path) or real_read(path))
    ids, counts = _one_epoch(_spec(faults, kind))
    assert sorted(ids) == sorted(faults["good"])
    expected = dict(faults["expected"])
    if kind == "jsonl":  # + a cut-off line and a line of bytes that are no JSON
        expected["malformed_json"] += 2
    assert counts == expected
    assert len(set(expected)) >= 8 and len(BAD_ENTRIES) + len(BAD_FILES) >= 15
    root = os.path.realpath(faults["images"])
    assert opened and all(os.path.realpath(p).startswith(root + os.sep) for p in opened), opened


@pytest.mark.parametrize("kind", ["json", "jsonl"])
def test_data_check_counts_what_training_counts(faults, kind):
    ids, counts = _one_epoch(_spec(faults, kind))
    result = check(_spec(faults, kind), image_size=32, augment="eval", batch_size=4, progress=False)
    assert result["delivered"] == len(ids)
    assert result["skipped"] == counts


def test_outside_root_paths_are_never_opened(faults):
    source = build_source(_spec(faults, "json"))
    assert source.skipped["outside_root"] == sum(r == "outside_root" for _, r in BAD_ENTRIES)
    paths = {source[i]["image"] for i in range(len(source))}
    assert not any("secret" in p or "passwd" in p for p in paths)


# ------------------------------------------------------------------ WebDataset
WDS_BAD = {  # key -> (members, reason)
    "b00": ([("b00.jpg", b""), ("b00.txt", b"empty image")], "empty_file"),
    "b01": ([("b01.jpg", GOOD_IMAGE[:300]), ("b01.txt", b"truncated image")], "corrupt_image"),
    "b02": ([("b02.jpg", np.random.default_rng(1).bytes(2000)), ("b02.txt", b"random bytes")], "corrupt_image"),
    "b03": ([("b03.png", _png_header(20_000, 20_000)), ("b03.txt", b"bomb")], "image_too_large"),
    "b04": ([("b04.png", _png_header(12_000, 12_000)), ("b04.txt", b"big bomb")], "image_too_large"),
    "b05": ([("b05.png", _png_header(0, 9)), ("b05.txt", b"zero width")], "zero_size_image"),
    "b06": ([("b06.jpg", GOOD_IMAGE), ("b06.txt", b"\xff\xfe\xc3 not utf-8")], "bad_text"),
    "b07": ([("b07.jpg", GOOD_IMAGE), ("b07.txt", b"   ")], "bad_text"),  # blank text
    "b08": ([("b08.jpg", GOOD_IMAGE), ("b08.txt", b"w" * 70_000)], "bad_text"),
    "b09": ([("b09.jpg", GOOD_IMAGE), ("b09.json", b'{"caption": "surrogate \\udcff"}')], "bad_text"),
    "b10": ([("b10.jpg", GOOD_IMAGE), ("b10.txt", b"... ;;")], "bad_text"),
    "b11": ([("b11.jpg", GOOD_IMAGE)], "incomplete_sample"),  # no text part
    "b12": ([("b12.txt", b"no image part")], "incomplete_sample"),
    "b13": ([("b13.jpg", GOOD_IMAGE), ("b13.json", b"{broken")], "malformed_json"),
    "b14": ([("b14.jpg", GOOD_IMAGE), ("b14.json", b'{"caption": 42}')], "incomplete_sample"),
}


@pytest.fixture(scope="module")
def wds(tmp_path_factory):
    d = tmp_path_factory.mktemp("wds_faults")
    good, expected, members = [], Counter(), []
    for i in range(8):
        key = f"g{i:02d}"
        members += [(f"{key}.jpg", _jpeg(20 * i)), (f"{key}.txt", f"good sample {i} é".encode())]
        good.append(f"shard-00000/{key}")
    for key, (parts, reason) in WDS_BAD.items():
        members += parts
        expected[reason] += 1
    members += [("../../escape.jpg", GOOD_IMAGE), ("../../escape.txt", b"a member named outside")]
    good.append("shard-00000/../../escape")  # a member's name is only a key: nothing is extracted
    write_tar(d / "shard-00000.tar", members)
    offsets = write_tar(d / "shard-00001.tar", [("g20.jpg", GOOD_IMAGE), ("g20.txt", b"kept"),
                                           ("t21.jpg", GOOD_IMAGE * 3), ("t21.txt", b"cut short")])
    good.append("shard-00001/g20")
    _, data_offset, size = offsets["t21.jpg"]
    os.truncate(d / "shard-00001.tar", data_offset + size // 2)  # t21's image member is cut short
    expected["truncated_tar_member"] += 1
    return {"path": str(d), "good": good, "expected": dict(expected)}


def test_webdataset_delivers_exactly_the_good_samples(wds):
    ids, counts = _one_epoch({"kind": "webdataset", "path": wds["path"]})
    assert sorted(ids) == sorted(wds["good"])
    assert counts == wds["expected"]
    assert len(WDS_BAD) + 1 >= 15
    result = check({"kind": "webdataset", "path": wds["path"]}, image_size=32, augment="eval", batch_size=4,
                   progress=False)
    assert result["delivered"] == len(ids) and result["skipped"] == counts


# ------------------------------------------------------------------ packed shards
def test_packed_delivers_exactly_the_good_records_and_counts_damaged_ones(faults, tmp_path):
    from array_record.python.array_record_module import ArrayRecordWriter

    from blip_jax.data.packed import MANIFEST, encode_record, pack

    source = build_source(_spec(faults, "json"))
    manifest = pack(source, tmp_path / "packed", records_per_shard=5, progress=False)
    # bad images were left out when packing, counted there; bad texts travel and are counted in training
    image_reasons = {"missing_file", "empty_file", "corrupt_image", "image_too_large", "zero_size_image"}
    assert manifest["skipped"] == {k: v for k, v in faults["expected"].items() if k in image_reasons | {
        "outside_root", "malformed_json"}}
    # damaged records written straight into one more shard
    damaged = [b"", b"BJR1", b"XXXX" + b"\0" * 8, b"BJR1" + struct.pack("<I", 9) + b"{not json",
               b"BJR1" + struct.pack("<I", 2) + b"[]", encode_record({"caption": "fine", "image_id": "p_ok"}, GOOD_IMAGE)]
    writer = ArrayRecordWriter(str(tmp_path / "packed" / "part-extra.array_record"), "group_size:1")
    for blob in damaged:
        writer.write(blob)
    writer.close()
    meta = json.loads((tmp_path / "packed" / MANIFEST).read_text())
    meta["shards"].append("part-extra.array_record")
    meta["records"] += len(damaged)
    (tmp_path / "packed" / MANIFEST).write_text(json.dumps(meta))
    ids, counts = _one_epoch({"kind": "packed", "path": str(tmp_path / "packed")})
    assert sorted(ids) == sorted(faults["good"] + ["p_ok"])
    assert counts == {"bad_text": faults["expected"]["bad_text"], "malformed_json": len(damaged) - 1}


def test_packed_manifest_naming_files_outside_is_refused(tmp_path):
    from blip_jax.data.packed import PackedSource

    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "pack.json").write_text(json.dumps({"records": 1, "shards": ["../../etc/passwd"]}))
    with pytest.raises(ValueError, match="outside"):
        PackedSource(tmp_path / "p")
    (tmp_path / "p" / "pack.json").write_text("{truncated")
    with pytest.raises(ValueError, match="not a valid pack manifest"):
        PackedSource(tmp_path / "p")


# ------------------------------------------------------------------ TFDS
TFDS_BAD_TEXTS = {"t_empty": "", "t_blank": "   ", "t_tab_newline": "\t\n", "t_punctuation": "... ;;",
                  "t_huge": "w" * 70_000, "t_not_utf8": b"\xff\xfe\xc3 bytes", "t_huge_words": "word " * 20_000}
TFDS_BAD_IMAGES = {**{f"i_{name}": data for name, (data, _) in BAD_FILES.items()},
                   "i_zero_height.png": _png_header(16, 0), "i_header_only.jpg": GOOD_IMAGE[:200]}


@pytest.fixture(scope="module")
def tfds_faults(tmp_path_factory):
    """A prepared TFDS dataset (TFDS stores image bytes as given): good examples and bad ones."""
    import tensorflow_datasets as tfds

    good = {f"g{i}": (_jpeg(30 * i), f"good example {i}") for i in range(5)}
    examples = {**good, **{k: (GOOD_IMAGE, v) for k, v in TFDS_BAD_TEXTS.items()},
                **{k: (v, "a caption for a bad image") for k, v in TFDS_BAD_IMAGES.items()}}

    class FaultCaps(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)), "caption": tfds.features.Text(),
                "image/id": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for key, (image, caption) in examples.items():
                yield key, {"image": io.BytesIO(image), "caption": caption, "image/id": key}

    d = tmp_path_factory.mktemp("tfds_faults")
    FaultCaps(data_dir=d, file_format="array_record").download_and_prepare()
    reasons = {name: reason for name, (_, reason) in BAD_FILES.items()}
    expected = Counter(reasons[k[2:]] if k[2:] in reasons else "zero_size_image" if "zero" in k else "corrupt_image"
                       for k in TFDS_BAD_IMAGES)
    expected["bad_text"] += len(TFDS_BAD_TEXTS)
    return {"data_dir": str(d), "good": sorted(good), "expected": dict(expected)}


def test_tfds_delivers_exactly_the_good_examples(tfds_faults):
    spec = {"kind": "tfds", "tfds_name": "fault_caps", "data_dir": tfds_faults["data_dir"]}
    ids, counts = _one_epoch(spec)
    assert sorted(ids) == tfds_faults["good"]
    assert counts == tfds_faults["expected"]
    assert len(TFDS_BAD_TEXTS) + len(TFDS_BAD_IMAGES) >= 15
    result = check(spec, image_size=32, augment="eval", batch_size=4, progress=False)
    assert result["delivered"] == len(ids) and result["skipped"] == counts


# ------------------------------------------------------------------ a real run
def test_blip_jax_train_on_the_fault_folder_completes(faults, tmp_path):
    spec = _spec(faults, "jsonl")
    workdir = tmp_path / "w"
    args = ["train", "--config=configs/blip2_stage1.py:tiny", f"--workdir={workdir}", "--config.total_steps=6",
            "--config.log_every=3", "--config.checkpoint_every=3", "--config.batch_size=4",
            *(f"--config.data.{k}={v}" for k, v in spec.items())]
    out = subprocess.run([sys.executable, "-m", "blip_jax.cli", *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((workdir / "data_report.json").read_text())
    assert report["skipped_total"] > 0 and set(report["skipped"]) <= set(faults["expected"])
    assert (workdir / "model" / "config.json").is_file()


def test_a_class_folder_symlink_out_of_the_root_is_left_out(tmp_path):
    from blip_jax.eval.classification import folder_records

    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.jpg").write_bytes(GOOD_IMAGE)
    (tmp_path / "classes" / "cat").mkdir(parents=True)
    (tmp_path / "classes" / "cat" / "a.jpg").write_bytes(GOOD_IMAGE)
    os.symlink(tmp_path / "outside" / "secret.jpg", tmp_path / "classes" / "cat" / "b.jpg")
    os.symlink(tmp_path / "classes" / "cat" / "a.jpg", tmp_path / "classes" / "cat" / "c.jpg")
    classes, records = folder_records(tmp_path / "classes")
    assert classes == ["cat"] and [Path(r["image"]).name for r in records] == ["a.jpg", "a.jpg"]
