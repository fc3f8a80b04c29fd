"""``--background``: start a service in a child and return once it serves.

The parent binds a datagram socket of its own in a private (0700) directory,
starts the child with ``$NOTIFY_SOCKET`` naming it and waits for the same
``READY=1`` systemd would get (:mod:`.sdnotify`), for the child's exit, or
for a timeout.  Only datagrams the kernel says come from the child's PID
count (``SO_PASSCRED``), as systemd's ``NotifyAccess=main``.  The child's
standard error, where its log goes, is a log file (0600, appended to, its
path printed), never a pipe that nobody reads once the parent is gone; a
child that fails to start is reported by its last error line.
"""

from __future__ import annotations

import os
import re
import select
import shutil
import socket
import struct
import subprocess
import time

from ..errors import ServiceError, ServiceStartFailed, ServiceStartTimeout
from ..hardening import private_tempdir

#: how long a background service may take to serve (a registry store's first scan included)
READY_TIMEOUT = 120.0


def default_log_dir() -> str:
    """``$CONVSTORE_LOG_DIR``, else ``/var/log/convstore`` for root, else ``<user state dir>/convstore/log``."""
    if os.environ.get("CONVSTORE_LOG_DIR"):
        return os.environ["CONVSTORE_LOG_DIR"]
    if os.geteuid() == 0:
        return "/var/log/convstore"
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "convstore", "log")


def default_log_file(service: str, mountpoint: str) -> str:
    """One log per service and mount point: ``layerstore@var-lib-convstore-layers.log``."""
    name = re.sub(r"[^A-Za-z0-9_.]+", "-", os.path.abspath(mountpoint).strip("/"))[:120] or "root"
    return os.path.join(default_log_dir(), f"{service}@{name}.log")


def open_log(path: str) -> tuple[int, int]:
    """Open ``path`` for appending (made 0600 in a 0700 folder if new; it may name images and registries)
    and return its descriptor and its size before this start."""
    path = os.path.abspath(path)
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError as e:
        raise ServiceError(f"cannot open the log file {path}: {e.strerror}") from None
    st = os.fstat(fd)
    if st.st_uid != os.geteuid() or st.st_mode & 0o077:
        os.close(fd)
        raise ServiceError(f"the log file {path} must be this user's and 0600 (it is {st.st_mode & 0o777:04o}, "
                           f"owner uid {st.st_uid})")
    return fd, st.st_size


class ReadyWaiter:
    """A private notify socket for one child (a context manager)."""

    def __init__(self) -> None:
        self._dir = private_tempdir("convstore-notify-")  # 0700, where no other user can swap it
        self.path = os.path.join(self._dir, "notify")
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.bind(self.path)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.status = ""

    def __enter__(self) -> ReadyWaiter:
        return self

    def __exit__(self, *exc: object) -> None:
        self._sock.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    def _messages(self, pid: int, timeout: float) -> list[dict[str, str]]:
        """The notifications of ``pid`` that arrive within ``timeout`` s (others are dropped)."""
        got: list[dict[str, str]] = []
        ready, _, _ = select.select([self._sock], [], [], timeout)
        while ready:
            data, anc, _flags, _addr = self._sock.recvmsg(4096, socket.CMSG_SPACE(12))
            sender = next((struct.unpack("iII", d[:12])[0] for level, kind, d in anc
                           if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS), None)
            if sender == pid:
                got.append(dict(line.split("=", 1) for line in data.decode(errors="replace").splitlines()
                                if "=" in line))
            ready, _, _ = select.select([self._sock], [], [], 0)
        return got

    def wait(self, proc: subprocess.Popen[bytes], what: str, log_path: str, log_offset: int,
             timeout: float = READY_TIMEOUT) -> str:
        """Wait until ``proc`` says ``READY=1`` (returns its ``STATUS=``), exits
        (:class:`ServiceStartFailed` with its error line; with its last line
        and the log's path if it said none) or times out
        (:class:`ServiceStartTimeout`; it is stopped)."""
        deadline = time.monotonic() + timeout
        while True:
            for msg in self._messages(proc.pid, 0.05):
                self.status = msg.get("STATUS", self.status)
                if msg.get("READY") == "1":
                    return self.status
            if proc.poll() is not None:
                for msg in self._messages(proc.pid, 0):  # it may have said why before it went
                    self.status = msg.get("STATUS", self.status)
                said, clean = last_error(log_path, log_offset)
                if clean:  # its own error line, as the command in the foreground says it
                    raise ServiceStartFailed(said)
                raise ServiceStartFailed(f"{what} exited with status {proc.returncode}"
                                         + (f": {said}" if said else "") + f" (log: {log_path})")
            if time.monotonic() > deadline:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                raise ServiceStartTimeout(f"{what} was not ready after {timeout:.0f} s"
                                          + (f" (last status: {self.status})" if self.status else "")
                                          + f"; stopped it (log: {log_path})")


def last_error(path: str, offset: int) -> tuple[str, bool]:
    """What the child wrote last after ``offset``: its error line (``convstore: error: ...``, True), else its
    last line (a traceback's, False)."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            lines = [ln.strip() for ln in f.read(1 << 20).decode(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "", False
    errors = [ln for ln in lines if ln.startswith("convstore: error: ")]
    if errors:
        return errors[-1].removeprefix("convstore: error: "), True
    return (lines or [""])[-1], False
