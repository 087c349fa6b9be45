"""Input pipeline over real-data layouts: annotation files, packing, mixing, instruction templates,
bad records (skipped, counted, every good record delivered), sharding and exact resume."""

from __future__ import annotations

import json
from collections import Counter

import grain
import numpy as np
import pytest

from blip_jax.data import pipeline
from blip_jax.data.annotations import AnnotationSource
from blip_jax.data.check import RecordCheck, check
from blip_jax.data.instructions import FAMILIES, TEMPLATES, instruct
from blip_jax.data.mixing import mixture, mixture_weights
from blip_jax.data.packed import PackedSource, pack
from blip_jax.data.records import BadRecord
from blip_jax.testing import write_caption_folder


def _write(path, data):
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


@pytest.fixture()
def folder(tmp_path):
    return write_caption_folder(tmp_path / "coco")


class KeepId:
    """RecordCheck plus the record's id, so tests can see which records arrived."""

    def __init__(self):
        self.check = RecordCheck(16, "blip_train")

    def __call__(self, record, rng):
        out = self.check(record, rng)
        return {**out, "id": np.array(record["image_id"], dtype=object)}


def _ids(batches):
    return [str(i) for b in batches for i in b["id"]]


# ------------------------------------------------------------------ annotation layouts
def test_layouts_become_the_same_records(tmp_path):
    (tmp_path / "val2014").mkdir()
    lavis = AnnotationSource(_write(tmp_path / "lavis.json", [
        {"image": "val2014/a.jpg", "caption": "a dog.", "image_id": "coco_1"},
        {"image": "val2014/b.jpg", "caption": ["one", "two"], "image_id": "coco_2"}]), image_root=tmp_path)
    assert lavis.layout == "lavis" and len(lavis) == 3
    assert lavis[0] == {"image": str(tmp_path / "val2014/a.jpg"), "task": "caption", "image_id": "coco_1",
                        "caption": "a dog."}
    assert [lavis[i]["caption"] for i in (1, 2)] == ["one", "two"]
    kept = AnnotationSource(tmp_path / "lavis.json", image_root=tmp_path, expand_captions=False)
    assert len(kept) == 2 and kept[1]["captions"] == ["one", "two"]

    karpathy = {"images": [
        {"filepath": "val2014", "filename": f"{s}.jpg", "cocoid": i, "split": s,
         "sentences": [{"raw": f"{s} caption {j}"} for j in range(2)]}
        for i, s in enumerate(["train", "restval", "val", "test"])]}
    train = AnnotationSource(_write(tmp_path / "dataset_coco.json", karpathy), image_root=tmp_path)
    assert train.layout == "karpathy" and len(train) == 4  # train + restval, one record per sentence
    assert {train[i]["caption"].split()[0] for i in range(4)} == {"train", "restval"}
    test = AnnotationSource(tmp_path / "dataset_coco.json", image_root=tmp_path, split="test",
                            expand_captions=False)
    assert len(test) == 1 and test[0]["captions"] == ["test caption 0", "test caption 1"]
    assert test[0]["image"] == str(tmp_path / "val2014/test.jpg") and test[0]["image_id"] == "3"

    coco = AnnotationSource(_write(tmp_path / "captions.json", {
        "images": [{"id": 7, "file_name": "x.jpg"}], "annotations": [
            {"image_id": 7, "caption": "c1"}, {"image_id": 7, "caption": "c2"}]}), image_root=tmp_path)
    assert coco.layout == "coco" and [coco[i]["caption"] for i in range(2)] == ["c1", "c2"]

    gqa = AnnotationSource(_write(tmp_path / "gqa.json", {"201": {"imageId": "n5", "question": "What?",
                                                                  "answer": "cat"}}), image_root=tmp_path)
    assert gqa.layout == "gqa" and gqa[0]["image"].endswith("n5.jpg") and gqa[0]["answers"] == ["cat"]

    vg = AnnotationSource(_write(tmp_path / "regions.json", [{"id": 3, "regions": [
        {"phrase": "a tree"}, {"phrase": "sky"}]}]), image_root=tmp_path)
    assert vg.layout == "vg_regions" and [vg[i]["caption"] for i in range(2)] == ["a tree", "sky"]


def test_vqa_layouts_carry_lavis_answer_weights(tmp_path):
    questions = {"questions": [{"image_id": 9, "question": "What color?", "question_id": 90}]}
    answers = {"annotations": [{"question_id": 90, "answers": [{"answer": a} for a in
                                                              ["red", "red", "red", "blue"]]}]}
    source = AnnotationSource(_write(tmp_path / "q.json", questions), image_root=tmp_path,
                              annotations=str(_write(tmp_path / "a.json", answers)), split="val")
    record = source[0]
    assert source.layout == "vqa" and record["image"] == str(tmp_path / "COCO_val2014_000000000009.jpg")
    assert record["answers"] == ["red", "blue"] and record["answer_weights"] == [0.75, 0.25]
    assert record["task"] == "vqa" and record["question_id"] == "90"
    lavis = AnnotationSource(_write(tmp_path / "vqa.json", [
        {"image": "x.jpg", "question": "Why?", "answer": ["a", "b", "a", "a"], "question_id": 1}]),
        image_root=tmp_path)
    assert lavis[0]["answers"] == ["a", "b"] and lavis[0]["answer_weights"] == [0.75, 0.25]


def test_jsonl_malformed_lines_are_counted(tmp_path):
    path = _write(tmp_path / "data.jsonl", '{"image": "a.jpg", "caption": "x"}\n{"image": \n\n'
                                           '{"caption": "no image"}\n{"image": "b.jpg", "caption": "y"}\n')
    source = AnnotationSource(path)
    assert len(source) == 2 and source.skipped == {"malformed_json": 2}


def test_clear_errors_for_missing_or_unknown_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="annotation file"):
        AnnotationSource(tmp_path / "nope.json")
    _write(tmp_path / "odd.json", {"something": 1})
    with pytest.raises(ValueError, match="layout"):
        AnnotationSource(tmp_path / "odd.json")
    with pytest.raises(ValueError, match="unknown annotation layout"):
        AnnotationSource(tmp_path / "odd.json", layout="csv")


# ------------------------------------------------------------------ bad data
def test_every_kind_of_bad_record_is_skipped_and_counted_and_every_good_one_arrives(folder):
    source = AnnotationSource(folder["annotations"], image_root=folder["image_root"])
    it = pipeline.make_iterator(source, batch_size=4, seed=0, transform=KeepId(), process_index=0,
                                process_count=1, num_epochs=1, drop_remainder=False)
    ids = _ids(it)
    assert sorted(ids) == sorted(folder["good"])  # converted modes included, each exactly once
    counted = pipeline.skipped_counts(pipeline.iterator_state(it))
    assert {**counted, **source.skipped} == folder["skipped"]


def test_data_check_reports_the_same_counts(folder):
    result = check({"kind": "json", "path": folder["annotations"], "image_root": folder["image_root"]},
                   image_size=16, augment="blip_train", batch_size=3, progress=False)
    assert result["delivered"] == len(folder["good"])
    assert result["skipped"] == folder["skipped"]
    assert result["records"] == len(folder["good"]) + sum(folder["skipped"].values()) - 2  # 2 never indexed


def test_resume_mid_epoch_continues_the_exact_sequence_and_counts(folder):
    source = AnnotationSource(folder["annotations"], image_root=folder["image_root"])

    def make():
        return pipeline.make_iterator(source, batch_size=2, seed=3, transform=KeepId(), process_index=0,
                                      process_count=1)

    it = make()
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(pipeline.iterator_state(it)))
    expected = [next(it) for _ in range(10)]
    resumed = pipeline.restore_iterator(make(), state)
    got = [next(resumed) for _ in range(10)]
    assert _ids(got) == _ids(expected)
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a["mean"], b["mean"])  # same augmentations too
    assert pipeline.skipped_counts(pipeline.iterator_state(resumed)) == \
        pipeline.skipped_counts(pipeline.iterator_state(it))


def test_two_processes_cover_every_record_exactly_once_per_epoch(folder):
    source = AnnotationSource(folder["annotations"], image_root=folder["image_root"])
    per_process = [_ids(pipeline.make_iterator(source, batch_size=4, seed=1, transform=KeepId(),
                                               process_index=p, process_count=2, num_epochs=1,
                                               drop_remainder=False)) for p in range(2)]
    assert not set(per_process[0]) & set(per_process[1])
    assert sorted(per_process[0] + per_process[1]) == sorted(folder["good"])


def test_augmentations_do_not_depend_on_the_process_count(folder):
    source = AnnotationSource(folder["annotations"], image_root=folder["image_root"])

    def rows(count):
        out = {}
        for p in range(count):
            for b in pipeline.make_iterator(source, batch_size=2, seed=4, transform=KeepId(), process_index=p,
                                            process_count=count, num_epochs=1, drop_remainder=False):
                out.update(zip(map(str, b["id"]), b["mean"]))
        return out

    assert rows(1) == rows(2)


# ------------------------------------------------------------------ packing
def test_pack_round_trip_keeps_bytes_and_counts(folder, tmp_path):
    source = AnnotationSource(folder["annotations"], image_root=folder["image_root"])
    manifest = pack(source, tmp_path / "packed", records_per_shard=4, progress=False)
    expected_bad = {k: v for k, v in folder["skipped"].items() if k != "bad_text"}  # texts are checked later
    assert manifest["skipped"] == expected_bad
    packed = PackedSource(tmp_path / "packed")
    assert len(packed) == len(source) - sum(v for k, v in expected_bad.items() if k != "malformed_json")
    assert len(manifest["shards"]) == -(-len(packed) // 4)
    assert not list(tmp_path.glob(".packed.*"))
    originals = {source[i]["image_id"]: source[i] for i in range(len(source))}
    for i in range(len(packed)):
        record = packed[i]
        original = originals[record["image_id"]]
        with open(original["image"], "rb") as f:
            assert record["image"] == f.read()
        assert record["caption"] == original["caption"]
    with pytest.raises(FileExistsError):
        pack(source, tmp_path / "packed", progress=False)
    ids = _ids(pipeline.make_iterator(packed, batch_size=4, seed=0, transform=KeepId(), process_index=0,
                                      process_count=1, num_epochs=1, drop_remainder=False))
    assert sorted(ids) == sorted(folder["good"])


# ------------------------------------------------------------------ mixing
class Numbers:
    def __init__(self, name, n):
        self.name, self.n = name, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"name": self.name, "i": int(i)}


def test_sqrt_balanced_mixture_draws_in_proportion():
    sources = {"big": Numbers("big", 400), "small": Numbers("small", 25)}
    weights = mixture_weights({k: len(v) for k, v in sources.items()}, balance="sqrt")
    assert weights == pytest.approx({"big": 20 / 25, "small": 5 / 25})
    adjusted = mixture_weights({"big": 400, "small": 25}, {"small": 4.0}, balance="sqrt")
    assert adjusted == pytest.approx({"big": 0.5, "small": 0.5})
    ds = mixture(sources, balance="sqrt", seed=0)
    drawn = [ds[i] for i in range(5000)]
    share = Counter(r["source"] for r in drawn)["small"] / len(drawn)
    assert abs(share - 0.2) < 0.01
    assert all(r["source"] == r["name"] for r in drawn)
    small = [r["i"] for r in drawn if r["source"] == "small"]
    assert sorted(small[:25]) == list(range(25))  # each source is a permutation per epoch
    assert [mixture(sources, balance="sqrt", seed=0)[i] for i in range(50)] == drawn[:50]
    with pytest.raises(ValueError, match="unknown sources"):
        mixture_weights({"a": 1}, {"b": 1.0})


def test_mixture_through_the_pipeline_resumes_exactly():
    sources = {"a": Numbers("a", 7), "b": Numbers("b", 11)}

    def make():
        ds = mixture(sources, weights={"a": 1.0, "b": 3.0}, seed=2)
        return pipeline.make_iterator(ds, batch_size=4, seed=2, transform=_name_index, process_index=0,
                                      process_count=1)

    it = make()
    for _ in range(3):
        next(it)
    state = pipeline.iterator_state(it)
    expected = [next(it) for _ in range(5)]
    resumed = pipeline.restore_iterator(make(), state)
    for a, b in zip([next(resumed) for _ in range(5)], expected):
        assert list(a["key"]) == list(b["key"])


def _name_index(record, rng):
    return {"key": np.array(f"{record['source']}{record['i']}", dtype=object)}


# ------------------------------------------------------------------ instructions
def test_instruction_templates_are_data_with_10_to_15_per_family():
    assert {"caption", "vqa_short", "vqa_long", "ocr_vqa", "knowledge_vqa", "reasoning", "multiple_choice",
            "dialogue"} <= set(FAMILIES)
    for family, templates in TEMPLATES.items():
        assert 10 <= len(templates) <= 15, family
        assert len(set(templates)) == len(templates), family


def test_instruct_fills_templates():
    rng = np.random.default_rng(0)
    vqa = {"question": "what is it?", "answers": ["cat", "dog"], "answer_weights": [1.0, 0.0], "task": "vqa"}
    seen = set()
    for _ in range(60):
        instruction, output = instruct(vqa, "", rng)
        assert "what is it?" in instruction and output == "cat"
        seen.add(instruction)
    assert len(seen) == len(TEMPLATES["vqa_short"])
    instruction, output = instruct({"caption": "a dog", "task": "caption"}, "", rng)
    assert instruction in TEMPLATES["caption"] and output == "a dog"
    mc = {"question": "which?", "choices": ["red", "blue"], "answer_index": 1}
    instruction, output = instruct(mc, "multiple_choice", rng)
    assert "red, blue" in instruction and output == "blue"
    with pytest.raises(BadRecord, match="bad_text"):
        instruct({"question": "which?", "choices": ["a"], "answer_index": 3}, "multiple_choice", rng)
    with pytest.raises(ValueError, match="unknown instruction family"):
        instruct(vqa, "poetry", rng)
    assert instruct({"instruction": "x", "output": "y"}, "caption", rng) == ("x", "y")


def test_grain_sees_a_map_dataset_mixture_as_a_source():
    ds = mixture({"a": Numbers("a", 3)}, seed=0)
    assert isinstance(ds, grain.MapDataset)
    assert pipeline.record_dataset(ds, seed=0) is ds


def test_data_cli_check_and_pack(folder, tmp_path, capsys):
    from blip_jax.cli import main

    source_flags = ["--kind", "json", "--path", folder["annotations"], "--image-root", folder["image_root"]]
    assert main(["data", "check", *source_flags, "--image-size", "16", "--augment", "blip2_train"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["delivered"] == len(folder["good"]) and result["skipped"] == folder["skipped"]
    assert result["records_per_sec"] > 0
    out = tmp_path / "packed"
    assert main(["data", "pack", *source_flags, str(out), "--records-per-shard", "5"]) == 0
    manifest = json.loads(capsys.readouterr().out)
    assert manifest["records"] == len(PackedSource(out)) == len(folder["good"]) + folder["skipped"]["bad_text"]
    assert main(["data", "check", "--kind", "packed", "--path", str(out), "--image-size", "16"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["delivered"] == len(folder["good"]) and again["skipped"] == {"bad_text": 4}
    assert main(["data", "check", "--kind", "json", "--path", str(tmp_path / "none.json")]) == 2
