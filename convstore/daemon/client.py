"""The client side of ``convstore daemon``: hand a command to this user's daemon.

This runs first in every ``convstore`` command, before anything else is
imported, so it imports only what the interpreter has already loaded or
what is built in (as :mod:`convstore.daemon.protocol` does).  The Python
wrappers ``socket``, ``signal`` and ``json`` cost a client 15-30 ms of
imports (``enum``, ``selectors``, ``re``), which was half of what a command
handed to the daemon cost (docs/benchmarks.md).  The server is
:mod:`convstore.daemon.server`; the wire format is in
:mod:`convstore.daemon.protocol`.
"""

from __future__ import annotations

import os
import stat
import struct
import sys

import _socket

from .protocol import (
    RELAYED,
    STATUS,
    DaemonError,
    encode_request,
    fingerprint,
    peer,
    private_dir,
    recv_frame,
    send_message,
    socket_path,
)

# not ``typing.TYPE_CHECKING`` (typing is not loaded yet); the stubs know ``signal``, not ``_signal``
TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal as _signal
else:
    import _signal

HANDSHAKE_TIMEOUT = 2.0  # a daemon that does not accept within this long is not used


def _safe_socket(path: str) -> bool:
    """The socket and its directory belong to this user, and no one else can replace them."""
    try:
        st = os.lstat(path)
        dst = os.lstat(os.path.dirname(path) or ".")
    except OSError:
        return False
    return stat.S_ISSOCK(st.st_mode) and st.st_uid == os.getuid() and private_dir(dst)


def connect(path: str) -> _socket.socket | None:
    """A connection to this user's daemon at ``path``, or None (no socket, not ours, no answer)."""
    if not _safe_socket(path):
        return None
    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    s.settimeout(HANDSHAKE_TIMEOUT)
    try:
        s.connect(path)
        if peer(s)[1] == os.getuid():
            return s
    except OSError:
        pass
    s.close()
    return None


# ---------------------------------------------------------------- the client


def run_via_daemon(argv: list[str]) -> int | None:
    """Run a command in the user's daemon; its exit status, or None when there
    is no usable daemon (the caller runs the command itself).  None is only
    returned before the command has started."""
    if os.environ.get("CONVSTORE_DAEMON", "").lower() in ("0", "off", "no", "false"):
        return None
    if "daemon" in argv:  # the daemon command itself never runs inside a daemon
        return None
    try:
        for fd in (0, 1, 2):
            os.fstat(fd)  # a closed one would be taken by the socket, and sent as the command's stdio
        if "--password-stdin" in argv and os.isatty(0):
            return None  # a child in its own process group cannot read the terminal
        s = connect(socket_path())
    except Exception:  # noqa: BLE001 - any doubt: the command runs in this process
        return None
    if s is None:
        return None
    try:
        return _run_client(s, argv)
    finally:
        s.close()


def _run_client(s: _socket.socket, argv: list[str]) -> int | None:
    try:
        ignored = [int(sig) for sig in RELAYED if _signal.getsignal(sig) == _signal.SIG_IGN]
        umask = os.umask(0)
        os.umask(umask)
        body = encode_request("run", _prog_name(), str(umask), str(len(argv)), ",".join(map(str, ignored)),
                              fingerprint(), *argv, *(k + b"=" + v for k, v in os.environb.items()))
        send_message(s, body)
        kind, _why = recv_frame(s)
        if kind != b"A":
            return None
    except Exception:  # noqa: BLE001 - nothing has run yet: the command runs in this process
        return None
    # committed from here: a signal that comes before the relays are in place is held, then relayed
    held = _signal.pthread_sigmask(_signal.SIG_BLOCK, RELAYED)
    try:
        return _committed(s, ignored)
    finally:
        _signal.pthread_sigmask(_signal.SIG_SETMASK, held)


def _committed(s: _socket.socket, ignored: list[int]) -> int | None:
    # the descriptors go with the commitment, never before: a daemon that does not answer must not
    # hold this process's stdout (a pipe's reader would wait for its end as long as the daemon lives)
    try:
        cwd = os.open(".", os.O_PATH | os.O_DIRECTORY)
        try:
            fds = struct.pack("4i", 0, 1, 2, cwd)
            s.sendmsg([b"G"], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fds)])  # the command starts now
        finally:
            os.close(cwd)
    except OSError:
        return None  # never sent: nothing runs there
    s.settimeout(None)

    relayed: list[int] = []
    fell_back = False

    def relay(signum: int, _frame: object) -> None:
        relayed.append(signum)
        try:
            s.sendall(b"S" + bytes([signum]))
        except OSError:
            pass

    saved = {int(sig): _signal.signal(sig, relay) for sig in RELAYED if int(sig) not in ignored}
    _signal.pthread_sigmask(_signal.SIG_UNBLOCK, RELAYED)
    try:
        while True:
            kind, payload = recv_frame(s)
            if kind == b"F":
                fell_back = True
                return None  # the daemon could not fork: the command never started
            if kind == b"X":
                return int(STATUS.unpack(payload)[0])
            if kind == b"K":  # the command was killed by a signal: so is this process, as a shell expects
                (signum,) = STATUS.unpack(payload)
                try:
                    _signal.signal(signum, _signal.SIG_DFL)  # SIGKILL cannot be (and need not be) reset
                except (OSError, ValueError):
                    pass
                saved.pop(signum, None)
                _signal.pthread_sigmask(_signal.SIG_UNBLOCK, [signum])
                os.kill(os.getpid(), signum)
                return 128 + signum
    except (OSError, EOFError, ValueError):
        sys.stderr.write("convstore: error: the daemon went away before the command finished\n")
        return 1
    finally:
        for sig, handler in saved.items():
            _signal.signal(sig, handler)
        if fell_back:  # what the user sent while it was handed over is this process's now (Ctrl-C: it stops)
            for sig in sorted(set(relayed), key=lambda n: n == _signal.SIGINT):  # a killing signal before Ctrl-C
                _signal.raise_signal(sig)


def _prog_name() -> str:
    """The program name click would give this process in its usage lines
    (``convstore``, or ``python -m convstore``)."""
    package = getattr(sys.modules.get("__main__"), "__package__", None)
    if not package:
        return os.path.basename(sys.argv[0]) or "convstore"
    name = os.path.splitext(os.path.basename(sys.argv[0]))[0]
    return f"python -m {package if name == '__main__' else f'{package}.{name}'}"


def _listeners(path: str) -> list[int]:
    """The pids of this user's ``convstore daemon`` processes that hold the
    socket listening at ``path`` (from /proc; SO_PEERCRED would name the
    process that called listen(), which a daemon started in the background
    by an older version had already left)."""
    inodes = set()
    where = os.path.abspath(path)  # as the daemon binds it
    try:
        with open("/proc/net/unix") as f:
            for line in f:
                parts = line.rstrip("\n").split(None, 7)
                if len(parts) == 8 and parts[7] == where and int(parts[3], 16) & 0x10000:  # __SO_ACCEPTCON
                    inodes.add(f"socket:[{parts[6]}]")
        pids = []
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                if os.stat(f"/proc/{name}").st_uid != os.getuid():
                    continue
                fds = os.listdir(f"/proc/{name}/fd")
                if not any(os.readlink(f"/proc/{name}/fd/{fd}") in inodes for fd in fds):
                    continue
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    cmdline = f.read().split(b"\0")
            except OSError:
                continue
            if b"daemon" in cmdline and any(b"convstore" in a for a in cmdline) and int(name) > 1:
                pids.append(int(name))
        return pids
    except (OSError, ValueError):
        return []


def request(path: str, op: str) -> dict[str, object]:
    """Ask the daemon at ``path`` for its ``status``, or to ``stop``."""
    import json

    s = connect(path)
    if s is None:
        raise DaemonError(f"no convstore daemon of this user answers at {path}")
    try:
        try:
            send_message(s, encode_request(op))
            kind, payload = recv_frame(s)
        except (OSError, EOFError) as e:
            # a daemon of another convstore version drops the request unanswered
            pids = _listeners(path)
            hint = (f"; if it is another convstore version's, stop it with: kill {' '.join(map(str, pids))}"
                    if pids else "; it may be another convstore version's: stop that `convstore daemon` process")
            raise DaemonError(f"the daemon at {path} did not answer{f' ({e})' if str(e) else ''}{hint}") from None
    finally:
        s.close()
    if kind != b"I":
        raise DaemonError(f"the daemon at {path} refused {op!r}: {payload.decode(errors='replace')}")
    info: dict[str, object] = json.loads(payload)
    return info
