"""One entry point from a config's data settings to a grain source (or a mixture of several).

    data.kind = synthetic | synthetic_pairs | json | webdataset | tfds | packed

    json        path (annotation file), image_root, layout, split, annotations, image_pattern
    webdataset  path (directory, glob or one .tar of img2dataset shards)
    tfds        tfds_name, split, data_dir (a dataset prepared there beforehand; nothing downloads)
    packed      path (a `blip-jax data pack` output)
    synthetic   num_records, seed, image_size, wrong_fraction (the built-in shapes data; a share of
                wrong captions, for the CapFilt experiment)
    synthetic_pairs  num_records, seed, image_size: two shapes images and a true or false
                statement about them (NLVR2's form)

`root`, when set, is the directory (or bucket prefix) that a relative `path`, `image_root` and
`annotations` are under; a mixture entry without its own takes the data block's. An entry's
`instruction_family` tags its records with the InstructBLIP template family they are turned into
instructions with (`blip_jax.data.instructions`).

Every kind takes `task` (the records' task family, e.g. "caption" or "vqa") and `expand_captions`
(one record per caption; "auto": yes, except for tfds, where it would cost a pass over the split
at start-up; training then draws one of an image's captions each time it reads the image).
`data.mixture`, when not empty, names several such source settings (each with a `weight`) mixed
by `data.balance` (see `mixing.py`); the top-level source fields are then unused.
"""

from __future__ import annotations

from typing import Mapping

KINDS = ("synthetic", "synthetic_pairs", "json", "webdataset", "tfds", "packed")


def under_root(spec: Mapping) -> dict:
    """`spec` with its relative file settings joined onto its `root` (module docstring)."""
    out = dict(spec)
    root = str(out.get("root") or "")
    if root:
        for key in ("path", "image_root", "annotations"):
            value = str(out.get(key) or "")
            if value and not (value.startswith("/") or "://" in value):
                out[key] = f"{root.rstrip('/')}/{value}"
    return out


def build_source(spec: Mapping):
    """A grain random-access source from one source's settings (module docstring)."""
    spec = under_root(spec)
    get = spec.get
    kind = get("kind", "synthetic")
    if kind == "synthetic":
        from blip_jax.data.synthetic import SyntheticShapes

        return SyntheticShapes(get("num_records", 10_000), seed=get("seed", 0), image_size=get("image_size", 64),
                               wrong_fraction=get("wrong_fraction", 0.0))
    if kind == "synthetic_pairs":
        from blip_jax.data.synthetic import SyntheticPairs

        return SyntheticPairs(get("num_records", 10_000), seed=get("seed", 0), image_size=get("image_size", 64))
    if kind == "json":
        from blip_jax.data.annotations import AnnotationSource

        return AnnotationSource(_required(spec, "path"), image_root=get("image_root", ""),
                                layout=get("layout", "auto"), split=get("split", "train"),
                                expand_captions=_expand(spec, True), annotations=get("annotations", ""),
                                image_pattern=get("image_pattern") or "COCO_{split}2014_{image_id:012d}.jpg",
                                task=get("task", ""))
    if kind == "webdataset":
        from blip_jax.data.webdataset import WebDatasetSource

        return WebDatasetSource(_required(spec, "path"))
    if kind == "tfds":
        from blip_jax.data.tfds_source import TfdsSource

        return TfdsSource(_required(spec, "tfds_name"), split=get("split", "train"), data_dir=get("data_dir") or None,
                          expand_captions=_expand(spec, False))
    if kind == "packed":
        from blip_jax.data.packed import PackedSource

        return PackedSource(_required(spec, "path"))
    raise ValueError(f"unknown data kind {kind!r}; use one of {', '.join(KINDS)}")


def _expand(spec: Mapping, auto: bool) -> bool:
    value = spec.get("expand_captions", "auto")
    return auto if value == "auto" else bool(value)


def _required(spec: Mapping, key: str) -> str:
    value = spec.get(key)
    if not value:
        raise ValueError(f"data kind {spec.get('kind')!r} needs data.{key}")
    return value


def build_records(data: Mapping, *, seed: int):
    """The source of a config's `data` block, or its mixture as an endless grain MapDataset;
    also returns the counts of records the sources skipped while indexing."""
    from blip_jax.data.mixing import mixture
    from blip_jax.data.records import add_counts

    mix = dict(data.get("mixture") or {})
    if not mix:
        source = build_source(data)
        return source, dict(getattr(source, "skipped", {}) or {})
    mix = {name: {**spec, "root": spec.get("root") or data.get("root", "")} for name, spec in mix.items()}
    sources = {name: build_source(spec) for name, spec in mix.items()}
    skipped: dict[str, int] = {}
    for source in sources.values():
        add_counts(skipped, getattr(source, "skipped", {}) or {})
    weights = {name: spec.get("weight", 1.0) for name, spec in mix.items()}
    tags = {name: {"instruction_family": spec["instruction_family"]} for name, spec in mix.items()
            if spec.get("instruction_family")}
    return mixture(sources, weights=weights, balance=data.get("balance", "ratio"), seed=seed, tags=tags), skipped
