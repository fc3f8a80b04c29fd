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
edit) is not used: the client runs the command itself; one whose loaded
module files changed on disk since it started (a patched dependency) stops
and starts again on the new code.
A command never runs with more than its client had: the client's context
is read from ``/proc`` while a pidfd of the process that connected shows it
still holds that pid (``SO_PEERPIDFD``), the client's resource limits are
applied to the command, and the daemon runs with a scrubbed environment.

The client (:mod:`convstore.daemon.client`), which every command imports
first and which imports almost nothing, and the wire format both sides speak
(:mod:`convstore.daemon.protocol`) are this package's other two modules.
"""

from __future__ import annotations

import atexit
import ctypes
import errno
import gc
import io
import json
import os
import resource
import select
import selectors
import signal
import socket
import stat
import struct
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterable

from .client import connect, request
from .protocol import (
    MAX_REQUEST,
    RELAYED,
    STATUS,
    DaemonError,
    WireError,
    decimal,
    decode_request,
    fingerprint,
    peer,
    private_dir,
    recv_exact,
    recv_message,
    send_frame,
    send_message,
    socket_path,
)

REQUEST_TIMEOUT = 5.0  # a client silent this long mid-request is dropped
#: the next spare waits this long for the running commands to end: its fork and its copy of the daemon's
#: memory (20-30 ms of CPU) do not compete with a command's start (a request that comes first forks one)
SPARE_DELAY = 0.5
# requests read at once, each up to MAX_REQUEST: whoever can connect (any process of the user, in any
# context or cgroup) holds no more of the daemon's memory and descriptors than this; more are dropped
MAX_PENDING = 32
SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)  # Linux 6.5; Python 3.11's socket module lacks the name

__all__ = ["Daemon", "DaemonError", "close_inherited", "request", "restart_if_stale", "scrub_environment",
           "socket_path"]


# what a command's process may differ in from the daemon's without running with more than it had
# (not compared: cgroups, which differ between a user's terminals, and LSM labels; docs/architecture.md)
_CONTEXT_NS = ("mnt", "pid", "net", "user", "ipc", "uts", "cgroup", "time")
_CONTEXT_STATUS = ("Uid:", "Gid:", "Groups:", "CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:",
                   "NoNewPrivs:", "Seccomp:", "Seccomp_filters:")


# the resource limits /proc/PID/limits shows, by name: all of Linux's (Python names no RLIMIT_LOCKS: 10)
_LIMITS = {"Max cpu time": resource.RLIMIT_CPU, "Max file size": resource.RLIMIT_FSIZE,
           "Max data size": resource.RLIMIT_DATA, "Max stack size": resource.RLIMIT_STACK,
           "Max core file size": resource.RLIMIT_CORE, "Max resident set": resource.RLIMIT_RSS,
           "Max processes": resource.RLIMIT_NPROC, "Max open files": resource.RLIMIT_NOFILE,
           "Max locked memory": resource.RLIMIT_MEMLOCK, "Max address space": resource.RLIMIT_AS,
           "Max file locks": getattr(resource, "RLIMIT_LOCKS", 10), "Max pending signals": resource.RLIMIT_SIGPENDING,
           "Max msgqueue size": resource.RLIMIT_MSGQUEUE, "Max nice priority": resource.RLIMIT_NICE,
           "Max realtime priority": resource.RLIMIT_RTPRIO, "Max realtime timeout": resource.RLIMIT_RTTIME}


_RLIM_MAX = (1 << 64) - 1  # a limit as the kernel holds it (rlim_t; this is RLIM_INFINITY, "unlimited")


def _rlim(value: int) -> int:
    """A limit as :mod:`resource` gives or takes it: Python 3.11 passes a ``rlim_t`` through a C long, so
    one past 2**63 - 1 is negative there (unlimited: -1), and a positive one that large overflows."""
    return value - (1 << 64) if resource.RLIM_INFINITY < 0 and value >= 1 << 63 else value


def _command_limits(pid: int | str) -> list[tuple[int, int, int]]:
    """The resource limits a command of process ``pid`` runs with: its own (``/proc/PID/limits``),
    never above this process's hard limits (a client cannot raise them by lying), as (resource, soft,
    hard) for :func:`resource.setrlimit`.  Compared as the kernel does, unsigned.  OSError if
    unreadable, ValueError if a limit is missing or unparsable."""
    def value(text: str) -> int:
        v = _RLIM_MAX if text == "unlimited" else int(text)
        if not 0 <= v <= _RLIM_MAX:
            raise ValueError(f"limit out of range: {text}")
        return v

    seen: dict[int, tuple[int, int]] = {}
    with open(f"/proc/{pid}/limits") as f:
        for line in f.read().splitlines()[1:]:
            name, rest = line[:26].strip(), line[26:].split()
            if name in _LIMITS and len(rest) >= 2:
                seen[_LIMITS[name]] = (value(rest[0]), value(rest[1]))
    if set(seen) != set(_LIMITS.values()):
        raise ValueError("/proc/PID/limits lacks a limit")
    out = []
    for res, (soft, hard) in sorted(seen.items()):
        hard = min(hard, resource.getrlimit(res)[1] & _RLIM_MAX)
        out.append((res, _rlim(min(soft, hard)), _rlim(hard)))
    return out


def _scheduling(pid: int | str) -> tuple[int, int]:
    """A process's nice value and scheduling policy (``/proc/PID/stat``): an unprivileged process
    cannot take back a higher priority, nor leave ``SCHED_IDLE``, so its command must not have them."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()  # after the command name, which may hold anything
    return int(fields[16]), int(fields[38])


def _peer_pidfd(conn: socket.socket, pid: int) -> int:
    """A pidfd of the process that connected (``SO_PEERPIDFD``: that process, even if its pid was
    reused since), or, on a kernel without it, one opened on its ``SO_PEERCRED`` pid at accept;
    -1 if neither (the connecting process is gone)."""
    try:
        (fd,) = struct.unpack("i", conn.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD, 4))
    except OSError as e:
        if e.errno != errno.ENOPROTOOPT:
            return -1  # ESRCH: it exited (its pid may be someone else's now)
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            return -1
    os.set_inheritable(fd, False)
    return fd


def _still(pidfd: int, pid: int) -> bool:
    """The process behind ``pidfd`` still has pid ``pid`` and has not exited: checked after its
    ``/proc/PID`` was read, it shows that what was read was that process's."""
    try:
        with open(f"/proc/self/fdinfo/{pidfd}") as f:
            same = any(line.split() == ["Pid:", str(pid)] for line in f)
    except OSError:
        return False
    poll = select.poll()
    poll.register(pidfd, select.POLLIN)  # readable once the process has exited
    return same and not poll.poll(0)


def _loaded_files() -> dict[str, tuple[int, int]]:
    """The size and modification time of every module file this process has loaded (convstore's,
    its dependencies', the standard library's)."""
    out: dict[str, tuple[int, int]] = {}
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if isinstance(path, str) and path not in out:
            try:
                st = os.stat(path)
            except OSError:
                continue
            out[path] = (st.st_size, st.st_mtime_ns)
    return out


def _files_changed(files: dict[str, tuple[int, int]]) -> bool:
    for path, seen in files.items():
        try:
            st = os.stat(path)
        except OSError:
            return True
        if (st.st_size, st.st_mtime_ns) != seen:
            return True
    return False


# inotify(7): what happens to a loaded file, and to the entries and the place of the folders holding them
_IN_FILE = 0x2 | 0x4 | 0x8 | 0x400 | 0x800  # MODIFY ATTRIB CLOSE_WRITE DELETE_SELF MOVE_SELF
_IN_DIR = 0x4 | 0x40 | 0x80 | 0x100 | 0x200 | 0x400 | 0x800  # ATTRIB MOVED_FROM MOVED_TO CREATE DELETE *_SELF
# a folder above those (to /): its entries added, removed or renamed (only the one on a watched path counts)
_IN_ABOVE = 0x40 | 0x80 | 0x100 | 0x200 | 0x400 | 0x800 | 0x20000000  # ... | IN_MASK_ADD
_IN_UNMOUNT, _IN_Q_OVERFLOW, _IN_IGNORED = 0x2000, 0x4000, 0x8000  # the watch itself is blind from then on
_IN_EVENT = struct.Struct("iIII")  # wd mask cookie len, then len bytes of name
_IN_NONBLOCK, _IN_CLOEXEC = os.O_NONBLOCK, os.O_CLOEXEC


#: filesystems whose files can change without an inotify event (on another host, the host side of a VM's
#: share, a FUSE server's backing store): a loaded file on one is statted at every command
_REMOTE_FS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "virtiofs", "ceph", "glusterfs", "afs", "lustre",
              "gpfs", "fuse", "fuseblk")


def _mountinfo() -> list[tuple[str, str, str]]:
    """/proc/self/mountinfo: (mount id, mount point, filesystem type), in mount order."""
    out = []
    with open("/proc/self/mountinfo", "rb") as f:
        for ln in f.read().splitlines():
            fields = ln.split()
            if len(fields) < 7 or b"-" not in fields[6:]:
                continue
            fstype = fields[fields.index(b"-", 6) + 1] if len(fields) > fields.index(b"-", 6) + 1 else b""
            point = os.fsdecode(fields[4].replace(b"\\040", b" ").replace(b"\\011", b"\t")
                                .replace(b"\\012", b"\n").replace(b"\\134", b"\\"))
            out.append((os.fsdecode(fields[0]), point, os.fsdecode(fstype)))
    return out


def _under(path: str, point: str) -> bool:
    return path == point or path.startswith(point.rstrip("/") + "/")


def _mounts_over(paths: Iterable[str]) -> set[tuple[str, str]]:
    """The mounts (id, mount point; /proc/self/mountinfo) at or above any of ``paths``: a mount made over
    one of them (or over a folder above) hides the watched files without an inotify event."""
    mounts = _mountinfo()
    return {(mid, point) for mid, point, _ in mounts if any(_under(p, point) for p in paths)}


def _on_remote_fs(paths: Iterable[str]) -> bool:
    """Whether one of ``paths`` is on a filesystem of :data:`_REMOTE_FS` (the deepest mount at or above it,
    the last one of those)."""
    mounts = _mountinfo()
    for p in paths:
        fstype, depth = "", -1
        for _mid, point, t in mounts:
            if _under(p, point) and len(point) >= depth:
                fstype, depth = t, len(point)
        if fstype.split(".")[0] in _REMOTE_FS:
            return True
    return False


class _CodeWatch:
    """Whether a module file the daemon loaded changed on disk since it started (then it serves no
    more).  The answer is :func:`_files_changed` (a stat of each of ~1,000 files: 5-7 ms of every
    command's hand-over), asked only when inotify reported something since the last time: a write, a
    metadata change, a removal or a rename of one of those files, an entry added, removed or renamed in a
    folder holding one, or such a folder moved; an entry of a folder above (to /) on the path of one
    renamed, replaced or removed (a venv or a release symlink swapped); the kernel's queue overflowed or a
    watch went away (an unmount).  A change of the mount table (/proc/self/mountinfo polls) that mounts or
    unmounts at or above a watched folder hides files from the watches: from then on, and without
    inotify (no watches left), every time."""

    def __init__(self) -> None:
        self.fd = -1
        self._mounts: io.BufferedReader | None = None  # /proc/self/mountinfo, open: POLLPRI when the mount table changed
        self._above: dict[int, set[bytes]] = {}  # watch of a folder above -> the names on watched paths
        self._folders: set[str] = set()
        self._over: set[tuple[str, str]] = set()
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        except (OSError, AttributeError):
            fd = -1
        if fd >= 0:  # the watches first, then the snapshot: any change after it is seen
            files: set[str] = set()
            folders: set[str] = set()
            for module in list(sys.modules.values()):
                path = getattr(module, "__file__", None)
                if isinstance(path, str):
                    files.add(path)
                    folders.add(os.path.dirname(path))
                    folders.update(p for p in getattr(module, "__path__", ()) if isinstance(p, str))
            folders = {os.path.abspath(d) for d in folders}
            folders |= {os.path.realpath(d) for d in folders}  # through a symlink: the real folders' places too
            above: dict[str, set[bytes]] = {}
            for d in folders:
                while True:
                    up, name = os.path.split(d)
                    if not name or up == d:
                        break
                    above.setdefault(up, set()).add(os.fsencode(name))
                    d = up
            try:
                self._mounts = open("/proc/self/mountinfo", "rb")  # noqa: SIM115 - held open: its poll says when
                self._over = _mounts_over(folders)
                self._folders = folders
                if _on_remote_fs(folders):  # changes there make no event here
                    raise OSError(errno.EREMOTE, "a loaded module on a network or FUSE filesystem")
                whole: set[int] = set()  # the watches of the files and their folders: any event counts
                for path, mask in [*((f, _IN_FILE) for f in files), *((d, _IN_DIR) for d in folders)]:
                    wd = libc.inotify_add_watch(fd, os.fsencode(path), mask)
                    if wd < 0 and os.path.exists(path):
                        raise OSError(ctypes.get_errno(), path)  # e.g. ENOSPC: no watches left for this user
                    whole.add(wd)
                for path, names in above.items():
                    wd = libc.inotify_add_watch(fd, os.fsencode(path), _IN_ABOVE)
                    if wd < 0 and os.path.exists(path):
                        raise OSError(ctypes.get_errno(), path)
                    if wd >= 0 and wd not in whole:
                        self._above.setdefault(wd, set()).update(names)
                self.fd = fd
            except (OSError, ValueError):
                os.close(fd)
                self._close_mounts()
        self.files = _loaded_files()
        self.seen = False

    def _close_mounts(self) -> None:
        if self._mounts is not None:
            self._mounts.close()
            self._mounts = None

    def _reported(self) -> bool:
        """Whether inotify or the mount table reported something that may change a loaded file (read now;
        what comes after stays)."""
        poll = select.poll()
        poll.register(self.fd, select.POLLIN)
        if self._mounts is not None:
            poll.register(self._mounts.fileno(), select.POLLPRI)
        events = dict(poll.poll(0))
        if self._mounts is not None and events.get(self._mounts.fileno(), 0) & (select.POLLPRI | select.POLLERR):
            try:
                moved = _mounts_over(self._folders) != self._over  # the watches may see other files than the paths
            except OSError:
                moved = True
            if moved:
                self.close()
                return True
        if not events.get(self.fd, 0) & select.POLLIN:
            return False
        data = b""
        try:
            while chunk := os.read(self.fd, 65536):
                data += chunk
        except BlockingIOError:
            pass
        pos, hit = 0, False
        while pos + _IN_EVENT.size <= len(data):
            wd, mask, _cookie, n = _IN_EVENT.unpack_from(data, pos)
            name = data[pos + _IN_EVENT.size:pos + _IN_EVENT.size + n].rstrip(b"\0")
            pos += _IN_EVENT.size + n
            if mask & (_IN_Q_OVERFLOW | _IN_UNMOUNT | _IN_IGNORED) or wd not in self._above \
                    or name in self._above[wd] or mask & 0xC00:  # a folder above moved or removed itself
                hit = True
        return hit

    def changed(self) -> bool:
        if self.seen:
            return True
        if self.fd >= 0 and not self._reported():
            return False
        self.seen = _files_changed(self.files)
        return self.seen

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self._close_mounts()


# what the daemon's own environment keeps (no secret of whatever started it: every command's
# /proc/PID/environ shows it); a command gets its client's environment in-process
_KEEP_ENV = ("PATH", "HOME", "LANG", "TZ", "TMPDIR", "CONVSTORE_DAEMON_SOCKET")


def _own_process() -> bool:
    """This process is ``convstore``, ``python -m convstore`` or ``python -m convstore.cli`` (not a
    program that calls the CLI in-process), so ``sys.orig_argv`` starts it again."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return (spec is not None and spec.name in ("convstore.__main__", "convstore.cli")
            or os.path.basename(getattr(main, "__file__", None) or "") == "convstore")


def scrub_environment(path: str, args: list[str]) -> None:
    """Re-execute this process (``convstore daemon``) with a minimal environment: what names the
    socket (``path``), the locale, ``PATH``, ``HOME``, ``TMPDIR``, ``TZ`` and the interpreter's
    ``PYTHON*`` settings (the code fingerprint depends on them); and with only the interpreter's options
    and ``daemon ARGS`` as its command line (a global option before ``daemon``, a key URI or a user name,
    would stay in every command's ``/proc/PID/cmdline``).  Returns when it already has both;
    :class:`DaemonError` when this process is not ``convstore``'s own (``sys.orig_argv`` would not start
    the daemon, and what it was started with would stay)."""
    if not _own_process():
        raise DaemonError("start the daemon as `convstore daemon` or `python -m convstore daemon`: this process "
                          "cannot start itself again without its launcher's environment")
    env = {k: v for k, v in os.environ.items() if k in _KEEP_ENV or k.startswith(("LC_", "PYTHON"))}
    env["CONVSTORE_DAEMON_SOCKET"] = os.path.abspath(path)
    # sys.orig_argv: the interpreter, its options, the script (or -m convstore), then sys.argv[1:]
    argv = [*sys.orig_argv[1:len(sys.orig_argv) - (len(sys.argv) - 1)], "daemon", *args]
    if env == dict(os.environ) and argv == sys.orig_argv[1:]:
        return
    for f in (sys.stdout, sys.stderr):
        f.flush()
    os.execve(sys.executable, [sys.executable, *argv], env)


def restart_if_stale(server: Daemon) -> None:
    """Once a daemon that stopped because its loaded code changed on disk has seen its commands end,
    start it again as it was started (same arguments, its scrubbed environment, the folder it started in
    if no one else can have put code there), on the new code."""
    if not server.stale or not _own_process():
        return
    try:
        os.chdir(server.launch_cwd)
        st = os.stat(".")
    except OSError:
        return
    # ``python -m`` imports from there (and relative paths in its arguments name things there): only the
    # folder it was started in, still this user's (or root's) and closed to others, else it stays stopped
    if ((st.st_dev, st.st_ino) != server.launch_dir or st.st_uid not in (os.getuid(), 0)
            or st.st_mode & 0o022):
        return
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], dict(os.environ))


def _context(pid: int | str) -> list[str]:
    """A process's root, namespaces, ids, groups, capabilities and seccomp/no_new_privs state
    (OSError if unreadable)."""
    out = [os.readlink(f"/proc/{pid}/root")]
    out += [os.readlink(f"/proc/{pid}/ns/{ns}") for ns in _CONTEXT_NS if os.path.exists(f"/proc/self/ns/{ns}")]
    with open(f"/proc/{pid}/status") as f:
        out += [line.strip() for line in f if line.startswith(_CONTEXT_STATUS)]
    return out


# ---------------------------------------------------------------- the server


class _Child:
    """A running command: its process (and process group) and its client's connection."""

    def __init__(self, pid: int, conn: socket.socket, status: socket.socket | None = None) -> None:
        self.pid, self.conn, self.connected, self.buf = pid, conn, True, b""
        self.status = status  # the command's own socket: its exit status, sent just before it exits
        self.reported = False  # its client has its exit status (it may not be reaped yet)


class _Status:
    """Selector data: a command's socket to the daemon, on which it says its exit status."""

    def __init__(self, child: _Child) -> None:
        self.child = child


class _Pending:
    """A client whose request is still arriving (read as its bytes come, never waited for), or who
    was accepted and has yet to commit: its connection, the pid and a pidfd of the process that
    connected, and what was checked of its request."""

    def __init__(self, conn: socket.socket, pid: int, pidfd: int) -> None:
        self.conn, self.pid, self.pidfd = conn, pid, pidfd
        self.deadline = time.monotonic() + REQUEST_TIMEOUT
        self.buf = bytearray()
        self.body = b""  # the whole request, once accepted
        self.limits: list[tuple[int, int, int]] = []  # its command's resource limits, once accepted
        self.scheduling = (0, 0)  # and its nice value and scheduling policy

    def close_pidfd(self) -> None:
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


class _Spare:
    """The next command's process, forked ahead, and the daemon's end of its socket."""

    def __init__(self, pid: int, sock: socket.socket) -> None:
        self.pid, self.sock = pid, sock


class _Command:
    """A ``run`` request's fields, checked: program name, umask, argument
    count, ignored signals, fingerprint, the arguments, then the environment."""

    __slots__ = ("prog", "umask", "ignored", "fingerprint", "argv", "env")

    def __init__(self, prog: str, umask: int, ignored: list[int], fingerprint: str, argv: list[str],
                 env: dict[str, str]) -> None:
        self.prog, self.umask, self.ignored, self.fingerprint, self.argv, self.env = (
            prog, umask, ignored, fingerprint, argv, env)

    @classmethod
    def parse(cls, fields: list[str]) -> _Command:
        if len(fields) < 5:
            raise WireError("malformed request")
        umask, argc = decimal(fields[1]), decimal(fields[2])
        ignored = [decimal(i) for i in fields[3].split(",")] if fields[3] else []
        if umask > 0o777 or len(fields) < 5 + argc or not all(i in RELAYED for i in ignored):
            raise WireError("malformed request")
        env: dict[str, str] = {}
        for item in fields[5 + argc:]:
            key, eq, value = item.partition("=")
            if not key or not eq:
                raise WireError("malformed environment")
            env[key] = value
        return cls(fields[0], umask, ignored, fields[4], fields[5:5 + argc], env)


class Daemon:
    """The fork server.  ``entry(prog)`` runs one command in a forked child
    (it reads ``sys.argv``; ``prog`` names the program in usage lines)."""

    def __init__(self, path: str, entry: Callable[[str], None], version: str) -> None:
        self.path, self.entry, self.version = os.path.abspath(path), entry, version
        self.fingerprint = fingerprint()
        self.context = _context("self")
        self.children: dict[int, _Child] = {}
        self.served = 0
        self.max_rss_kib = 0  # the largest peak RSS of a command's child
        self.stopping = False
        self.started = 0.0
        self.listener: socket.socket | None = None
        self.spare: _Spare | None = None
        self._respawn = False
        self._respawn_at = 0.0
        self._reserve = -1
        self._inode: tuple[int, int] | None = None
        self._pending: set[_Pending] = set()
        self._code: _CodeWatch | None = None
        self.stale = False  # a module file it loaded changed on disk: it stopped, to start again
        self.launch_cwd = os.getcwd()  # where it was started (``python -m convstore`` may import from there)
        st = os.stat(".")
        self.launch_dir = (st.st_dev, st.st_ino)  # that folder, not whatever later has its name

    def bind(self) -> None:
        """Create the socket (0600, in a 0700 directory of this user), or
        explain why not; a live daemon at the same path is an error, a dead
        one's socket is replaced."""
        folder = os.path.dirname(self.path)
        os.makedirs(folder, mode=0o700, exist_ok=True)
        if not private_dir(os.lstat(folder)):
            raise DaemonError(f"{folder} must be a directory of this user that no one else can write "
                              f"(someone else's, a link, or open to others): remove it, or set "
                              f"XDG_RUNTIME_DIR or CONVSTORE_DAEMON_SOCKET to a place of your own")
        live = connect(self.path)
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
        except OSError as e:
            s.close()
            raise DaemonError(f"cannot listen at {self.path} ({e}): set CONVSTORE_DAEMON_SOCKET to a shorter path "
                              f"of your own") from None
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
        assert self.listener is not None
        self.listener.listen(64)  # again, in this process: SO_PEERCRED names the listening process to clients
        self.started = time.time()
        self._code = _CodeWatch()  # after the imports: rechecked at each command
        self._forget_launch_folder()
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
        self._reserve = _reserve_fd()
        self._inherited = [wake_r, wake_w]
        self._selector = sel
        self._respawn = True
        try:
            while not (self.stopping and not self.children):
                # here, between requests, it inherits no request's descriptors
                if self._respawn and (not self._live() or time.monotonic() >= self._respawn_at):
                    self._spawn_spare()
                timeout = None
                if self._pending:
                    timeout = max(0.0, min(p.deadline for p in self._pending) - time.monotonic())
                if self._respawn:
                    timeout = max(0.0, min(timeout if timeout is not None else SPARE_DELAY,
                                           self._respawn_at - time.monotonic()))
                for key, _ in sel.select(timeout):
                    if key.fileobj is self.listener:
                        self._accept()
                    elif key.fileobj == wake_r:
                        while True:
                            try:
                                if not os.read(wake_r, 512):
                                    break
                            except BlockingIOError:
                                break
                    elif isinstance(key.data, _Pending):
                        self._from_pending(key.data)
                    elif isinstance(key.data, _Status):
                        self._from_status(key.data.child)
                    else:
                        self._from_client(key.data)
                now = time.monotonic()
                for p in [p for p in self._pending if p.deadline <= now]:  # silent for too long: dropped
                    self._drop(p)
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

    def _forget_launch_folder(self) -> None:
        """``python -m`` put the folder the daemon started in first on ``sys.path``: a command importing
        a module the daemon has not (``pkcs11``, say) must not look there, whatever folder its client is
        in (anyone who can write there would choose its code), unless convstore itself comes from it."""
        package_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        if sys.path and os.path.abspath(sys.path[0]) == self.launch_cwd != package_parent:
            del sys.path[0]

    def _stop_listening(self) -> None:
        self.stopping = True
        for p in list(self._pending):  # nothing of theirs has run: an accepted one is told to run it itself
            if p.body:
                try:
                    send_frame(p.conn, b"F", b"the daemon stopped")
                except OSError:
                    pass
            self._drop(p)
        if self.spare is not None:  # it reads the end of its socket, and exits
            self.spare.sock.close()
            self.spare = None
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

    def _live(self) -> bool:
        """A command is running: one that has not said its exit status yet."""
        return any(not c.reported for c in self.children.values())

    def _reap(self) -> None:
        while True:
            try:
                pid, status, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if self.spare is not None and pid == self.spare.pid:  # died idle (killed): the next command makes one
                self.spare.sock.close()
                self.spare = None
            child = self.children.pop(pid, None)
            if child is None:
                continue
            self.max_rss_kib = max(self.max_rss_kib, usage.ru_maxrss)
            self._close_status(child)
            if child.reported:  # it said its status before it exited: its client has it
                continue
            if child.connected:
                self._selector.unregister(child.conn)
            try:
                if os.WIFSIGNALED(status):
                    send_frame(child.conn, b"K", STATUS.pack(os.WTERMSIG(status)))
                else:
                    send_frame(child.conn, b"X", STATUS.pack(os.waitstatus_to_exitcode(status)))
            except OSError:
                pass
            child.conn.close()

    def _close_status(self, child: _Child) -> None:
        if child.status is not None:
            self._selector.unregister(child.status)
            child.status.close()
            child.status = None

    def _from_status(self, child: _Child) -> None:
        """A command's exit status, said as it ends (its streams flushed and closed): reported to its
        client at once, not after the kernel has torn the process down (5-10 ms for a command that
        touched ~50 MB); anything else, or nothing, and the status is reported when it is reaped."""
        assert child.status is not None
        try:
            data = child.status.recv(16)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        self._close_status(child)
        if len(data) != 1 + STATUS.size or data[:1] != b"E" or child.reported:
            return
        child.reported = True
        if child.connected:
            self._selector.unregister(child.conn)
            child.connected = False
        try:
            send_frame(child.conn, b"X", data[1:])
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
        """Take a connection of this user and read its request as it arrives (:meth:`_from_pending`):
        a client that trickles its bytes holds up no one else."""
        assert self.listener is not None
        try:
            conn, _ = self.listener.accept()
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE) and self._reserve >= 0:
                # out of descriptors: the pending client would keep the listener readable (a busy loop);
                # the reserve descriptor makes room to take it and drop it (it falls back)
                os.close(self._reserve)
                try:
                    self.listener.accept()[0].close()
                except OSError:
                    pass
                self._reserve = _reserve_fd()
            return
        try:
            pid, uid = peer(conn)
        except OSError:
            conn.close()
            return
        if uid != os.getuid() or len(self._pending) >= MAX_PENDING:  # too many: it runs its command itself
            conn.close()
            return
        p = _Pending(conn, pid, _peer_pidfd(conn, pid))  # taken now: the process that connected
        conn.setblocking(False)
        self._pending.add(p)
        self._selector.register(conn, selectors.EVENT_READ, p)

    def _drop(self, p: _Pending) -> None:
        if p in self._pending:
            self._pending.discard(p)
            self._selector.unregister(p.conn)
            p.conn.close()
            p.close_pidfd()

    def _from_pending(self, p: _Pending) -> None:
        try:
            if p.body:
                self._commit(p)
            else:
                self._read_request(p)
        except Exception:  # noqa: BLE001 - one bad request never takes the daemon down
            self._drop(p)

    def _read_request(self, p: _Pending) -> None:
        """What has arrived of a request (length, then body; never past it); handled once whole."""
        want = 4 - len(p.buf) if len(p.buf) < 4 else 4 + struct.unpack("!I", p.buf[:4])[0] - len(p.buf)
        data = p.conn.recv(min(want, 1 << 20))
        if not data:
            raise EOFError
        p.buf += data
        if len(p.buf) < 4:
            return
        (n,) = struct.unpack("!I", p.buf[:4])
        if n > MAX_REQUEST:
            raise WireError("request too large")
        if len(p.buf) < 4 + n:
            return
        body, p.buf = bytes(p.buf[4:]), bytearray()
        try:
            op, fields = decode_request(body)
        except WireError as e:
            if e.version:
                send_frame(p.conn, b"F", b"protocol version")
            raise
        if op == "run":
            self._accept_run(p, body, fields)
            return
        if op in ("status", "stop") and not fields:
            send_frame(p.conn, b"I", json.dumps(self.status()).encode())
            if op == "stop":
                self._stop_listening()
        self._drop(p)

    def status(self) -> dict[str, object]:
        return {"pid": os.getpid(), "socket": self.path, "version": self.version,
                "code": os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "served": self.served,
                "running": len(self.children), "spare": self.spare.pid if self.spare else None,
                "started": self.started, "stopping": self.stopping,
                "rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                "command_max_rss_kib": self.max_rss_kib}

    def _accept_run(self, p: _Pending, body: bytes, fields: list[str]) -> None:
        """Check a ``run`` request: the client's code, this daemon's (unchanged on disk since it
        started), the client's context and resource limits, read from ``/proc`` while the process that
        connected demonstrably still had that pid; then answer "accepted"."""
        cmd = _Command.parse(fields)
        if cmd.fingerprint != self.fingerprint:
            send_frame(p.conn, b"F", b"the daemon runs other code than this client; restart it")
            raise ValueError("stale")
        if self._code is None or self._code.changed():  # an edited or upgraded dependency: it serves no more
            send_frame(p.conn, b"F", b"the daemon's code changed on disk since it started; it restarts")
            self.stale = True
            self._stop_listening()
            raise ValueError("stale")
        try:
            context, limits, scheduling = _context(p.pid), _command_limits(p.pid), _scheduling(p.pid)
        except (OSError, ValueError, IndexError):
            context, limits, scheduling = [], [], (0, 0)
        if p.pidfd < 0 or not _still(p.pidfd, p.pid):  # the pid read may be another process's now
            send_frame(p.conn, b"F", b"the process that connected has exited")
            raise ValueError("gone")
        if context != self.context:  # another namespace, fewer capabilities, a sandbox: it runs there
            send_frame(p.conn, b"F", b"the client runs in another context than the daemon")
            raise ValueError("context")
        p.body, p.limits, p.scheduling = body, limits, scheduling
        p.deadline = time.monotonic() + REQUEST_TIMEOUT
        send_frame(p.conn, b"A")

    def _commit(self, p: _Pending) -> None:
        """The client's commitment (``G``, with its descriptors): hand the command to a spare."""
        go, fds, flags, _ = socket.recv_fds(p.conn, 1, 8)
        try:
            if go != b"G":
                raise ValueError("not committed")
            if len(fds) != 4 or flags & getattr(socket, "MSG_CTRUNC", 8):  # e.g. this daemon at its fd limit
                send_frame(p.conn, b"F", b"the client's descriptors did not arrive")
                raise ValueError("no descriptors")
            if not _still(p.pidfd, p.pid):  # if nothing else is left of the client, nothing runs
                send_frame(p.conn, b"F", b"the process that connected has exited")
                raise ValueError("gone")
            self._pending.discard(p)
            self._selector.unregister(p.conn)
            p.close_pidfd()
            conn = p.conn
            conn.setblocking(True)
            try:
                taken = self._hand_over(conn, p.body, p.limits, p.scheduling, fds)
            except Exception:  # noqa: BLE001 - no spare has it: nothing ran, the client runs it itself
                taken = False
            if not taken:
                try:
                    send_frame(conn, b"F", b"fork failed")
                except OSError:
                    pass
                conn.close()
        finally:
            for fd in fds:
                os.close(fd)

    def _hand_over(self, conn: socket.socket, body: bytes, limits: list[tuple[int, int, int]],
                   scheduling: tuple[int, int], fds: list[int]) -> bool:
        """Give the command to a spare (another once if it fails); False if none took it (nothing ran)."""
        for _attempt in (0, 1):  # a spare that died idle is replaced once
            if self.spare is None:
                self._spawn_spare([conn.fileno(), *fds])
            spare, self.spare = self.spare, None
            if spare is None:
                break
            started = False
            try:
                # bounded: a spare that does not take its command (stopped, or copying a huge mapping) is replaced
                spare.sock.settimeout(REQUEST_TIMEOUT)
                socket.send_fds(spare.sock, [b"C"], fds)  # the client's descriptors, then its request
                send_message(spare.sock, body)
                send_message(spare.sock, json.dumps([limits, scheduling]).encode())
                try:
                    started = recv_exact(spare.sock, 1) == b"R"  # it is the command now (idle signals dropped)
                except TimeoutError:
                    # stopped or stuck: it must not start later, unsupervised.  Killed, its socket ends; an
                    # acknowledgement it sent first says the command had started (and is reported as killed)
                    _killpg(spare.pid, signal.SIGKILL)
                    try:
                        started = spare.sock.recv(1) == b"R"
                    except TimeoutError:
                        started = True  # not even gone (uninterruptible): reported when it is, never run again
            except (OSError, EOFError):
                pass  # not all sent, or it died before taking it: nothing ran there
            if not started:
                spare.sock.close()
                _killpg(spare.pid, signal.SIGKILL)
                continue
            self.served += 1
            child = self.children[spare.pid] = _Child(spare.pid, conn, spare.sock)
            self._selector.register(conn, selectors.EVENT_READ, child)
            spare.sock.setblocking(False)
            self._selector.register(spare.sock, selectors.EVENT_READ, _Status(child))
            self._respawn = True  # the next command's, made once this request's descriptors are closed
            self._respawn_at = time.monotonic() + SPARE_DELAY
            return True
        return False

    def _spawn_spare(self, close: list[int] | None = None) -> None:
        """Fork the next command's process before its command comes.  While
        it waits, it copies the daemon's writable memory for itself
        (``MADV_POPULATE_WRITE``): the copy-on-write faults a forked command
        would take as it touches its objects (3,000, 15-25 ms here) are
        taken before the command starts, not while it runs.  ``close``: the
        descriptors of a request being handled, which it must not keep."""
        self._respawn = False
        if self.spare is not None or self.stopping:
            return
        try:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError:
            return  # as a failed fork: no spare (the command is told to run in its client)
        old = signal.pthread_sigmask(signal.SIG_BLOCK, (*RELAYED, signal.SIGCHLD))  # held until it is the command
        try:
            pid = os.fork()
        except OSError:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
            ours.close()
            theirs.close()
            return
        if pid == 0:
            code = 70  # EX_SOFTWARE: the child could not become the client's process
            try:
                ours.close()
                for fd in close or ():
                    os.close(fd)
                code = self._spare(theirs, old)
            except BaseException as e:  # noqa: BLE001 - reported on the client's stderr, never unwound into the server
                os.write(2, f"convstore: internal error in the daemon's child: {type(e).__name__}: {e}\n".encode(
                    errors="backslashreplace"))
            finally:
                os._exit(code)
        theirs.close()
        try:
            os.setpgid(pid, pid)
        except OSError:
            pass  # the child did it first, or is already gone
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
        self.spare = _Spare(pid, ours)

    def _spare(self, sock: socket.socket, mask: Iterable[int]) -> int:
        """In the forked spare: leave the daemon's state, wait for a command,
        become the client's process, run the command, return its exit status
        (0 without a command: the daemon stopped)."""
        os.setpgid(0, 0)
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        self._selector.close()
        for fd in self._inherited:
            os.close(fd)
        if self._reserve >= 0:
            os.close(self._reserve)
        if self._code is not None:
            self._code.close()
        if self.listener is not None:
            self.listener.close()
        for other in self.children.values():
            other.conn.close()
        for p in self._pending:  # other clients' requests, still arriving
            p.conn.close()
            p.close_pidfd()
        _parent_death_signal(signal.SIGHUP)  # a daemon that dies takes its commands with it, as a terminal would
        _prefault(lambda: bool(select.select([sock], [], [], 0)[0]))
        try:
            go, fds, _flags, _ = socket.recv_fds(sock, 1, 4)
            if go != b"C" or len(fds) != 4:
                return 0
            body = recv_message(sock)
            limits, (nice, policy) = json.loads(recv_message(sock))
            for res, soft, hard in limits:  # never more than the client had
                resource.setrlimit(res, (soft, hard))
            if nice > os.getpriority(os.PRIO_PROCESS, 0):  # nor a higher priority (a lower one it may have)
                os.setpriority(os.PRIO_PROCESS, 0, nice)
            if policy in (os.SCHED_BATCH, os.SCHED_IDLE) and os.sched_getscheduler(0) != policy:
                os.sched_setscheduler(0, policy, os.sched_param(0))
            # a signal sent to this process while it idled was not meant for the command it is about to run
            while signal.sigtimedwait(RELAYED, 0) is not None:
                pass
            sock.sendall(b"R")  # from here the daemon relays the client's signals to this process
        except (OSError, EOFError, ValueError):
            return 0  # no command (the daemon stopped or gave up on this spare), or unfit: nothing runs
        status_sock = sock  # kept for the exit status (below)
        cmd = _Command.parse(decode_request(body)[1])
        for i in cmd.ignored:  # what the client ignores (nohup), its command ignores too
            signal.signal(i, signal.SIG_IGN)
        for target, fd in enumerate(fds[:3]):
            os.dup2(fd, target)
        os.fchdir(fds[3])
        for fd in fds:
            if fd > 2:
                os.close(fd)
        os.umask(cmd.umask)
        os.environ.clear()
        os.environ.update(cmd.env)
        tempfile.tempdir = None
        from ..stores import faults

        faults.configure()
        sys.stdin = _stream(0, "r", cmd.env)
        sys.stdout = _stream(1, "w", cmd.env)
        sys.stderr = _stream(2, "w", cmd.env)
        sys.argv = ["convstore", *cmd.argv]
        prog = cmd.prog
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
            # the command is over: its streams closed (a reader of its output sees the end now) and its
            # status said, before the kernel tears this process down
            os.closerange(0, 3)
            try:
                status_sock.sendall(b"E" + STATUS.pack(code & 0xFF))
            except OSError:
                pass  # the daemon reports it when it reaps this process
            status_sock.close()
        return code


def _reserve_fd() -> int:
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return -1


def close_inherited() -> None:
    """Close the descriptors above 2 this process inherited (a launcher's
    pipe, say): called before the daemon opens anything of its own, so that
    no command it forks holds them open (a reader waiting for their end
    would wait for the daemon's)."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            # what survived an exec is inheritable; what Python and its modules open is not (PEP 446)
            if fd > 2 and os.get_inheritable(fd):
                os.close(fd)
        except OSError:
            pass  # the directory listing's own descriptor, already closed


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
    ctypes.CDLL(None, use_errno=True).prctl(1, int(sig), 0, 0, 0)
    if os.getppid() == 1:  # it already died
        os.kill(os.getpid(), sig)


def _killpg(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


_MADV_POPULATE_WRITE = 23  # Linux 5.14


def _prefault(interrupted: Callable[[], bool]) -> None:
    """Copy this process's private writable memory now, mapping by mapping,
    until ``interrupted()`` (a command came); advisory: where the kernel lacks
    MADV_POPULATE_WRITE, the faults come later, as they would have."""
    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    try:
        with open("/proc/self/maps") as f:
            maps = f.read().splitlines()
    except OSError:
        return
    for line in maps:
        parts = line.split()
        if len(parts) < 2 or parts[1][1] != "w" or parts[1][3] != "p" or (len(parts) > 5 and parts[5] in (
                "[vvar]", "[vdso]", "[vsyscall]", "[vvar_vclock]")):
            continue
        if interrupted():
            return
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        madvise(lo, hi - lo, _MADV_POPULATE_WRITE)  # a failure leaves the faults for later
