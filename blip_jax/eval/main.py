"""`blip-jax eval --config=configs/eval/<task>.py:<preset> --ckpt=DIR --workdir=W [--config.f=v ...]`

Loads a converted checkpoint, splits every batch over this process's devices, splits the work
over processes (multi-process flags as `blip-jax train`), and writes W/results.json,
W/predictions.jsonl, W/gallery.html and TensorBoard scalars. Rerunning resumes: finished shards
in W/shards are not recomputed.
"""

from __future__ import annotations

import json
import sys

from absl import flags

from blip_jax import processes

USAGE = "blip-jax eval --config=configs/eval/<task>.py:<preset> --ckpt=DIR --workdir=DIR [--config.field=value ...]"

def _flags(argv: list[str]) -> flags.FlagValues:
    values = processes.job_flags(argv, "eval config file, e.g. configs/eval/retrieval.py:coco")
    flags.DEFINE_string("ckpt", None, "a blip-jax model directory (made by `blip-jax convert`), or a training workdir (its model/)", flag_values=values)
    flags.DEFINE_string("workdir", None, "output directory: results.json, predictions.jsonl, gallery.html",
                        flag_values=values)
    flags.DEFINE_bool("progress", True, "progress bars with rate and ETA", flag_values=values)
    return values


def evaluator(task: str):
    """The `evaluate(model, cfg, workdir, progress=...)` function of a task."""
    from blip_jax.eval import captioning, choice, classification, nlvr, retrieval, vqa

    return {"retrieval": retrieval, "caption": captioning, "vqa": vqa, "choice": choice,
            "classification": classification, "nlvr": nlvr}[task].evaluate


def load_model(ckpt: str, cfg):
    """The model at `ckpt`, placed on this process's devices for evaluation jobs."""
    import jax
    import numpy as np
    from jax.sharding import Mesh

    import blip_jax

    model = blip_jax.load(ckpt, batch_size=cfg.batch_size)
    model.use_mesh(Mesh(np.array(jax.local_devices()), ("data",)))
    return model


def run(cfg, ckpt: str, workdir: str, *, progress: bool = True, model=None) -> dict:
    """Run `cfg`'s task on the model at `ckpt` (loaded here unless `model`, loaded from it by
    `load_model`, is given); returns results."""
    import jax

    from blip_jax import jobs
    from blip_jax.eval.runner import has_outputs

    model = model or load_model(ckpt, cfg)
    settings = {k: v for k, v in json.loads(cfg.to_json()).items() if k != "gallery"}  # gallery: display only
    identity = {"job": "eval", "models": {"model": jobs.model_identity(model.path)}, "settings": settings}
    jobs.claim(workdir, identity, has_outputs=has_outputs(workdir), write=jax.process_index() == 0)
    return evaluator(cfg.task)(model, cfg, workdir, progress=progress)


def main(argv: list[str]) -> int:
    argv = ["blip-jax eval"] + list(argv)
    FLAGS = _flags(argv)  # noqa: N806 (absl's name)
    stop = processes.parse(FLAGS, argv, USAGE, __doc__)
    if stop is not None:
        return stop
    if FLAGS.config is None or FLAGS.ckpt is None or FLAGS.workdir is None:
        print(f"usage: {USAGE}", file=sys.stderr)
        return 2
    import jax

    from blip_jax import validate

    validate.evaluation(FLAGS.config)
    processes.initialize(FLAGS)
    results = run(FLAGS.config, FLAGS.ckpt, FLAGS.workdir, progress=FLAGS.progress)
    if jax.process_index() == 0:
        print(json.dumps(results, indent=2))
    return 0
