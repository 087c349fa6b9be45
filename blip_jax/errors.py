"""The command line's error boundary: the library's own errors (bad input, bad config, a missing or
unreadable file, a task a model does not serve) become one line naming what is wrong, exit status 2;
`blip-jax ... --debug` shows the traceback instead."""

from __future__ import annotations

import sys

DEBUG_FLAG = "--debug"
# What a user's input can cause; anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, OSError, LookupError)  # LookupError: KeyError and IndexError


def root_cause(e: BaseException) -> BaseException:
    """The innermost exception of a chain (ml_collections wraps a config file's errors twice)."""
    seen = set()
    while (e.__cause__ or e.__context__) is not None and id(e) not in seen:
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return e


def one_line(e: BaseException) -> str:
    """`e`'s message on one line (a KeyError's without its quotes)."""
    text = e.args[0] if isinstance(e, KeyError) and e.args and isinstance(e.args[0], str) else str(e)
    text = "; ".join(line.strip() for line in text.splitlines() if line.strip()) or type(e).__name__
    return text if len(text) < 1000 else text[:1000] + " ..."


def run(command: str, main, argv: list[str]) -> int:
    """`main(argv)` inside the boundary (module docstring)."""
    debug = DEBUG_FLAG in argv
    argv = [a for a in argv if a != DEBUG_FLAG]
    try:
        return main(argv)
    except USER_ERRORS as e:
        if debug:
            raise
        print(f"blip-jax {command}: error: {one_line(e)}", file=sys.stderr, flush=True)
        _quiet_exit()
        return 2


def _quiet_exit() -> None:
    """Nothing more on stderr: background threads a failed job leaves (Orbax / TensorStore reads
    of a damaged checkpoint) print asyncio tracebacks while the interpreter exits."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):  # no real stderr (captured in-process): nothing to quiet
        pass
