"""Process hardening for processes that hold key material.

:func:`protect_process` turns core dumps off (a soft ``RLIMIT_CORE`` of 0)
and makes the process non-dumpable (``prctl(PR_SET_DUMPABLE, 0)``):
no core file, no ``/proc/PID/mem`` or ptrace for other processes of the same
user, ``/proc/PID/*`` owned by root.  It is called where key material is
first loaded (:func:`convstore.keys.open_key`), so every process that opens
a store with its key (CLI commands, ``layerstore``, ``snapshotter``,
``mount``, the worker, the daemon's commands) is covered.  The dumpable flag
is reset by ``execve`` (runc, the tools convstore runs); the core limit is
inherited, which is harmless.  ``convstore daemon``, which reads its
clients' requests (their environments) but opens no key, calls
:func:`no_core_dumps` only: it stays dumpable, so its user's tools still see
its ``/proc/PID`` (the stop hint).

:func:`take_secret_env` reads a secret (a PKCS#11 PIN named by
``pin-source=env:VAR``) from the environment and removes it: from
``os.environ`` (so no child inherits it) and from the environment block the
kernel shows as ``/proc/PID/environ`` (the process's initial stack copy,
overwritten in place through ``/proc/self/mem``).  The value is kept in this
module only, for :func:`secret_env` (a worker gets it on its pipe).

:func:`tool_environ` is the environment of a program convstore runs that is
not convstore (``runc``, ``fusermount3``): this process's environment without
the variables that hold secrets or key specs (``CONVSTORE_*`` -- a key spec
can carry a PIN --, ``AWS_*`` -- credentials, session tokens --), which no such
tool needs.  convstore's own workers get what they need on their pipe
(:mod:`convstore.worker`).
"""

from __future__ import annotations

import ctypes
import logging
import os
import resource

log = logging.getLogger(__name__)

PR_SET_DUMPABLE = 4
PR_GET_DUMPABLE = 3
_TAKEN: dict[str, str] = {}


#: prefixes of the variables that can hold a secret: a key spec (which can carry a PIN), cloud credentials
SECRET_ENV_PREFIXES = ("CONVSTORE_KEY", "AWS_")
#: prefixes of the variables a program that is not convstore never gets (:func:`tool_environ`)
TOOL_ENV_DROPPED = ("CONVSTORE_", "AWS_")


def tool_environ(drop: tuple[str, ...] = TOOL_ENV_DROPPED) -> dict[str, str]:
    """This process's environment for a program that is not convstore: no ``CONVSTORE_*``, no ``AWS_*``
    (``drop``: other prefixes; :data:`SECRET_ENV_PREFIXES` for a helper of convstore's own that needs
    its ``CONVSTORE_`` settings but no secret)."""
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}


def _unreplaceable(folder: str) -> bool:
    """Whether no other user can rename or replace what this process makes in ``folder``: it and each
    folder above it are root's or this user's, and writable by no one else unless sticky (``/tmp``)."""
    path = os.path.realpath(folder)
    while True:
        try:
            st = os.stat(path)
        except OSError:
            return False
        if st.st_uid not in (0, os.geteuid()) or (st.st_mode & 0o022 and not st.st_mode & 0o1000):
            return False
        up = os.path.dirname(path)
        if up == path:
            return True
        path = up


def private_tempdir(prefix: str) -> str:
    """A new 0700 folder (:func:`tempfile.mkdtemp`) where no other user can rename it and put another in its
    place (it holds mount points whose paths are handed on: an engine follows them): in ``$TMPDIR`` if that
    is safe so (``su`` keeps the user's ``TMPDIR``), else in ``/tmp``."""
    import tempfile

    base = tempfile.gettempdir()
    if not _unreplaceable(base):
        log.warning("TMPDIR %s can be written by another user: using /tmp", base)
        base = "/tmp"
    return tempfile.mkdtemp(prefix=prefix, dir=base)


def no_core_dumps() -> None:
    """A core limit of 0 for this process and its children (the soft limit,
    which is the one that applies; the hard limit is left, so that a program
    embedding the library is not changed for good)."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))


def protect_process() -> None:
    """No core dumps and no same-user ptrace/``/proc/PID/mem`` for this process (idempotent)."""
    no_core_dumps()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        log.warning("cannot make the process non-dumpable: %s", os.strerror(err))


def is_protected() -> bool:
    """Whether this process is non-dumpable and has no core limit (for diagnostics)."""
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0) == 0 and resource.getrlimit(resource.RLIMIT_CORE)[0] == 0


def _wipe_initial_environ(name: str) -> None:
    """Overwrite ``NAME=value`` in the kernel-visible environment block (``/proc/self/environ``) with NULs."""
    with open("/proc/self/stat", "rb") as f:
        stat = f.read()
    fields = stat[stat.rindex(b")") + 2:].split()
    start, end = int(fields[47]), int(fields[48])  # env_start, env_end (fields 50 and 51)
    prefix = name.encode() + b"="
    with open("/proc/self/mem", "r+b", buffering=0) as mem:
        mem.seek(start)
        block = mem.read(end - start)
        pos = 0
        while pos < len(block):
            stop = block.find(b"\0", pos)
            stop = len(block) if stop < 0 else stop
            if block.startswith(prefix, pos):
                mem.seek(start + pos)
                mem.write(b"\0" * (stop - pos))
            pos = stop + 1


def take_secret_env(name: str) -> str | None:
    """The secret in environment variable ``name``, removed from this process's environment
    (``os.environ`` and ``/proc/PID/environ``); a second call returns the same value."""
    value = os.environ.pop(name, None)
    if value is None:
        return _TAKEN.get(name)
    _TAKEN[name] = value
    try:
        _wipe_initial_environ(name)
    except (OSError, ValueError, IndexError) as e:  # not Linux, or /proc not mounted
        log.warning("cannot scrub %s from /proc/self/environ: %s", name, e)
    return value


def secret_env(name: str) -> str | None:
    """A secret environment variable, whether still in the environment or already taken."""
    value = os.environ.get(name)
    return value if value is not None else _TAKEN.get(name)
