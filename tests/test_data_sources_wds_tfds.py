"""WebDatasetSource over img2dataset-style tar shards (with damage) and TfdsSource over a tiny
array_record TFDS dataset written here without TensorFlow."""

import io
import json
import os
import pickle
import tarfile

import grain
import numpy as np
import pytest
from PIL import Image

from blip_jax.data.webdataset import WebDatasetSource
from blip_jax.testing import write_tar

tfds = pytest.importorskip("tensorflow_datasets")


def encoded(fmt: str, value: int, size=(3, 2)) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(out, format=fmt)
    return out.getvalue()


def sample(key, image=None, ext="jpg", text=None, meta=None):
    members = []
    if image is not None:
        members.append((f"{key}.{ext}", image))
    if text is not None:
        members.append((f"{key}.txt", text.encode()))
    if meta is not None:
        members.append((f"{key}.json", meta if isinstance(meta, bytes) else json.dumps(meta).encode()))
    return members


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """A shard directory and the good samples: image_id -> (image bytes, caption, json or None)."""
    d = tmp_path_factory.mktemp("wds")
    jpg, png = encoded("JPEG", 200), encoded("PNG", 7)
    good = {}

    def add(shard, key, image, caption, meta, ext="jpg", text=True):
        good[f"{shard}/{key}"] = (image, caption, meta)
        return sample(key, image, ext, caption if text else None, meta)

    # shard-00000: complete, with bad samples inside
    write_tar(d / "shard-00000.tar", [
        ("00000", b""),  # not a sample member: ignored
        *add("shard-00000", "000000", jpg, "a red square", {"url": "http://x/0.jpg", "similarity": 0.31}),
        *add("shard-00000", "000001", png, "two dots", {"url": "http://x/1.png"}, ext="png"),
        *sample("000002", None, text="no image here", meta={"url": "u"}),  # incomplete_sample
        *add("shard-00000", "000003", jpg + b"3", "caption from json", {"caption": "caption from json"},
             text=False),
        *sample("000004", jpg),  # no text at all: incomplete_sample
        *add("shard-00000", "000005", jpg + b"5", "txt wins", None) + [("000005.json", b"{not json")],
        *sample("000006", jpg, meta=b"{broken"),  # malformed json and no txt: malformed_json
        *sample("000007", jpg, meta={"url": "no caption"}),  # json without caption, no txt: incomplete
        ("._000008.jpg", jpg),  # hidden (macOS) file: ignored
        *sample("000009", jpg + b"9"), ("000009.txt", b"\xff\xfe latin-1?"),  # kept: the transform says bad_text
    ])
    good["shard-00000/000009"] = (jpg + b"9", b"\xff\xfe latin-1?", None)
    # shard-00001: cut in the middle of 000012.jpg's data; 000013 is lost
    offsets = write_tar(d / "shard-00001.tar", [
        *add("shard-00001", "000010", png, "ten", {"i": 10}, ext="png"),
        *add("shard-00001", "000011", jpg, "eleven", None),
        *sample("000012", jpg * 4, text="twelve"),
        *sample("000013", jpg, text="thirteen"),
    ])
    _, data_offset, size = offsets["000012.jpg"]
    os.truncate(d / "shard-00001.tar", data_offset + size // 2)
    # shard-00002: cut in the middle of 000021.txt's header (000021.jpg complete): 000021 is cut short
    offsets = write_tar(d / "shard-00002.tar", [
        *add("shard-00002", "000020", jpg, "twenty", None),
        *sample("000021", jpg, text="twenty-one"),
    ])
    header_offset, _, _ = offsets["000021.txt"]
    os.truncate(d / "shard-00002.tar", header_offset + 100)
    # not a tar at all
    (d / "shard-00003.tar").write_bytes(b"this is not a tar file" * 40)
    return d, good


def read_all(src, order=None):
    order = range(len(src)) if order is None else order
    return {r["image_id"]: r for r in (src[i] for i in order)}


def test_every_good_sample_once_with_its_bytes_and_caption(shards):
    d, good = shards
    src = WebDatasetSource(d)
    assert len(src) == len(good) == 8
    ids = [src[i]["image_id"] for i in range(len(src))]
    assert sorted(ids) == ids == sorted(good)  # shards by name, samples in tar order
    for image_id, record in read_all(src).items():
        image, caption, meta = good[image_id]
        assert record["image"] == image
        assert record["caption"] == caption
        assert record.get("json") == meta
    assert repr(src) == "WebDatasetSource(4 shards, 8 samples)"


def test_skipped_counts_by_reason_and_damaged_shards(shards):
    d, _ = shards
    src = WebDatasetSource(d)
    assert src.skipped == {"incomplete_sample": 3, "malformed_json": 1, "truncated_tar_member": 2}
    assert sorted(os.path.basename(p) for p in src.damaged) == ["shard-00001.tar", "shard-00002.tar",
                                                                  "shard-00003.tar"]


def test_random_access_is_order_independent(shards):
    d, _ = shards
    src = WebDatasetSource(d)
    forward = read_all(src)
    shuffled = read_all(WebDatasetSource(d), np.random.default_rng(0).permutation(len(src)))
    assert shuffled == forward
    assert src[-1] == src[len(src) - 1]
    with pytest.raises(IndexError):
        src[len(src)]


def test_pickle_round_trip_and_fork_reopen(shards):
    d, _ = shards
    src = WebDatasetSource(d)
    expected = read_all(src)  # opens handles, which must not travel
    clone = pickle.loads(pickle.dumps(src))
    assert read_all(clone) == expected and clone.skipped == src.skipped
    src._local.pid = -1  # as after a fork: the inherited handles must not be reused
    stale = dict(src._local.files)
    assert read_all(src) == expected
    assert not set(map(id, src._local.files.values())) & set(map(id, stale.values()))


def test_shard_changed_after_indexing_reads_without_raising(shards, tmp_path):
    d, good = shards
    copy = tmp_path / "shard-00000.tar"
    copy.write_bytes((d / "shard-00000.tar").read_bytes())
    src = WebDatasetSource(copy)
    with tarfile.open(copy) as tar:
        os.truncate(copy, tar.getmember("000001.png").offset_data + 10)  # cuts 000001.png, keeps 000000
    assert src[0]["image"] == good["shard-00000/000000"][0]
    short = src[1]  # the transform reports the short image as corrupt_image
    assert short["image"] == good["shard-00000/000001"][0][: len(short["image"])] != good["shard-00000/000001"][0]


def test_grain_shuffle_covers_every_sample(shards):
    d, good = shards
    src = WebDatasetSource(d)
    ids = [r["image_id"] for r in grain.MapDataset.source(src).shuffle(seed=0)]
    assert sorted(ids) == sorted(good) and ids != sorted(ids)


def test_shard_specs(shards):
    d, _ = shards
    by_dir = WebDatasetSource(d)
    for spec in (str(d / "shard-*.tar"), str(d / "shard-{00000..00003}.tar"),
                 [d / f"shard-0000{i}.tar" for i in (3, 1, 0, 2)]):
        assert WebDatasetSource(spec).shards == by_dir.shards
    assert len(WebDatasetSource(d / "shard-00001.tar")) == 2


def test_missing_paths_raise(tmp_path):
    with pytest.raises(FileNotFoundError, match="no .tar shards"):
        WebDatasetSource(tmp_path)
    with pytest.raises(FileNotFoundError, match="not found"):
        WebDatasetSource(tmp_path / "nope.tar")
    with pytest.raises(FileNotFoundError, match="not found"):
        WebDatasetSource(str(tmp_path / "shard-*.tar"))


# ----------------------------------------------------------------------------------------- TFDS

PIXELS = {100 + i: np.arange(i, i + 2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 5 for i in range(3)}
CAPTIONS = {100 + i: [f"caption {i}.{j} é" for j in range(i + 1)] for i in range(3)}


def png_of(pixels) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


class TinyCaps(tfds.core.GeneratorBasedBuilder):
    """Three images with 1, 2, 3 captions; registered as "tiny_caps"."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "captions": tfds.features.Sequence({"text": tfds.features.Text()}),
            "image/id": np.int64,
        }))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for image_id, pixels in PIXELS.items():
            # A file object, not an array: encoding arrays needs TensorFlow.
            yield image_id, {"image": io.BytesIO(png_of(pixels)), "captions": {"text": CAPTIONS[image_id]},
                             "image/id": image_id}


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tfds")
    TinyCaps(data_dir=d, file_format="array_record").download_and_prepare()
    return d


def test_tfds_records(tfds_dir):
    from blip_jax.data.tfds_source import TfdsSource

    src = TfdsSource("tiny_caps", data_dir=tfds_dir)
    assert src.fields == {"image": "image", "captions": "captions/text", "image_id": "image/id"}
    assert len(src) == 3 and "3 records" in repr(src)
    records = {r["image_id"]: r for r in (src[i] for i in range(len(src)))}
    assert sorted(records) == [str(i) for i in PIXELS]
    for image_id, pixels in PIXELS.items():
        record = records[str(image_id)]
        assert isinstance(record["image"], bytes)
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(record["image"]))), pixels)
        assert record["captions"] == CAPTIONS[image_id]
    coco_style = TfdsSource("tiny_caps", data_dir=tfds_dir, fields={"image": "image", "captions": "captions/text"})
    assert set(coco_style[0]) == {"image", "captions"}
    with pytest.raises(ValueError, match="not features"):
        TfdsSource("tiny_caps", data_dir=tfds_dir, fields={"image": "img"})


def test_tfds_expand_captions_pickle_and_grain(tfds_dir):
    from blip_jax.data.tfds_source import TfdsSource

    src = TfdsSource("tiny_caps", data_dir=tfds_dir, expand_captions=True)
    assert len(src) == 6
    pairs = sorted((r["image_id"], r["caption"]) for r in (src[i] for i in range(len(src))))
    assert pairs == sorted((str(i), c) for i, cs in CAPTIONS.items() for c in cs)
    assert "captions" not in src[0]
    clone = pickle.loads(pickle.dumps(src))
    assert clone._source is None and clone[5] == src[5]
    shuffled = sorted((r["image_id"], r["caption"]) for r in grain.MapDataset.source(clone).shuffle(seed=0))
    assert shuffled == pairs


def test_tfds_not_prepared(tmp_path):
    from blip_jax.data.tfds_source import TfdsSource

    for name in ("tiny_caps", "no_such_dataset"):
        with pytest.raises(FileNotFoundError, match=f"{name}.*not prepared.*tfds build"):
            TfdsSource(name, data_dir=tmp_path)
    assert not any(tmp_path.iterdir())  # nothing downloaded or created
