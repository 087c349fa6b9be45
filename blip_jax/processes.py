"""Multi-process jobs (TPU pods, SLURM, localhost): the flags `blip-jax train`, `eval` and `capfilt`
share, and the `jax.distributed` start-up they drive. Every process runs the same command."""

from __future__ import annotations

import sys

from absl import flags

HELP_FLAGS = ("--help", "-h", "--helpfull", "-help")


def define_flags(flag_values: flags.FlagValues) -> None:
    flags.DEFINE_string("coordinator", None, "host:port of process 0 (multi-process runs)", flag_values=flag_values)
    flags.DEFINE_integer("num_processes", None, "processes in the job (multi-process runs)", flag_values=flag_values)
    flags.DEFINE_integer("process_id", None, "this process's index (multi-process runs)", flag_values=flag_values)
    flags.DEFINE_bool("distributed", False, "multi-process run whose cluster environment names the coordinator "
                      "(TPU pod, SLURM, Open MPI): jax.distributed.initialize() without arguments",
                      flag_values=flag_values)
    flags.DEFINE_bool("cpu_collectives", False, "use gloo collectives between CPU processes", flag_values=flag_values)


def initialize(flag_values: flags.FlagValues) -> None:
    """Connect the processes named by the flags (nothing to do for a single process)."""
    import jax

    if flag_values.cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if flag_values.coordinator or flag_values.num_processes:
        jax.distributed.initialize(flag_values.coordinator, flag_values.num_processes, flag_values.process_id)
    elif flag_values.distributed:
        jax.distributed.initialize()


def job_flags(argv: list[str], config_help: str) -> flags.FlagValues:
    """Flags of a config-driven job: --config (an ml_collections file, `--config.field=value`
    overrides read from `argv`, so a job started from Python sees them too), the multi-process
    flags; the caller adds its own, then parses `argv`."""
    from ml_collections import config_flags

    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, config_help, flag_values=values, lock_config=False,
                                    sys_argv=argv)
    define_flags(values)
    return values


def parse(values: flags.FlagValues, argv: list[str], usage: str, description: str = "") -> int | None:
    """Parse a job's `argv` (argv[0]: its name) into `values`. Returns an exit status when the
    command should stop here: 0 after printing the help for --help, 2 after a one-line error for a
    flag absl rejects; None to go on."""
    if any(a in HELP_FLAGS for a in argv[1:]):
        print(f"usage: {usage}\n\n{description.strip()}\n\nflags:\n{values.get_help()}")
        return 0
    try:
        values(argv)
    except flags.Error as e:
        print(f"{argv[0]}: error: {e}\nusage: {usage}", file=sys.stderr)
        return 2
    return None
