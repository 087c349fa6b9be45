"""Zero-shot image classification by ITC: a folder of class-named image directories; each class is
the mean of its prompt templates' unit-norm text features ("a photo of a {}."), renormalised;
each image goes to the class of highest similarity (BLIP-2: best query). Top-1 / top-5 accuracy."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from absl import logging

from blip_jax.data.paths import Root
from blip_jax.eval import runner
from blip_jax.eval.inputs import load_pixels

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
DEFAULT_TEMPLATES = ("a photo of a {}.", "a photo of the {}.", "a picture of a {}.", "an image of a {}.")


def folder_records(root: str | Path) -> tuple[list[str], list[dict]]:
    """(class names, [{"image": path, "label": index}]) of `root/<class>/<image>`."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ValueError(f"{root} has no class subdirectories")
    inside = Root(root)  # a symlink out of the folder is left out, never opened (blip_jax.data.paths)
    found = [(inside.resolve(str(p)), c) for c, name in enumerate(classes)
             for p in sorted((root / name).iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
    if any(path is None for path, _ in found):
        logging.warning("%d images of %s resolve outside it: left out", sum(p is None for p, _ in found), root)
    return classes, [{"image": path, "label": c} for path, c in found if path is not None]


def class_features(model, classes: list[str], templates) -> np.ndarray:
    feats = model.text_features([t.format(c.replace("_", " ")) for c in classes for t in templates])
    feats = feats.reshape(len(classes), len(templates), -1).mean(1)
    return feats / np.linalg.norm(feats, axis=-1, keepdims=True)


def evaluate(model, cfg, workdir, *, progress: bool = True) -> dict:
    start_time = time.time()
    classes, records = folder_records(cfg.data.path)
    templates = list(cfg.templates) or list(DEFAULT_TEMPLATES)
    text = class_features(model, classes, templates)

    def classify(a, b):
        pixels, ok, _ = load_pixels(model, [records[i]["image"] for i in range(a, b)])
        return {"logits": model.similarity(model.image_features(pixels), text).astype(np.float32), "ok": ok}

    out = runner.run_sharded(workdir, "classes", len(records), classify, shard_size=cfg.shard_size,
                             progress=progress)
    ok = out["ok"].astype(bool)
    labels = np.array([r["label"] for r in records])
    order = np.argsort(-out["logits"], axis=1, kind="stable")
    top1 = order[:, 0] == labels
    top5 = (order[:, :5] == labels[:, None]).any(1)
    metrics = {"top1": float(top1[ok].mean() * 100) if ok.any() else 0.0,
               "top5": float(top5[ok].mean() * 100) if ok.any() else 0.0,
               "images": int(ok.sum()), "classes": len(classes), "unreadable_images": int((~ok).sum())}
    predictions = [{"image": r["image"], "label": classes[r["label"]], "readable": bool(good),
                    "top5": [classes[j] for j in order[i, :5]]} for i, (r, good) in enumerate(zip(records, ok))]
    gallery = [{"image": p["image"], "lines": [f"{'✓' if p['top5'][0] == p['label'] else '✗'} {p['top5'][0]}",
                                               f"label: {p['label']}"]}
               for p in predictions[: cfg.gallery] if p["readable"]]
    settings = {"templates": templates, "classes": classes, "data": dict(cfg.data)}
    return runner.write_outputs(workdir, "classification", metrics, settings, predictions, gallery,
                                time.time() - start_time)
