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
    from .cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
