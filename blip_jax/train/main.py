"""`blip-jax train --config=configs/<stage>.py:<preset> --workdir=W [--config.field=value ...]`

absl flags with ml_collections config files (big_vision's convention). Rerunning the same command
resumes from the latest checkpoint in W. In a multi-process job (TPU pod, SLURM, localhost) every
process runs the same command; `--coordinator`, `--num_processes` and `--process_id` (or, with
`--distributed`, the environment a cluster sets: TPU pods, SLURM) connect them through
`jax.distributed.initialize`.
"""

from __future__ import annotations

import json
import sys

from absl import flags

from blip_jax import processes

USAGE = "blip-jax train --config=configs/<stage>.py:<preset> (--workdir=DIR | --dry_run) [--config.field=value ...]"

def _flags(argv: list[str]) -> flags.FlagValues:
    values = processes.job_flags(argv, "training config file, e.g. configs/blip2_stage1.py:tiny")
    flags.DEFINE_string("workdir", None, "run directory: checkpoints, metrics.jsonl, tensorboard/", flag_values=values)
    flags.DEFINE_bool("dry_run", False, "compile the train step for the mesh, print memory and FLOPs, and exit",
                      flag_values=values)
    flags.DEFINE_string("topology", None, "with --dry_run: compile for this TPU slice instead (libtpu, no TPU "
                        "needed), e.g. v5p:4x4x4, v4:2x2x2, v5e:4x4, v6e:8x8", flag_values=values)
    return values


def main(argv: list[str]) -> int:
    argv = ["blip-jax train"] + list(argv)
    FLAGS = _flags(argv)  # noqa: N806 (absl's name)
    stop = processes.parse(FLAGS, argv, USAGE, __doc__)
    if stop is not None:
        return stop
    if FLAGS.config is None or (FLAGS.workdir is None and not FLAGS.dry_run):
        print(f"usage: {USAGE}", file=sys.stderr)
        return 2
    import jax

    from blip_jax import validate

    if FLAGS.topology and not FLAGS.dry_run:
        print("--topology compiles a plan: pass --dry_run with it", file=sys.stderr)
        return 2
    tpu = None
    if FLAGS.topology:
        from blip_jax.hardware import tpu_slice

        tpu = tpu_slice(FLAGS.topology)
    processes.initialize(FLAGS)
    validate.train(FLAGS.config, len(tpu.devices) if tpu else jax.device_count(), jax.process_count(),
                   paths=not FLAGS.dry_run)
    from blip_jax.train import trainer

    if FLAGS.dry_run:
        from blip_jax.train import plan

        print(json.dumps(plan.plan(FLAGS.config, tpu), indent=2))
        return 0
    last = trainer.train(FLAGS.config, FLAGS.workdir)
    if jax.process_index() == 0:
        print(json.dumps(last, indent=2))
    return 0
