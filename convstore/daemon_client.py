"""The client side of ``convstore daemon`` and the wire format both sides speak.

This runs first in every ``convstore`` command, before anything else is
imported, so it imports only what the interpreter has already loaded or
what is built in: ``os``, ``sys``, ``stat``, ``struct`` and the C modules
``_socket`` and ``_signal``.  The Python wrappers ``socket``, ``signal``
and ``json`` cost a client 15-30 ms of imports (``enum``, ``selectors``,
``re``), which was half of what a command handed to the daemon cost
(docs/benchmarks.md).  The server is :mod:`convstore.daemon`.

Wire format, version 2.  Client to daemon: one 4-byte big-endian length,
then that many bytes: NUL-terminated fields,
``convstore-daemon``, the protocol version in decimal, the operation
(``run``, ``status`` or ``stop``), and for ``run``: the program name, the
umask and the number of arguments in decimal, the ignored relayed signals
(decimal, comma-separated), the code fingerprint, the arguments, then the
environment as ``KEY=VALUE`` fields up to the end.  Strings travel as the
operating system's bytes (``os.fsencode``); nothing in them can hold a NUL.
After ``A`` the client sends one byte ``G`` (committed: from here on the
command may run) carrying its stdin, stdout, stderr and working directory
as descriptors (``SCM_RIGHTS``), never earlier: a daemon that does not
answer holds none of them; then, while it runs, ``b"S" + signal number``
frames.
Daemon to client: frames of one type byte and a 4-byte length: ``A``
accepted, ``F`` fall back (reason; before the command starts only), ``I``
status JSON, ``X`` exit status (4 bytes, signed), ``K`` killed by a signal
(4 bytes).
"""

from __future__ import annotations

import os
import stat
import struct
import sys

import _socket

# not ``typing.TYPE_CHECKING`` (typing is not loaded yet); the stubs know ``signal``, not ``_signal``
TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal as _signal
else:
    import _signal

PROTOCOL = 2
MAGIC = b"convstore-daemon"
MAX_REQUEST = 4 << 20
HANDSHAKE_TIMEOUT = 2.0  # a daemon that does not accept within this long is not used
# signals a client relays to its command's process group, as a terminal would deliver them
RELAYED = (_signal.SIGINT, _signal.SIGTERM, _signal.SIGHUP, _signal.SIGQUIT)
_FRAME = struct.Struct("!cI")
_LENGTH = struct.Struct("!I")
_INT = struct.Struct("!i")


class DaemonError(Exception):
    """The daemon cannot start, or cannot be reached for --status or --stop."""


class WireError(ValueError):
    """A request that is not version 2 of the wire format (``version``: it is
    well-formed, of another version)."""

    def __init__(self, why: str, version: bool = False) -> None:
        super().__init__(why)
        self.version = version


def socket_path() -> str:
    """Where the daemon listens: ``$CONVSTORE_DAEMON_SOCKET``, else
    ``$XDG_RUNTIME_DIR/convstore/cli.sock``, else ``/run/convstore/cli.sock``
    for root, else ``~/.cache/convstore-daemon/cli.sock`` (a home of this
    user: a name in ``/tmp`` could be taken first by another user), and only
    without such a home ``/tmp/convstore-UID/cli.sock``."""
    explicit = os.environ.get("CONVSTORE_DAEMON_SOCKET")
    if explicit:
        return explicit
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return os.path.join(runtime, "convstore", "cli.sock")
    if os.getuid() == 0:
        return "/run/convstore/cli.sock"
    home = os.environ.get("HOME", "")
    try:
        st = os.stat(home) if os.path.isabs(home) else None
    except OSError:
        st = None
    if st is not None and stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid():
        return os.path.join(home, ".cache", "convstore-daemon", "cli.sock")
    return f"/tmp/convstore-{os.getuid()}/cli.sock"


def fingerprint() -> str:
    """The code a process runs: the interpreter, this package's location and
    its files' sizes and modification times (about 1 ms; compared as text,
    which spares the client hashlib's import)."""
    root = os.path.dirname(os.path.abspath(__file__))
    parts = [f"{PROTOCOL}:{root}:{sys.version}:{sys.prefix}:{sys.executable}:{sys.getfilesystemencoding()}",
             f"flags:{tuple(sys.flags)}:{os.environ.get('PYTHONPATH', '')}"]
    for d in sys.path[1:]:  # an installed or removed package changes its directory's mtime ([0]: the script's or cwd)
        try:
            parts.append(f"path:{d}:{os.stat(d or '.').st_mtime_ns}")
        except OSError:
            pass
    stack = [root]
    while stack:
        with os.scandir(stack.pop()) as it:
            for e in it:
                if e.is_dir(follow_symlinks=False):
                    if e.name != "__pycache__":
                        stack.append(e.path)
                elif e.name.endswith(".py"):
                    st = e.stat()
                    parts.append(f"{e.path[len(root):]}:{st.st_size}:{st.st_mtime_ns}")
    return "\n".join(sorted(parts))


# ---------------------------------------------------------------- the wire


def encode_request(op: str, *fields: str | bytes) -> bytes:
    """A request's body: ``op`` and its fields, NUL-terminated."""
    out = [MAGIC, b"%d" % PROTOCOL, op.encode()]
    for f in fields:
        b = os.fsencode(f)
        if b"\0" in b:
            raise WireError("a field holds a NUL")
        out.append(b)
    return b"\0".join(out) + b"\0"


def decode_request(body: bytes) -> tuple[str, list[str]]:
    """(operation, fields) of a request body; :class:`WireError` if malformed."""
    parts = body.split(b"\0")
    if len(parts) < 4 or parts[0] != MAGIC or parts[-1] != b"":
        raise WireError("not a convstore daemon request")
    if parts[1] != b"%d" % PROTOCOL:
        raise WireError("protocol version", version=True)
    op = parts[2]
    if op not in (b"run", b"status", b"stop"):
        raise WireError("unknown operation")
    return op.decode(), [os.fsdecode(p) for p in parts[3:-1]]


def decimal(text: str) -> int:
    """A non-negative decimal number as the wire writes it (no sign, no spaces, ASCII digits)."""
    if not (text.isascii() and text.isdigit()) or len(text) > 9:
        raise WireError(f"not a number: {text[:20]!r}")
    return int(text)


def peer(sock: _socket.socket) -> tuple[int, int]:
    """The (pid, uid) of the process at the other end (``SO_PEERCRED``)."""
    pid, uid, _gid = struct.unpack("3i", sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12))
    return int(pid), int(uid)


def send_frame(sock: _socket.socket, kind: bytes, payload: bytes = b"") -> None:
    sock.sendall(_FRAME.pack(kind, len(payload)) + payload)


def recv_exact(sock: _socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        part = sock.recv(min(n - len(buf), 1 << 20))
        if not part:
            raise EOFError
        buf += part
    return bytes(buf)


def send_message(sock: _socket.socket, body: bytes) -> None:
    """A request: its 4-byte length, then its bytes."""
    sock.sendall(_LENGTH.pack(len(body)) + body)


def recv_message(sock: _socket.socket) -> bytes:
    """A request sent by :func:`send_message`; :class:`WireError` past :data:`MAX_REQUEST`."""
    (n,) = _LENGTH.unpack(recv_exact(sock, _LENGTH.size))
    if n > MAX_REQUEST:
        raise WireError("request too large")
    return recv_exact(sock, n)


def recv_frame(sock: _socket.socket) -> tuple[bytes, bytes]:
    kind, n = _FRAME.unpack(recv_exact(sock, _FRAME.size))
    if n > MAX_REQUEST:
        raise EOFError
    return kind, recv_exact(sock, n)


def private_dir(st: os.stat_result) -> bool:
    """An ``lstat`` of a directory of this user that no one else can write."""
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o022


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
                return int(_INT.unpack(payload)[0])
            if kind == b"K":  # the command was killed by a signal: so is this process, as a shell expects
                (signum,) = _INT.unpack(payload)
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
