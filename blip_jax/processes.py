"""Multi-process jobs (TPU pods, SLURM, localhost): the flags `blip-jax train`, `eval` and `capfilt`
share, and the `jax.distributed` start-up they drive. Every process runs the same command."""

from __future__ import annotations

import sys

from absl import flags

from blip_jax.errors import one_line, root_cause

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
        if values["config"].present:
            values.config.keys()  # ml_collections loads the file lazily: its errors surface here
    except Exception as e:  # noqa: BLE001 - the config file and the flags are the user's input
        message = _flag_error(e, argv)
        if isinstance(e, flags.Error) and not isinstance(root_cause(e), (KeyError, AttributeError)):
            print(f"{argv[0]}: error: {message}\nusage: {usage}", file=sys.stderr)
            return 2
        raise ValueError(message) from e
    return None


def _flag_error(e: Exception, argv: list[str]) -> str:
    """One line for a flag or config file that could not be read: an override naming no field
    (with ml_collections' suggestion), a config file that fails to load (its own error)."""
    inner = root_cause(e)
    if isinstance(inner, KeyError):  # --config.<path>=v where <path> names no field
        name = inner.args[0] if inner.args else "?"
        flag = next((a.split("=")[0] for a in argv if a.startswith("--config.") and
                     a.split("=")[0].split(".")[-1] == name), f"--config...{name}")
        hint = next((str(x) for x in _chain(e) if "Did you mean" in str(x)), "")
        hint = hint[hint.index("Did you mean"):].rstrip("'\"").replace('\\"', '"') if hint else ""
        return f"{flag}: the config has no field {name!r}" + (f" ({hint})" if hint else "")
    if isinstance(inner, OSError) and "Failed loading config file" in str(inner):
        return f"cannot load the config file: {str(inner).strip().splitlines()[-1].strip()}"
    if isinstance(e, flags.Error) and "Traceback" in str(e):  # get_config raised: its own message
        flag = next((a for a in argv if a.startswith("--config=")), "--config")
        return f"{flag}: {one_line(inner)}"
    return one_line(e)


def _chain(e: BaseException):
    while e is not None:
        yield e
        e = e.__cause__ or e.__context__
