"""A random-access grain source over a prepared TFDS dataset (array_record format), without TensorFlow.

The dataset is opened from its files alone (`builder_from_files`: no builder code, no download),
with every image feature left encoded (`SkipDecoding`), so records carry image bytes that the
pipeline's transform decodes (and counts, when corrupt). `fields` maps record keys (records.py) to
feature paths, "/"-separated for nested features: {"captions": "captions/text"} reads
example["captions"]["text"]; a flat key that itself contains "/" ("image/id") is matched first.

With `expand_captions=True` the source yields one record per (example, caption) pair, for
captioning training. Building that index needs each example's caption count, which TFDS does not
store: construction reads (and parses, without decoding images) every example of the split once,
i.e. one full pass over the split's files (COCO train2014: ~13 GB). Reads afterwards are random.
"""

from __future__ import annotations

import threading

import numpy as np

# Feature paths of datasets whose layout the generic rules below would not guess (or guess wrong).
KNOWN_FIELDS = {
    "coco_captions": {"image": "image", "captions": "captions/text", "image_id": "image/id"},
}
_LIST_KEYS = ("captions", "answers")  # record keys holding list[str]
_ID_KEYS = ("image_id", "question_id")  # record keys holding str identifiers
_ID_PATHS = {"image_id": ("image/id", "image_id", "id"), "question_id": ("question_id", "question/id")}


def _tfds():
    import tensorflow_datasets as tfds  # imported lazily: optional dependency, and slow-ish

    return tfds


def _leaves(feature, prefix: str = "", in_sequence: bool = False):
    """(path, feature, inside a Sequence) of every leaf feature of a FeaturesDict."""
    features = _tfds().features
    if isinstance(feature, features.FeaturesDict):
        for key, sub in feature.items():
            yield from _leaves(sub, f"{prefix}/{key}" if prefix else key, in_sequence)
    elif isinstance(feature, features.Sequence):
        yield from _leaves(feature.feature, prefix, True)
    else:
        yield prefix, feature, in_sequence


def _text_role(path: str, in_sequence: bool) -> str | None:
    """The record key a text feature at `path` fills under the generic rules, or None."""
    words = path.lower().split("/")
    if any(w.startswith("caption") for w in words) or words[-1] == "text":
        return "captions" if in_sequence else "caption"
    if any(w.startswith("question") for w in words) and not words[-1].endswith("id"):
        return "question"
    if any(w.startswith("answer") for w in words):
        return "answers"
    return None


def default_fields(name: str, features) -> dict[str, str]:
    """`KNOWN_FIELDS` for a known dataset, else: the image feature (the one named "image" first), the
    first text feature(s) named caption(s)/text/question/answer(s), and an id feature if present."""
    base = name.split("/")[0].split(":")[0]
    if base in KNOWN_FIELDS:
        return dict(KNOWN_FIELDS[base])
    features_lib = _tfds().features
    leaves = list(_leaves(features))
    images = [path for path, feature, _ in leaves if isinstance(feature, features_lib.Image)]
    if not images:
        raise ValueError(f"TFDS dataset {name!r} has no image feature; pass fields= (features: {features})")
    fields = {"image": "image" if "image" in images else images[0]}
    for path, feature, in_sequence in leaves:
        role = _text_role(path, in_sequence) if isinstance(feature, features_lib.Text) else None
        if role and role not in fields:
            fields[role] = path
    if not {"caption", "captions", "question"} & set(fields):
        raise ValueError(f"TFDS dataset {name!r} has no caption or question text feature; pass fields= "
                         f"(features: {features})")
    paths = {path for path, _, _ in leaves}
    for key, candidates in _ID_PATHS.items():
        found = next((p for p in candidates if p in paths), None)
        if found:
            fields[key] = found
    return fields


def resolve(example, path: str):
    """example[path], where `path` is a flat key or "/"-separated nested keys (longest key first)."""
    if path in example:
        return example[path]
    parts = path.split("/")
    for n in range(len(parts) - 1, 0, -1):
        head = "/".join(parts[:n])
        if head in example:
            return resolve(example[head], "/".join(parts[n:]))
    raise KeyError(path)


def _plain(value):
    """numpy / bytes values as Python str, int, float and lists (text decoded as utf-8)."""
    if isinstance(value, (bytes, np.bytes_)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return bytes(value)  # not a str: the transform counts it as bad_text
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value] if value.ndim else _plain(value.item())
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _image_decoders(features) -> dict:
    """A SkipDecoding for every image feature (nested FeaturesDicts included): images stay bytes."""
    tfds = _tfds()
    decoders = {}
    for key, feature in features.items():
        if isinstance(feature, tfds.features.Image):
            decoders[key] = tfds.decode.SkipDecoding()
        elif isinstance(feature, tfds.features.FeaturesDict):
            sub = _image_decoders(feature)
            if sub:
                decoders[key] = sub
    return decoders


def _open(name: str, split: str, data_dir):
    """The tfds random-access data source, from prepared files only; FileNotFoundError if absent."""
    tfds = _tfds()
    try:
        builder = tfds.core.read_only_builder.builder_from_files(name, data_dir=data_dir)
    except (tfds.core.DatasetNotFoundError, ImportError) as e:
        where = data_dir or "the default TFDS data dirs (~/tensorflow_datasets, $TFDS_DATA_DIR)"
        raise FileNotFoundError(
            f"TFDS dataset {name!r} is not prepared in {where}. Prepare it first (nothing is downloaded "
            f"here): `tfds build {name.split(':')[0]} --data_dir {data_dir or '<dir>'} --file_format array_record` "
            f"or its builder's download_and_prepare(file_format='array_record'). ({e})") from None
    return builder.as_data_source(split=split, decoders=_image_decoders(builder.info.features))


class TfdsSource:
    """Random-access source of raw records (records.py) from a prepared TFDS dataset split.

    Records hold the keys of `fields` (default: `default_fields`): image bytes, text as str,
    `captions`/`answers` as list[str], ids as str. With `expand_captions=True`, one record per
    caption, with `caption` (str) instead of `captions` (see the module docstring for the cost).
    Reading never raises for bad data (the pipeline guards only the transform): text that is not
    utf-8 stays bytes, which the transform reports as bad_text; corrupt images as corrupt_image.
    """

    def __init__(self, name: str, *, split: str = "train", data_dir=None, fields: dict[str, str] | None = None,
                 expand_captions: bool = False):
        self.name, self.split, self.data_dir = name, split, None if data_dir is None else str(data_dir)
        self.skipped: dict[str, int] = {}  # same interface as the file sources; TFDS records are checked on read
        self._lock = threading.Lock()
        self._source = _open(name, split, self.data_dir)
        features = self._source.dataset_info.features
        self.fields = dict(fields) if fields is not None else default_fields(name, features)
        paths = {path for path, _, _ in _leaves(features)}
        unknown = [p for p in self.fields.values() if p not in paths and not any(q.startswith(p + "/") for q in paths)]
        if unknown:
            raise ValueError(f"fields {unknown} are not features of {name!r}: {sorted(paths)}")
        self._starts = None  # expanded: first flat index of each example (np.int64, length n + 1)
        if expand_captions:
            if "captions" not in self.fields:
                raise ValueError(f"expand_captions needs a 'captions' field; fields are {self.fields}")
            self._starts = np.concatenate([[0], np.cumsum(self._caption_counts())]).astype(np.int64)

    def _caption_counts(self, chunk: int = 256) -> np.ndarray:
        """Captions per example: one pass over the split (images stay encoded, so only parsing)."""
        counts = np.zeros(len(self._source), np.int64)
        path = self.fields["captions"]
        for start in range(0, len(counts), chunk):
            keys = list(range(start, min(start + chunk, len(counts))))
            for i, example in zip(keys, self._source.__getitems__(keys)):
                counts[i] = len(resolve(example, path))
        return counts

    def _data(self):
        if self._source is None:  # unpickled in a worker: open it there
            with self._lock:
                if self._source is None:
                    self._source = _open(self.name, self.split, self.data_dir)
        return self._source

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_source"], state["_lock"] = None, None  # file readers and locks stay in their process
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return int(self._starts[-1]) if self._starts is not None else len(self._data())

    def __repr__(self) -> str:
        expanded = ", expand_captions=True" if self._starts is not None else ""
        return f"TfdsSource({self.name!r}, split={self.split!r}, {len(self)} records{expanded})"

    def __getitem__(self, index: int) -> dict:
        i = range(len(self))[index]  # IndexError out of range; negative indices count from the end
        caption = None
        if self._starts is not None:
            example_index = int(np.searchsorted(self._starts, i, side="right")) - 1
            caption = i - int(self._starts[example_index])
        else:
            example_index = i
        example = self._data()[example_index]
        record = {}
        for key, path in self.fields.items():
            value = resolve(example, path)
            if key == "image":
                record[key] = bytes(value)
                continue
            value = _plain(value)
            if key in _LIST_KEYS and not isinstance(value, list):
                value = [value]
            record[key] = str(value) if key in _ID_KEYS else value
        if caption is not None:
            record["caption"] = record.pop("captions")[caption]
        return record
