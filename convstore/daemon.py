"""A fork server for the command line: ``convstore daemon``.

Every ``convstore`` process pays for the interpreter, typer, the command
tree and convstore's imports before it does any work: 0.15-0.2 s, most of a
warm ``convstore run`` (docs/benchmarks.md).  The daemon pays it once: it
imports the command line, builds the command tree, then waits on a unix
socket.  ``convstore`` (``__main__``) first looks for that socket; when a
daemon of the same user answers, it sends its arguments, environment, umask
and its stdin, stdout, stderr and working directory (as descriptors), and the
daemon forks a child that runs the command exactly as the process would
have: the same files, terminal, environment and exit status.  Nothing of one
command outlives it in the daemon, which only forks and reports.

Trust: the socket is created 0600 in a directory of its owner that no one
else can write, and both ends check the other's uid (``SO_PEERCRED``): a
daemon serves only its own user, and a client talks only to a daemon of its
own user.  A daemon whose code differs from the client's (an upgrade, an
edit) is not used: the client runs the command itself.

Wire format, version 1.  Client to daemon: one 4-byte big-endian length
(carrying the descriptors), then that many bytes of JSON:
``{"v": 1, "op": "run" | "status" | "stop", ...}``; after ``A``, one byte
``G`` (the client is committed: from here on the command may run); then,
while it runs, ``b"S" + signal number`` frames.  Daemon to client: frames of
one type byte and a 4-byte length: ``A`` accepted, ``F`` fall back (reason;
before the command starts only), ``I`` status JSON, ``X`` exit status
(4 bytes, signed), ``K`` killed by a signal (4 bytes).

Only the standard library is imported here: the client side runs before
everything else in every command.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import stat
import struct
import sys
from collections.abc import Callable, Iterable

PROTOCOL = 1
MAX_REQUEST = 4 << 20
REQUEST_TIMEOUT = 5.0  # a client silent this long mid-request is dropped
HANDSHAKE_TIMEOUT = 2.0  # a daemon that does not accept within this long is not used
# signals a client relays to its command's process group, as a terminal would deliver them
RELAYED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
_FRAME = struct.Struct("!cI")


class DaemonError(Exception):
    """The daemon cannot start, or cannot be reached for --status or --stop."""


def socket_path() -> str:
    """Where the daemon listens: ``$CONVSTORE_DAEMON_SOCKET``, else
    ``$XDG_RUNTIME_DIR/convstore/cli.sock``, else ``/run/convstore/cli.sock``
    for root and ``/tmp/convstore-UID/cli.sock`` for other users."""
    explicit = os.environ.get("CONVSTORE_DAEMON_SOCKET")
    if explicit:
        return explicit
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return os.path.join(runtime, "convstore", "cli.sock")
    if os.getuid() == 0:
        return "/run/convstore/cli.sock"
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


def _peer(sock: socket.socket) -> tuple[int, int]:
    """The (pid, uid) of the process at the other end (``SO_PEERCRED``)."""
    pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    return int(pid), int(uid)


def _send(sock: socket.socket, kind: bytes, payload: bytes = b"") -> None:
    sock.sendall(_FRAME.pack(kind, len(payload)) + payload)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        part = sock.recv(n - len(buf))
        if not part:
            raise EOFError
        buf += part
    return buf


def _recv_frame(sock: socket.socket) -> tuple[bytes, bytes]:
    kind, n = _FRAME.unpack(_recv_exact(sock, _FRAME.size))
    if n > MAX_REQUEST:
        raise EOFError
    return kind, _recv_exact(sock, n)


def _safe_socket(path: str) -> bool:
    """The socket and its directory belong to this user, and no one else can replace them."""
    uid = os.getuid()
    try:
        st = os.lstat(path)
        dst = os.lstat(os.path.dirname(path) or ".")
    except OSError:
        return False
    return (stat.S_ISSOCK(st.st_mode) and st.st_uid == uid and stat.S_ISDIR(dst.st_mode) and dst.st_uid == uid
            and not dst.st_mode & 0o022)


def _connect(path: str) -> socket.socket | None:
    if not _safe_socket(path):
        return None
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(HANDSHAKE_TIMEOUT)
    try:
        s.connect(path)
        if _peer(s)[1] == os.getuid():
            return s
    except OSError:
        pass
    s.close()
    return None


# what a command's process may differ in from the daemon's without running with more than it had
# (not compared: cgroups, which differ between a user's terminals, and LSM labels; docs/architecture.md)
_CONTEXT_NS = ("mnt", "pid", "net", "user", "ipc", "uts", "cgroup", "time")
_CONTEXT_STATUS = ("Uid:", "Gid:", "Groups:", "CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:",
                   "NoNewPrivs:", "Seccomp:", "Seccomp_filters:")


def _context(pid: int | str) -> list[str]:
    """A process's root, namespaces, ids, groups, capabilities and seccomp/no_new_privs state
    (OSError if unreadable)."""
    out = [os.readlink(f"/proc/{pid}/root")]
    out += [os.readlink(f"/proc/{pid}/ns/{ns}") for ns in _CONTEXT_NS if os.path.exists(f"/proc/self/ns/{ns}")]
    with open(f"/proc/{pid}/status") as f:
        out += [line.strip() for line in f if line.startswith(_CONTEXT_STATUS)]
    return out


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
        s = _connect(socket_path())
    except Exception:  # noqa: BLE001 - any doubt: the command runs in this process
        return None
    if s is None:
        return None
    with s:
        return _run_client(s, argv)


def _run_client(s: socket.socket, argv: list[str]) -> int | None:
    try:
        ignored = [int(sig) for sig in RELAYED if signal.getsignal(sig) == signal.SIG_IGN]
        umask = os.umask(0)
        os.umask(umask)
        body = json.dumps({"v": PROTOCOL, "op": "run", "argv": argv, "prog": _prog_name(),
                           "env": dict(os.environ), "umask": umask, "ignored": ignored,
                           "fingerprint": fingerprint()}).encode()
        cwd = os.open(".", os.O_PATH | os.O_DIRECTORY)
        try:
            socket.send_fds(s, [struct.pack("!I", len(body))], [0, 1, 2, cwd])
        finally:
            os.close(cwd)
        s.sendall(body)
        kind, _why = _recv_frame(s)
        if kind != b"A":
            return None
    except Exception:  # noqa: BLE001 - nothing has run yet: the command runs in this process
        return None
    # committed from here: a signal that comes before the relays are in place is held, then relayed
    held = signal.pthread_sigmask(signal.SIG_BLOCK, RELAYED)
    try:
        return _committed(s, argv, ignored)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def _committed(s: socket.socket, argv: list[str], ignored: list[int]) -> int | None:
    try:
        s.sendall(b"G")  # the daemon forks the command now
    except OSError:
        return None  # never sent: nothing runs there
    s.settimeout(None)

    def relay(signum: int, _frame: object) -> None:
        try:
            s.sendall(b"S" + bytes([signum]))
        except OSError:
            pass

    saved = {int(sig): signal.signal(sig, relay) for sig in RELAYED if int(sig) not in ignored}
    signal.pthread_sigmask(signal.SIG_UNBLOCK, RELAYED)
    try:
        while True:
            kind, payload = _recv_frame(s)
            if kind == b"F":
                return None  # the daemon could not fork: the command never started
            if kind == b"X":
                return int(struct.unpack("!i", payload)[0])
            if kind == b"K":  # the command was killed by a signal: so is this process, as a shell expects
                (signum,) = struct.unpack("!i", payload)
                try:
                    signal.signal(signum, signal.SIG_DFL)  # SIGKILL cannot be (and need not be) reset
                except (OSError, ValueError):
                    pass
                saved.pop(signum, None)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, [signum])
                os.kill(os.getpid(), signum)
                return 128 + signum
    except (OSError, EOFError, ValueError):
        sys.stderr.write("convstore: error: the daemon went away before the command finished\n")
        return 1
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def _prog_name() -> str:
    """The program name click would give this process in its usage lines
    (``convstore``, or ``python -m convstore``)."""
    package = getattr(sys.modules.get("__main__"), "__package__", None)
    if not package:
        return os.path.basename(sys.argv[0]) or "convstore"
    name = os.path.splitext(os.path.basename(sys.argv[0]))[0]
    return f"python -m {package if name == '__main__' else f'{package}.{name}'}"


def request(path: str, op: str) -> dict[str, object]:
    """Ask the daemon at ``path`` for its ``status``, or to ``stop``."""
    s = _connect(path)
    if s is None:
        raise DaemonError(f"no convstore daemon of this user answers at {path}")
    with s:
        body = json.dumps({"v": PROTOCOL, "op": op}).encode()
        try:
            s.sendall(struct.pack("!I", len(body)) + body)
            kind, payload = _recv_frame(s)
        except (OSError, EOFError) as e:
            raise DaemonError(f"the daemon at {path} did not answer: {e}") from None
    if kind != b"I":
        raise DaemonError(f"the daemon at {path} refused {op!r}: {payload.decode(errors='replace')}")
    info: dict[str, object] = json.loads(payload)
    return info


# ---------------------------------------------------------------- the server


class _Child:
    def __init__(self, pid: int, conn: socket.socket) -> None:
        self.pid, self.conn, self.connected, self.buf = pid, conn, True, b""


class Daemon:
    """The fork server.  ``entry(prog)`` runs one command in a forked child
    (it reads ``sys.argv``; ``prog`` names the program in usage lines)."""

    def __init__(self, path: str, entry: Callable[[str], None], version: str) -> None:
        self.path, self.entry, self.version = path, entry, version
        self.fingerprint = fingerprint()
        self.context = _context("self")
        self.children: dict[int, _Child] = {}
        self.served = 0
        self.max_rss_kib = 0  # the largest peak RSS of a command's child
        self.stopping = False
        self.started = 0.0
        self.listener: socket.socket | None = None
        self._inode: tuple[int, int] | None = None

    def bind(self) -> None:
        """Create the socket (0600, in a 0700 directory of this user), or
        explain why not; a live daemon at the same path is an error, a dead
        one's socket is replaced."""
        folder = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(folder, mode=0o700, exist_ok=True)
        st = os.lstat(folder)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
            raise DaemonError(f"{folder} must be a directory of this user that no one else can write "
                              f"(someone else's, a link, or open to others)")
        live = _connect(self.path)
        if live is not None:
            live.close()
            raise DaemonError(f"a convstore daemon already listens at {self.path}")
        try:
            if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                os.unlink(self.path)  # a dead daemon's
            else:
                raise DaemonError(f"{self.path} exists and is not a socket")
        except FileNotFoundError:
            pass
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # created 0600
        try:
            s.bind(self.path)
        finally:
            os.umask(old)
        st = os.lstat(self.path)
        self._inode = (st.st_dev, st.st_ino)
        s.listen(64)
        self.listener = s

    def serve(self) -> None:
        """Serve until ``stop`` or SIGTERM/SIGINT/SIGHUP; then wait for the
        running commands (a second signal is passed on to them), and remove
        the socket."""
        import gc
        import selectors
        import time

        assert self.listener is not None
        self.started = time.time()
        gc.freeze()  # what was imported stays out of every child's collections (and unshared pages untouched)
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        pending: list[int] = []

        def on_signal(signum: int, _frame: object) -> None:
            pending.append(signum)

        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, on_signal)
        signal.set_wakeup_fd(wake_w)
        sel = selectors.DefaultSelector()
        sel.register(self.listener, selectors.EVENT_READ, None)
        sel.register(wake_r, selectors.EVENT_READ, None)
        self._inherited = [wake_r, wake_w]
        self._selector = sel
        try:
            while not (self.stopping and not self.children):
                for key, _ in sel.select():
                    if key.fileobj is self.listener:
                        self._accept()
                    elif key.fileobj == wake_r:
                        while True:
                            try:
                                if not os.read(wake_r, 512):
                                    break
                            except BlockingIOError:
                                break
                    else:
                        self._from_client(key.data)
                while pending:
                    signum = pending.pop()
                    if signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                        if self.stopping:
                            for c in self.children.values():
                                _killpg(c.pid, signum)
                        self._stop_listening()
                self._reap()
        finally:
            signal.set_wakeup_fd(-1)
            self._stop_listening()
            sel.close()
            os.close(wake_r)
            os.close(wake_w)

    def _stop_listening(self) -> None:
        self.stopping = True
        if self.listener is not None:
            try:  # unlinked while still bound: a newer daemon cannot have taken the path meanwhile
                st = os.lstat(self.path)
                if (st.st_dev, st.st_ino) == self._inode:
                    os.unlink(self.path)
            except FileNotFoundError:
                pass
            self._selector.unregister(self.listener)
            self.listener.close()
            self.listener = None

    def _reap(self) -> None:
        while self.children:
            try:
                pid, status, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.max_rss_kib = max(self.max_rss_kib, usage.ru_maxrss)
            child = self.children.pop(pid, None)
            if child is None:
                continue
            if child.connected:
                self._selector.unregister(child.conn)
            try:
                if os.WIFSIGNALED(status):
                    _send(child.conn, b"K", struct.pack("!i", os.WTERMSIG(status)))
                else:
                    _send(child.conn, b"X", struct.pack("!i", os.waitstatus_to_exitcode(status)))
            except OSError:
                pass
            child.conn.close()

    def _from_client(self, child: _Child) -> None:
        try:
            data = child.conn.recv(64)
        except OSError:
            data = b""
        if not data:  # the client is gone: its command gets what a closed terminal sends
            self._selector.unregister(child.conn)
            child.connected = False
            _killpg(child.pid, signal.SIGHUP)
            return
        child.buf += data
        while len(child.buf) >= 2:
            frame, child.buf = child.buf[:2], child.buf[2:]
            if frame[:1] == b"S" and frame[1] in RELAYED:
                _killpg(child.pid, frame[1])

    def _accept(self) -> None:
        assert self.listener is not None
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        fds: list[int] = []
        try:
            pid, uid = _peer(conn)
            if uid != os.getuid():
                conn.close()
                return
            conn.settimeout(REQUEST_TIMEOUT)
            head, fds, flags, _ = socket.recv_fds(conn, 4, 8)
            if len(head) < 4:
                head += _recv_exact(conn, 4 - len(head))
            (n,) = struct.unpack("!I", head)
            if n > MAX_REQUEST or flags & getattr(socket, "MSG_CTRUNC", 8):
                raise ValueError("request too large")
            req = json.loads(_recv_exact(conn, n))
            if not isinstance(req, dict) or req.get("v") != PROTOCOL:
                _send(conn, b"F", b"protocol version")
                raise ValueError("protocol")
            op = req.get("op")
            if op == "status":
                _send(conn, b"I", json.dumps(self.status()).encode())
            elif op == "stop":
                _send(conn, b"I", json.dumps(self.status()).encode())
                self._stop_listening()
            elif op == "run":
                self._run(conn, pid, req, fds)
                return
            raise ValueError("done")
        except Exception:  # noqa: BLE001 - one bad request never takes the daemon down
            conn.close()
        finally:
            for fd in fds:
                os.close(fd)

    def status(self) -> dict[str, object]:
        import resource

        return {"pid": os.getpid(), "socket": self.path, "version": self.version,
                "code": os.path.dirname(os.path.abspath(__file__)), "served": self.served,
                "running": len(self.children), "started": self.started, "stopping": self.stopping,
                "rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                "command_max_rss_kib": self.max_rss_kib}

    def _run(self, conn: socket.socket, peer: int, req: dict[str, object], fds: list[int]) -> None:
        argv, env, umask, prog, ignored = req["argv"], req["env"], req["umask"], req["prog"], req["ignored"]
        if (len(fds) != 4 or not isinstance(argv, list) or not all(isinstance(a, str) for a in argv)
                or not isinstance(env, dict) or not isinstance(umask, int) or not isinstance(prog, str)
                or not isinstance(ignored, list) or not all(i in RELAYED for i in ignored)):
            raise ValueError("malformed request")
        if req.get("fingerprint") != self.fingerprint:
            _send(conn, b"F", b"the daemon runs other code than this client; restart it")
            raise ValueError("stale")
        try:
            same = _context(peer) == self.context
        except OSError:
            same = False
        if not same:  # another namespace, fewer capabilities, a sandbox: the command must run there, not here
            _send(conn, b"F", b"the client runs in another context than the daemon")
            raise ValueError("context")
        _send(conn, b"A")
        if _recv_exact(conn, 1) != b"G":
            raise ValueError("not committed")
        conn.settimeout(None)
        blocked = (*RELAYED, signal.SIGCHLD)
        old = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)  # relayed at once: held until the child is ready
        try:
            pid = os.fork()
        except OSError:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
            _send(conn, b"F", b"fork failed")
            raise
        if pid == 0:
            code = 70  # EX_SOFTWARE: the child could not become the client's process
            try:
                code = self._child(conn, fds, argv, prog, {str(k): str(v) for k, v in env.items()}, umask,
                                   [int(i) for i in ignored], old)
            except BaseException as e:  # noqa: BLE001 - reported on the client's stderr, never unwound into the server
                os.write(2, f"convstore: internal error in the daemon's child: {type(e).__name__}: {e}\n".encode())
            finally:
                os._exit(code)
        try:
            os.setpgid(pid, pid)
        except OSError:
            pass  # the child did it first, or is already gone
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
        self.served += 1
        self.children[pid] = _Child(pid, conn)
        self._selector.register(conn, 0x1, self.children[pid])  # selectors.EVENT_READ

    def _child(self, conn: socket.socket, fds: list[int], argv: list[str], prog: str, env: dict[str, str],
               umask: int, ignored: list[int], mask: Iterable[int]) -> int:
        """In the forked child: become the client's process, run the command, return its exit status."""
        import atexit
        import tempfile
        import threading
        import traceback

        os.setpgid(0, 0)
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for i in ignored:  # what the client ignores (nohup), its command ignores too
            signal.signal(i, signal.SIG_IGN)
        self._selector.close()
        for fd in self._inherited:
            os.close(fd)
        if self.listener is not None:
            self.listener.close()
        for other in self.children.values():
            other.conn.close()
        conn.close()
        for target, fd in enumerate(fds[:3]):
            os.dup2(fd, target)
        os.fchdir(fds[3])
        for fd in fds:
            if fd > 2:
                os.close(fd)
        fds.clear()
        os.umask(umask)
        os.environ.clear()
        os.environ.update(env)
        tempfile.tempdir = None
        from .stores import faults

        faults.configure()
        sys.stdin = _stream(0, "r", env)
        sys.stdout = _stream(1, "w", env)
        sys.stderr = _stream(2, "w", env)
        sys.argv = ["convstore", *argv]
        _parent_death_signal(signal.SIGHUP)  # a daemon that dies takes its commands with it, as a terminal would
        code = 1
        try:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # a signal relayed meanwhile arrives here, on the command
            self.entry(prog)
            code = 0
        except SystemExit as e:
            if e.code is None:
                code = 0
            elif isinstance(e.code, int):
                code = e.code
            else:
                sys.stderr.write(f"{e.code}\n")
        except KeyboardInterrupt:
            code = 128 + signal.SIGINT
        except BaseException:  # noqa: BLE001 - as the interpreter reports an uncaught exception
            traceback.print_exc()
        finally:
            # what the interpreter does at exit: wait for non-daemon threads (executors first), atexit, flush
            try:
                shutdown = getattr(threading, "_shutdown", None)
                if shutdown is not None:
                    shutdown()
                atexit._run_exitfuncs()
            except KeyboardInterrupt:
                code = 128 + signal.SIGINT
            for f in (sys.stdout, sys.stderr):
                try:
                    f.flush()
                except (OSError, ValueError):
                    pass
        return code


def _stream(fd: int, mode: str, env: dict[str, str]) -> io.TextIOWrapper:
    """A standard stream on the client's descriptor, encoded and buffered as
    Python sets up its own (``PYTHONIOENCODING``, ``PYTHONUNBUFFERED``; UTF-8)."""
    encoding, _, errors = env.get("PYTHONIOENCODING", "").partition(":")
    raw = io.FileIO(fd, mode, closefd=False)
    tty = raw.isatty()
    buffered: io.BufferedReader | io.BufferedWriter = io.BufferedReader(raw) if mode == "r" else io.BufferedWriter(raw)
    unbuffered = fd == 2 or bool(env.get("PYTHONUNBUFFERED"))
    return io.TextIOWrapper(buffered, encoding=encoding or "utf-8",
                            errors=errors or ("strict" if fd == 0 else "backslashreplace"),
                            line_buffering=tty or fd == 2, write_through=unbuffered and mode == "w")


def _parent_death_signal(sig: int) -> None:
    """PR_SET_PDEATHSIG: ``sig`` when the daemon exits (then the client reports it went away)."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, int(sig), 0, 0, 0)
    if os.getppid() == 1:  # it already died
        os.kill(os.getpid(), sig)


def _killpg(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
