"""``convstore`` and ``python -m convstore``: the command line's entry point.

``convstore --version`` is answered here, before typer and the command tree
are imported (the start-up budget is 120 ms; docs/benchmarks.md).
"""

from __future__ import annotations

import sys


def main() -> None:
    if sys.argv[1:] == ["--version"]:
        from ._version import __version__

        sys.stdout.write(f"convstore {__version__}\n")
        return
    from .daemon.client import run_via_daemon

    code = run_via_daemon(sys.argv[1:])  # the user's `convstore daemon`, when one runs
    if code is not None:
        sys.exit(code)
    from .cli_base import _State

    try:
        if "run" in sys.argv[1:]:
            from .cli_fast import run_fast

            run_fast(sys.argv[1:])  # a plain `convstore run`, without typer (ends with SystemExit if it ran)
        from .cli import main as cli_main

        cli_main()
    except SystemExit as e:
        if _State.exit_without_finalizing:
            _exit_now(e.code)
        raise


def _exit_now(code: object) -> None:
    """End the process as the interpreter would, minus the finalization that only frees memory (tens of ms),
    as a daemon's forked child ends (daemon/server.py):
    join the non-daemon threads (and executors' workers) first, run the atexit handlers (logging's flush,
    weakref finalizers, temporary directories), flush stdout and stderr, then ``os._exit``."""
    import atexit
    import os
    import threading

    shutdown = getattr(threading, "_shutdown", None)  # what Py_FinalizeEx calls first
    if shutdown is None:
        return  # an interpreter without it: the ordinary exit
    shutdown()
    atexit._run_exitfuncs()
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:
        sys.stderr.write(f"{code}\n")
        status = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status & 0xFF)


if __name__ == "__main__":
    main()
