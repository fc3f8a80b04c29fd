"""The daemon's wire protocol: what ``convstore daemon`` and its client both speak.

Its rules: the request and frame format, the code fingerprint that keeps a
client off a daemon running other code, and where the socket is
(:func:`socket_path`).  The client (:mod:`convstore.daemon.client`) runs
first in every command, so this module imports only what the interpreter has
already loaded or what is built in: ``os``, ``sys``, ``stat``, ``struct`` and
the C modules ``_socket`` and ``_signal`` (docs/benchmarks.md).

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
# signals a client relays to its command's process group, as a terminal would deliver them
RELAYED = (_signal.SIGINT, _signal.SIGTERM, _signal.SIGHUP, _signal.SIGQUIT)
_FRAME = struct.Struct("!cI")
_LENGTH = struct.Struct("!I")
STATUS = struct.Struct("!i")  # the payload of ``X`` (exit status) and ``K`` (signal number)


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
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # convstore/, not convstore/daemon/
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

