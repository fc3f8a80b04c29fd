"""The FUSE session holder: keeps a mount's ``/dev/fuse`` connection alive across its server's death.

When the low-level server (:mod:`.kfuse`) has mounted and answered the
kernel's INIT, it starts a holder: a small process of its own (``python -m
convstore.reader.fdholder``, a new session, so a kill of the server's
process group spares it) that keeps a duplicate of the ``/dev/fuse`` fd and
what a successor needs (the image's manifest digest, the negotiated INIT
parameters).  While it holds the fd the kernel keeps the connection: readers
of a killed server wait instead of failing with ENOTCONN.  A successor
started the same way (``convstore mount REF MOUNTPOINT``) asks the holder
for the fd (SCM_RIGHTS over the holder's unix socket), checks it serves the
same manifest (same inode numbers, the kernel's nodeids) and serves on; the
requests its predecessor had taken are asked for again (FUSE_NOTIFY_RESEND).

The fd is the filesystem: whoever has it answers every read of the mount.
The socket is 0600 in a 0700 directory, and the holder also checks its peer
with SO_PEERCRED: only a process of the holder's own uid gets it (a
stranger's connection is closed and logged).  The holder exits when the
connection ends (unmounted or aborted: ``/dev/fuse`` polls POLLERR) or when
told to drop it (a clean stop), or when no server has been attached to
it (the serving process keeps a connection open) for a grace period
(``$CONVSTORE_FUSE_FAILOVER_GRACE``, 120 s): then the readers get ENOTCONN
instead of waiting for ever.

Session state (JSON, format version 1)::

    {"version": 1, "mountpoint": DIR, "manifest_digest": "sha256:...", "ref": NAME:TAG,
     "init": {"major": 7, "minor": N, "flags": N, "max_readahead": N}}
"""

from __future__ import annotations

import array
import hashlib
import json
import os
import re
import select
import socket
import stat
import struct
import subprocess
import sys
import time
from typing import Any

STATE_VERSION = 1
_MAX_STATE = 64 << 10  # what a server hands over at the start
_MAX_REQUEST = 64 << 20  # a request line (a path server's journal of nodeids)
#: how long a session whose server died waits for a successor ($CONVSTORE_FUSE_FAILOVER_GRACE, seconds)
DEFAULT_GRACE = 120.0


def grace_seconds() -> float:
    from ..errors import FuseSessionError

    raw = os.environ.get("CONVSTORE_FUSE_FAILOVER_GRACE", "")
    try:
        v = float(raw) if raw else DEFAULT_GRACE
    except ValueError:
        v = -1.0
    if not 0 < v < 1e7:
        raise FuseSessionError(f"CONVSTORE_FUSE_FAILOVER_GRACE={raw!r}: give a number of seconds > 0")
    return v


def sessions_dir() -> str:
    """Where holders listen: ``$CONVSTORE_FUSE_SESSIONS``, else /run/convstore/fuse (root) or
    ``$XDG_RUNTIME_DIR/convstore/fuse``."""
    d = os.environ.get("CONVSTORE_FUSE_SESSIONS")
    if d:
        return d
    if os.geteuid() != 0 and os.environ.get("XDG_RUNTIME_DIR"):
        return os.path.join(os.environ["XDG_RUNTIME_DIR"], "convstore", "fuse")
    return "/run/convstore/fuse"


def mount_key(mountpoint: str) -> str:
    """The mount point, absolute, its parent resolved: never a syscall on the mount point itself
    (a mount whose server is gone would block it)."""
    a = os.path.abspath(mountpoint)
    return os.path.join(os.path.realpath(os.path.dirname(a)), os.path.basename(a))


def socket_path(mountpoint: str) -> str:
    h = hashlib.sha256(os.fsencode(mount_key(mountpoint))).hexdigest()[:32]
    return os.path.join(sessions_dir(), f"{h}.sock")


# -- the client side (the server processes) -------------------------------------
def _connect(mountpoint: str) -> socket.socket | None:
    path = socket_path(mountpoint)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    s.settimeout(10)
    try:
        s.connect(path)
    except (FileNotFoundError, NotADirectoryError, PermissionError):  # none held (or not this user's to ask)
        s.close()
        return None
    except ConnectionRefusedError:  # a holder that died: its socket is left over
        s.close()
        try:
            os.unlink(path)
        except OSError:
            pass
        return None
    except OSError as e:  # e.g. a sessions directory too deep for a unix socket's path (107 bytes)
        s.close()
        import logging

        logging.getLogger(__name__).warning("FUSE session holder socket %s unusable (no failover): %s", path, e)
        return None
    return s


def held(mountpoint: str) -> bool:
    """Whether a holder keeps a session for ``mountpoint`` that is still mounted there (asks it, and
    reads /proc/self/mountinfo; never touches the mount)."""
    return mounted(mountpoint) and _ping(mountpoint).startswith(b"ok")


def mounted(mountpoint: str) -> bool:
    """Whether a FUSE file system is mounted at ``mountpoint`` (from /proc/self/mountinfo: a stat of a
    mount whose server is gone would block).  A session held for a mount point that is no longer
    mounted there (unmounted while an engine's overlay still holds its superblock) is not this mount
    point's any more: a new server mounts afresh instead of taking it over."""
    key = mount_key(mountpoint)
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                fields = line.split()
                sep = fields.index("-") if "-" in fields else -1
                if len(fields) > 4 and sep > 0 and fields[sep + 1].startswith("fuse") \
                        and _unescape(fields[4]) == key:
                    return True
    except OSError:
        return True  # cannot tell: as before, trust the holder
    return False


def _unescape(field: str) -> str:
    """A mountinfo path: space, tab, newline and backslash are octal escapes there."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def served(mountpoint: str) -> bool:
    """Whether a held session has a live server attached (a successor took it over)."""
    return _ping(mountpoint).startswith(b"ok attached")


def _ping(mountpoint: str) -> bytes:
    s = _connect(mountpoint)
    if s is None:
        return b""
    try:
        s.sendall(b'{"op": "ping"}\n')
        return s.recv(32)
    except OSError:
        return b""
    finally:
        s.close()


def take(mountpoint: str) -> tuple[int, dict[str, Any]] | None:
    """A duplicate of the held ``/dev/fuse`` fd and the session state, or None when nothing is held.
    The holder keeps its own copy (a successor of the successor can take it again)."""
    from ..errors import FuseSessionError

    s = _connect(mountpoint)
    if s is None:
        return None
    try:
        uid = _peer_uid(s)
    except OSError:
        uid = -1
    if uid != os.geteuid():  # a socket planted by someone else: never serve the image into their fd
        s.close()
        raise FuseSessionError(f"the FUSE session socket of {mountpoint} ({socket_path(mountpoint)}) belongs to "
                               f"uid {uid}, not {os.geteuid()}: refused; remove it")
    try:
        s.sendall(b'{"op": "get"}\n')
        fds = array.array("i")
        msg, anc, _flags, _addr = s.recvmsg(1 << 16, socket.CMSG_SPACE(fds.itemsize))
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[:len(data) - (len(data) % fds.itemsize)])
        while fds and msg:
            more = s.recv(1 << 20)
            if not more:
                break
            msg += more
    except OSError as e:
        raise FuseSessionError(f"the FUSE session holder of {mountpoint} did not answer: {e}") from None
    finally:
        s.close()
    if len(fds) != 1:
        for fd in fds:
            os.close(fd)
        if not msg:
            return None  # the holder found its connection ended (unmounted) and let go
        raise FuseSessionError(f"the FUSE session holder of {mountpoint} refused to hand over its session "
                               f"({msg.decode(errors='replace').strip() or 'no answer'})")
    try:
        state = json.loads(msg)
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ValueError(f"version {state.get('version') if isinstance(state, dict) else '?'}")
    except ValueError as e:
        os.close(fds[0])
        raise FuseSessionError(f"the FUSE session holder of {mountpoint} sent unreadable state: {e}") from None
    st = os.fstat(fds[0])
    if not stat.S_ISCHR(st.st_mode) or st.st_rdev != os.makedev(10, 229):  # /dev/fuse
        os.close(fds[0])
        raise FuseSessionError(f"the FUSE session holder of {mountpoint} handed over something that is not "
                               f"/dev/fuse: refused")
    if not _connected(fds[0]):  # unmounted since
        os.close(fds[0])
        return None
    if not mounted(mountpoint):  # no longer mounted here (an overlay may keep it alive elsewhere): not ours
        os.close(fds[0])
        drop(mountpoint)
        return None
    return fds[0], state


class Journal:
    """A path server's line to its holder: new nodeids, kept for a successor.  Sent before the kernel
    learns them; what is sent is read by the holder even if this process dies right after."""

    def __init__(self, mountpoint: str):
        from ..errors import FuseSessionError

        s = _connect(mountpoint)
        if s is None:
            raise FuseSessionError(f"no FUSE session holder for {mountpoint}")
        s.settimeout(None)
        self._sock = s
        s.sendall(b'{"op": "attach"}\n')  # the holder's grace period stops while this connection lives

    def add(self, nodes: list[tuple[int, str]]) -> None:
        self._sock.sendall(json.dumps({"op": "add", "nodes": nodes}).encode() + b"\n")

    def close(self) -> None:
        self._sock.close()


def drop(mountpoint: str) -> None:
    """Tell the holder to close its fd and exit (a clean stop); nothing if there is none."""
    s = _connect(mountpoint)
    if s is None:
        return
    try:
        s.sendall(b'{"op": "drop"}\n')
        s.recv(16)
    except OSError:
        pass
    finally:
        s.close()


def hold(mountpoint: str, fd: int, state: dict[str, Any]) -> subprocess.Popen[bytes]:
    """Start a holder keeping ``fd`` (a duplicate) and ``state`` for ``mountpoint``; returns once it listens."""
    from ..errors import FuseSessionError
    from ..hardening import SECRET_ENV_PREFIXES, tool_environ

    d = sessions_dir()
    os.makedirs(d, mode=0o700, exist_ok=True)
    st = os.stat(d)
    if st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise FuseSessionError(f"{d} must be a directory of uid {os.geteuid()} closed to others (mode 0700)")
    # the file itself, isolated (-I): the holder needs the standard library only, and starts in tens of ms
    p = subprocess.Popen([sys.executable, "-I", os.path.abspath(__file__), socket_path(mountpoint), str(fd)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, pass_fds=(fd,), start_new_session=True,
                         env=tool_environ(SECRET_ENV_PREFIXES))
    assert p.stdin is not None and p.stdout is not None
    p.stdin.write(json.dumps({**state, "version": STATE_VERSION, "grace": grace_seconds()}).encode())
    p.stdin.close()
    line = p.stdout.readline()  # "ready" once it listens, nothing if it failed
    p.stdout.close()
    if not line.startswith(b"ready"):
        p.wait()
        raise FuseSessionError(f"the FUSE session holder for {mountpoint} failed to start (exit {p.returncode})")
    return p


# -- the holder process ---------------------------------------------------------
def _peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


def _serve_holder(path: str, fuse_fd: int, state: dict[str, Any]) -> None:
    old = os.umask(0o177)
    try:
        if os.path.exists(path):
            os.unlink(path)  # a dead holder's socket (the client found nobody listening)
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        srv.bind(path)
    finally:
        os.umask(old)
    srv.listen(8)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    os.close(1)
    me = os.geteuid()
    poll = select.poll()
    poll.register(srv.fileno(), select.POLLIN)
    poll.register(fuse_fd, 0)  # POLLERR/POLLHUP only: the connection ended
    conns: dict[int, tuple[socket.socket, bytearray]] = {}
    attached: set[int] = set()  # the connections of the serving process (none: it died)
    grace = float(state.get("grace", DEFAULT_GRACE))
    deadline: list[float | None] = [time.monotonic() + grace]  # until the server attaches

    def close(fd: int) -> None:
        poll.unregister(fd)
        conns.pop(fd)[0].close()
        if fd in attached:
            attached.discard(fd)
            if not attached:
                deadline[0] = time.monotonic() + grace  # a successor has this long to take over

    try:
        while True:
            wait = None if deadline[0] is None else max(0.0, deadline[0] - time.monotonic())
            events = poll.poll(None if wait is None else int(wait * 1000) + 1)
            if not events and deadline[0] is not None and time.monotonic() >= deadline[0]:
                _log(f"no server took over {state.get('mountpoint')} within {grace:g} s; letting the session "
                     f"go (its readers get ENOTCONN)")
                return
            for fd, ev in events:
                if fd == fuse_fd:
                    return  # unmounted or aborted: nothing left to hold
                if fd == srv.fileno():
                    conn, _ = srv.accept()
                    uid = _peer_uid(conn)
                    if uid != me:
                        _log(f"refused a connection from uid {uid} to {path}")
                        conn.close()  # never the fd, not even the state
                        continue
                    conns[conn.fileno()] = (conn, bytearray())
                    poll.register(conn.fileno(), select.POLLIN)
                    continue
                conn, buf = conns[fd]
                try:
                    data = conn.recv(1 << 16)
                except OSError:
                    data = b""
                if not data:  # the peer is gone (what it sent before is read first)
                    close(fd)
                    continue
                buf += data
                if len(buf) > _MAX_REQUEST:
                    close(fd)
                    continue
                while b"\n" in buf:
                    line, _, rest = bytes(buf).partition(b"\n")
                    buf[:] = rest
                    op = _handle(conn, line, fuse_fd, state, bool(attached))
                    if op == "drop":
                        return
                    if op in ("attach", "add"):
                        attached.add(fd)
                        deadline[0] = None
                    elif op == "get" and not attached:
                        deadline[0] = time.monotonic() + grace
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass
        os.close(fuse_fd)


def _log(msg: str) -> None:
    """One line on stderr (the server's; a closed pipe must not end the holder)."""
    try:
        sys.stderr.write(f"convstore fdholder: {msg}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def _connected(fuse_fd: int) -> bool:
    """Whether the FUSE connection is still up (an unmount aborts it: the fd polls POLLERR)."""
    p = select.poll()
    p.register(fuse_fd, 0)
    return not p.poll(0)


def _handle(conn: socket.socket, line: bytes, fuse_fd: int, state: dict[str, Any], attached: bool) -> str | None:
    """One request; its op.  ``attached``: whether a server is attached (the answer to a ping)."""
    try:
        req = json.loads(line)
    except ValueError:
        return None
    op = req.get("op") if isinstance(req, dict) else None
    if op in ("ping", "get") and not _connected(fuse_fd):
        return "drop"  # unmounted meanwhile: nothing to hand over (the poll loop would see it next)
    try:
        if op == "ping":
            conn.sendall(b"ok attached\n" if attached else b"ok\n")
        elif op == "get":
            doc = json.dumps(state).encode()
            conn.setblocking(True)
            conn.sendmsg([doc[:4096]], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fuse_fd]).tobytes())])
            conn.sendall(doc[4096:])
            conn.shutdown(socket.SHUT_WR)
        elif op == "add":  # a path server's new nodeids (journal: kept for its successor)
            nodes = req.get("nodes")
            if isinstance(nodes, list):
                state.setdefault("nodes", []).extend(nodes)
        elif op == "drop":
            conn.sendall(b"ok\n")
    except OSError:
        pass
    return op if isinstance(op, str) else None


def main() -> None:
    path, fd = sys.argv[1], int(sys.argv[2])
    raw = sys.stdin.buffer.read(_MAX_STATE + 1)
    if len(raw) > _MAX_STATE:
        sys.exit("convstore fdholder: session state too large")
    state = json.loads(raw)
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's ^C to the server's group is not for the holder
    _serve_holder(path, fd, state)


if __name__ == "__main__":
    main()
